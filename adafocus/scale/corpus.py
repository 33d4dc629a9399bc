"""The input of ``adafocus batch``: a list of videos, each an id, a path (or URL) and an optional label.

A corpus is given as a directory, a glob, a video file, or a list file:

- ``*.csv`` with a header: a ``video`` (or ``path``) column, optional ``id`` and ``label`` columns; relative paths
  are resolved against the CSV's directory (the demo data's ``test.csv`` is such a list);
- ``*.jsonl``: one object per line with the same keys.

Paths are made absolute here, on the driver, so that every worker of a cluster reads the same file (the
directory must be visible to the workers at the same path, e.g. a network mount). A video's id is its
``id`` column, or else its path; ids must be unique, since resuming skips the ids already written.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from adafocus.errors import DataError

LIST_SUFFIXES = (".csv", ".jsonl")
_PATH_KEYS = ("video", "path")


@dataclass(frozen=True, kw_only=True)
class VideoItem:
    """One video of a corpus."""

    id: str
    path: str  # absolute path, or a URL as given
    truth: str | None = None  # the label given with the video, if any


def read_corpus(source: str | os.PathLike) -> list[VideoItem]:
    """The videos of ``source`` (a list file, a directory, a glob or a video), in input order.

    Raises DataError for a malformed list (the line and what is wrong), duplicate ids, or an empty corpus,
    and VideoError (from :func:`~adafocus.runtime.pipeline.expand_videos`) for a directory without videos or
    a glob that matches nothing. A listed file that does not exist is kept: it becomes an error row.
    """
    text = os.fspath(source)
    path = Path(text)
    if path.suffix.lower() in LIST_SUFFIXES and not any(ch in text for ch in "*?["):
        if not path.is_file():
            raise DataError(f"{path}: no such list file")
        read = _read_csv if path.suffix.lower() == ".csv" else _read_jsonl
        items = [_item(row, path, where) for where, row in read(path)]
    else:
        from adafocus.runtime.pipeline import expand_videos

        if not path.exists() and not any(ch in text for ch in "*?["):
            raise DataError(f"{source}: no such file or directory")
        items = [VideoItem(id=p, path=p) for p in (_absolute(v) for v in expand_videos([text]))]
    if not items:
        raise DataError(f"{source}: no videos listed")
    _check_unique(items, source)
    return items


def _read_csv(path: Path):
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [(f or "").strip() for f in reader.fieldnames or []]
        if not any(k in fields for k in _PATH_KEYS):
            raise DataError(f"{path}: the header must name a 'video' or 'path' column, got {fields}")
        for line, row in enumerate(reader, start=2):
            yield f"{path}:{line}", {(k or "").strip(): (v or "").strip() for k, v in row.items() if k}


def _read_jsonl(path: Path):
    with open(path, encoding="utf-8") as fh:
        for line, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line}: expected an object with 'video' or 'path', got {type(row).__name__}")
            yield f"{path}:{line}", row


def _item(row: dict, list_file: Path, where: str) -> VideoItem:
    video = next((row[k] for k in _PATH_KEYS if row.get(k) not in (None, "")), None)
    if not isinstance(video, str):
        raise DataError(f"{where}: no video path ('video' or 'path')")
    if "://" not in video:
        p = Path(video).expanduser()
        video = _absolute(p if p.is_absolute() else list_file.parent / p)
    label = row.get("label")
    vid = row.get("id")
    return VideoItem(id=str(vid) if vid not in (None, "") else video, path=video,
                     truth=str(label) if label not in (None, "") else None)


def _absolute(path: str | os.PathLike) -> str:
    return os.path.abspath(os.fspath(path))


def _check_unique(items: list[VideoItem], source) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise DataError(f"{source}: video id {item.id!r} is listed twice (ids must be unique to resume)")
        seen.add(item.id)

"""Labelled video data sets: a labels CSV per split, read without torch.

Format (what ``adafocus demo-data`` writes, and what training, calibration and benchmarks read):

- ``<root>/<split>.csv`` for split in train / val / test, with a header and the columns ``video,label``;
  ``video`` is a path relative to the CSV's directory (or absolute), ``label`` a class name;
- optionally ``<root>/labels.txt``, one class name per line, which fixes the class order. Without it the
  classes are the sorted distinct labels of the train split (or of the split given).

Extra columns are ignored, so a CSV with more metadata can be used as is.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from adafocus.errors import DataError

SPLITS = ("train", "val", "test")
LABELS_FILE = "labels.txt"


@dataclass(frozen=True)
class LabelledVideo:
    """One row of a labels CSV."""

    path: Path  # resolved against the CSV's directory
    label: str


def read_labels_csv(path: str | Path, check_files: bool = True) -> list[LabelledVideo]:
    """Rows of a ``video,label`` CSV. Raises DataError on a missing file, column or video."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels CSV not found: {path}")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "video" not in fields or "label" not in fields:
            raise DataError(f"{path}: the header must name the columns 'video' and 'label', got {fields}")
        rows = []
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if not row["video"] or not row["label"]:
                raise DataError(f"{path}:{line}: empty video or label")
            video = Path(row["video"])
            video = video if video.is_absolute() else path.parent / video
            if check_files and not video.is_file():
                raise DataError(f"{path}:{line}: video not found: {video}")
            rows.append(LabelledVideo(video, row["label"]))
    if not rows:
        raise DataError(f"{path}: no videos listed")
    return rows


def split_csv(root: str | Path, split: str) -> Path:
    """``<root>/<split>.csv``, or ``root`` itself when it is a CSV file."""
    root = Path(root)
    if root.suffix.lower() == ".csv":
        return root
    path = root / f"{split}.csv"
    if not path.is_file():
        found = sorted(p.name for p in root.glob("*.csv")) if root.is_dir() else []
        raise DataError(f"no {split}.csv in {root}" + (f" (found: {', '.join(found)})" if found else ""))
    return path


def load_split(root: str | Path, split: str, check_files: bool = True) -> list[LabelledVideo]:
    """The videos of one split of a data set directory."""
    return read_labels_csv(split_csv(root, split), check_files)


def class_names(root: str | Path, split: str = "train") -> list[str]:
    """Class names in index order: ``labels.txt`` if present, else the sorted labels of ``split``."""
    root = Path(root)
    directory = root.parent if root.suffix.lower() == ".csv" else root
    labels_file = directory / LABELS_FILE
    if labels_file.is_file():
        names = [line.strip() for line in labels_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(set(names)) != len(names):
            raise DataError(f"{labels_file}: duplicate class names")
        if not names:
            raise DataError(f"{labels_file} is empty")
        return names
    return sorted({v.label for v in load_split(root, split, check_files=False)})


def label_indices(videos: list[LabelledVideo], classes: list[str]) -> list[int]:
    """Class index of every video; an unknown label is a DataError naming it."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({v.label for v in videos} - set(index))
    if unknown:
        raise DataError(f"labels not among the {len(classes)} classes: {', '.join(unknown[:5])}")
    return [index[v.label] for v in videos]

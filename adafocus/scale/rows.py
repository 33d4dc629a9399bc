"""The row function of ``adafocus batch``: videos in, one small result row per video out.

The same function runs in-process (``--ray off``) and inside each Ray Data actor (:class:`RowClassifier`, a
callable class that ``map_batches`` runs in an actor pool). An actor opens the bundle once and runs the step
scheduler (``Pipeline.run_many``) over the videos of each batch it is given, many in flight; it decodes the
videos itself, so frames never enter Ray's object store: only these rows do.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from adafocus.scale.corpus import VideoItem

# the output schema: (column, arrow type); one place for the parquet and jsonl writers and the Ray batches
COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "string"), ("path", "string"), ("truth", "string"), ("status", "string"), ("label", "string"),
    ("score", "float64"), ("correct", "bool_"), ("exit_step", "int64"), ("exit_reason", "string"),
    ("gflops", "float64"), ("gflops_exit", "float64"), ("budget_gflops", "float64"), ("total_ms", "float64"),
    ("decode_ms", "float64"), ("error", "string"), ("worker", "string"),
)
INPUT_COLUMNS = ("id", "path", "truth")
FAULT_ENV = "ADAFOCUS_FAULT_EXIT_ONCE"  # fault injection for tests: see RowClassifier.__call__


@dataclass(frozen=True, kw_only=True)
class RunnerOptions:
    """How a worker opens the bundle and runs its videos (what ``--engine``, ``--budget`` ... of batch set)."""

    bundle: str
    engine: str = "auto"
    device: str = "cpu"
    threads: int | None = None  # CPU threads per engine (None: onnxruntime's default)
    budget: str | None = None  # per-video GFLOPs, a share of the dense cost, or None (the bundle's default)
    average: bool = False  # the budget is a calibrated average over videos, not a per-video cap
    batch: int = 4  # videos in flight in the step scheduler
    chunk: str = "auto"

    def open(self):
        """The worker's Pipeline (the bundle verified and its engines opened, once per worker)."""
        from adafocus.runtime.pipeline import Pipeline

        return Pipeline.from_bundle(self.bundle, engine=self.engine, device=self.device, threads=self.threads,
                                    chunk=self.chunk)


def check_runner(options: RunnerOptions) -> None:
    """The bundle's manifest and the budget checked on the driver, before any worker starts (a bad one is one
    error line, not workers that keep dying); the workers verify the checksums when they open the bundle."""
    from adafocus.bundle import load_bundle
    from adafocus.runtime.budget import parse_budget

    costs = load_bundle(options.bundle, verify=False).manifest.costs
    parse_budget(options.budget, list(costs.exits), float(getattr(costs, "dense", 0.0) or 0.0) or None)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def iter_rows(pipe, items: Iterable[VideoItem], budget: Any, batch: int) -> Iterator[dict]:
    """One row per item, as the videos finish: ``run_many`` over the items' paths, ``batch`` in flight; a video
    that fails (missing, corrupt, not a video, a URL that cannot be fetched) is an error row and the others go on.
    http(s) URLs are downloaded to a temporary directory first (removed at the end)."""
    from adafocus.errors import AdaFocusError

    with tempfile.TemporaryDirectory(prefix="adafocus-fetch-") as tmp:
        waiting: dict[str, deque[VideoItem]] = defaultdict(deque)  # a path may be listed twice under two ids
        paths: list[str] = []
        for n, item in enumerate(items):
            path = item.path
            if is_url(path):
                try:
                    path = fetch(path, Path(tmp) / f"{n}{Path(urlsplit(path).path).suffix or '.mp4'}")
                except (OSError, ValueError) as exc:
                    yield error_row(item, f"{item.path}: cannot download ({exc})")
                    continue
            waiting[path].append(item)
            paths.append(path)
        try:
            for path, res in pipe.run_many(paths, budget, topk=1, batch=batch):
                item = waiting[path].popleft()
                if isinstance(res, BaseException):  # a downloaded video's error names its URL, not the temp file
                    yield error_row(item, str(res).replace(path, item.path))
                else:
                    yield result_row(item, res)
        except AdaFocusError as exc:  # not one video's failure (e.g. an engine error): the videos not done yet
            for queue in waiting.values():
                while queue:
                    yield error_row(queue.popleft(), exc)


def is_url(path: str) -> bool:
    return urlsplit(path).scheme in ("http", "https")


def fetch(url: str, dest: Path, timeout: float = 60.0) -> str:
    """Download ``url`` to ``dest``; returns the path."""
    import shutil
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as fh:
        shutil.copyfileobj(resp, fh, 1 << 20)
    return str(dest)


def result_row(item: VideoItem, res: Any) -> dict:
    """The row of one video's VideoResult."""
    t = res.timings_ms
    return _row(item, status="ok", label=res.label, score=float(res.score),
                correct=None if item.truth is None else res.label == item.truth,
                exit_step=int(res.exit_step), exit_reason=res.exit_reason, gflops=float(res.gflops),
                gflops_exit=float(res.gflops_exit), budget_gflops=float(res.budget_gflops),
                total_ms=float(t.get("total", 0.0)), decode_ms=float(t.get("decode_background", t.get("decode", 0.0))))


def error_row(item: VideoItem, error: Any) -> dict:
    return _row(item, status="error", error=str(error).strip() or type(error).__name__)


def _row(item: VideoItem, **values: Any) -> dict:
    row = dict.fromkeys(name for name, _ in COLUMNS)
    row.update(id=item.id, path=item.path, truth=item.truth, worker=worker_name(), **values)
    return row


def arrow_schema():
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in COLUMNS])


def to_table(rows: list[dict]):
    """Rows as a pyarrow Table with the output schema."""
    import pyarrow as pa

    schema = arrow_schema()
    return pa.Table.from_pylist(rows, schema=schema)


class RowClassifier:
    """The Ray Data callable class: one per actor, the bundle opened once (``__init__``), then ``__call__`` on
    each batch of input rows (a pyarrow Table of id, path, truth) returns its result rows."""

    def __init__(self, options: RunnerOptions):
        self.options = options
        self.pipe = options.open()
        self.budget = self.pipe.budget(options.budget, options.average)

    def __call__(self, batch):
        _maybe_fault()
        cols = batch.to_pydict()
        items = [VideoItem(id=i, path=p, truth=t) for i, p, t in zip(*(cols[c] for c in INPUT_COLUMNS), strict=True)]
        return to_table(list(iter_rows(self.pipe, items, self.budget, self.options.batch)))


def _maybe_fault() -> None:
    """Fault injection for the tests of actor loss: with ``ADAFOCUS_FAULT_EXIT_ONCE=FILE`` set, the first worker
    that creates FILE dies on the spot (``os._exit``), once in the whole job; FILE already there, nothing happens."""
    flag = os.environ.get(FAULT_ENV)
    if not flag:
        return
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, worker_name().encode())
    os.close(fd)
    os._exit(17)

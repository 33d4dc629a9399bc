"""Run a bundle over a labelled split once, through every exit, and keep what calibration needs.

Thresholds for any number of budgets, and the INT8-vs-fp32 comparison, are computed from this cache: per
video and exit the logits (hence scores under either criterion, and predictions), the focus frames and
crop boxes the policy chose, and the stage timings. Collection runs every step (no early exit, no budget
cap), so each video is decoded and run once whatever the budgets are.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adafocus.dataset import LabelledVideo, load_split, split_csv
from adafocus.errors import AdaFocusError, DataError
from adafocus.runtime.budget import Budget
from adafocus.runtime.exits import confidence

Progress = Callable[[int, int], None]


@dataclass
class ExitCache:
    """Per-video, per-exit outputs of one bundle on one split (every exit run).

    ``logits [n, E, C]``, ``labels [n]`` (class indices, -1 when unlabelled), ``costs [E]`` (cumulative
    GFLOPs per exit), ``positions [n, K]`` (candidate index of each focus frame), ``boxes [n, K, 4]``
    (y0, x0, h, w in the model's frame pixels), ``timings_ms``: per video, milliseconds per stage
    (``glance``, ``policy``, ``crop``, ``local`` summed over the steps).
    """

    split: str
    videos: list[str]
    labels: np.ndarray
    logits: np.ndarray
    costs: np.ndarray
    positions: np.ndarray
    boxes: np.ndarray
    timings_ms: dict[str, np.ndarray] = field(default_factory=dict)
    precision: str = "fp32"

    def __len__(self) -> int:
        return len(self.videos)

    @property
    def num_exits(self) -> int:
        return int(self.logits.shape[1])

    @property
    def preds(self) -> np.ndarray:
        """Predicted class per video and exit ``[n, E]``."""
        return self.logits.argmax(axis=-1)

    def scores(self, criterion: str = "max_logit") -> np.ndarray:
        """Exit scores per video and exit ``[n, E]`` under ``criterion``."""
        return confidence(self.logits, criterion)

    def accuracy_per_exit(self) -> np.ndarray:
        """Top-1 of every video exiting at exit k, for each k (the fixed-step baselines)."""
        return (self.preds == self.labels[:, None]).mean(axis=0)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the cache as ``.npz`` (atomically)."""
        import tempfile

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"labels": self.labels, "logits": self.logits, "costs": self.costs, "positions": self.positions,
                  "boxes": self.boxes, "videos": np.asarray(self.videos, dtype=str),
                  "meta": np.asarray([self.split, self.precision], dtype=str)}
        arrays.update({f"t_{k}": v for k, v in self.timings_ms.items()})
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
        os.close(fd)
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExitCache:
        with np.load(path, allow_pickle=False) as z:
            split, precision = (str(v) for v in z["meta"])
            timings = {k[2:]: z[k] for k in z.files if k.startswith("t_")}
            return cls(split, [str(v) for v in z["videos"]], z["labels"], z["logits"], z["costs"], z["positions"],
                       z["boxes"], timings, precision)


# ---------------------------------------------------------------------------------------------- data
def load_labelled(data: str | os.PathLike, split: str, classes: Sequence[str],
                  max_videos: int | None = None) -> tuple[list[LabelledVideo], np.ndarray]:
    """The videos of ``<data>/<split>.csv`` and their class indices in ``classes`` (the bundle's labels).

    One-line DataErrors: a missing or empty data directory, a missing split, a label the bundle does not know.
    """
    root = Path(data)
    if not root.exists():
        raise DataError(f"data directory not found: {root}")
    if root.is_dir() and not any(root.iterdir()):
        raise DataError(f"data directory {root} is empty: expected <split>.csv files (video,label), e.g. from "
                        "`adafocus demo-data`")
    csv_path = split_csv(root, split)
    videos = load_split(root, split)
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({v.label for v in videos} - set(index))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise DataError(f"{csv_path}: {len(unknown)} label(s) not among the bundle's {len(classes)} classes: {shown}")
    if max_videos is not None:
        if max_videos < 1:
            raise DataError(f"need at least one video, got a limit of {max_videos}")
        videos = videos[:max_videos]
    return videos, np.asarray([index[v.label] for v in videos], dtype=np.int64)


# ------------------------------------------------------------------------------------------- collect
def full_budget(pipe) -> Budget:
    """Every step, no thresholds: what collection runs (the calibrated tables are deliberately ignored)."""
    return Budget(float(pipe.exits[-1]), len(pipe.exits) - 1, None, None)


def split_frames(pipe, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Preprocessed frames -> (candidates, glance frames or None), as the pipeline lays them out."""
    p = pipe.pre
    if p.glance_positions is None:
        return frames[p.num_glance:], frames[:p.num_glance]
    return frames, None


def collect_many(pipes: dict[str, object], videos: Sequence[LabelledVideo | str | os.PathLike],
                 labels: np.ndarray | None = None, split: str = "", progress: Progress | None = None,
                 prefetch: int = 2) -> dict[str, ExitCache]:
    """Run every pipeline in ``pipes`` (same bundle, e.g. fp32 and int8) on the same decoded frames of each
    video, through every exit. Returns one :class:`ExitCache` per pipeline name.

    A video that cannot be decoded fails the whole collection (a calibration set with holes would bias it).
    """
    from adafocus.runtime.decode import Prefetcher

    if not pipes:
        raise ValueError("no pipelines to collect from")
    if not videos:
        raise DataError("no videos to collect from")
    first = next(iter(pipes.values()))
    paths = [str(v.path) if isinstance(v, LabelledVideo) else str(v) for v in videos]
    n, e = len(paths), len(first.exits)
    k = first.pre.num_focus
    out = {name: {"logits": [], "positions": [], "boxes": [], "t": {s: [] for s in _STAGES}} for name in pipes}
    budgets = {name: full_budget(p) for name, p in pipes.items()}
    done = 0
    with Prefetcher(paths, first.decode, depth=prefetch) as queue:
        for item in queue:
            if item.error is not None:
                err = item.error
                raise err if isinstance(err, AdaFocusError) else DataError(f"{item.item}: {err}")
            frames = first.preprocess(item.result.frames)
            candidates, glance = split_frames(first, frames)
            for name, pipe in pipes.items():
                trace = pipe.run_frames(candidates, budgets[name], glance)
                if len(trace.logits) != e:  # cannot happen without a cap; a bundle that disagrees is broken
                    raise AdaFocusError(f"{item.item}: ran {len(trace.logits)} of {e} exits")
                rec = out[name]
                rec["logits"].append(np.stack([np.asarray(x, np.float32) for x in trace.logits]))
                rec["positions"].append(_pad(trace.positions, (k,), -1, np.int64))
                rec["boxes"].append(_pad(trace.boxes, (k, 4), np.nan, np.float32))
                for s in _STAGES:
                    rec["t"][s].append(float(trace.timings_ms.get(s, 0.0)))
            done += 1
            if progress is not None:
                progress(done, n)
    lab = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64)
    costs = np.asarray(first.exits, np.float64)
    return {name: ExitCache(split, paths, lab, np.stack(rec["logits"]), costs, np.stack(rec["positions"]),
                            np.stack(rec["boxes"]), {s: np.asarray(v) for s, v in rec["t"].items()},
                            str(getattr(pipes[name], "precision", "fp32")))
            for name, rec in out.items()}


def collect(pipe, videos: Sequence[LabelledVideo | str | os.PathLike], labels: np.ndarray | None = None,
            split: str = "", progress: Progress | None = None) -> ExitCache:
    """:func:`collect_many` for one pipeline."""
    return collect_many({"_": pipe}, videos, labels, split, progress)["_"]


_STAGES = ("glance", "policy", "crop", "local")


@dataclass
class DenseReference:
    """The bundle's dense baseline on a labelled split: the point the adaptive curve is compared with."""

    split: str
    n: int
    gflops: float  # per video
    accuracy: float  # top-1, 0..1

    def to_dict(self) -> dict:
        return {"split": self.split, "n": self.n, "gflops": self.gflops, "accuracy": round(self.accuracy, 6)}


def dense_reference(pipe, videos: Sequence[LabelledVideo], labels: np.ndarray, split: str,
                    threads: int | None = None) -> DenseReference | None:
    """Top-1 of the bundle's ``dense.onnx`` (onnxruntime, CPU) on ``videos``; None without a dense stage or
    without labels. Same candidate frames and preprocessing as the adaptive model."""
    from adafocus.runtime.engine_set import open_engines

    bundle = pipe.bundle
    gflops = float(getattr(bundle.manifest.costs, "dense", 0.0) or 0.0)
    if not bundle.has_stage("dense") or not gflops or not len(videos) or (np.asarray(labels) < 0).any():
        return None
    engine = open_engines(bundle, "ort", "cpu", stages=("dense",), threads=threads)[1]["dense"]
    correct = 0
    try:
        for video, label in zip(videos, labels, strict=True):
            logits = np.asarray(engine.run({"frames": pipe.dense_frames(video.path)[None]})["logits"])
            correct += int(np.argmax(logits[0]) == int(label))
    finally:
        engine.close()
    return DenseReference(split, len(videos), gflops, correct / len(videos))


def _pad(x, shape: tuple[int, ...], fill, dtype) -> np.ndarray:
    """``x`` cut or padded with ``fill`` to ``shape`` (K rows whatever the policy returned)."""
    x = np.asarray(x, dtype)
    out = np.full(shape, fill, dtype=dtype)
    if x.size:
        view = tuple(slice(0, min(a, b)) for a, b in zip(x.shape, shape, strict=True))
        out[view] = x[view]
    return out

"""Throughput mode for the bench: many videos in flight, engine calls batched across videos.

The loop is the runtime's (:class:`~adafocus.runtime.scheduler.StepScheduler` through
``Pipeline.run_many(batch=N)``): decode + preprocessing run in background threads, newly admitted videos are
glanced together, and every video in flight takes its next focus step in one local-encoder call. This module
only adapts its results to the bench's light rows and batches the dense baseline the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from adafocus.errors import AdaFocusError
from adafocus.runtime.budget import Budget
from adafocus.runtime.scheduler import BatchStats, host


@dataclass
class BatchedResult:
    """What one video gave in throughput mode (a lighter :class:`~adafocus.runtime.pipeline.VideoResult`)."""

    video: str
    label: str
    score: float
    exit_step: int
    exit_reason: str  # "confident", "budget" or "last", as in the pipeline
    confidence: float
    gflops: float
    positions: list[int]  # candidate positions of the focus frames (empty when exiting after the glance)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class BatchedRunner:
    """``pipe.run_many(videos, budget, batch=batch)`` with bench-sized rows and the scheduler's call stats.

        runner = BatchedRunner(pipe, batch=8)
        for path, result in runner.run(paths, budget="30%"):
            ...
    """

    def __init__(self, pipe, batch: int = 8, prefetch: int | None = None, workers: int = 1):
        if batch < 1:
            raise AdaFocusError(f"batch must be >= 1, got {batch}")
        self.pipe = pipe
        self.batch = int(batch)
        self.prefetch = int(prefetch) if prefetch else self.batch
        self.workers = max(1, int(workers))
        self.stats = BatchStats()

    def run(self, videos: Iterable[str | os.PathLike], budget: str | float | Budget | None = None
            ) -> Iterator[tuple[str, BatchedResult | AdaFocusError]]:
        """Yield ``(path, result)`` as videos finish; a video that fails yields its error."""
        pipe = self.pipe
        for path, res in pipe.run_many(videos, budget, topk=1, prefetch=self.batch + self.prefetch,
                                       batch=self.batch, workers=self.workers):
            if isinstance(res, Exception):
                yield path, res
                continue
            yield path, BatchedResult(res.video, res.label, res.score, res.exit_step, res.exit_reason,
                                      res.confidence, res.gflops, res.focus_positions)
        self.stats = pipe.last_stats


def dense_batched(engine, pipe, videos: Iterable[str | os.PathLike], batch: int = 8, workers: int = 1
                  ) -> Iterator[tuple[str, str | AdaFocusError]]:
    """The dense baseline in throughput mode: ``batch`` videos per ``dense.onnx`` call, decode overlapped.

    Yields ``(path, label)`` (or the decode error) in input order.
    """
    from adafocus.runtime.decode import Prefetcher

    def load(path):
        return pipe.dense_frames(path)

    chunk: list[tuple[str, np.ndarray]] = []

    def flush():
        out = engine.run({"frames": np.stack([f for _, f in chunk])})
        logits = host(out["logits"])
        for (path, _), row in zip(chunk, logits, strict=True):
            yield path, pipe.labels[int(np.argmax(row))]
        chunk.clear()

    with Prefetcher([os.fspath(v) for v in videos], load, depth=2 * batch, workers=workers) as queue:
        for item in queue:
            if item.error is not None:
                err = item.error
                yield str(item.item), err if isinstance(err, AdaFocusError) else AdaFocusError(f"{item.item}: {err}")
                continue
            chunk.append((str(item.item), item.result))
            if len(chunk) == batch:
                yield from flush()
        if chunk:
            yield from flush()


__all__ = ["BatchStats", "BatchedResult", "BatchedRunner", "dense_batched"]

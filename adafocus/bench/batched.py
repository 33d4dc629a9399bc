"""Throughput mode: many videos in flight, their engine calls batched across videos (dynamic batching).

One video alone makes small engine calls (one patch per local step), which leaves a GPU mostly idle and
pays the per-call overhead once per patch. :class:`BatchedRunner` keeps up to ``batch`` videos in flight:

- decode + preprocessing run in background threads (:class:`~adafocus.runtime.decode.Prefetcher`), so the
  next videos are ready while the engines work on the current ones;
- newly admitted videos are glanced together (one global call) and, where they go on, get their focus frames
  and boxes from one policy call;
- then every video in flight takes its next focus step in **one** local-encoder call: patches ``[B, 3, P, P]``,
  each with its own classifier state, context and step index (every stage has a dynamic batch dimension);
- a video that exits (confident, budget, last step) drops out and a decoded one takes its place.

The decisions are the pipeline's, per video: the same exit thresholds, the same hard budget cap, the same
focus frames and boxes; only float rounding of a batched call can differ (tests check that predictions and
exit steps match one-at-a-time runs). Results come back in the order videos finish, not the input order.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adafocus.errors import AdaFocusError
from adafocus.runtime.budget import Budget
from adafocus.runtime.exits import confidence
from adafocus.runtime.pipeline import _host, _passes, _softmax  # the step loop's own helpers, shared
from adafocus.runtime.sampling import crop_boxes, focus_positions


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


@dataclass
class BatchStats:
    """Engine calls and their sizes over one :meth:`BatchedRunner.run` (what batching achieved)."""

    videos: int = 0
    failed: int = 0
    calls: dict[str, int] = field(default_factory=lambda: {"global": 0, "policy": 0, "local": 0})
    items: dict[str, int] = field(default_factory=lambda: {"global": 0, "policy": 0, "local": 0})
    engine_ms: dict[str, float] = field(default_factory=lambda: {"global": 0.0, "policy": 0.0, "local": 0.0})
    crop_ms: float = 0.0
    wall_s: float = 0.0

    def mean_batch(self, stage: str = "local") -> float:
        """Mean number of videos per call of ``stage``."""
        return self.items[stage] / self.calls[stage] if self.calls[stage] else 0.0

    def to_dict(self) -> dict:
        return {"videos": self.videos, "failed": self.failed, "calls": dict(self.calls), "items": dict(self.items),
                "mean_batch": {k: round(self.mean_batch(k), 3) for k in self.calls},
                "engine_ms": {k: round(v, 3) for k, v in self.engine_ms.items()}, "crop_ms": round(self.crop_ms, 3),
                "wall_s": round(self.wall_s, 4)}


@dataclass
class _Video:
    """One video in flight."""

    path: str
    frames: Any  # candidates [N, 3, S, S] (host or device array)
    glance: Any  # glance frames [Tg, 3, S, S]
    logits: np.ndarray | None = None
    score: float = 0.0
    positions: np.ndarray | None = None
    boxes: np.ndarray | None = None
    state: np.ndarray | None = None  # classifier state row [D] (base family)
    context: np.ndarray | None = None  # context row [D]
    step: int = 0  # focus steps taken
    reason: str = ""


class BatchedRunner:
    """Runs videos through a :class:`~adafocus.runtime.pipeline.Pipeline`'s engines with up to ``batch``
    videos in flight and one engine call per stage per round.

    ``prefetch``: decoded videos waiting beyond those in flight (default ``batch``); ``workers``: decode
    threads (default 1: on a small CPU more threads only steal cores from the engines).

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
        p = pipe.pre
        self._p = p
        self._exits = list(pipe.exits)
        self._n_steps = len(self._exits) - 1
        self._on_gpu = pipe.device != "cpu"
        if self._on_gpu:
            from adafocus.errors import require
            from adafocus.runtime.crop import get_cropper

            self._xp = require("cupy", "gpu", "GPU crops")
            self._crop = get_cropper(pipe.device)
        else:
            from adafocus.runtime.crop import crop_cpu

            self._xp = np
            self._crop = crop_cpu
        if pipe.family == "base":
            self._state_dim = int(pipe.manifest.stages["local"].inputs[1].shape[1])

    # ------------------------------------------------------------------------------------------ input
    def _load(self, path: str) -> tuple[Any, Any]:
        """Decode + preprocess one video (runs in a background thread) -> (glance frames, candidates)."""
        p = self._p
        frames = self.pipe.preprocess(self.pipe.decode(path).frames)
        if p.glance_positions is None:
            return frames[:p.num_glance], frames[p.num_glance:]
        return frames[np.asarray(p.glance_positions)], frames

    # -------------------------------------------------------------------------------------------- run
    def run(self, videos: Iterable[str | os.PathLike], budget: str | float | Budget | None = None
            ) -> Iterator[tuple[str, BatchedResult | AdaFocusError]]:
        """Yield ``(path, result)`` as videos finish; a video that fails to decode yields its error."""
        from adafocus.runtime.decode import Prefetcher

        b = budget if isinstance(budget, Budget) else self.pipe.budget(budget)
        self.stats = BatchStats()
        start = time.perf_counter()
        active: list[_Video] = []
        paths = [os.fspath(v) for v in videos]
        with Prefetcher(paths, self._load, depth=self.batch + self.prefetch, workers=self.workers) as queue:
            exhausted = False
            while True:
                new: list[_Video] = []
                while len(active) + len(new) < self.batch and not exhausted:
                    try:
                        item = next(queue)
                    except StopIteration:
                        exhausted = True
                        break
                    if item.error is not None:
                        self.stats.failed += 1
                        err = item.error
                        yield str(item.item), err if isinstance(err, AdaFocusError) else \
                            AdaFocusError(f"{item.item}: {err}")
                        continue
                    glance, frames = item.result
                    if self._on_gpu:
                        glance, frames = self._xp.asarray(glance), self._xp.asarray(frames)
                    new.append(_Video(str(item.item), frames, glance))
                if new:
                    going_on, done = self._start(new, b)
                    active += going_on
                    yield from done
                    if len(active) < self.batch and not exhausted:
                        continue  # fill the slots of videos that exited after the glance first
                if not active:
                    if exhausted:
                        break
                    continue
                active, done = self._step(active, b)
                yield from done
        self.stats.wall_s = time.perf_counter() - start

    # ------------------------------------------------------------------------------------------ stages
    def _timed(self, stage: str, feeds: dict, items: int) -> dict:
        engine = self.pipe.engines[stage]
        out = engine.run(feeds)
        self.stats.calls[stage] += 1
        self.stats.items[stage] += items
        self.stats.engine_ms[stage] += engine.last_ms
        return out

    def _start(self, new: list[_Video], budget: Budget) -> tuple[list[_Video], list]:
        """Glance every new video (one call), exit 0 where allowed, policy for the rest (one call)."""
        xp, p = self._xp, self._p
        g = self._timed("global", {"frames": xp.stack([v.glance for v in new])}, len(new))
        logits = _host(g["logits"])
        done, going_on, rows = [], [], []
        for i, v in enumerate(new):
            v.logits = logits[i]
            v.score = float(confidence(v.logits, self.pipe.criterion))
            v.glance = None  # not needed any more
            if _passes(budget.thresholds, 0, v.score):
                v.reason = "confident"
            elif budget.max_steps == 0:
                v.reason = "budget"
            if v.reason:
                done.append(self._finish(v))
            else:
                going_on.append(v)
                rows.append(i)
        if not going_on:
            return [], done
        idx = np.asarray(rows)
        pol = self._timed("policy", {"fmap": g["fmap"][idx], "vec": g["vec"][idx]}, len(rows))
        actions, weights = _host(pol["actions"]), _host(pol["weights"])
        positions = focus_positions(weights, p.candidates, p.num_focus, clamp=p.focus_clamp)
        context = g["context"][idx]
        for j, v in enumerate(going_on):
            acts = actions[j]
            pos = positions[j]
            acts = acts[pos] if acts.shape[0] == p.candidates else np.repeat(acts, p.num_focus, 0)
            v.positions = pos
            v.boxes = crop_boxes(acts, p.frame_size, p.crop_min, p.crop_max)
            v.context = context[j]
            if self.pipe.family == "base":
                v.state = np.zeros((self._state_dim,), np.float32)
        return going_on, done

    def _step(self, active: list[_Video], budget: Budget) -> tuple[list[_Video], list]:
        """One focus step of every video in flight, in one local-encoder call."""
        xp, p = self._xp, self._p
        runnable, done = [], []
        for v in active:
            if v.step + 1 > budget.max_steps:
                v.reason = "budget"
                done.append(self._finish(v))
            else:
                runnable.append(v)
        if not runnable:
            return [], done
        tick = time.perf_counter()
        if self.pipe.family == "base":
            patches = [self._crop(v.frames, xp.asarray(v.boxes[v.step:v.step + 1]), p.patch_size,
                                  xp.asarray(v.positions[v.step:v.step + 1])) for v in runnable]
            # state and context come back from the engines as host arrays, as in the pipeline
            feeds = {"patch": xp.concatenate(patches), "state": np.stack([v.state for v in runnable]),
                     "context": np.stack([v.context for v in runnable]),
                     "step": np.array([v.step for v in runnable], np.int64)}
        else:  # tsm: all K patches of a video in its single step
            patches = [self._crop(v.frames, xp.asarray(v.boxes), p.patch_size, xp.asarray(v.positions))
                       for v in runnable]
            feeds = {"patches": xp.stack(patches), "context": np.stack([v.context for v in runnable])}
        self.stats.crop_ms += (time.perf_counter() - tick) * 1e3
        out = self._timed("local", feeds, len(runnable))
        logits = _host(out["logits"])
        going_on = []
        for i, v in enumerate(runnable):
            v.step += 1
            v.logits = logits[i]
            v.score = float(confidence(v.logits, self.pipe.criterion))
            if self.pipe.family == "base":
                v.state = out["new_state"][i]
            if v.step >= self._n_steps:
                v.reason = "last"
            elif _passes(budget.thresholds, v.step, v.score):
                v.reason = "confident"
            if v.reason:
                done.append(self._finish(v))
            else:
                going_on.append(v)
        return going_on, done

    def _finish(self, v: _Video) -> tuple[str, BatchedResult]:
        self.stats.videos += 1
        prob = _softmax(v.logits)
        top = int(prob.argmax())
        positions = [] if v.positions is None or v.step == 0 else [int(x) for x in v.positions]
        result = BatchedResult(v.path, self.pipe.labels[top], float(prob[top]), v.step, v.reason, v.score,
                               float(self._exits[v.step]), positions)
        return v.path, result


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
        logits = _host(out["logits"])
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

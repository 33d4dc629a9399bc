"""The step loop: one state per video in flight, and a scheduler that batches their pending engine calls.

Every video goes glance -> (exit 0?) -> policy -> focus steps -> done. A :class:`Flight` holds one video's
state and says which stage it needs next; :class:`StepScheduler` keeps up to ``slots`` flights going and,
each round, makes **one** engine call per stage for every flight that waits on it (the glance of the new
videos, the policy of those that go on, the next focus step of all the others), then retires the flights
that are done and admits new ones. One video at a time is the scheduler with one slot, so ``Pipeline``,
``run_many(batch=N)``, bench, calibration and INT8 recording all run this loop and take the same decisions.

Two small strategies keep the loop free of branches on where frames live and on the model family:

- a frame source (:class:`HostFrames`, :class:`LazyHostFrames`, :class:`DeviceFrames`) gives the glance
  input and cuts patches (on the host with a crop plan made once per video, or on the GPU);
- a family (:mod:`adafocus.runtime.families`: base, K steps of one patch with a running classifier state;
  TSM, one step of all K patches) builds the local stage's feed and reads its output.

Views (the X3D family's 3-crop evaluation): a flight of V views is V consecutive rows of every engine call
(glance, policy, backbone, head), each view with its own focus frames and box (``positions`` ``[V, K]``,
``boxes`` ``[V, K, 4]``); an exit reads the mean of its V rows' logits. One view keeps ``[K]`` / ``[K, 4]``
and takes its single row as is (no copy).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adafocus.bundle import STAGES, Preprocessing
from adafocus.errors import AdaFocusError
from adafocus.runtime.budget import Budget
from adafocus.runtime.crop import crop_planned, plan_crop
from adafocus.runtime.exits import confidence, passes
from adafocus.runtime.families import FAMILIES, cat_rows
from adafocus.runtime.sampling import crop_boxes, focus_positions


# ------------------------------------------------------------------------------------------ sources
class HostFrames:
    """Preprocessed candidates on the host ``[N, 3, S, S]`` (+ the glance frames when sampled apart)."""

    def __init__(self, candidates: np.ndarray, glance: np.ndarray):
        self.candidates = candidates
        self._glance = glance
        self._plan = None

    def glance(self) -> Any:
        return self._glance

    def prepare(self, boxes: np.ndarray, pre: Preprocessing) -> None:
        self._plan = plan_crop(boxes, pre.frame_size, pre.patch_size)  # interpolation tables, once

    def patch(self, k: int, position: int, boxes: np.ndarray, pre: Preprocessing) -> np.ndarray:
        """Patch ``[1, 3, P, P]`` of box ``k`` on candidate ``position``."""
        return crop_planned(self.candidates, self._plan, k, position)

    def patches(self, positions: np.ndarray, boxes: np.ndarray, pre: Preprocessing) -> np.ndarray:
        """Every box on its frame ``[K, 3, P, P]`` (the TSM family's one step); with V views (candidates
        ``[V, N, 3, S, S]``, positions ``[V, K]``) all views' ``[V * K, 3, P, P]`` in one crop."""
        from adafocus.runtime.crop import crop_cpu

        frames, boxes, positions = _flat_views(self.candidates, positions, boxes)
        return crop_cpu(frames, boxes, pre.patch_size, positions)

    @property
    def preprocess_ms(self) -> float:
        return 0.0


class LazyHostFrames(HostFrames):
    """Candidates preprocessed on first use (:class:`~adafocus.runtime.preprocess.LazyFrames`): the glance
    frames at once, each focus frame when a step first crops it (the CPU base family reads about 11 of 16)."""

    def __init__(self, lazy):
        super().__init__(None, None)
        self.lazy = lazy
        self._ms0 = lazy.ms

    def glance(self) -> Any:
        return self.lazy.first()

    def patch(self, k: int, position: int, boxes: np.ndarray, pre: Preprocessing) -> np.ndarray:
        return crop_planned(self.lazy.frame(position)[None], self._plan, k, 0)

    @property
    def preprocess_ms(self) -> float:
        """Preprocessing done by the focus steps (the glance frames' share was paid before the loop)."""
        return self.lazy.ms - self._ms0


class DeviceFrames(HostFrames):
    """Candidates on the GPU (cupy); patches cut there by ``crop`` (:func:`~adafocus.runtime.crop.crop_gpu`)."""

    def __init__(self, candidates: Any, glance: Any, crop, xp):
        super().__init__(candidates, glance)
        self._crop, self._xp = crop, xp

    def prepare(self, boxes: np.ndarray, pre: Preprocessing) -> None:
        pass

    def patch(self, k: int, position: int, boxes: np.ndarray, pre: Preprocessing) -> Any:
        xp = self._xp
        return self._crop(self.candidates, xp.asarray(boxes[k:k + 1]), pre.patch_size,
                          xp.asarray(np.asarray([position])))

    def patches(self, positions: np.ndarray, boxes: np.ndarray, pre: Preprocessing) -> Any:
        xp = self._xp
        frames, boxes, positions = _flat_views(self.candidates, positions, boxes)
        return self._crop(frames, xp.asarray(boxes), pre.patch_size, xp.asarray(positions))


def _flat_views(candidates: Any, positions: np.ndarray, boxes: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
    """(frames, boxes, positions) for one crop call: as given for one view; V views' candidates
    ``[V, N, ...]`` as ``[V * N, ...]`` (a view of them) with each view's positions moved to its frames."""
    if positions.ndim == 1:
        return candidates, boxes, positions
    v, n = candidates.shape[:2]
    frames = candidates.reshape(v * n, *candidates.shape[2:])
    return frames, boxes.reshape(-1, 4), (positions + n * np.arange(v)[:, None]).reshape(-1)


# ------------------------------------------------------------------------------------------- flights
@dataclass
class Flight:
    """One video in flight: its frames, budget and everything decided so far."""

    key: Any  # what the caller tracks the video by (a path, an index)
    source: HostFrames
    budget: Budget
    logits: list[np.ndarray] = field(default_factory=list)  # [C] per exit taken
    scores: list[float] = field(default_factory=list)
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    glance_out: dict[str, Any] | None = None  # this video's rows of the glance outputs, until the policy ran
    computed: int = 0  # backbone calls' worth of steps run (>= steps taken when a chunk ran past the exit)
    chunk: int = 1  # steps per backbone call
    chunks: list[int] | None = None  # a planned chunk size for each step a chunk starts at (else ``chunk``)
    deadline: float | None = None  # perf_counter() time by which the model must be done (a time budget)
    ran: list[int] = field(default_factory=list)  # the size of every backbone call the flight made, in order
    context: Any = None
    state: Any = None  # the base family's running classifier state [1, D]
    reason: str = ""  # "confident", "budget", "deadline", "last" once done; "error" when an engine call failed
    error: Exception | None = None
    timings_ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("glance", "policy", "crop",
                                                                                     "local"), 0.0))
    meta: Any = None  # the caller's (the decoded video, for results)
    views: int = 1  # rows of every engine call (the source's frames are [V, ...] when more than one)

    @property
    def steps(self) -> int:
        """Focus steps taken."""
        return max(0, len(self.logits) - 1)

    def next_stage(self) -> str | None:
        if self.reason:
            return None
        if not self.logits:
            return "global"
        return "policy" if self.glance_out is not None else "local"


# --------------------------------------------------------------------------------------------- stats
@dataclass
class BatchStats:
    """Engine calls and their sizes over one scheduler run (what batching achieved)."""

    videos: int = 0
    failed: int = 0
    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))
    items: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))
    engine_ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    crop_ms: float = 0.0
    wall_s: float = 0.0

    def mean_batch(self, stage: str = "head") -> float:
        """Mean number of videos per call of ``stage``."""
        return self.items[stage] / self.calls[stage] if self.calls[stage] else 0.0

    def to_dict(self) -> dict:
        return {"videos": self.videos, "failed": self.failed, "calls": dict(self.calls), "items": dict(self.items),
                "mean_batch": {k: round(self.mean_batch(k), 3) for k in self.calls},
                "engine_ms": {k: round(v, 3) for k, v in self.engine_ms.items()}, "crop_ms": round(self.crop_ms, 3),
                "wall_s": round(self.wall_s, 4)}


# ------------------------------------------------------------------------------------------ scheduler
class StepScheduler:
    """Runs flights through a bundle's engines, batching each stage's pending calls across flights.

    ``engines``: stage -> engine (``global``, ``policy``, ``local``); ``xp``: numpy, or cupy when frames
    and patches live on the GPU.
    """

    def __init__(self, manifest, engines: dict[str, Any], criterion: str, xp=np,
                 max_batch: dict[str, int] | None = None, cost=None, clock=time.perf_counter):
        self.pre = manifest.preprocessing
        self.engines = engines
        self.criterion = criterion
        self.xp = xp
        self.max_batch = dict(max_batch or {})  # step ("global", "policy", "local") -> most flights per call
        self.family = FAMILIES[manifest.family](manifest)
        self.cost = cost  # a profile's CostModel: needed by flights with a deadline
        self.clock = clock  # what deadlines are read on (seconds)
        self.stats = BatchStats()

    def run(self, flights: Iterable[Any], slots: int = 1) -> Iterator[Any]:
        """Yield each flight when it is done (in the order they finish), keeping ``slots`` in flight.

        Items of ``flights`` that are not a :class:`Flight` (a caller's error rows) are yielded as soon as
        they are taken, so with one slot everything comes out in input order. A typed error in a stage's
        engine call ends the flights of that call with ``reason`` "error" and the error attached.
        """
        start = time.perf_counter()
        pending = iter(flights)
        active: list[Flight] = []
        exhausted = False
        while True:
            while len(active) < slots and not exhausted:
                flight = next(pending, None)
                if flight is None:
                    exhausted = True
                elif isinstance(flight, Flight):
                    active.append(flight)
                else:
                    self.stats.failed += 1
                    yield flight
            if not active:
                break
            self.round(active)
            for f in [f for f in active if f.reason]:
                self.stats.videos += 1
                yield f
            active = [f for f in active if not f.reason]
        self.stats.wall_s += time.perf_counter() - start

    def round(self, flights: list[Flight]) -> None:
        """One call per stage: the glance of new flights, the policy of those that go on, a focus step of
        every flight past its policy (including the ones whose policy just ran). Each stage's wall time
        (engine call and host work) is shared by the flights in it."""
        for stage, key, step in (("global", "glance", self._glance), ("policy", "policy", self._policy),
                                 ("local", "local", self._local)):  # "local": backbone + head
            waiting = [f for f in flights if f.next_stage() == stage]
            size = self.max_batch.get(stage) or len(waiting) or 1
            for group in (waiting[i:i + size] for i in range(0, len(waiting), size)):
                self._stage(step, key, group)

    def _stage(self, step, key: str, group: list[Flight]) -> None:
        """One stage's calls for ``group``; its wall time (engine and host work) is shared by the flights."""
        tick = time.perf_counter()
        try:
            crop_ms = step(group) or 0.0
        except AdaFocusError as exc:  # this stage's call failed: its videos end with the error
            for f in group:
                if not f.reason:
                    f.reason, f.error = "error", exc
            return
        ms = (time.perf_counter() - tick) * 1e3 - crop_ms
        for f in group:
            f.timings_ms[key] += ms / len(group)
            if crop_ms:
                f.timings_ms["crop"] += crop_ms / len(group)

    # ------------------------------------------------------------------------------------------ stages
    def _call(self, stage: str, feeds: dict[str, Any], flights: list[Flight]) -> dict[str, Any]:
        tick = time.perf_counter()
        if self.xp is np:
            out = self.engines[stage].run(feeds)
        else:  # on a GPU the outputs stay there: only what a decision reads (logits, actions) comes back
            out = self.engines[stage].run(feeds, device_outputs=True)
        self.stats.calls[stage] += 1
        self.stats.items[stage] += len(flights)
        self.stats.engine_ms[stage] += (time.perf_counter() - tick) * 1e3  # any object with run() is an engine here
        return out

    def _exit(self, f: Flight, logits: np.ndarray) -> None:
        """Record a step's logits and decide whether the flight stops here."""
        f.logits.append(logits)
        f.scores.append(float(confidence(logits, self.criterion)))
        k = len(f.logits) - 1
        if k >= self.family.steps:
            f.reason = "last"
        elif passes(f.budget.thresholds, k, f.scores[-1]):
            f.reason = "confident"
        elif f.budget.max_steps <= k:
            f.reason = "budget"

    def _glance(self, flights: list[Flight]) -> None:
        xp = self.xp
        rows = [f.source.glance()[None] if f.views == 1 else f.source.glance() for f in flights]
        frames = rows[0] if len(rows) == 1 else xp.concatenate(rows)
        g = self._call("global", {"frames": frames}, flights)
        logits = _host(g["logits"])
        for f, (lo, hi) in zip(flights, _row_spans(flights), strict=True):
            self._exit(f, _view_mean(logits, lo, hi))
            if not f.reason:
                f.glance_out = g if len(flights) == 1 else {"fmap": g["fmap"][lo:hi], "vec": g["vec"][lo:hi],
                                                            "context": g["context"][lo:hi]}

    def _policy(self, flights: list[Flight]) -> None:
        flights = self._in_time(flights, lambda n: (self.cost.policy_round(n, "p90") + self.cost.chunk(1, n, "p90"))
                                * self.cost.slow)
        if not flights:
            return
        p, xp = self.pre, self.xp
        if len(flights) == 1:
            g = flights[0].glance_out
            feeds = {"fmap": g["fmap"], "vec": g["vec"]}
        else:
            feeds = {k: cat_rows([f.glance_out[k] for f in flights], xp) for k in ("fmap", "vec")}
        out = self._call("policy", feeds, flights)
        actions, weights = _host(out["actions"]), _host(out["weights"])
        positions = focus_positions(weights, p.candidates, p.num_focus, clamp=p.focus_clamp)
        for f, (lo, hi) in zip(flights, _row_spans(flights), strict=True):
            if f.views == 1:
                f.positions, f.boxes = positions[lo], self._boxes(actions[lo], positions[lo])
            else:  # each view its own frames and box
                f.positions = positions[lo:hi]
                f.boxes = np.stack([self._boxes(actions[r], positions[r]) for r in range(lo, hi)])
            f.context = f.glance_out["context"]
            f.glance_out = None
            self.family.start(f, xp)

    def _boxes(self, actions: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One row's boxes ``[K, 4]``: its action per focus frame (base) or its one action repeated (TSM, X3D)."""
        p = self.pre
        acts = actions[positions] if actions.shape[0] == p.candidates else np.repeat(actions, p.num_focus, 0)
        return crop_boxes(acts, p.frame_size, p.crop_min, p.crop_max)

    def _local(self, flights: list[Flight]) -> float:
        """Focus steps: one backbone call for the next chunk of every flight, then head calls, one step of
        every flight at a time, until the chunks are used up or the flights exit (features of steps after an
        exit were computed, and are charged, but not used). Returns the crop time (ms), lazy preprocessing of
        the focus frames left out (it is the frame source's ``preprocess_ms``)."""
        fam, xp = self.family, self.xp
        sizes = [self._chunk(f, len(flights)) for f in flights]
        timed = self.cost is not None and any(f.deadline is not None for f in flights)
        if timed:
            flights, sizes = self._cut_to_deadlines(flights, sizes)
            if not flights:
                return 0.0
        tick = time.perf_counter()
        observed = (self.clock(), sizes[0], len(flights)) if timed and len(set(sizes)) == 1 else None
        lazy_before = sum(f.source.preprocess_ms for f in flights)
        rows = [fam.patches(f, n, xp) for f, n in zip(flights, sizes, strict=True)]
        crop_ms = (time.perf_counter() - tick) * 1e3 - (sum(f.source.preprocess_ms for f in flights) - lazy_before)
        self.stats.crop_ms += crop_ms
        patches = rows[0] if len(rows) == 1 else xp.concatenate(rows)
        features = self._call("backbone", {fam.patch_input: patches}, flights)["features"]
        pending, start = {}, 0
        for f, n in zip(flights, sizes, strict=True):  # a step's features: the flight's V rows
            v = f.views
            pending[id(f)] = [features[i:i + v] for i in range(start, start + n * v, v)]
            f.computed += n
            f.ran.append(n)
            start += n * v
        going = flights
        while going:
            feeds = fam.head_feed(going, [pending[id(f)].pop(0) for f in going], xp)
            out = self._call("head", feeds, going)
            fam.absorb(going, out)
            logits = _host(out["logits"])
            for f, (lo, hi) in zip(going, _row_spans(going), strict=True):
                self._exit(f, _view_mean(logits, lo, hi))
            going = [f for f in going if pending[id(f)] and not f.reason]
        if observed is not None and not any(pending[id(f)] for f in flights):  # every chunk ran whole
            t0, n, b = observed
            self.cost.observe((self.clock() - t0) * 1e3, self.cost.chunk(n, b))
        return crop_ms

    @staticmethod
    def _cut_to_deadlines(flights: list[Flight], sizes: list[int]) -> tuple[list[Flight], list[int]]:
        """Flights with no step left before their deadline stop ("deadline"); the others' chunks are cut to
        the smallest one a deadline allowed, since every flight of the call waits for the longest chunk."""
        for f, n in zip(flights, sizes, strict=True):
            if n == 0:
                f.reason = "deadline"
        kept = [(f, n) for f, n in zip(flights, sizes, strict=True) if n]
        if not kept:
            return [], []
        cap = min(n for f, n in kept if f.deadline is not None) if any(f.deadline is not None for f, _ in kept) \
            else max(n for _, n in kept)
        return [f for f, _ in kept], [min(n, cap) for _, n in kept]

    def _chunk(self, f: Flight, batch: int = 1) -> int:
        """Steps in the flight's next backbone call: its chunk (planned per step, or fixed), cut to the steps
        left, to those that fit under its hard cap (a hard budget charges what is computed) and, with a
        deadline, to those whose predicted end (p90 of the profile, ``batch`` videos in the call) is before
        it: 0 when not one step fits."""
        left = min(self.family.steps, f.budget.max_steps) - f.steps
        n = max(1, min(f.chunks[f.steps] if f.chunks else f.chunk, left))
        if f.deadline is None:
            return n
        room = (f.deadline - self.clock()) * 1e3
        while n and self.cost.chunk(n, batch, "p90") * self.cost.slow > room:
            n -= 1
        return n

    def _in_time(self, flights: list[Flight], predicted) -> list[Flight]:
        """The flights whose deadline leaves room for ``predicted(len(flights))`` ms more (the others stop
        with reason "deadline"); flights without a deadline always go on."""
        if all(f.deadline is None for f in flights):
            return flights
        need = predicted(len(flights)) / 1e3
        now = self.clock()
        for f in flights:
            if f.deadline is not None and now + need > f.deadline:
                f.reason = "deadline"
        return [f for f in flights if not f.reason]

# ------------------------------------------------------------------------------------------ helpers
def _row_spans(flights: list[Flight]) -> Iterator[tuple[int, int]]:
    """Each flight's rows ``[lo, hi)`` in a call that batches ``flights`` (V rows for V views)."""
    lo = 0
    for f in flights:
        yield lo, lo + f.views
        lo += f.views


def _view_mean(logits: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """A flight's logits ``[C]``: its one row as is, or the mean over its views' rows (upstream's average)."""
    return logits[lo] if hi - lo == 1 else logits[lo:hi].mean(axis=0)


def host(x: Any) -> np.ndarray:
    """A numpy array of an engine output (numpy, cupy, OrtValue or torch)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "get"):  # cupy
        return x.get()
    if hasattr(x, "numpy"):  # OrtValue / torch
        try:
            return x.numpy()
        except TypeError:
            return x.cpu().numpy()
    return np.asarray(x)


_host = host

"""The runtime orchestrator: decode -> glance -> exit 0? -> policy -> focus frames -> crop -> local steps.

Control flow stays here, in Python, between the engines of a bundle (one engine per stage), so that every
stage is a static graph and a video stops as soon as it is confident enough or its budget is spent. Nothing
here imports torch: the edge install is numpy + onnxruntime + OpenCV.

    pipeline = Pipeline.from_bundle("tiny_bundle", engine="auto", device="cpu")
    result = pipeline("video.mp4", budget="30%")
    print(result.label, result.score, result.exit_step, result.gflops)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from adafocus.bundle import Bundle, load_bundle
from adafocus.device import parse_device, require_device
from adafocus.errors import AdaFocusError, BudgetError, ConfigError, VideoError
from adafocus.runtime.budget import Budget, make_budget, parse_ms
from adafocus.runtime.engine_set import close_engines
from adafocus.runtime.preprocess import lazy_candidates
from adafocus.runtime.sampling import segment_indices
from adafocus.runtime.scheduler import DeviceFrames, Flight, HostFrames, LazyHostFrames, StepScheduler

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


@dataclass
class Patch:
    """One focus patch: the step that used it, the source frame and the box in source-video pixels."""

    step: int
    frame: int  # 0-based frame number in the video
    box: list[float]  # x0, y0, x1, y1 in the decoded video's pixels
    box_model: list[float]  # y0, x0, h, w in the model's frame_size crop (what the crop used)


@dataclass
class VideoResult:
    """What one video gives: prediction, where it stopped, what it looked at, what it cost."""

    video: str
    label: str
    score: float  # softmax probability of the label at the exit step
    topk: list[tuple[str, float]]
    exit_step: int  # 0 = after the glance; k = after the k-th focus step
    exit_reason: str  # "confident", "budget" (next step would not fit), "last" (all steps ran), "deadline"
    confidence: float  # the exit criterion's score at the exit step
    frames_used: list[int]  # video frame numbers the model saw (glance + focus frames)
    patches: list[Patch]  # with several views: the centre view's (frames_used has every view's focus frames)
    gflops: float  # what was computed (a chunk may run past the exit step)
    budget_gflops: float
    engine: str
    timings_ms: dict[str, float]
    steps: list[dict[str, Any]] = field(default_factory=list)  # per exit: step, label, score, confidence
    focus_positions: list[int] = field(default_factory=list)  # candidates the policy chose (all K; [] at exit 0;
    # the centre view's with several views)
    gflops_exit: float = 0.0  # the cost up to the exit step (= gflops without chunking)
    chunk: int | list[int] = 1  # focus steps per backbone call (a list: the planned chunks, in order)
    budget_ms: float | None = None  # a time budget: the deadline (or the average aimed at), ms
    predicted_ms: float | None = None  # the profile's prediction of this video's model time (with a profile)
    views: int = 1  # crops of every frame evaluated (logits averaged per exit; costs counted for all)
    decoded: Any = field(default=None, repr=False, compare=False)  # the DecodedVideo, kept for --save-vis

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "decoded"}
        d["patches"] = [asdict(pt) for pt in self.patches]
        d["topk"] = [{"label": k, "score": v} for k, v in self.topk]
        return d


@dataclass
class Trace:
    """The decisions of the step loop on preprocessed frames (what tests compare with the reference)."""

    logits: list[np.ndarray]  # [C] per exit taken
    scores: list[float]
    positions: np.ndarray  # [K] candidate positions of the focus frames (empty if the policy never ran); [V, K]
    boxes: np.ndarray  # [K, 4] y0, x0, h, w (model frame pixels); [V, K, 4] with V > 1 views
    exit_step: int
    exit_reason: str
    timings_ms: dict[str, float]


class Pipeline:
    """Runs a bundle's engines on videos under a per-video GFLOPs budget."""

    def __init__(self, bundle: Bundle, engines: dict[str, Any], engine_name: str, device: str = "cpu",
                 criterion: str | None = None):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.pre = bundle.manifest.preprocessing
        self.engines = engines
        self.engine_name = engine_name
        self.device = str(parse_device(device))  # canonical: "cpu" or "cuda:N"
        self.criterion = criterion or bundle.manifest.exit.criterion
        self.precision = bundle.manifest.precision  # which stage files run (from_bundle's precision)
        self.labels = bundle.manifest.labels
        self.family = bundle.manifest.family
        self.exits = list(bundle.manifest.costs.exits)
        self.dense = float(getattr(bundle.manifest.costs, "dense", 0.0) or 0.0) or None
        self.views = 1  # crops of every frame (see ``set_views``)
        self.keep_decoded = False  # attach the decoded frames to results (for --save-vis)
        self.chunk = 1  # focus steps per backbone call (see ``set_chunk``)
        self.chunk_auto = False  # ``set_chunk("auto")`` with a profile: chunks planned per budget
        self.threads: int | None = None  # the engines' intra-op threads (from_bundle's; None: the default)
        self._cost = None  # the profile's CostModel, once one was asked for (``cost_model``)
        self._plans: dict[Any, Any] = {}
        self.clock = time.perf_counter  # what deadlines are read on (seconds; tests drive their own)
        # most videos per call of a stage in the batched mode (see ``scheduler``); {} batches every stage
        self.stage_batch: dict[str, int] = {} if self.device != "cpu" else {"global": 1}
        self._on_gpu = self.device != "cpu"
        if self._on_gpu:
            from adafocus.runtime.crop import get_cropper

            self._crop = get_cropper(self.device)
            from adafocus.errors import require

            self._xp = require("cupy", "gpu", "GPU crops")
        else:
            from adafocus.runtime.crop import crop_cpu

            self._crop = crop_cpu
            self._xp = np
        p = self.pre
        self._mean = np.asarray(p.mean, np.float32)
        self._std = np.asarray(p.std, np.float32)

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def from_bundle(cls, path: str | os.PathLike, engine: str = "auto", device: str = "cpu",
                    threads: int | None = None, criterion: str | None = None, verify: bool = True,
                    checkpoint: str | os.PathLike | None = None, precision: str | None = None,
                    cuda_graphs: bool = True, chunk: int | str | None = None, views: int = 1) -> Pipeline:
        """Load a bundle (checksums verified) and create one engine per stage.

        ``engine``: ``auto`` or a registered name (``ort``, ``ort-cuda``, ``ort-tensorrt``, ``tensorrt``,
        ``torch``); ``device``: ``cpu`` or ``cuda[:N]`` (also ``gpu[:N]``, any case; a CUDA device this machine
        does not have fails here, before the bundle is read or an engine picked). The ``torch`` engine rebuilds
        the stages from the PyTorch ``checkpoint`` the bundle was exported from (the export extra is needed).
        ``precision``: the stage files to run, the bundle's own (None) or one recorded under
        ``manifest.precisions`` (e.g. ``int8`` from ``adafocus calibrate int8``; ONNX engines only).
        ``cuda_graphs``: the torch engine on cuda replays each stage as a CUDA graph (see TorchEngine).
        ``chunk``: focus steps per backbone call, or ``auto`` (see :meth:`set_chunk`).
        ``views``: crops of every frame evaluated, logits averaged per exit (see :meth:`set_views`).
        """
        from adafocus.bundle import lock_bundle
        from adafocus.runtime.engine_set import open_engines

        device = str(require_device(device))  # parsed once, here: engines, crops and results see "cpu"/"cuda:N"
        with lock_bundle(path):  # shared, from verifying the files until the engines have read them
            bundle = load_bundle(path, verify=verify)
            name, engines = open_engines(bundle, engine, device, threads=threads, precision=precision,
                                         checkpoint=checkpoint, cuda_graphs=cuda_graphs)
        try:
            pipe = cls(bundle, engines, name, device, criterion)
            pipe.precision = precision or bundle.manifest.precision
            pipe.threads = threads
            pipe.set_chunk(chunk)
            pipe.set_views(views)
        except BaseException:
            close_engines(engines)  # a bad chunk, or cupy missing for a GPU device, leaves nothing open
            raise
        return pipe

    def close(self) -> None:
        close_engines(self.engines)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- budgets
    def budget(self, budget: str | float | None = None, average: bool = False,
               includes_decode: bool = False) -> Budget:
        """Parse a budget ('0.08' GFLOPs, '30%' of the dense cost, '25ms' a deadline, None = full model) for
        this bundle: a hard per-video cap, or with ``average`` the calibrated average to aim at (see
        adafocus.runtime.budget). A time budget needs this device's profile (``adafocus profile``);
        ``includes_decode``: the deadline counts the video's decode too."""
        own = self.precision if self.precision != self.manifest.precision else None
        table = [self._per_views(e) for e in self.manifest.exit.table(own).values()]
        cost = time_table = None
        if parse_ms(budget) is not None:
            if self.views > 1:
                raise BudgetError(f"a budget in milliseconds is planned from a profile of one view; with "
                                  f"{self.views} views give GFLOPs or a share of the dense cost")
            cost = self.cost_model()
            time_table = list(cost.profile.thresholds.values())
        return make_budget(budget, self.exits, table, self.dense, average, cost=cost,
                           includes_decode=includes_decode, time_table=time_table)

    def set_views(self, views: int) -> int:
        """Evaluate ``views`` crops of every frame (1, or 3 for upstream's left / right / centre test,
        :func:`~adafocus.runtime.preprocess.view_offsets`) where the family was made for it (X3D): each view
        runs its own glance, policy, frames and box as one more row of every engine call, and every exit
        reads the logits averaged over the views. Costs are per video, for all views: the exit costs, the
        dense cost (so a ``%`` budget is the same share) and the calibrated budgets are multiplied by
        ``views``; the calibrated thresholds, solved on one view's logits, are applied to the averaged ones.
        Time budgets and ``--chunk auto`` plans (profiles of one view) are not used with views. A result's
        ``focus_positions`` and ``patches`` are the centre view's (upstream's third), its ``frames_used`` every
        view's frames. Returns it."""
        from adafocus.runtime.families import FAMILIES
        from adafocus.runtime.preprocess import VIEWS

        if views not in VIEWS:
            raise ConfigError(f"views must be one of {', '.join(map(str, VIEWS))}, got {views}")
        allowed = FAMILIES[self.family].views
        if views not in allowed:
            raise ConfigError(f"{views} views: the {self.family} family is evaluated on "
                              f"{' or '.join(map(str, allowed))} view(s) (multi-view evaluation is X3D's)")
        costs = self.manifest.costs
        self.views = views
        self.exits = [float(e) * views for e in costs.exits]
        dense = float(getattr(costs, "dense", 0.0) or 0.0)
        self.dense = dense * views or None
        if views > 1:
            self.chunk_auto = False
        return views

    def _per_views(self, entry: dict) -> dict:
        """A calibrated table entry (one view's budgets) for this pipeline's views."""
        if self.views == 1:
            return entry
        scaled = {k: entry[k] * self.views for k in ("budget_gflops", "max_gflops") if k in entry}
        return {**entry, **scaled}

    def cost_model(self, required: bool = True):
        """The :class:`~adafocus.runtime.profile.CostModel` of this bundle's profile for exactly this engine,
        precision, device and threads; a ConfigError naming the ``adafocus profile`` command when there is
        none (None when not ``required``)."""
        if self._cost is None:
            from adafocus.runtime.profile import CostModel, find_profile

            prof = find_profile(self.bundle, self.engine_name, self.precision, self.device, self.threads, required)
            self._cost = CostModel(prof, self.manifest) if prof is not None else None
        return self._cost

    def plan(self, budget: Budget):
        """The chunk plan for ``budget`` (``--chunk auto`` with a profile), or None (fixed chunks)."""
        if not self.chunk_auto:
            return None
        from adafocus.runtime.plan import plan_chunks

        key = budget.exit_fractions
        if key not in self._plans:
            self._plans[key] = plan_chunks(self._cost, list(key) if key else None)
        return self._plans[key]

    # ----------------------------------------------------------------------------------------- decode
    def sample_indices(self, num_frames: int) -> np.ndarray:
        """Video frame numbers to decode: the N candidates (base), or Tg glance + 3K candidates (tsm)."""
        p = self.pre
        if p.glance_positions is not None:
            return segment_indices(num_frames, p.num_segments)
        return np.concatenate([segment_indices(num_frames, p.num_glance),
                               segment_indices(num_frames, p.candidates)])

    def decode(self, path: str | os.PathLike):
        from adafocus.runtime.decode import decode_frames

        return decode_frames(path, indices_fn=self.sample_indices, short_side=self.pre.resize_size)

    def decode_dense(self, path: str | os.PathLike):
        """Decode the frames the dense baseline reads: the N candidates (for TSM too, without the glance's)."""
        from adafocus.runtime.decode import decode_frames

        n = self.pre.candidates
        return decode_frames(path, indices_fn=lambda total: segment_indices(total, n),
                             short_side=self.pre.resize_size)

    def dense_frames(self, path: str | os.PathLike) -> np.ndarray:
        """The dense baseline's input for one video: normalised candidates ``[N, 3, S, S]`` (same sampling and
        preprocessing as the adaptive model's candidates; the centre crop)."""
        return self.preprocess(self.decode_dense(path).frames, views=1)

    def preprocess(self, frames_uint8: np.ndarray, views: int | None = None) -> np.ndarray:
        """Normalised crops ``[T, 3, S, S]``, or ``[V, T, 3, S, S]`` for V > 1 views (default: the pipeline's)."""
        from adafocus.runtime.preprocess import preprocess, preprocess_views

        p, views = self.pre, views or self.views
        if views > 1:
            return preprocess_views(frames_uint8, views, p.resize_size, p.frame_size, p.mean, p.std)
        return preprocess(frames_uint8, p.resize_size, p.frame_size, p.mean, p.std)

    # -------------------------------------------------------------------------------------- step loop
    @property
    def _lazy(self) -> bool:
        """Whether candidates are preprocessed on first use (the CPU base family: glance frames are candidates)."""
        return lazy_candidates(self.family, self.pre, self.device)

    def scheduler(self, engines: dict[str, Any] | None = None) -> StepScheduler:
        """A step scheduler over this pipeline's engines, with ``engines`` replacing some of them for this
        scheduler only (a stream's glance that reuses earlier windows' frames); its ``stats`` count the calls.

        On the CPU the glance runs one video per call: onnxruntime's CPU kernels for these small convs cost
        more per video in a batch (measured on the 2-core dev CPU, demo glance: 3.24 ms a video one at a
        time, 4.21 in batches of 8), while the backbone and head gain a little from batching."""
        return StepScheduler(self.manifest, {**self.engines, **(engines or {})}, self.criterion, self._xp,
                             max_batch=self.stage_batch,
                             cost=self._cost, clock=self.clock)

    def frame_source(self, frames: Any, glance_frames: Any = None) -> tuple[HostFrames, dict[str, float]]:
        """The step loop's frame source for normalised candidates ``[N, 3, S, S]`` (an array, or
        :class:`~adafocus.runtime.preprocess.LazyFrames`), and the time spent making it (upload,
        preprocessing a lazy source in full)."""
        from adafocus.runtime.preprocess import LazyFrames

        p, t = self.pre, {"upload": 0.0}
        if isinstance(frames, LazyFrames):
            if self._lazy:
                return LazyHostFrames(frames), t  # the CPU base loop reads the focus frames one by one
            lazy, before = frames, frames.ms
            frames = lazy.materialize()
            t["preprocess"] = lazy.ms - before
        if glance_frames is None and p.glance_positions is None:
            raise ValueError("this bundle's glance frames are sampled separately: pass glance_frames")
        if not self._on_gpu:
            glance = frames[np.asarray(p.glance_positions)] if glance_frames is None else glance_frames
            return HostFrames(frames, glance), t
        tick = time.perf_counter()
        xp = self._xp
        candidates = xp.asarray(frames)  # uploaded once; the glance frames are gathered on the device
        glance = candidates[xp.asarray(p.glance_positions)] if glance_frames is None else xp.asarray(glance_frames)
        source = DeviceFrames(candidates, glance, self._crop, xp)
        t["upload"] = (time.perf_counter() - tick) * 1e3
        return source, t

    def run_frames(self, frames: np.ndarray, budget: Budget | None = None,
                   glance_frames: np.ndarray | None = None) -> Trace:
        """The step loop on normalised frames: candidates ``[N, 3, S, S]`` (+ the TSM/X3D glance frames); with
        V views (:meth:`set_views`) ``[V, N, 3, S, S]`` and ``[V, Tg, 3, S, S]``, as :meth:`preprocess` makes.

        Base family: the glance frames are ``preprocessing.glance_positions`` of the candidates.
        """
        source, t = self.frame_source(frames, glance_frames)
        flight = Flight(None, source, budget or self.budget(None), chunk=self.chunk, views=self.views)
        flight.timings_ms.update(t)
        (done,) = list(self.scheduler().run([flight]))
        return _trace(done)

    # ------------------------------------------------------------------------------------------ videos
    def __call__(self, video: str | os.PathLike | Any, budget: str | float | Budget | None = None,
                 topk: int = 5, engines: dict[str, Any] | None = None) -> VideoResult:
        """Run one video (a path or an already decoded :class:`DecodedVideo`); ``engines`` replace some stages'
        engines for this call (see :meth:`scheduler`)."""
        b = budget if isinstance(budget, Budget) else self.budget(budget)
        is_path = isinstance(video, (str, os.PathLike))
        decoded = self.decode(video) if is_path else video
        # the clock starts after decode: its time is added from decode_ms (a path) or was spent elsewhere
        flight = self._flight(decoded, b, decode_ms=decoded.decode_ms if is_path else 0.0)
        (done,) = list(self.scheduler(engines).run([flight]))
        if done.error is not None:
            raise done.error
        return self._result(done, topk)

    def run_many(self, videos: Iterable[str | os.PathLike], budget: str | float | Budget | None = None,
                 topk: int = 5, prefetch: int = 2, batch: int = 1, workers: int = 1
                 ) -> Iterator[tuple[str, VideoResult | AdaFocusError]]:
        """Run many videos, decoding the next ones in the background while the engines run.

        ``batch``: videos in flight at once; their engine calls are batched per stage (one glance call for
        the new videos, one local call for the next focus step of all the others). With ``batch`` 1 the
        results come in input order; with more, in the order videos finish. Yields ``(path, result)``; a
        video that fails yields its error (the others go on).
        """
        from adafocus.runtime.decode import Prefetcher

        if batch < 1:
            raise ConfigError(f"batch must be >= 1, got {batch}")
        b = budget if isinstance(budget, Budget) else self.budget(budget)
        # decode ahead; the CPU base family preprocesses here, lazily (the glance frames, then each focus
        # frame a step reads, about 11 of 16 on the demo); on a GPU the frames are normalised on the device
        # here; the others preprocess ahead too when batched
        load = self.decode if batch == 1 or self._lazy or self._on_gpu else self._decode_preprocessed
        sched = self.scheduler()
        depth = max(prefetch, 2 * batch) if batch > 1 else prefetch
        with Prefetcher(list(videos), load, depth=depth, workers=workers) as queue:
            def flights():
                for item in queue:
                    path = str(item.item)
                    if item.error is not None:
                        err = item.error
                        yield path, err if isinstance(err, AdaFocusError) else AdaFocusError(f"{path}: {err}")
                        continue
                    try:
                        yield self._flight(item.result, b, background_ms=item.result.decode_ms)
                    except AdaFocusError as exc:
                        yield path, exc

            for done in sched.run(flights(), slots=batch):
                if isinstance(done, tuple):
                    yield done
                elif done.error is not None:
                    yield done.key, done.error
                else:
                    yield done.key, self._result(done, topk)
        self.last_stats = sched.stats

    def stream(self, source: str | int, window: float | None = None, stride: float | None = None,
               budget: str | float | Budget | None = None, topk: int = 5, **options) -> Iterator[Any]:
        """Results of a live ``source`` (a stream URL, a camera index, or a file replayed live), one per window
        of ``window`` seconds every ``stride`` seconds (see :mod:`adafocus.runtime.stream`)."""
        from adafocus.runtime.stream import stream

        if self.views > 1:
            raise ConfigError(f"live streams run one view; this pipeline evaluates {self.views} (views=1)")
        return stream(self, source, window=window, stride=stride, budget=budget, topk=topk, **options)

    def _decode_preprocessed(self, path: str | os.PathLike):
        """Decode and preprocess one video (in a background thread, for the batched mode)."""
        decoded = self.decode(path)
        tick = time.perf_counter()
        decoded.preprocessed = self.preprocess(decoded.frames)
        decoded.preprocess_ms = (time.perf_counter() - tick) * 1e3
        if not self.keep_decoded:
            decoded.frames = None
        return decoded

    def _flight(self, decoded, budget: Budget, decode_ms: float = 0.0, background_ms: float | None = None,
                start: float | None = None) -> Flight:
        """A flight for a decoded video: preprocessed (lazily on the CPU base family), glance and candidates
        split, the source made."""
        from adafocus.runtime.preprocess import LazyFrames

        p = self.pre
        start = time.perf_counter() if start is None else start
        tick = time.perf_counter()
        frames = getattr(decoded, "preprocessed", None)
        if frames is None:
            if self._lazy:
                frames = LazyFrames(decoded.frames, p.resize_size, p.frame_size, p.mean, p.std,
                                    first=p.glance_positions)
            elif self._on_gpu and self.views == 1:  # upload the uint8 crops once, normalise on the device
                from adafocus.runtime.preprocess import preprocess_device

                frames = preprocess_device(decoded.frames, self._xp, p.resize_size, p.frame_size, p.mean, p.std)
            else:
                frames = self.preprocess(decoded.frames)
        if p.glance_positions is None:  # [T, ...], or [V, T, ...] with views
            glance_frames, candidates = frames[..., :p.num_glance, :, :, :], frames[..., p.num_glance:, :, :, :]
        else:
            glance_frames, candidates = None, frames
        pre_ms = (time.perf_counter() - tick) * 1e3
        source, t = self.frame_source(candidates, glance_frames)
        plan = self.plan(budget)
        flight = Flight(str(decoded.path), source, budget, chunk=self.chunk, chunks=plan.chunks if plan else None,
                        views=self.views,
                        deadline=self._deadline(budget, decode_ms if background_ms is None else background_ms),
                        meta=_Meta(decoded, decode_ms, background_ms, start, pre_ms,
                                   getattr(decoded, "preprocess_ms", None)))
        flight.timings_ms.update(t)
        return flight

    def _deadline(self, budget: Budget, decode_ms: float) -> float | None:
        """The clock time a flight starting now must be done by (None: no deadline); ``decode_ms`` is
        taken off when the deadline includes decode."""
        if budget.ms is None or budget.average:
            return None
        if self._cost is None:  # a Budget made elsewhere: the scheduler plans with this pipeline's profile
            self.cost_model()
        return self.clock() + (budget.ms - (decode_ms if budget.includes_decode else 0.0)) / 1e3

    def _result(self, flight: Flight, topk: int) -> VideoResult:
        """The VideoResult of a finished flight: labels, patches in video pixels, cost, timings."""
        p, meta = self.pre, flight.meta
        decoded, trace = meta.decoded, _trace(flight)
        if p.glance_positions is None:
            cand_index, glance_index = decoded.indices[p.num_glance:], decoded.indices[:p.num_glance]
        else:
            cand_index, glance_index = decoded.indices, decoded.indices[np.asarray(p.glance_positions)]
        total = (time.perf_counter() - meta.start) * 1e3 + meta.decode_ms
        timings = {"decode": meta.decode_ms if meta.background_ms is None else 0.0, **trace.timings_ms,
                   "preprocess": meta.pre_ms + trace.timings_ms.get("preprocess", 0.0)}  # + focus frames done lazily
        if meta.background_ms is not None:
            timings["decode_background"] = meta.background_ms
        if meta.background_pre_ms is not None:  # the batched mode preprocessed in the prefetch thread
            timings["preprocess_background"] = meta.background_pre_ms
        timings["total"] = total
        timings["other"] = max(0.0, total - sum(v for k, v in timings.items()
                                                if k not in ("total", "decode_background", "preprocess_background")))
        probs = _softmax(np.stack(trace.logits))  # [exits taken, C]
        prob = probs[-1]
        order = np.argsort(-prob)[:max(1, topk)]
        names = self.labels
        positions, boxes, view = trace.positions, trace.boxes, 0
        seen = np.asarray(cand_index)[np.asarray(positions, np.int64)] if trace.exit_step else []
        if self.views > 1 and trace.exit_step:  # results show the centre view's patches; frames_used every view's
            from adafocus.runtime.preprocess import VIEWS

            view = VIEWS[self.views].index("centre")
            positions, boxes = positions[view], boxes[view]
        n_patches = trace.exit_step if self.family == "base" else len(positions) * trace.exit_step
        boxes = np.asarray(boxes[:n_patches], np.float64)
        frame_nos = np.asarray(cand_index)[np.asarray(positions[:n_patches], np.int64)].tolist()
        source = self._source_boxes(boxes, decoded, view).tolist()
        model_boxes = boxes.round(3).tolist()
        patches = [Patch(k + 1 if self.family == "base" else 1, int(frame_nos[k]), source[k], model_boxes[k])
                   for k in range(n_patches)]
        used = sorted({int(i) for i in glance_index} | set(frame_nos) | {int(i) for i in np.ravel(seen)})
        best, best_p = probs.argmax(axis=1).tolist(), probs.max(axis=1).tolist()
        steps = [{"step": k, "label": names[best[k]], "score": best_p[k], "confidence": sc}
                 for k, sc in enumerate(trace.scores)]
        return VideoResult(
            video=str(decoded.path), label=names[int(order[0])], score=float(prob[order[0]]),
            topk=[(names[int(i)], float(prob[i])) for i in order], exit_step=trace.exit_step,
            exit_reason=trace.exit_reason, confidence=trace.scores[-1], frames_used=used, patches=patches,
            gflops=self.computed_gflops(flight), budget_gflops=float(flight.budget.gflops),
            engine=self.engine_name, timings_ms={k: round(v, 3) for k, v in timings.items()}, steps=steps,
            focus_positions=[int(x) for x in positions] if trace.exit_step else [],
            gflops_exit=float(self.exits[trace.exit_step]), chunk=self._chunk_used(flight),
            budget_ms=flight.budget.ms, predicted_ms=self._predicted(flight), views=self.views,
            decoded=decoded if self.keep_decoded else None)

    def _chunk_used(self, flight: Flight) -> int | list[int]:
        """The chunk: the fixed one, or with planned chunks the sizes of the backbone calls made."""
        return flight.chunk if not flight.chunks else list(flight.ran)

    def _predicted(self, flight: Flight) -> float | None:
        """The profile's prediction of the model time of what this flight ran, its backbone calls as they
        were made (a deadline cuts chunks) (None without a profile)."""
        if self._cost is None or self.views > 1:  # profiles are of one view
            return None
        chunks, k = [1] * self._cost.steps, 0
        for n in flight.ran:
            if k < len(chunks):
                chunks[k] = n
            k += n
        return round(self._cost.exit_times(chunks)[flight.steps], 3)

    def computed_gflops(self, flight: Flight) -> float:
        """GFLOPs a finished flight computed: the cost up to its exit, plus the backbone calls of steps a
        chunk ran past the exit."""
        wasted = flight.computed - flight.steps
        backbone = self.manifest.stages["backbone"].gflops * self.views
        return float(self.exits[flight.steps] + max(0, wasted) * backbone)

    def set_chunk(self, chunk: int | str | None) -> int:
        """Focus steps per backbone call: a number (cut to the steps a video has left), or ``auto``/None:
        with a profile of this device (``adafocus profile``) the chunks are planned per step and budget
        (:mod:`adafocus.runtime.plan`); without one 1 on the CPU, where a batched call costs about what its
        single calls do, and every step at once on a GPU, where the calls, not the FLOPs, bound the time
        (not measured: no GPU). Returns the fixed chunk."""
        steps = len(self.exits) - 1
        self.chunk_auto = False
        if chunk is None or (isinstance(chunk, str) and chunk.strip().lower() == "auto"):
            value = 1 if not self._on_gpu else steps
            # plan from this device's profile (of one view: with more views the fixed rule)
            self.chunk_auto = self.views == 1 and self.cost_model(required=False) is not None
        else:
            try:
                value = int(chunk)
            except (TypeError, ValueError):
                raise ConfigError(f"chunk must be a number of focus steps or 'auto', got {chunk!r}") from None
            if value < 1:
                raise ConfigError(f"chunk must be >= 1, got {value}")
        self.chunk = max(1, min(value, steps))
        return self.chunk

    def _source_boxes(self, boxes: np.ndarray, decoded, view: int = 0) -> np.ndarray:
        """(y0, x0, h, w) boxes ``[n, 4]`` in the model's crop (of ``view``) -> (x0, y0, x1, y1) in the
        decoded video's pixels, rounded to 0.01."""
        from adafocus.runtime.preprocess import resized_shape, view_offsets

        p = self.pre
        h, w = decoded.height, decoded.width
        rh, rw = resized_shape(h, w, p.resize_size)
        top, left = view_offsets(rh, rw, p.frame_size, self.views)[view]
        sy, sx = h / rh, w / rw
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        y0, x0, bh, bw = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
        return np.stack([(x0 + left) * sx, (y0 + top) * sy, (x0 + bw + left) * sx, (y0 + bh + top) * sy],
                        axis=1).round(2)


# ------------------------------------------------------------------------------------------ helpers
@dataclass
class _Meta:
    """What a flight carries for its VideoResult: the decoded video and the time spent before the loop."""

    decoded: Any
    decode_ms: float  # decode time paid in the foreground
    background_ms: float | None  # decode time paid in a prefetch thread (None: decoded in the foreground)
    start: float  # perf_counter when the video's work began here
    pre_ms: float  # preprocessing before the loop, here
    background_pre_ms: float | None = None  # preprocessing done in a prefetch thread (the batched mode)


def _trace(f: Flight) -> Trace:
    """A finished flight's decisions as a Trace (preprocessing done lazily by its steps included)."""
    t = dict(f.timings_ms)
    if f.source.preprocess_ms:
        t["preprocess"] = t.get("preprocess", 0.0) + f.source.preprocess_ms
    return Trace(f.logits, f.scores, f.positions, f.boxes, f.steps, f.reason, t)


def expand_videos(inputs: Iterable[str]) -> list[str]:
    """Paths, globs and directories (their video files, sorted) -> a list of paths; missing paths are kept
    so that they are reported as failures.

    Raises VideoError (one line) for a directory without video files (it names the directory and the
    suffixes looked for, ``VIDEO_SUFFIXES``) and for a glob that matches nothing.
    """
    import glob

    out: list[str] = []
    for item in inputs:
        item = os.fspath(item)
        path = Path(item)
        if path.is_dir():
            found = _videos_in(path)
            if not found:
                raise VideoError(f"{item}: no videos in this directory (looked for {', '.join(VIDEO_SUFFIXES)})")
            out += found
        elif any(ch in item for ch in "*?[") and not path.exists():
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise VideoError(f"{item}: no files match this pattern")
            out += matches
        else:
            out.append(item)
    return out


def _videos_in(directory: Path) -> list[str]:
    """The video files (by suffix, case-insensitive) directly in ``directory``, sorted."""
    try:
        entries = list(directory.iterdir())
    except PermissionError:
        raise VideoError(f"{directory}: permission denied") from None
    return sorted(str(f) for f in entries if f.suffix.lower() in VIDEO_SUFFIXES)


def _softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64."""
    z = np.asarray(x, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)

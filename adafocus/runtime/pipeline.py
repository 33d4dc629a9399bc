"""The runtime orchestrator: decode -> glance -> exit 0? -> policy -> focus frames -> crop -> local steps.

Control flow stays here, in Python, between the engines of a bundle (one engine per stage), so that every
stage is a static graph and a video stops as soon as it is confident enough or its budget is spent. Nothing
here imports torch: the edge install is numpy + onnxruntime + OpenCV.

    pipeline = Pipeline.from_bundle("tiny_bundle", engine="auto", device="cpu")
    result = pipeline("video.mp4", budget="30%")
    print(result.label, result.score, result.exit_step, result.gflops)
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from adafocus.bundle import Bundle, load_bundle
from adafocus.device import parse_device, require_device
from adafocus.errors import AdaFocusError, BundleError, EngineError, VideoError
from adafocus.runtime.budget import Budget, make_budget
from adafocus.runtime.crop import crop_planned, plan_crop
from adafocus.runtime.exits import confidence
from adafocus.runtime.sampling import crop_boxes, focus_positions, segment_indices

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
    exit_reason: str  # "confident", "budget" (next step would not fit), "last" (all steps ran)
    confidence: float  # the exit criterion's score at the exit step
    frames_used: list[int]  # video frame numbers the model saw (glance + focus frames)
    patches: list[Patch]
    gflops: float
    budget_gflops: float
    engine: str
    timings_ms: dict[str, float]
    steps: list[dict[str, Any]] = field(default_factory=list)  # per exit: step, label, score, confidence
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
    positions: np.ndarray  # [K] candidate positions of the focus frames (empty if the policy never ran)
    boxes: np.ndarray  # [K, 4] y0, x0, h, w (model frame pixels)
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
        self.keep_decoded = False  # attach the decoded frames to results (for --save-vis)
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
                    cuda_graphs: bool = True) -> Pipeline:
        """Load a bundle (checksums verified) and create one engine per stage.

        ``engine``: ``auto`` or a registered name (``ort``, ``ort-cuda``, ``ort-tensorrt``, ``tensorrt``,
        ``torch``); ``device``: ``cpu`` or ``cuda[:N]`` (also ``gpu[:N]``, any case; a CUDA device this machine
        does not have fails here, before the bundle is read or an engine picked). The ``torch`` engine rebuilds
        the stages from the PyTorch ``checkpoint`` the bundle was exported from (the export extra is needed).
        ``precision``: the stage files to run, the bundle's own (None) or one recorded under
        ``manifest.precisions`` (e.g. ``int8`` from ``adafocus calibrate int8``; ONNX engines only).
        ``cuda_graphs``: the torch engine on cuda replays each stage as a CUDA graph (see TorchEngine).
        """
        from adafocus.engines.registry import create_engine, resolve_engine

        device = str(require_device(device))  # parsed once, here: engines, crops and results see "cpu"/"cuda:N"
        bundle = load_bundle(path, verify=verify)
        name = resolve_engine(engine, device)
        files = _precision_files(bundle, precision, name)
        engines: dict[str, Any] = {}
        stages = ("global", "policy", "local")
        try:
            if name == "tensorrt":
                record = _engine_record(bundle)
                for stage in stages:
                    engines[stage] = create_engine(
                        name, str(bundle.file(record.files[stage])), device=device,
                        expected_trt_version=record.tensorrt_version,
                        expected_compute_capability=record.compute_capability)
            elif name == "torch":
                if checkpoint is None:
                    raise EngineError("the torch engine needs the PyTorch checkpoint: pass checkpoint=PATH "
                                      "(--checkpoint) of the model the bundle was exported from")
                engines = _torch_stage_engines(checkpoint, bundle, device, cuda_graphs)
            else:
                options = {"threads": threads} if threads else {}
                for stage in stages:
                    engines[stage] = create_engine(name, str(files[stage]), device=device, **options)
            for stage, eng in engines.items():  # the manifest is not checksummed: check it against the files
                why = bundle.manifest.stages[stage].io_mismatch(eng.inputs, eng.outputs)
                if why is not None:
                    raise BundleError(f"bundle {bundle.path}: stage {stage} ({files[stage].name}) does not match "
                                      f"its manifest record: {why}")
        except Exception:
            for e in engines.values():
                e.close()
            raise
        pipe = cls(bundle, engines, name, device, criterion)
        pipe.precision = precision or bundle.manifest.precision
        return pipe

    def close(self) -> None:
        for e in self.engines.values():
            e.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- budgets
    def budget(self, budget: str | float | None = None, average: bool = False) -> Budget:
        """Parse a budget ('0.08' GFLOPs, '30%' of the dense cost, None = full model) for this bundle: a hard
        per-video cap, or with ``average`` the calibrated average to aim at (see adafocus.runtime.budget)."""
        own = self.precision if self.precision != self.manifest.precision else None
        table = list(self.manifest.exit.table(own).values())
        return make_budget(budget, self.exits, table, self.dense, average)

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
        preprocessing as the adaptive model's candidates)."""
        return self.preprocess(self.decode_dense(path).frames)

    def preprocess(self, frames_uint8: np.ndarray) -> np.ndarray:
        from adafocus.runtime.preprocess import preprocess

        p = self.pre
        return preprocess(frames_uint8, p.resize_size, p.frame_size, p.mean, p.std)

    # -------------------------------------------------------------------------------------- step loop
    def run_frames(self, frames: np.ndarray, budget: Budget | None = None,
                   glance_frames: np.ndarray | None = None) -> Trace:
        """The step loop on normalised frames: candidates ``[N, 3, S, S]`` (+ the TSM glance frames).

        Base family: the glance frames are ``preprocessing.glance_positions`` of the candidates.
        """
        from adafocus.runtime.preprocess import LazyFrames

        p = self.pre
        budget = budget or self.budget(None)
        thresholds = budget.thresholds
        t: dict[str, float] = {"glance": 0.0, "policy": 0.0, "crop": 0.0, "local": 0.0}
        xp = self._xp
        lazy = given = frames if isinstance(frames, LazyFrames) else None
        lazy_ms = lazy.ms if lazy is not None else 0.0
        if lazy is not None and (self._on_gpu or self.family != "base" or p.glance_positions is None):
            frames, lazy = lazy.materialize(), None  # only the CPU base loop reads frames one by one
            t["preprocess"] = given.ms - lazy_ms
        tick = time.perf_counter()
        if self._on_gpu:
            frames = xp.asarray(frames)
            if glance_frames is not None:
                glance_frames = xp.asarray(glance_frames)
        t["upload"] = (time.perf_counter() - tick) * 1e3
        if lazy is not None:
            glance_in = lazy.first()  # already contiguous: LazyFrames(first=glance_positions)
        elif p.glance_positions is not None:
            glance_in = frames[xp.asarray(p.glance_positions)]
        else:
            glance_in = glance_frames
        if glance_in is None:
            raise ValueError("this bundle's glance frames are sampled separately: pass glance_frames")

        tick = time.perf_counter()
        g = self.engines["global"].run({"frames": glance_in[None]})
        t["glance"] = (time.perf_counter() - tick) * 1e3
        logits_list = [_host(g["logits"])[0]]
        scores = [float(confidence(logits_list[0], self.criterion))]
        empty = Trace(logits_list, scores, np.zeros(0, np.int64), np.zeros((0, 4), np.float32), 0, "", t)
        if _passes(thresholds, 0, scores[0]):
            empty.exit_reason = "confident"
            return empty
        if budget.max_steps == 0:
            empty.exit_reason = "budget"
            return empty

        tick = time.perf_counter()
        pol = self.engines["policy"].run({"fmap": g["fmap"], "vec": g["vec"]})
        actions, weights = _host(pol["actions"])[0], _host(pol["weights"])
        positions = focus_positions(weights, p.candidates, p.num_focus, clamp=p.focus_clamp)[0]
        acts = actions[positions] if actions.shape[0] == p.candidates else np.repeat(actions, p.num_focus, 0)
        boxes = crop_boxes(acts, p.frame_size, p.crop_min, p.crop_max)
        t["policy"] = (time.perf_counter() - tick) * 1e3

        context = g["context"]
        n_steps = len(self.exits) - 1
        reason = "last"
        if self.family == "base":
            state = xp.zeros((1, int(self.manifest.stages["local"].inputs[1].shape[1])), np.float32)
            tick = time.perf_counter()
            plan = None if self._on_gpu else plan_crop(boxes, p.frame_size, p.patch_size)
            t["crop"] += (time.perf_counter() - tick) * 1e3
            for k in range(n_steps):
                if k + 1 > budget.max_steps:
                    reason = "budget"
                    break
                if lazy is not None:  # the focus frame, preprocessed now if no earlier step used it
                    source, index = lazy.frame(int(positions[k]))[None], 0
                else:
                    source, index = frames, int(positions[k])
                tick = time.perf_counter()
                if plan is not None:  # CPU: the boxes' interpolation tables were made once, above
                    patch = crop_planned(source, plan, k, index)
                else:
                    patch = self._crop(frames, xp.asarray(boxes[k:k + 1]), p.patch_size,
                                       xp.asarray(positions[k:k + 1]))
                t["crop"] += (time.perf_counter() - tick) * 1e3
                tick = time.perf_counter()
                out = self.engines["local"].run({"patch": patch, "state": state, "context": context,
                                                 "step": _step_feed(k)})
                t["local"] += (time.perf_counter() - tick) * 1e3
                state = out["new_state"]
                logits_list.append(_host(out["logits"])[0])
                scores.append(float(confidence(logits_list[-1], self.criterion)))
                if k + 1 < n_steps and _passes(thresholds, k + 1, scores[-1]):
                    reason = "confident"
                    break
        else:  # tsm: one step with all K patches, one box per video
            if budget.max_steps >= 1:
                tick = time.perf_counter()
                patches = self._crop(frames, xp.asarray(boxes), p.patch_size, xp.asarray(positions))
                t["crop"] += (time.perf_counter() - tick) * 1e3
                tick = time.perf_counter()
                out = self.engines["local"].run({"patches": patches[None], "context": context})
                t["local"] += (time.perf_counter() - tick) * 1e3
                logits_list.append(_host(out["logits"])[0])
                scores.append(float(confidence(logits_list[-1], self.criterion)))
            else:
                reason = "budget"
        steps_taken = len(logits_list) - 1
        if given is not None:  # frames first preprocessed here (by the focus steps, or to materialize)
            t["preprocess"] = given.ms - lazy_ms
        return Trace(logits_list, scores, positions, boxes, steps_taken, reason, t)

    # ------------------------------------------------------------------------------------------ videos
    def __call__(self, video: str | os.PathLike | Any, budget: str | float | Budget | None = None,
                 topk: int = 5) -> VideoResult:
        """Run one video (a path or an already decoded :class:`DecodedVideo`)."""
        b = budget if isinstance(budget, Budget) else self.budget(budget)
        is_path = isinstance(video, (str, os.PathLike))
        decoded = self.decode(video) if is_path else video
        decode_ms = decoded.decode_ms if is_path else 0.0
        return self._run_decoded(decoded, b, topk, decode_ms, time.perf_counter())

    def run_many(self, videos: Iterable[str | os.PathLike], budget: str | float | Budget | None = None,
                 topk: int = 5, prefetch: int = 2) -> Iterator[tuple[str, VideoResult | AdaFocusError]]:
        """Run many videos, decoding the next ones in the background while the engines run.

        Yields ``(path, result)``; a video that fails yields its error (the others go on).
        """
        from adafocus.runtime.decode import Prefetcher

        b = budget if isinstance(budget, Budget) else self.budget(budget)
        with Prefetcher(list(videos), self.decode, depth=prefetch) as queue:
            for item in queue:
                path = str(item.item)
                if item.error is not None:
                    err = item.error
                    yield path, err if isinstance(err, AdaFocusError) else AdaFocusError(f"{path}: {err}")
                    continue
                start = time.perf_counter()
                try:
                    yield path, self._run_decoded(item.result, b, topk, 0.0, start, item.result.decode_ms)
                except AdaFocusError as exc:
                    yield path, exc

    def _run_decoded(self, decoded, budget: Budget, topk: int, decode_ms: float, start: float,
                     background_decode_ms: float | None = None) -> VideoResult:
        from adafocus.runtime.preprocess import LazyFrames

        p = self.pre
        tick = time.perf_counter()
        if p.glance_positions is not None and self.family == "base" and not self._on_gpu:
            # CPU: preprocess the glance frames now and each focus frame when a step first crops it
            frames = LazyFrames(decoded.frames, p.resize_size, p.frame_size, p.mean, p.std,
                                first=p.glance_positions)
        else:
            frames = self.preprocess(decoded.frames)
        if p.glance_positions is None:
            glance_frames, candidates = frames[:p.num_glance], frames[p.num_glance:]
            cand_index = decoded.indices[p.num_glance:]
            glance_index = decoded.indices[:p.num_glance]
        else:
            glance_frames, candidates = None, frames
            cand_index = decoded.indices
            glance_index = decoded.indices[np.asarray(p.glance_positions)]
        pre_ms = (time.perf_counter() - tick) * 1e3
        trace = self.run_frames(candidates, budget, glance_frames)
        total = (time.perf_counter() - start) * 1e3 + decode_ms
        timings = {"decode": decode_ms if background_decode_ms is None else 0.0, **trace.timings_ms,
                   "preprocess": pre_ms + trace.timings_ms.get("preprocess", 0.0)}  # + focus frames done lazily
        if background_decode_ms is not None:
            timings["decode_background"] = background_decode_ms
        timings["total"] = total
        timings["other"] = max(0.0, total - sum(v for k, v in timings.items()
                                                if k not in ("total", "decode_background")))
        probs = _softmax(np.stack(trace.logits))  # [exits taken, C]
        prob = probs[-1]
        order = np.argsort(-prob)[:max(1, topk)]
        names = self.labels
        n_patches = trace.exit_step if self.family == "base" else len(trace.positions) * trace.exit_step
        boxes = np.asarray(trace.boxes[:n_patches], np.float64)
        frame_nos = np.asarray(cand_index)[np.asarray(trace.positions[:n_patches], np.int64)].tolist()
        source = self._source_boxes(boxes, decoded).tolist()
        model_boxes = boxes.round(3).tolist()
        patches = [Patch(k + 1 if self.family == "base" else 1, int(frame_nos[k]), source[k], model_boxes[k])
                   for k in range(n_patches)]
        used = sorted({int(i) for i in glance_index} | set(frame_nos))
        best, best_p = probs.argmax(axis=1).tolist(), probs.max(axis=1).tolist()
        steps = [{"step": k, "label": names[best[k]], "score": best_p[k], "confidence": sc}
                 for k, sc in enumerate(trace.scores)]
        return VideoResult(
            video=str(decoded.path), label=names[int(order[0])], score=float(prob[order[0]]),
            topk=[(names[int(i)], float(prob[i])) for i in order], exit_step=trace.exit_step,
            exit_reason=trace.exit_reason, confidence=trace.scores[-1], frames_used=used, patches=patches,
            gflops=float(self.exits[trace.exit_step]), budget_gflops=float(budget.gflops),
            engine=self.engine_name, timings_ms={k: round(v, 3) for k, v in timings.items()}, steps=steps,
            decoded=decoded if self.keep_decoded else None)

    def _source_boxes(self, boxes: np.ndarray, decoded) -> np.ndarray:
        """(y0, x0, h, w) boxes ``[n, 4]`` in the model's crop -> (x0, y0, x1, y1) in the decoded video's
        pixels, rounded to 0.01."""
        from adafocus.runtime.preprocess import center_crop_offsets, resized_shape

        p = self.pre
        h, w = decoded.height, decoded.width
        rh, rw = resized_shape(h, w, p.resize_size)
        top, left = center_crop_offsets(rh, rw, p.frame_size)
        sy, sx = h / rh, w / rw
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        y0, x0, bh, bw = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
        return np.stack([(x0 + left) * sx, (y0 + top) * sy, (x0 + bw + left) * sx, (y0 + bh + top) * sy],
                        axis=1).round(2)


# ------------------------------------------------------------------------------------------ helpers
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


@functools.lru_cache(maxsize=256)
def _step_feed(k: int) -> np.ndarray:
    """The local stage's ``step`` input for step k (made once: it is fed every step of every video)."""
    a = np.array([k], np.int64)
    a.setflags(write=False)
    return a


def _passes(thresholds, k: int, score: float) -> bool:
    if thresholds is None or k >= len(thresholds) or thresholds[k] is None:
        return False
    return score >= float(thresholds[k])


def _host(x: Any) -> np.ndarray:
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


def _softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64."""
    z = np.asarray(x, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _precision_files(bundle: Bundle, precision: str | None, engine: str) -> dict[str, Path]:
    """Stage files of ``precision``: the bundle's own, or those recorded under ``manifest.precisions``."""
    m = bundle.manifest
    if precision is None or precision == m.precision:
        return {stage: bundle.stage_path(stage) for stage in m.stages}
    if precision not in m.precisions:
        known = ", ".join([m.precision, *m.precisions])
        hint = " (adafocus calibrate int8 BUNDLE --data DIR adds it)" if precision == "int8" else ""
        raise BundleError(f"bundle {bundle.path} has no {precision} files (has: {known}){hint}")
    if engine in ("tensorrt", "torch"):
        raise EngineError(f"precision {precision} runs the bundle's {precision} ONNX files: use an ort engine, "
                          f"not {engine}")
    chosen = m.precisions[precision]
    return {stage: bundle.file(chosen.get(stage, m.stages[stage].file)) for stage in m.stages}


def _engine_record(bundle: Bundle):
    if not bundle.manifest.engines:
        raise BundleError(f"{bundle.path} has no TensorRT engines: run `adafocus build-engines {bundle.path}`")
    return next(iter(bundle.manifest.engines.values()))


def _torch_stage_engines(checkpoint, bundle: Bundle, device: str, cuda_graphs: bool = True) -> dict[str, Any]:
    from adafocus.engines.registry import create_engine
    from adafocus.export.stages import SIGNATURES, StageModule
    from adafocus.models import load
    from adafocus.models.checkpoint import check_source

    model = load(checkpoint)
    # the checkpoint must be the one the bundle was exported from (its weights digest, or for bundles without
    # one its model config), before any stage is built: another model's weights would run without a word
    m = bundle.manifest
    check_source(model, checkpoint, m.source, m.config, str(bundle.path))
    engines = {}
    for stage in ("global", "policy", "local"):
        ins, outs = SIGNATURES[(model.cfg.family, stage)]
        engines[stage] = create_engine("torch", module=StageModule(model, stage), input_names=list(ins),
                                       output_names=list(outs), device=device, cuda_graphs=cuda_graphs)
    return engines

"""Verification of an exported bundle against the PyTorch reference: per stage, then whole videos.

1. **Stages**: each ONNX file runs in onnxruntime on the same realistic inputs as the fp32 PyTorch stage
   (chained through the model, at a batch size other than the traced one, which also checks the dynamic
   batch); max abs and max rel error per output, where rel = max abs error / max |reference|.
2. **End to end**: random videos run step by step both ways: the reference model's ``stepwise``, and the
   runtime itself (:meth:`adafocus.runtime.pipeline.Pipeline.run_frames` on ``ort`` engines: numpy frame
   choice, :func:`adafocus.runtime.crop.crop_cpu` crop, explicit classifier state). Exit
   thresholds are set between the two highest reference scores of every step, so that videos exit at
   different steps; the exit steps, predictions, focus positions and boxes are compared.

Tolerances (:data:`TOLERANCES`), per output ``max_abs <= rtol * max|ref| + atol + drift_factor * drift``:

- fp32: rtol 1e-4, atol 0; every decision identical. Float32 reorderings give ~1e-6 on well-scaled weights;
  random weights with BatchNorm statistics amplify them to ~2e-5 (glance stage of ``tiny``), and the
  end-to-end logits, which compound all three stages, to ~1e-4 (see :func:`end_to_end_tolerance`). A deep
  random-weight network can amplify float32 rounding past 1e-4 by itself: PyTorch's own fp32 run of a random
  ``x3d-p128-16x32`` (X3D-S, 27 residual blocks, ~3x per stage) lands 1.4e-3 (relative) from its fp64 run on
  the glance feature maps. So the fp32 bound is never below ``fp64_factor`` (2) x that drift of PyTorch fp32
  from fp64 on the same inputs: the graph may be as far from the exact result as PyTorch fp32 is (x2: both are
  fp32 roundings of it). On well-conditioned weights the drift is ~1e-6 and the bound stays 1e-4 of the scale.
- fp16: rtol 1e-3, atol 2**-14, drift_factor 2, where ``drift`` is how far the *PyTorch* model run in fp16
  lands from the fp32 one on the same inputs. Why not a fixed rtol: what fp16 costs depends on the
  weights, not on the export. fp16's unit roundoff is 2**-11 ~ 4.9e-4 per layer boundary and per weight;
  a well-conditioned (trained) network should keep that near 1e-3 of the output scale (not measured
  here: no trained weights were at hand), but a random-weight network with BatchNorm amplifies it layer
  after layer (measured on random weights with BatchNorm
  statistics from random inputs: 4-7% on the glance stage of ``tiny`` and ``base-p128``, 20% on the base
  classifier state), and with untouched random statistics the glance features of ``tiny``/``base-p128``
  are ~1e-7, below fp16's normal range. So the check is "the ONNX graph is no further from fp32 than
  PyTorch's own fp16 run of the same weights (x2, since onnxruntime rounds at other points than torch),
  plus 1e-3 of the scale"; an export bug (a wrong op, a lost cast, overflow) is off by O(1) and fails.
  ``atol`` is fp16's smallest normal number: below it fp16 has no relative precision (subnormals).
  The end-to-end bound on each step's logits adds up the stages' relative bounds (x2, see
  :func:`end_to_end_tolerance`): with fp16 it only catches O(1) breakage on ill-conditioned (random)
  weights, and tightens to ~1e-2 where PyTorch's own fp16 drift is ~1e-3. With fp16 a decision may
  differ only where the fp32 reference sits within that bound of the decision boundary (a near tie: top-2
  logit gap, score vs threshold, or focus positions read from temporal weights that matched within
  tolerance); the rest of that video is then not compared, and the note says so. The report prints the
  model's own fp16 drift, so a model that fp16 does not suit shows it.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from adafocus.bundle import STAGES, Bundle, Manifest, load_bundle
from adafocus.errors import ConfigError
from adafocus.export.onnx_export import ExportError
from adafocus.export.stages import STAGE_METHODS, build_stages, example_inputs
from adafocus.runtime.sampling import crop_boxes


class VerificationError(ExportError):
    """The exported bundle does not match the PyTorch model within tolerance."""


@dataclass(frozen=True)
class Tolerance:
    """``max_abs <= max(rtol * ref_max + atol + drift_factor * drift, fp64_factor * drift64)`` (see the module
    docstring): ``drift`` is PyTorch fp16's distance from fp32, ``drift64`` PyTorch fp32's from fp64."""

    rtol: float
    atol: float
    drift_factor: float = 0.0
    fp64_factor: float = 0.0

    def bound(self, ref_max: float, drift: float = 0.0, drift64: float = 0.0) -> float:
        return max(self.rtol * ref_max + self.atol + self.drift_factor * drift, self.fp64_factor * drift64)


TOLERANCES = {"fp32": Tolerance(1e-4, 0.0, fp64_factor=2.0), "fp16": Tolerance(1e-3, 2.0 ** -14, drift_factor=2.0)}


@dataclass
class OutputCheck:
    stage: str
    output: str
    max_abs: float  # ONNX vs fp32 PyTorch
    max_rel: float  # max_abs / ref_max
    ref_max: float  # max |fp32 PyTorch output|
    bound: float  # the largest max_abs allowed
    drift: float | None  # PyTorch's own drift: fp16 vs fp32 (fp16 bundles), fp32 vs fp64 (fp32 bundles)
    ok: bool


@dataclass
class VideoCheck:
    video: int
    exit_ref: int
    exit_onnx: int
    pred_ref: int
    pred_onnx: int
    positions_same: bool
    max_box_err: float  # pixels
    max_logit_rel: float
    ok: bool
    note: str = ""


@dataclass
class VerificationReport:
    precision: str
    tolerance: Tolerance
    stages: list[OutputCheck] = field(default_factory=list)
    videos: list[VideoCheck] = field(default_factory=list)
    thresholds: list[float | None] = field(default_factory=list)
    video_tolerance: Tolerance | None = None  # bound on each step's logits in the end-to-end check

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.stages) and all(v.ok for v in self.videos)

    def failures(self) -> list[str]:
        out = [f"{c.stage}.{c.output} max abs {c.max_abs:.3g} (rel {c.max_rel:.3g})" for c in self.stages
               if not c.ok]
        out += [f"video {v.video}: {v.note or 'decisions differ'}" for v in self.videos if not v.ok]
        return out

    def to_dict(self) -> dict:
        return {"passed": self.passed, "precision": self.precision, "tolerance": asdict(self.tolerance),
                "stages": [_rounded(asdict(c)) for c in self.stages],
                "videos": [_rounded(asdict(v)) for v in self.videos],
                "thresholds": [None if t is None else float(f"{t:.6g}") for t in self.thresholds],
                "video_tolerance": asdict(self.video_tolerance) if self.video_tolerance else None}

    def format(self) -> str:
        t = self.tolerance
        rule = f"rtol {t.rtol:g}, atol {t.atol:.2g}" + (f", {t.drift_factor:g} x torch fp16 drift"
                                                         if t.drift_factor else "")
        rule += f", at least {t.fp64_factor:g} x torch fp32-vs-fp64 drift" if t.fp64_factor else ""
        drift = any(c.drift is not None for c in self.stages)
        label = "fp16 drift" if self.precision == "fp16" else "fp64 drift"
        lines = [f"{'stage':<8} {'output':<10} {'max abs':>10} {'max rel':>10} {'bound':>10}"
                 + (f" {label:>10}" if drift else "") + f"  ({rule})"]
        for c in self.stages:
            lines.append(f"{c.stage:<8} {c.output:<10} {c.max_abs:10.3g} {c.max_rel:10.3g} {c.bound:10.3g}"
                         + (f" {c.drift:10.3g}" if drift and c.drift is not None else "")
                         + f"  {'ok' if c.ok else 'FAIL'}")
        drifts = [c.drift / c.ref_max for c in self.stages if c.drift is not None and c.ref_max >= 1e-2]
        if self.precision == "fp32" and drifts and max(drifts) > 0.5 * t.rtol:
            lines.append(f"note: PyTorch fp32 itself lands up to {max(drifts):.2g} (relative) from fp64 on these "
                         "weights (an ill-conditioned, e.g. random, model); bounds follow that drift")
        elif self.precision != "fp32" and drifts and max(drifts) > 1e-2:
            lines.append(f"warning: PyTorch itself moves by up to {max(drifts):.1%} (relative) at fp16 on these "
                         "weights; check accuracy on real videos, or export fp32")
        if self.videos:
            vt = self.video_tolerance or t
            lines.append(f"end to end: {len(self.videos)} random videos, exit thresholds {_fmt_list(self.thresholds)}, "
                         f"logits within rtol {vt.rtol:.3g}")
            lines.append(f"{'video':<6} {'exit ref/onnx':>13} {'pred ref/onnx':>13} {'positions':>9} "
                         f"{'box err px':>10} {'logit rel':>10}")
            for v in self.videos:
                lines.append(f"{v.video:<6} {v.exit_ref:>6}/{v.exit_onnx:<6} {v.pred_ref:>6}/{v.pred_onnx:<6} "
                             f"{'same' if v.positions_same else 'differ':>9} {v.max_box_err:10.3g} "
                             f"{v.max_logit_rel:10.3g}  {'ok' if v.ok else 'FAIL'}"
                             + (f"  ({v.note})" if v.note else ""))
            differ = sum(v.exit_ref != v.exit_onnx or v.pred_ref != v.pred_onnx or not v.positions_same
                         for v in self.videos)
            if differ:
                lines.append(f"note: decisions differ from PyTorch fp32 in {differ} of {len(self.videos)} videos, "
                             "each at a near tie within the bound")
        return "\n".join(lines)


def _fmt_list(values) -> str:
    return "[" + ", ".join("-" if v is None else f"{v:.3g}" for v in values) + "]"


def _rounded(d: dict) -> dict:
    # 4 significant digits are plenty for error magnitudes, and keep the manifest readable
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in d.items()}


# ------------------------------------------------------------------------------------------ engines
def ort_engines(bundle: Bundle | str | Path, files: dict[str, str] | None = None) -> dict[str, Any]:
    """One onnxruntime CPU engine per stage, opened by the runtime's engine factory
    (:func:`adafocus.runtime.engine_set.open_engines`: real I/O checked against the manifest): the bundle's
    stage files, or ``files`` (stage -> file, relative to the bundle). ``bundle``: a
    :class:`Bundle` (its manifest may be one not written yet) or a bundle directory (checksums not verified).
    Close them when done."""
    from adafocus.runtime.engine_set import open_engines

    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle, verify=False)
    return open_engines(bundle, "ort", "cpu", stages=tuple(files) if files else STAGES, files=files)[1]


# --------------------------------------------------------------------------------------------- stages
@torch.no_grad()
def check_stages(model: nn.Module, engines: dict[str, Any], precision: str = "fp32", batch: int = 3,
                 seed: int = 1) -> list[OutputCheck]:
    """Each ONNX stage against the fp32 PyTorch stage on the same inputs (fp16: and PyTorch's fp16 drift)."""
    tol = TOLERANCES[precision]
    reference = build_stages(model, "fp32")
    # PyTorch's own drift on the same inputs: fp16 vs fp32 (fp16 bundles), or fp32 vs fp64 (fp32 bundles)
    other = build_stages(model, "fp16") if tol.drift_factor else _fp64_stages(model) if tol.fp64_factor else None
    inputs = example_inputs(model, batch, seed)
    checks = []
    for stage, module in reference.items():
        ref = module(*inputs[stage])
        if other is None:
            ref_other = [None] * len(ref)
        elif tol.drift_factor:
            ref_other = other[stage](*inputs[stage])
        else:
            ref_other = other[stage](*[x.double() if x.is_floating_point() else x for x in inputs[stage]])
        got = engines[stage].run({n: x.numpy() for n, x in zip(module.input_names, inputs[stage], strict=True)})
        for name, r, r2 in zip(module.output_names, ref, ref_other, strict=True):
            drift = None if r2 is None else _max_abs(r2.numpy(), r.numpy())
            checks.append(_compare(stage, name, got[name], r.numpy(), tol, drift))
    return checks


class _Fp64Stage(nn.Module):
    """A stage of the fp64 copy: float64 in, float64 out (the drift is measured before any cast)."""

    def __init__(self, model: nn.Module, stage: str):
        super().__init__()
        self._method = getattr(model, STAGE_METHODS[stage])

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self._method(*inputs)
        return out if isinstance(out, tuple) else (out,)


def _fp64_stages(model: nn.Module) -> dict[str, _Fp64Stage]:
    """The stages of a float64 copy of ``model`` (``model`` is left untouched)."""
    copy64 = copy.deepcopy(model).double().eval()
    return {stage: _Fp64Stage(copy64, stage) for stage in STAGE_METHODS}


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0


def _compare(stage: str, output: str, got: np.ndarray, ref: np.ndarray, tol: Tolerance,
             drift: float | None) -> OutputCheck:
    ref_max = float(np.abs(ref).max()) if ref.size else 0.0
    if tol.fp64_factor:
        bound = tol.bound(ref_max, drift64=drift or 0.0)
    else:
        bound = tol.bound(ref_max, drift or 0.0)
    if got.shape != ref.shape:
        return OutputCheck(stage, output, float("inf"), float("inf"), ref_max, bound, drift, False)
    max_abs = _max_abs(got, ref)
    max_rel = max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else float("inf"))
    ok = bool(np.isfinite(got).all()) and max_abs <= bound
    return OutputCheck(stage, output, max_abs, max_rel, ref_max, bound, drift, ok)


def end_to_end_tolerance(precision: str, stages: list[OutputCheck]) -> Tolerance:
    """Bound on each step's logits in the end-to-end check.

    A step's logits carry the error of all three parts (the glance's context, the policy's boxes, which
    move the crop, and the local step: backbone + head, counted as one), each fed the other side's slightly
    different outputs, so the parts' relative bounds add up: ``2 * sum over parts of max over outputs of
    (bound - atol) / max|ref|``, the x2 because the stage bounds were measured on other inputs. fp32: 6e-4.
    Outputs below 1e-2 in magnitude are left out: that close to fp16's subnormal range relative errors mean
    nothing.
    """
    tol = TOLERANCES[precision]
    total = 0.0
    for part in dict.fromkeys(_PART.get(c.stage, c.stage) for c in stages):
        rel = [(c.bound - tol.atol) / c.ref_max for c in stages
               if _PART.get(c.stage, c.stage) == part and c.ref_max >= 1e-2]
        total += max(rel, default=tol.rtol)
    return Tolerance(2.0 * total, tol.atol)


# the local step is one piece of arithmetic split over two files: its error is counted once, not per file
_PART = {"backbone": "local", "head": "local"}


# ------------------------------------------------------------------------------------ host-side loop
@dataclass
class Trace:
    """One video's step-wise run: executed steps and the policy's choice for all K focus frames."""

    logits: list[np.ndarray]  # per executed step
    scores: list[float]
    positions: np.ndarray | None = None  # [K] (None if it exited at step 0)
    boxes: np.ndarray | None = None  # [K, 4] (y0, x0, h, w) pixels

    @property
    def exit_step(self) -> int:
        return len(self.logits) - 1


def run_onnx(pipeline, video: dict[str, np.ndarray], thresholds=None) -> Trace:
    """Step-wise inference of one video by the runtime (:class:`adafocus.runtime.pipeline.Pipeline`).

    ``video``: base ``{"frames": [N, 3, S, S]}``; tsm ``{"glance": [Tg, 3, S, S], "candidates": [3K, ...]}``.
    """
    from adafocus.runtime.budget import Budget

    steps = len(pipeline.exits) - 1
    budget = Budget(float("inf"), steps, None if thresholds is None else tuple(thresholds))
    if "frames" in video:
        t = pipeline.run_frames(video["frames"], budget)
    else:
        t = pipeline.run_frames(video["candidates"], budget, glance_frames=video["glance"])
    ran_policy = len(t.positions) > 0
    return Trace(list(t.logits), list(t.scores), t.positions if ran_policy else None,
                 t.boxes if ran_policy else None)


@torch.no_grad()
def run_torch(model: nn.Module, video: dict[str, np.ndarray], thresholds=None,
              criterion: str = "max_logit") -> Trace:
    """The reference model's own ``stepwise`` on one video, as a :class:`Trace`."""
    cfg = model.cfg
    if cfg.family == "base":
        steps = list(model.stepwise(torch.from_numpy(video["frames"]), thresholds, criterion))
    else:
        steps = list(model.stepwise(torch.from_numpy(video["glance"]), torch.from_numpy(video["candidates"]),
                                    thresholds, criterion))
    trace = Trace([s.logits for s in steps], [s.score for s in steps])
    if len(steps) > 1:
        if cfg.family == "base":
            trace.positions = np.array([s.position for s in steps[1:]])
            actions = np.stack([s.action for s in steps[1:]])
        else:
            trace.positions = np.asarray(steps[1].positions)
            actions = np.repeat(np.asarray(steps[1].action)[None], cfg.num_focus, axis=0)
        trace.boxes = crop_boxes(actions, cfg.frame_size, cfg.crop_min, cfg.crop_max)
    return trace


def random_videos(cfg, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random normalised frames in the layout of :func:`run_onnx`: smooth random images (a coarse random
    grid upsampled bilinearly), not white noise.

    Why smooth: the two sides' boxes differ by float rounding (~1e-4 px), and a bilinear crop turns a box
    shift into a pixel change proportional to the image gradient. White noise has the steepest gradient
    an image can have and inflates that into ~3e-4 relative logit differences that no real frame shows.
    """
    g = torch.Generator().manual_seed(seed)
    s = cfg.frame_size
    coarse = max(4, s // 16)

    def frames(n):
        grid = torch.randn(n, 3, coarse, coarse, generator=g)
        return F.interpolate(grid, size=(s, s), mode="bilinear", align_corners=False).numpy()

    if cfg.family == "base":
        return [{"frames": frames(cfg.num_segments)} for _ in range(count)]
    return [{"glance": frames(cfg.num_glance), "candidates": frames(cfg.candidates)} for _ in range(count)]


def spread_thresholds(scores: list[list[float]], tol: Tolerance) -> list[float | None]:
    """Exit thresholds that make the reference videos exit at different steps, far from every score.

    Per step, the threshold goes in the middle of the widest gap between consecutive reference scores in
    the upper half (so at most half the videos exit there); a gap narrower than twice the tolerance
    would make the decision a coin toss between the two sides, so such a step gets no threshold (None).
    """
    out: list[float | None] = []
    for k in range(max(len(s) for s in scores)):
        col = sorted(s[k] for s in scores if len(s) > k)
        best, best_gap = None, 0.0
        for j in range(len(col) // 2, len(col)):
            lo = col[j - 1] if j > 0 else None
            if lo is None:
                continue
            gap = col[j] - lo
            if gap > best_gap and gap > 2 * tol.bound(max(abs(lo), abs(col[j]))):
                best, best_gap = (lo + col[j]) / 2, gap
        out.append(best)
    return out


# -------------------------------------------------------------------------------------- end to end
def check_videos(model: nn.Module, pipeline, precision: str = "fp32", count: int = 4, seed: int = 0,
                 tol: Tolerance | None = None) -> tuple[list[VideoCheck], list[float | None]]:
    """Whole videos both ways with mid-way exits; returns the per-video checks and the thresholds used.

    ``pipeline``: the runtime on the bundle's engines; ``tol`` bounds each step's logits (default: the
    precision's stage tolerance; :func:`verify_bundle` passes :func:`end_to_end_tolerance`)."""
    tol = tol or TOLERANCES[precision]
    cfg = model.cfg
    criterion = pipeline.criterion
    videos = random_videos(cfg, max(count, 2), seed)
    full = [run_torch(model, v, None, criterion) for v in videos]
    thresholds = spread_thresholds([t.scores for t in full], tol)
    checks = []
    for i, video in enumerate(videos):
        ref = run_torch(model, video, thresholds, criterion)
        got = run_onnx(pipeline, video, thresholds)
        checks.append(_compare_video(i, full[i], ref, got, thresholds, precision, tol, cfg.frame_size))
    return checks, thresholds


def _compare_video(i: int, full: Trace, ref: Trace, got: Trace, thresholds: list[float | None], precision: str,
                   tol: Tolerance, frame_size: int) -> VideoCheck:
    """``full``: reference without exits (all K positions and boxes); ``ref``/``got``: both with exits."""
    exact = precision == "fp32"
    notes: list[str] = []
    failed = False

    def fail(note: str) -> None:
        nonlocal failed
        failed = True
        notes.append(note)

    positions_same, box_err = True, 0.0
    if full.positions is not None and got.positions is not None:  # got has none if it exited at step 0
        positions_same = bool(np.array_equal(full.positions, got.positions))
        if positions_same:
            box_err = float(np.abs(full.boxes - got.boxes).max())
            if box_err > tol.rtol * frame_size:  # boxes are in frame pixels
                fail(f"boxes off by {box_err:.3g} px")
        elif exact:
            fail("focus positions differ")
        else:
            notes.append("focus positions differ at a near tie of the temporal weights; later steps not compared")
    logit_rel = 0.0
    for k in range(min(len(ref.logits), len(got.logits))):
        if k > 0 and not positions_same:
            break  # other focus frames from here on
        r, g = ref.logits[k], got.logits[k]
        r_max = float(np.abs(r).max())
        bound = tol.bound(r_max)
        err = float(np.abs(r - g).max())
        logit_rel = max(logit_rel, err / r_max if r_max > 0 else err)
        if err > bound:
            fail(f"step {k} logits off by {err:.3g} (bound {bound:.3g})")
            break
        if int(r.argmax()) != int(g.argmax()):
            top2 = np.sort(r)[-2:]
            if exact or top2[1] - top2[0] > 2 * bound:
                fail(f"step {k} prediction differs")
                break
            notes.append(f"step {k} prediction differs at a near tie")
    if ref.exit_step != got.exit_step and positions_same and not failed:
        k = min(ref.exit_step, got.exit_step)  # the step where one exits and the other goes on
        margin = abs(ref.scores[k] - thresholds[k]) if thresholds[k] is not None else float("inf")
        if exact or margin > tol.bound(float(np.abs(ref.logits[k]).max())):
            fail(f"exits at step {got.exit_step} instead of {ref.exit_step}")
        else:
            notes.append(f"exit differs at a near tie of step {k}'s score and its threshold")
    return VideoCheck(i, ref.exit_step, got.exit_step, int(ref.logits[-1].argmax()), int(got.logits[-1].argmax()),
                      positions_same, box_err, logit_rel, not failed, "; ".join(notes))


def verify_bundle(model: nn.Module, bundle_dir: str | Path, precision: str = "fp32", videos: int = 4,
                  seed: int = 0, manifest: Manifest | None = None) -> VerificationReport:
    """Stage checks + end-to-end decision checks of the bundle in ``bundle_dir`` against ``model``.

    ``manifest``: the bundle's manifest when it is not written yet (the exporter verifies before it writes);
    default: read from ``bundle_dir`` (checksums verified).
    """
    from adafocus.runtime.pipeline import Pipeline

    if precision not in TOLERANCES:
        raise ConfigError(f"precision must be one of {', '.join(TOLERANCES)}, not {precision!r}")
    bundle = Bundle(Path(bundle_dir), manifest) if manifest is not None else load_bundle(bundle_dir)
    engines = ort_engines(bundle)
    try:
        report = VerificationReport(precision, TOLERANCES[precision])
        report.stages = check_stages(model, engines, precision, seed=seed + 1)
        if videos > 0:
            report.video_tolerance = end_to_end_tolerance(precision, report.stages)
            report.videos, report.thresholds = check_videos(model, Pipeline(bundle, engines, "ort"), precision,
                                                            videos, seed, tol=report.video_tolerance)
    finally:
        for engine in engines.values():
            engine.close()
    return report


__all__ = [
    "TOLERANCES", "OutputCheck", "Tolerance", "Trace", "VerificationError", "VerificationReport", "VideoCheck",
    "check_stages", "check_videos", "end_to_end_tolerance", "ort_engines", "random_videos", "run_onnx", "run_torch",
    "spread_thresholds", "verify_bundle",
]

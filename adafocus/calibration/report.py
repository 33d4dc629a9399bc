"""Reports of a calibration: the threshold table per budget (+ plot), and the INT8-vs-fp32 accuracy gate.

Everything is computed from :class:`~adafocus.calibration.collect.ExitCache` objects (one model pass per
video), so a report costs no inference.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from adafocus.calibration.collect import ExitCache
from adafocus.calibration.thresholds import ThresholdSolution, exits_under
from adafocus.errors import require
from adafocus.runtime.budget import make_budget


# ------------------------------------------------------------------------------------------ thresholds
def format_thresholds(solutions: list[ThresholdSolution], costs=None, dense=None) -> str:
    """One row per budget: GFLOPs and top-1 on the calibration and held-out splits, and q; then the dense
    baseline's GFLOPs and top-1 (a :class:`~adafocus.calibration.collect.DenseReference`) when given."""
    if not solutions:
        return "no budgets"
    cal = solutions[0].calibration
    held = solutions[0].heldout
    head = f"{'budget':>9}  {'q':>8}  {cal.split + ' GFLOPs':>14} {'top-1':>7}"
    if held is not None:
        head += f"  {held.split + ' GFLOPs':>14} {'top-1':>7} {'vs budget':>9}"
    lines = [f"exit thresholds ({solutions[0].criterion}), average GFLOPs per video; calibration on {cal.n} "
             f"{cal.split} videos" + (f", held out {held.n} {held.split} videos" if held is not None else ""), head]
    for s in solutions:
        q = "inf" if math.isinf(s.q) else f"{s.q:.3g}"
        row = f"{s.budget_gflops:>9.4g}  {q:>8}  {s.calibration.avg_gflops:>14.4g} {pct(s.calibration.accuracy):>7}"
        if s.heldout is not None:
            off = (s.heldout.avg_gflops / s.budget_gflops - 1) * 100
            row += f"  {s.heldout.avg_gflops:>14.4g} {pct(s.heldout.accuracy):>7} {off:>+8.1f}%"
        lines.append(row)
    if costs is not None:
        lines.append("exit costs (GFLOPs): " + ", ".join(f"{c:.4g}" for c in costs))
    if dense is not None:
        lines.append(f"dense baseline: {dense.gflops:.4g} GFLOPs per video, top-1 {pct(dense.accuracy)} on "
                     f"{dense.n} {dense.split} videos")
    return "\n".join(lines)


def plot_thresholds(solutions: list[ThresholdSolution], out: str | os.PathLike, calibration: ExitCache | None = None,
                    heldout: ExitCache | None = None, title: str = "", dense=None) -> Path:
    """Accuracy vs average GFLOPs: the calibrated budgets on both splits, (dashed) every video stopping at
    the same exit (the first point is glance only), and the dense baseline (a star, with a log GFLOPs axis).
    Needs matplotlib (``pip install 'adafocus[plot]'``)."""
    require("matplotlib", "plot", "the calibration plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    x = [s.calibration.avg_gflops for s in solutions]
    ax.plot(x, [100 * s.calibration.accuracy for s in solutions], "o-",
            label=f"early exit, {solutions[0].calibration.split} (calibration)")
    if solutions and solutions[0].heldout is not None:
        ax.plot([s.heldout.avg_gflops for s in solutions], [100 * s.heldout.accuracy for s in solutions], "s-",
                label=f"early exit, {solutions[0].heldout.split} (held out)")
    for cache, style in ((calibration, "--"), (heldout, ":")):
        if cache is not None and (cache.labels >= 0).all():
            ax.plot(cache.costs, 100 * cache.accuracy_per_exit(), style, color="grey", alpha=0.8,
                    label=f"fixed exit k, {cache.split}")
    for s in solutions:
        ax.axvline(s.budget_gflops, color="lightgrey", lw=0.8, zorder=0)
    ref = heldout if heldout is not None else calibration
    if ref is not None and (ref.labels >= 0).all():
        ax.annotate("glance only", (ref.costs[0], 100 * ref.accuracy_per_exit()[0]), textcoords="offset points",
                    xytext=(6, -4), fontsize=8)
    if dense is not None:
        ax.plot([dense.gflops], [100 * dense.accuracy], "*", ms=13, color="crimson",
                label=f"dense baseline, {dense.split}")
        from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

        ax.set_xscale("log")
        lo, hi = ax.get_xlim()
        ticks = [t * 10.0 ** e for e in range(-4, 4) for t in (1, 2, 5) if lo <= t * 10.0 ** e <= hi]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("average GFLOPs per video" + (" (log scale)" if dense is not None else ""))
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title or "accuracy vs compute budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------------------------ gate
@dataclass
class GateRow:
    """fp32 vs INT8 at one operating point (the full model, or a calibrated budget's thresholds)."""

    name: str
    budget_gflops: float | None
    top1_ref: float  # %
    top1_test: float  # %
    drop: float  # percentage points (positive: INT8 worse)
    pred_agreement: float  # % of videos with the same final prediction
    exit_agreement: float  # % of videos exiting at the same step
    gflops_ref: float  # average per video
    gflops_test: float


@dataclass
class GateReport:
    """INT8 (test) against fp32 (reference) on a held-out split; ``passed``: every row's drop <= max_drop."""

    split: str
    n: int
    rows: list[GateRow]
    box_iou: float  # mean IoU of the crop boxes, all focus steps of all videos
    frame_agreement: float  # % of focus steps that picked the same frame
    ms: dict[str, tuple[float, float]] = field(default_factory=dict)  # stage -> (fp32, int8) ms per call
    max_drop: float = 1.0
    precision: str = "int8"  # the precision under test
    thresholds: str = "fp32"  # whose exit thresholds the test model ran: 'fp32', or 'own (solved on <split>)'

    @property
    def worst_drop(self) -> float:
        return max(r.drop for r in self.rows)

    @property
    def passed(self) -> bool:
        return self.worst_drop <= self.max_drop + 1e-9

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ms"] = {k: {"fp32": a, self.precision: b} for k, (a, b) in self.ms.items()}
        d["worst_drop"] = self.worst_drop
        d["passed"] = self.passed
        return d

    def format(self) -> str:
        p = self.precision
        lines = [f"accuracy gate: {p} vs fp32 on {self.n} {self.split} videos (max drop {self.max_drop:g} points)",
                 f"{'operating point':<18} {'top-1 fp32':>10} {p:>7} {'drop':>6} {'same pred':>9} "
                 f"{'same exit':>9} {'GFLOPs fp32':>11} {p:>8}"]
        for r in self.rows:
            lines.append(f"{r.name:<18} {r.top1_ref:>9.1f}% {r.top1_test:>6.1f}% {r.drop:>+6.1f} "
                         f"{r.pred_agreement:>8.1f}% {r.exit_agreement:>8.1f}% {r.gflops_ref:>11.4g} "
                         f"{r.gflops_test:>8.4g}")
        lines.append(f"{p} exit thresholds: {self.thresholds}; patches: mean box IoU {self.box_iou:.3f}, "
                     f"same focus frame {self.frame_agreement:.1f}%")
        if self.ms:
            lines.append("onnxruntime CPU ms per call (during the gate): " + ", ".join(
                f"{k} {a:.2f} -> {b:.2f} ({a / b:.2f}x)" if b > 0 else f"{k} {a:.2f} -> {b:.2f}"
                for k, (a, b) in self.ms.items()))
        verdict = "passed" if self.passed else "FAILED"
        lines.append(f"gate {verdict}: worst top-1 drop {self.worst_drop:+.2f} points (allowed {self.max_drop:g})")
        return "\n".join(lines)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``[..., 4]`` given as (y0, x0, h, w); nan where either is missing."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    y0, x0 = np.maximum(a[..., 0], b[..., 0]), np.maximum(a[..., 1], b[..., 1])
    y1 = np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2])
    x1 = np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3])
    inter = np.clip(y1 - y0, 0, None) * np.clip(x1 - x0, 0, None)
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / union


def compare_caches(ref: ExitCache, test: ExitCache, table: list[dict], criterion: str = "max_logit",
                   max_drop: float = 1.0, test_table: list[dict] | None = None) -> GateReport:
    """Gate rows for the full model and every calibrated budget in ``table``, decided as the runtime does
    (``make_budget``: the entry's thresholds and per-video cap), on caches of the same videos. ``test_table``:
    the test model's own thresholds for the same budgets (compared at equal average cost); default ``table``."""
    if ref.videos != test.videos:
        raise ValueError("the two caches hold different videos")
    costs = [float(c) for c in ref.costs]
    e = len(costs)
    full = ("full (no exit)", None, None, None, e - 1)
    points: list[tuple[str, float | None, list | None, list | None, int]] = [full]
    for entry in sorted(table, key=lambda x: x["budget_gflops"]):
        b = make_budget(float(entry["budget_gflops"]), costs, table, average=True)
        bt = make_budget(float(entry["budget_gflops"]), costs, test_table, average=True) if test_table else b
        points.append((f"budget {entry['budget_gflops']:.4g}", float(entry["budget_gflops"]), list(b.thresholds or []),
                       list(bt.thresholds or []), b.max_steps))
    s_ref, s_test = ref.scores(criterion), test.scores(criterion)
    p_ref, p_test = ref.preds, test.preds
    n = len(ref)
    idx = np.arange(n)
    rows = []
    for name, budget, thresholds, test_thresholds, max_step in points:
        x_ref = exits_under(s_ref, thresholds or [None] * e, max_step)
        x_test = exits_under(s_test, test_thresholds or [None] * e, max_step)
        y_ref, y_test = p_ref[idx, x_ref], p_test[idx, x_test]
        a_ref = 100 * float(np.mean(y_ref == ref.labels))
        a_test = 100 * float(np.mean(y_test == ref.labels))
        rows.append(GateRow(name, budget, a_ref, a_test, a_ref - a_test, 100 * float(np.mean(y_ref == y_test)),
                            100 * float(np.mean(x_ref == x_test)), float(np.mean(np.asarray(costs)[x_ref])),
                            float(np.mean(np.asarray(costs)[x_test]))))
    iou = box_iou(ref.boxes, test.boxes)
    valid = (ref.positions >= 0) & (test.positions >= 0)
    steps = max(e - 1, 1)
    ms = {}
    if ref.timings_ms and test.timings_ms:
        ms["global"] = (float(np.mean(ref.timings_ms["glance"])), float(np.mean(test.timings_ms["glance"])))
        ms["local"] = (float(np.mean(ref.timings_ms["local"])) / steps,
                       float(np.mean(test.timings_ms["local"])) / steps)
    return GateReport(ref.split, n, rows, float(np.nanmean(iou[valid])) if valid.any() else float("nan"),
                      100 * float(np.mean(ref.positions[valid] == test.positions[valid])) if valid.any() else
                      float("nan"), ms, max_drop)


def pct(x: float | None) -> str:
    """A share in [0, 1] as '93.3%'; '-' for None or nan (no labels)."""
    return "-" if x is None or x != x else f"{100 * x:.1f}%"

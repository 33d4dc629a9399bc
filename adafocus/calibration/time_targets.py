"""Exit thresholds for average-*time* targets (``adafocus calibrate thresholds --budgets 10ms,20ms``).

The same solver as for average GFLOPs (:func:`~adafocus.calibration.thresholds.solve_budgets`), with the
device profile's predicted cumulative milliseconds per exit as the cost of each exit instead of GFLOPs. The
tables are specific to a device, engine and thread count, so they are stored in that profile
(``profiles/<key>.json``, key ``"20ms"``), not in the manifest; ``--budget 20ms --average`` reads them.
The report gives, per target, the predicted average on the calibration split, and on the held-out split the
predicted and the **measured** average model time (the held-out videos run through the pipeline with the
solved thresholds, each decoded right before as the runtime does; decode is not counted).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adafocus.calibration.report import pct
from adafocus.errors import BudgetError

TIME_UNITS = ("ms", "s")


def is_time_budgets(text: str | None) -> bool:
    """Whether a ``--budgets`` text names times (every entry ending in ms or s)."""
    if not isinstance(text, str) or not text.strip():
        return False
    parts = [p.strip().lower() for p in text.replace(";", ",").split(",") if p.strip()]
    timed = [p.endswith(TIME_UNITS) for p in parts]
    if any(timed) and not all(timed):
        raise BudgetError(f"--budgets mixes times and GFLOPs ({text!r}): calibrate one kind at a time")
    return all(timed)


def parse_time_budgets(text: str) -> list[float]:
    from adafocus.runtime.budget import parse_ms

    out = set()
    for part in (p.strip() for p in text.replace(";", ",").split(",")):
        if part:
            ms = parse_ms(part)
            if ms is None:
                raise BudgetError(f"time target {part!r} is not a time (e.g. 10ms or 0.01s)")
            out.add(ms)
    return sorted(out)


@dataclass
class TimeTarget:
    budget_ms: float
    thresholds: list[float | None]
    predicted_ms: float  # calibration split, by the profile
    accuracy: float
    exit_fractions: list[float]
    heldout_predicted_ms: float | None = None
    heldout_measured_ms: float | None = None
    heldout_accuracy: float | None = None
    heldout_n: int = 0
    gflops: float = 0.0  # average GFLOPs on the calibration split at these thresholds

    def to_entry(self, q: Any, max_ms: float, criterion: str, n: int) -> dict:
        return {"budget_ms": self.budget_ms, "thresholds": self.thresholds, "max_ms": max_ms, "q": q,
                "criterion": criterion,
                "calibration": {"n": n, "avg_ms": round(self.predicted_ms, 4), "avg_gflops": round(self.gflops, 9),
                                "accuracy": _round(self.accuracy), "exit_fractions": self.exit_fractions},
                "heldout": None if self.heldout_measured_ms is None else {
                    "n": self.heldout_n, "predicted_ms": round(self.heldout_predicted_ms, 4),
                    "measured_ms": round(self.heldout_measured_ms, 4), "accuracy": _round(self.heldout_accuracy)}}


@dataclass
class TimeTargetsResult:
    profile: str
    exit_ms: list[float]
    targets: list[TimeTarget] = field(default_factory=list)
    written: str | None = None

    def format(self) -> str:
        lines = [f"profile    {self.profile}: predicted ms at each exit "
                 + " ".join(f"{t:.2f}" for t in self.exit_ms)]
        lines.append(f"{'target':>8} {'pred. ms':>9} {'acc':>6} {'GFLOPs':>8} | {'held-out pred.':>14} "
                     f"{'measured':>9} {'acc':>6}")
        for t in self.targets:
            held = (f"{t.heldout_predicted_ms:14.3f} {t.heldout_measured_ms:9.3f} {pct(t.heldout_accuracy):>6}"
                    if t.heldout_measured_ms is not None else f"{'-':>14} {'-':>9} {'-':>6}")
            lines.append(f"{t.budget_ms:6.4g}ms {t.predicted_ms:9.3f} {pct(t.accuracy):>6} {t.gflops:8.4g} | {held}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"profile": self.profile, "exit_ms": self.exit_ms, "written": self.written,
                "targets": [vars(t) for t in self.targets]}


def calibrate_time_targets(bundle: str | os.PathLike, data: str | os.PathLike, budgets: str, *,
                           calib_split: str = "val", heldout_split: str | None = "test", criterion: str | None = None,
                           max_videos: int | None = None, engine: str = "auto", device: str = "cpu",
                           threads: int | None = None, precision: str | None = None, write: bool = True,
                           log=None, progress=None) -> TimeTargetsResult:
    """Solve thresholds for average model times ``budgets`` ('10ms,20ms') with the profile of this engine,
    device and threads as the cost model; store them in that profile (unless not ``write``)."""
    from adafocus.calibration.collect import collect, load_labelled
    from adafocus.calibration.thresholds import evaluate, solve_budgets
    from adafocus.runtime.budget import Budget
    from adafocus.runtime.pipeline import Pipeline
    from adafocus.runtime.profile import profile_paths, read_profile, write_profile

    say = log or (lambda _line: None)
    wanted = parse_time_budgets(budgets)
    with Pipeline.from_bundle(bundle, engine=engine, device=device, threads=threads, criterion=criterion,
                              precision=precision) as pipe:
        cost = pipe.cost_model()  # required: one line naming `adafocus profile` otherwise
        chunks = pipe.plan(Budget(pipe.exits[-1], len(pipe.exits) - 1, None)) if pipe.chunk_auto else None
        costs = cost.exit_times(chunks.chunks if chunks else [pipe.chunk] * cost.steps)
        for b in wanted:
            if not costs[0] * (1 - 1e-9) <= b <= costs[-1] * (1 + 1e-9):
                raise BudgetError(f"time target {b:g} ms is outside what this device reaches on average: "
                                  f"{costs[0]:.3f} ms (everything exits after the glance) to {costs[-1]:.3f} ms "
                                  f"(every step), by profile {cost.profile.key}")
        cal_videos, cal_labels = load_labelled(data, calib_split, pipe.labels, max_videos)
        held = load_labelled(data, heldout_split, pipe.labels, max_videos) if heldout_split else None
        t0 = time.perf_counter()
        cal = collect(pipe, cal_videos, cal_labels, calib_split, progress)
        say(f"collect    {calib_split}: {len(cal)} videos, all exits ({time.perf_counter() - t0:.1f}s)")
        hc = collect(pipe, held[0], held[1], heldout_split, progress) if held else None
        crit = pipe.criterion
        sols = solve_budgets(cal.scores(crit), cal.preds, cal.labels, costs, wanted, criterion=crit,
                             calibration_split=calib_split)
        result = TimeTargetsResult(cost.profile.key, [round(c, 4) for c in costs])
        paths = [str(v.path) for v in held[0]] if held else []
        steps = len(costs) - 1
        entries = []
        for sol in sols:
            st = sol.calibration
            gflops = float(np.dot(st.exit_fractions, pipe.exits)) if st.exit_fractions else 0.0
            target = TimeTarget(sol.budget_gflops, list(sol.thresholds), st.avg_gflops, st.accuracy,
                                list(st.exit_fractions), gflops=gflops)
            if held:
                hs = evaluate(hc.scores(crit), hc.preds, hc.labels, costs, sol.thresholds, steps, heldout_split)
                budget = Budget(pipe.exits[-1], steps, tuple(sol.thresholds), None, True,
                                exit_fractions=tuple(st.exit_fractions))
                for path in paths[:3]:  # warm the engines for these thresholds
                    pipe(path, budget)
                measured = [_model_ms(pipe(path, budget)) for path in paths]
                target.heldout_predicted_ms, target.heldout_accuracy = hs.avg_gflops, hs.accuracy
                target.heldout_measured_ms, target.heldout_n = float(np.mean(measured)), len(measured)
            result.targets.append(target)
            entries.append(target.to_entry(_q(sol.q), costs[-1], crit, len(cal)))
        if write:
            path = next(p for p in profile_paths(pipe.bundle.path) if p.stem == cost.profile.key)
            prof = read_profile(path, pipe.manifest)
            for entry, t in zip(entries, result.targets, strict=True):
                prof.thresholds[f"{t.budget_ms:g}ms"] = entry
            prof.thresholds = dict(sorted(prof.thresholds.items(), key=lambda kv: kv[1]["budget_ms"]))
            result.written = str(write_profile(pipe.bundle.path, prof))
    return result


def _model_ms(res) -> float:
    return res.timings_ms["total"] - res.timings_ms["decode"]


def _q(q: float) -> float | str:
    return "inf" if q == float("inf") else float(q)


def _round(x: float | None) -> float | None:
    return None if x is None or x != x else round(float(x), 6)



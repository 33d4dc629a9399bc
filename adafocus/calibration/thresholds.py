"""Exit thresholds for a target *average* GFLOPs per video (Uni-AdaFocus / MSDNet budgeted classification).

Upstream sweeps a family of exit schedules and leaves the choice to the user; here we solve for a budget:

- **exit ratios** ``p_k ∝ q^k`` over the exits ``k = 0..m`` a video may reach (``m``: the last exit whose
  cumulative cost fits the per-video cap, the full model by default);
- **thresholds**: for ``k = 0..m-1`` take the ``floor(n·p_k)`` highest-scoring calibration videos among those
  not taken at an earlier exit; ``T_k`` is the score of the last one taken (``None``: never exit here, when
  that count is 0). Exit ``m`` takes everything left, so ``T_k`` is ``None`` for ``k >= m`` (the runtime's
  per-video cap, or the last step, ends the video there);
- **evaluation** (calibration or held-out): each video exits at the first ``k`` whose score reaches ``T_k``;
  the average of the exits' cumulative costs is the budget that the schedule spends;
- **solve**: the expected cost grows with ``q`` (monotone up to the integer counts), so a scan over ``log q``
  and a bisection find the largest cost not above the budget.

Everything here is numpy on cached scores (see :mod:`adafocus.calibration.collect`): one pass of the model
over the data, then any number of budgets.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from adafocus.errors import BudgetError
from adafocus.runtime.budget import max_steps_within
from adafocus.runtime.exits import first_exit

TOL = 1e-9  # relative slack when comparing costs (they are sums of float GFLOPs)
LOG10_Q_RANGE = (-4.0, 4.0)  # q from 1e-4 (nearly everything exits at 0) to 1e4 (nearly nothing exits early)


@dataclass
class SplitStats:
    """How a threshold set does on one split: what it costs and how accurate it is."""

    split: str
    n: int
    avg_gflops: float
    accuracy: float  # top-1 in [0, 1] at each video's exit (nan without labels)
    exit_fractions: list[float] = field(default_factory=list)  # share of videos exiting at each exit

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ThresholdSolution:
    """Thresholds solved for one budget, with their cost and accuracy on the calibration (and held-out) split.

    ``to_entry()`` is what goes into ``manifest.exit.thresholds`` (the runtime reads ``budget_gflops``,
    ``thresholds`` and ``max_gflops``).
    """

    budget_gflops: float
    q: float  # 0: everything at exit 0; inf: everything at the last reachable exit
    thresholds: list[float | None]
    max_gflops: float  # the per-video cap the schedule was solved under (the full model's cost by default)
    criterion: str
    calibration: SplitStats
    heldout: SplitStats | None = None

    def to_entry(self) -> dict:
        entry = {"budget_gflops": self.budget_gflops, "thresholds": list(self.thresholds),
                 "max_gflops": self.max_gflops, "q": _json_q(self.q), "criterion": self.criterion,
                 "calibration": _stats_entry(self.calibration)}
        if self.heldout is not None:
            entry["heldout"] = _stats_entry(self.heldout)
        return entry


def budget_key(budget: float) -> str:
    """The manifest key of a budget: 4 significant digits, e.g. ``'0.06'``, ``'12.5'``."""
    return f"{budget:.4g}"


# ------------------------------------------------------------------------------------------ the scheme
def exit_ratios(q: float, num_exits: int) -> np.ndarray:
    """``p_k ∝ q^k`` for ``k = 0..num_exits-1``, normalised; ``q = 0`` / ``inf`` put everything first / last."""
    if num_exits < 1:
        raise ValueError("need at least one exit")
    if q <= 0:
        p = np.zeros(num_exits)
        p[0] = 1.0
        return p
    if math.isinf(q):
        p = np.zeros(num_exits)
        p[-1] = 1.0
        return p
    logs = np.arange(num_exits) * math.log(q)  # in logs: q^16 overflows nothing, but 1e4^16 would be close
    w = np.exp(logs - logs.max())
    return w / w.sum()


def schedule_thresholds(scores: np.ndarray, ratios: np.ndarray, num_exits: int | None = None) -> list[float | None]:
    """MSDNet's thresholds from calibration ``scores [n, E]`` and exit ``ratios`` over the first ``len(ratios)``
    exits. Returns ``E`` (or ``num_exits``) values: a score, or ``None`` (never exit there)."""
    s = np.asarray(scores, dtype=np.float64)
    n, e = s.shape
    m = len(ratios) - 1  # the last reachable exit takes all that is left
    out: list[float | None] = [None] * (num_exits or e)
    taken = np.zeros(n, dtype=bool)
    for k in range(m):
        count = min(int(math.floor(n * float(ratios[k]) + TOL)), int((~taken).sum()))
        if count <= 0:
            continue
        left = np.flatnonzero(~taken)
        order = left[np.argsort(-s[left, k], kind="stable")][:count]
        taken[order] = True
        out[k] = float(s[order[-1], k])
    return out


def exits_under(scores: np.ndarray, thresholds, max_step: int) -> np.ndarray:
    """Exit index of each video: the first step reaching its threshold, at most ``max_step``."""
    return np.minimum(first_exit(scores, thresholds), max_step)


def evaluate(scores: np.ndarray, preds: np.ndarray, labels: np.ndarray | None, costs, thresholds,
             max_step: int | None = None, split: str = "") -> SplitStats:
    """Average GFLOPs and top-1 of a threshold set on cached per-exit ``scores`` and ``preds`` ``[n, E]``."""
    s = np.asarray(scores, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    n, e = s.shape
    exits = exits_under(s, thresholds, e - 1 if max_step is None else max_step)
    chosen = np.asarray(preds)[np.arange(n), exits]
    acc = float(np.mean(chosen == np.asarray(labels))) if labels is not None and n else float("nan")
    fractions = np.bincount(exits, minlength=e) / max(n, 1)
    return SplitStats(split, int(n), float(costs[exits].mean()) if n else float("nan"), acc,
                      [round(float(f), 6) for f in fractions])


# ------------------------------------------------------------------------------------------- budgets
def reachable_range(costs, max_gflops: float | None = None) -> tuple[float, float]:
    """The average costs a schedule can spend: everything at exit 0 .. everything at the last exit that fits
    the per-video cap."""
    costs = [float(c) for c in costs]
    cap = costs[-1] if max_gflops is None else float(max_gflops)
    return costs[0], costs[max_steps_within(cap, costs)]


def check_budget(budget: float, costs, max_gflops: float | None = None) -> None:
    """BudgetError for a budget no schedule can meet on average (one line naming the range)."""
    low, high = reachable_range(costs, max_gflops)
    if not budget > 0 or budget != budget:
        raise BudgetError(f"budget must be a positive number of GFLOPs, got {budget!r}")
    if budget < low * (1 - TOL):
        raise BudgetError(f"budget {budget:.4g} GFLOPs is below the glance cost: the minimum is {low:.4g} GFLOPs "
                          f"per video (reachable range {low:.4g}..{high:.4g})")
    if budget > high * (1 + TOL):
        what = "the full model's cost" if max_gflops is None else f"the cost of the last exit under {max_gflops:.4g}"
        raise BudgetError(f"budget {budget:.4g} GFLOPs is above {what}: the reachable range is "
                          f"{low:.4g}..{high:.4g} GFLOPs per video")


def default_budgets(costs, count: int = 6, max_gflops: float | None = None) -> list[float]:
    """``count`` budgets spread evenly between the exit-0 cost and the full cost (ends excluded, where a
    schedule has nothing to choose), rounded to 3 significant digits."""
    low, high = reachable_range(costs, max_gflops)
    if high <= low:
        return [float(f"{low:.3g}")]
    fractions = np.linspace(0, 1, count + 2)[1:-1]
    out = sorted({float(f"{low + f * (high - low):.3g}") for f in fractions})
    return [b for b in out if low <= b <= high]


def solve_budget(scores: np.ndarray, preds: np.ndarray, labels: np.ndarray | None, costs, budget: float, *,
                 max_gflops: float | None = None, criterion: str = "max_logit", split: str = "calibration",
                 grid: int = 161, iters: int = 50) -> ThresholdSolution:
    """Thresholds whose average cost on (``scores``, ``preds``) is the largest not above ``budget``.

    ``costs``: cumulative GFLOPs per exit; ``max_gflops``: per-video cap (exits beyond it are never reached;
    default the full model). Raises BudgetError for a budget outside the reachable range.
    """
    costs = [float(c) for c in costs]
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != len(costs) or s.shape[0] == 0:
        raise ValueError(f"scores must be [n > 0, {len(costs)}], got {list(s.shape)}")
    check_budget(budget, costs, max_gflops)
    cap = costs[-1] if max_gflops is None else float(max_gflops)
    m = max_steps_within(cap, costs)

    def run(q: float) -> tuple[list[float | None], SplitStats]:
        t = schedule_thresholds(s, exit_ratios(q, m + 1), len(costs))
        return t, evaluate(s, preds, labels, costs, t, m, split)

    limit = budget * (1 + TOL)
    qs = [0.0] + [10.0 ** x for x in np.linspace(*LOG10_Q_RANGE, grid)] + [math.inf]
    results = [run(q) for q in qs]
    feasible = [i for i, (_, st) in enumerate(results) if st.avg_gflops <= limit]
    # the most expensive feasible schedule (the cheapest q among equals: the scan's first hit)
    best = max(feasible, key=lambda i: (results[i][1].avg_gflops, -i))
    q_best, (t_best, st_best) = qs[best], results[best]
    above = next((i for i in range(best + 1, len(qs)) if results[i][1].avg_gflops > limit), None)
    if above is not None and q_best > 0 and not math.isinf(qs[above]):
        lo, hi = math.log(q_best), math.log(qs[above])
        for _ in range(iters):  # bisection in log q between the best feasible and the first infeasible q
            mid = 0.5 * (lo + hi)
            t, st = run(math.exp(mid))
            if st.avg_gflops <= limit:
                lo = mid
                if st.avg_gflops > st_best.avg_gflops:
                    q_best, t_best, st_best = math.exp(mid), t, st
            else:
                hi = mid
    return ThresholdSolution(float(budget), float(q_best), t_best, float(cap), criterion, st_best)


def solve_budgets(cal_scores: np.ndarray, cal_preds: np.ndarray, cal_labels: np.ndarray | None, costs,
                  budgets, *, heldout: tuple[np.ndarray, np.ndarray, np.ndarray | None, str] | None = None,
                  max_gflops: float | None = None, criterion: str = "max_logit",
                  calibration_split: str = "calibration") -> list[ThresholdSolution]:
    """:func:`solve_budget` for each budget (sorted), evaluated on the ``heldout`` (scores, preds, labels,
    split name) cache when given. Every budget is checked before any is solved."""
    budgets = sorted({float(b) for b in budgets})
    if not budgets:
        raise BudgetError("no budgets given")
    for b in budgets:
        check_budget(b, costs, max_gflops)
    out = []
    for b in budgets:
        sol = solve_budget(cal_scores, cal_preds, cal_labels, costs, b, max_gflops=max_gflops,
                           criterion=criterion, split=calibration_split)
        if heldout is not None:
            hs, hp, hl, name = heldout
            sol.heldout = evaluate(hs, hp, hl, costs, sol.thresholds, max_steps_within(sol.max_gflops, list(costs)),
                                   name)
        out.append(sol)
    return out


def parse_budgets(text: str) -> list[float]:
    """``'0.05, 0.06,0.08'`` -> floats; BudgetError on anything that is not a positive number."""
    out = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise BudgetError(f"budget {part!r} is not a number of GFLOPs (e.g. --budgets 0.05,0.06,0.08)") from None
        if not value > 0 or math.isinf(value):
            raise BudgetError(f"budgets must be positive GFLOPs, got {part!r}")
        out.append(value)
    if not out:
        raise BudgetError("no budgets given (e.g. --budgets 0.05,0.06,0.08)")
    return out


# ------------------------------------------------------------------------------------------- helpers
def _json_q(q: float) -> float | str:
    return "inf" if math.isinf(q) else float(q)


def _stats_entry(st: SplitStats) -> dict:
    return {"split": st.split, "n": st.n, "avg_gflops": round(st.avg_gflops, 9),
            "accuracy": None if st.accuracy != st.accuracy else round(st.accuracy, 6),
            "exit_fractions": st.exit_fractions}


# -------------------------------------------------------------------------------------------- the command
@dataclass
class ThresholdsResult:
    """What :func:`calibrate_thresholds` solved (and wrote, unless ``write=False``)."""

    solutions: list[ThresholdSolution]
    costs: list[float]
    calibration: object  # ExitCache of the calibration split
    heldout: object | None  # ExitCache of the held-out split
    written: bool
    plot: str | None = None
    dense: object | None = None  # DenseReference on the held-out split, when the bundle has a dense baseline

    def format(self) -> str:
        from adafocus.calibration.report import format_thresholds

        return format_thresholds(self.solutions, self.costs, self.dense)

    def to_dict(self) -> dict:
        return {"budgets": {budget_key(s.budget_gflops): s.to_entry() for s in self.solutions},
                "costs": self.costs, "written": self.written, "plot": self.plot,
                "dense": self.dense.to_dict() if self.dense is not None else None}


def calibrate_thresholds(bundle: str | os.PathLike, data: str | os.PathLike, budgets=None, *,
                         calib_split: str = "val", heldout_split: str | None = "test", criterion: str | None = None,
                         max_gflops: float | None = None, max_videos: int | None = None, engine: str = "auto",
                         device: str = "cpu", threads: int | None = None, precision: str | None = None,
                         merge: bool = False, write: bool = True, plot: str | os.PathLike | None = None,
                         cache_dir: str | os.PathLike | None = None, log=None, progress=None) -> ThresholdsResult:
    """Solve exit thresholds for average-GFLOPs ``budgets`` on ``<data>/<calib_split>.csv``, evaluate them on
    ``<data>/<heldout_split>.csv``, and store them in the bundle's manifest (``exit.thresholds``, one entry
    per budget; checksums updated). ``budgets``: GFLOPs (a list, or text '0.05,0.06'); default: a spread
    between the exit-0 and the full cost. ``merge`` keeps the table's other budgets (same criterion only).
    ``precision``: which of the bundle's stage files score the videos (default its own; e.g. ``int8``). Another
    precision's table goes to ``exit.by_precision[precision]``, which the runtime uses for that precision
    (a new criterion for the bundle's own table drops those).
    The bundle is only written after everything else succeeded.
    """
    from adafocus.bundle import update_manifest
    from adafocus.calibration.collect import load_labelled
    from adafocus.errors import AdaFocusError
    from adafocus.runtime.exits import CRITERIA
    from adafocus.runtime.pipeline import Pipeline

    say = log or (lambda _line: None)
    if criterion is not None and criterion not in CRITERIA:
        raise AdaFocusError(f"unknown exit criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    with Pipeline.from_bundle(bundle, engine=engine, device=device, threads=threads, criterion=criterion,
                              precision=precision) as pipe:
        costs = [float(c) for c in pipe.exits]
        crit = pipe.criterion
        if budgets is None:
            wanted = default_budgets(costs, max_gflops=max_gflops)
        else:
            wanted = parse_budgets(budgets) if isinstance(budgets, str) else [float(b) for b in budgets]
        for b in wanted:  # before any video runs: a bad budget costs nothing
            check_budget(b, costs, max_gflops)
        existing = pipe.manifest.exit
        other = pipe.precision if pipe.precision != pipe.manifest.precision else None
        if other is not None and crit != existing.criterion:
            raise AdaFocusError(f"the {other} thresholds must use the bundle's criterion ({existing.criterion}): "
                                "the runtime reads one criterion")
        if merge and existing.thresholds and existing.criterion != crit:
            raise AdaFocusError(f"cannot merge thresholds for criterion {crit} into a table calibrated for "
                                f"{existing.criterion}: recalibrate without --merge")
        cal_videos, cal_labels = load_labelled(data, calib_split, pipe.labels, max_videos)
        held = load_labelled(data, heldout_split, pipe.labels, max_videos) if heldout_split else None
        cal = _collect_cached(pipe, cal_videos, cal_labels, calib_split, cache_dir, say, progress)
        hcache = _collect_cached(pipe, held[0], held[1], heldout_split, cache_dir, say, progress) if held else None
        dense = None
        if held and pipe.bundle.has_stage("dense"):
            from adafocus.calibration.collect import dense_reference

            dense = dense_reference(pipe, held[0], held[1], heldout_split, threads)
    solutions = solve_budgets(
        cal.scores(crit), cal.preds, cal.labels, costs, wanted, max_gflops=max_gflops, criterion=crit,
        calibration_split=calib_split,
        heldout=(hcache.scores(crit), hcache.preds, hcache.labels, heldout_split) if hcache is not None else None)
    result = ThresholdsResult(solutions, costs, cal, hcache, False, dense=dense)
    if plot is not None:
        from adafocus.calibration.report import plot_thresholds

        result.plot = str(plot_thresholds(solutions, plot, cal, hcache, title=f"{Path(bundle).name}: {crit}",
                                          dense=dense))
    if write:
        def edit(manifest):
            ex = manifest.exit
            table = dict(ex.by_precision.get(other, {}) if other is not None else ex.thresholds) if merge else {}
            for s in solutions:
                table[budget_key(s.budget_gflops)] = s.to_entry()
            table = dict(sorted(table.items(), key=lambda kv: kv[1]["budget_gflops"]))
            if other is not None:  # another precision: its own table beside the bundle's, same criterion
                ex.by_precision[other] = table
                return manifest
            ex.thresholds = table
            if ex.criterion != crit:  # the other precisions' tables were solved for the old criterion
                ex.by_precision = {}
            ex.criterion = crit
            return manifest

        update_manifest(bundle, edit)  # verifies the files again, writes the manifest atomically
        result.written = True
    return result


def _collect_cached(pipe, videos, labels, split, cache_dir, say, progress):
    """Collect a split, or load it from ``cache_dir`` when the same bundle files ran the same videos."""
    import hashlib
    import time

    from adafocus.calibration.collect import ExitCache, collect

    path = None
    if cache_dir is not None:
        h = hashlib.sha256()
        for name in sorted(pipe.manifest.files):
            h.update(f"{name}:{pipe.manifest.files[name].sha256}\n".encode())
        h.update(str(pipe.precision).encode())
        for v, lab in zip(videos, labels, strict=True):
            st = Path(v.path).stat()
            h.update(f"{v.path}:{st.st_size}:{st.st_mtime_ns}:{lab}\n".encode())
        path = Path(cache_dir) / f"{split}-{h.hexdigest()[:16]}.npz"
        if path.is_file():
            cache = ExitCache.load(path)
            say(f"collect    {split}: {len(cache)} videos from the cache {path}")
            return cache
    t = time.perf_counter()
    cache = collect(pipe, videos, labels, split, progress)
    say(f"collect    {split}: {len(cache)} videos, all {cache.num_exits} exits ({time.perf_counter() - t:.1f}s)")
    if path is not None:
        cache.save(path)
    return cache

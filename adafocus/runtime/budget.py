"""Per-video compute budgets: parsing, the hard step cap, and the exit thresholds for a budget.

A budget is the GFLOPs (multiply-adds) one video may spend. The glance is always paid; the policy is paid
with the first focus step; each focus step is taken only if the cumulative cost after it still fits, so the
cost a video reports never exceeds its budget. Within that cap, the video exits at the first step whose
confidence reaches the threshold calibrated for the budget (none calibrated: no early exit).

Calibrated budgets (``adafocus calibrate thresholds``) are *averages* over a data set, as in Uni-AdaFocus:
some videos spend more than the average, others less. Two ways to use them:

- ``--budget B`` (the default, a hard cap): every video stops by B, and the thresholds are those calibrated
  for the largest average budget not above B, so the average stays at or below B as well;
- ``--budget B --average``: B is the average to aim at: the thresholds calibrated for B (the largest entry
  not above it), and the per-video cap that calibration assumed (``max_gflops``, the full model by
  default), so single videos may spend more than B while the average on data like the calibration set is B.
"""

from __future__ import annotations

from dataclasses import dataclass

from adafocus.errors import BudgetError


@dataclass(frozen=True)
class Budget:
    gflops: float  # the budget asked: the per-video cap, or with ``average`` the average to aim at
    max_steps: int  # focus steps that fit under the per-video cap
    thresholds: tuple[float | None, ...] | None  # per-exit thresholds, None: no early exit
    calibrated_for: float | None = None  # the calibrated budget whose thresholds are used
    average: bool = False  # True: gflops is an average (per-video cap = the calibration's max_gflops)


def parse_budget(text: str | float | None, exits: list[float], dense: float | None = None) -> float:
    """'12.5' (GFLOPs), '30%' (of the dense baseline's cost, or of the full model's without one), or None
    (the full model) -> GFLOPs. Raises BudgetError for malformed, non-positive or too small budgets."""
    full = exits[-1]
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "full", "max")):
        return full
    raw = str(text).strip()
    try:
        if raw.endswith("%"):
            value = float(raw[:-1]) / 100.0 * (dense or full)
        else:
            value = float(raw)
    except ValueError:
        raise BudgetError(f"budget {raw!r} is not a number of GFLOPs (e.g. 0.08) or a percentage (e.g. 30%)") \
            from None
    if not value > 0 or value != value:
        raise BudgetError(f"budget must be positive, got {raw!r}")
    if value < exits[0] * (1 - 1e-9):
        raise BudgetError(f"budget {value:.4g} GFLOPs is below the glance cost: the minimum is {exits[0]:.4g} "
                          f"GFLOPs per video")
    return value


def max_steps_within(budget: float, exits: list[float]) -> int:
    """The most focus steps whose cumulative cost fits in ``budget``."""
    steps = 0
    for k, cost in enumerate(exits):
        if cost <= budget * (1 + 1e-9):
            steps = k
    return steps


def calibrated_entry(budget: float, table: list[dict]) -> dict | None:
    """The table entry calibrated for the largest budget not above ``budget`` (the smallest one if all are
    above; None for an empty table)."""
    if not table:
        return None
    entries = sorted(table, key=lambda e: e["budget_gflops"])
    chosen = entries[0]
    for e in entries:
        if e["budget_gflops"] <= budget * (1 + 1e-9):
            chosen = e
    return chosen


def thresholds_for(budget: float, table: list[dict]) -> tuple[tuple | None, float | None]:
    """Thresholds calibrated for the largest budget not above ``budget`` (the smallest one if all are above;
    the hard cap still holds). ``table`` entries: ``{'budget_gflops': float, 'thresholds': [...]}``."""
    chosen = calibrated_entry(budget, table)
    if chosen is None:
        return None, None
    return tuple(chosen["thresholds"]), float(chosen["budget_gflops"])


def make_budget(text: str | float | None, exits: list[float], table: list[dict] | None = None,
                dense: float | None = None, average: bool = False) -> Budget:
    """A budget for a bundle with cumulative exit costs ``exits`` and calibrated ``table`` (see the module
    docstring for the hard-cap default and ``average``)."""
    gflops = parse_budget(text, exits, dense)
    entry = calibrated_entry(gflops, table or [])
    cap = gflops
    if average:
        if entry is None:
            raise BudgetError("an average budget needs calibrated exit thresholds: run `adafocus calibrate "
                              "thresholds BUNDLE --data DIR` first, or drop --average for a per-video cap")
        cap = max(gflops, float(entry.get("max_gflops", exits[-1])))
    thresholds, calibrated = thresholds_for(gflops, table or [])
    return Budget(gflops, max_steps_within(cap, exits), thresholds, calibrated, average)

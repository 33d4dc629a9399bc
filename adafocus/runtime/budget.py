"""Per-video compute budgets: parsing, the hard step cap, and the exit thresholds for a budget.

A budget is the GFLOPs (multiply-adds) one video may spend. The glance is always paid; the policy is paid
with the first focus step; each focus step is taken only if the cumulative cost after it still fits, so the
cost a video reports never exceeds its budget. Within that cap, the video exits at the first step whose
confidence reaches the threshold calibrated for the budget (none calibrated: no early exit).

Calibrated budgets (``adafocus calibrate thresholds``) are *averages* over a data set, as in Uni-AdaFocus:
some videos spend more than the average, others less. A table entry solved for ``B`` records the per-video
cap it assumed (``max_gflops``, the full model by default); when the runtime uses an entry calibrated for
a budget not above the one asked, that cap replaces the budget as the per-video cap, so that the average
stays at or below the budget asked (on data like the calibration set). Below every calibrated budget the
budget stays a hard per-video cap.
"""

from __future__ import annotations

from dataclasses import dataclass

from adafocus.errors import BudgetError


@dataclass(frozen=True)
class Budget:
    gflops: float  # the budget asked: per-video cap, or the average when calibrated thresholds are used
    max_steps: int  # focus steps that fit under the per-video cap
    thresholds: tuple[float | None, ...] | None  # per-exit thresholds, None: no early exit
    calibrated_for: float | None = None  # the calibrated budget whose thresholds are used


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
                dense: float | None = None) -> Budget:
    gflops = parse_budget(text, exits, dense)
    entry = calibrated_entry(gflops, table or [])
    cap = gflops
    if entry is not None and entry["budget_gflops"] <= gflops * (1 + 1e-9):
        cap = max(gflops, float(entry.get("max_gflops", gflops)))  # an average budget: see the module docstring
    thresholds, calibrated = thresholds_for(gflops, table or [])
    return Budget(gflops, max_steps_within(cap, exits), thresholds, calibrated)

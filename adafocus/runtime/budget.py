"""Per-video compute budgets: parsing, the hard step cap, and the exit thresholds for a budget.

A budget is GFLOPs ('0.08'), a share of the dense cost ('30%'), or time ('25ms', '0.025s'): a time budget is
a per-video deadline for the model (decode excluded unless asked), planned from the device's profile
(:mod:`adafocus.runtime.profile`): the runtime reads the clock before every chunk of focus steps and never
starts one whose predicted end passes the deadline (``exit_reason`` "deadline"). With ``average`` a time
budget is an average over videos, through thresholds calibrated on that profile
(``adafocus calibrate thresholds --budgets 20ms``).

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

import re
from dataclasses import dataclass

from adafocus.errors import BudgetError

_TIME = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    gflops: float  # the budget asked: the per-video cap, or with ``average`` the average to aim at
    max_steps: int  # focus steps that fit under the per-video cap
    thresholds: tuple[float | None, ...] | None  # per-exit thresholds, None: no early exit
    calibrated_for: float | None = None  # the calibrated budget whose thresholds are used
    average: bool = False  # True: gflops is an average (per-video cap = the calibration's max_gflops)
    ms: float | None = None  # a time budget: the per-video deadline, or with ``average`` the average to aim at
    includes_decode: bool = False  # the deadline counts the video's decode too
    exit_fractions: tuple[float, ...] | None = None  # calibrated share of videos exiting at each exit
    calibrated_ms: float | None = None  # the calibrated average-time target whose thresholds are used


def parse_ms(text: str | float | None) -> float | None:
    """'25ms' / '0.025s' -> 25.0 (milliseconds); anything else (GFLOPs, a share, None) -> None."""
    if not isinstance(text, str):
        return None
    m = _TIME.match(text)
    if m is None:
        if text.strip().lower().endswith("ms"):
            raise BudgetError(f"budget {text.strip()!r} is not a time (e.g. 25ms or 0.025s)")
        return None
    value = float(m.group(1)) * (1.0 if m.group(2).lower() == "ms" else 1e3)
    if not value > 0:
        raise BudgetError(f"budget must be positive, got {text.strip()!r}")
    return value


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
        raise BudgetError(f"budget {raw!r} is not a number of GFLOPs (e.g. 0.08), a percentage (e.g. 30%) or a "
                          "time (e.g. 25ms)") \
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
                dense: float | None = None, average: bool = False, cost=None, includes_decode: bool = False,
                time_table: list[dict] | None = None) -> Budget:
    """A budget for a bundle with cumulative exit costs ``exits`` and calibrated ``table`` (see the module
    docstring for the hard-cap default and ``average``). A time budget needs ``cost`` (a
    :class:`~adafocus.runtime.profile.CostModel`), and with ``average`` the profile's ``time_table``."""
    ms = parse_ms(text)
    if ms is not None:
        return time_budget(ms, exits, table or [], cost, average, includes_decode, time_table or [])
    if includes_decode:
        raise BudgetError("--deadline-includes-decode needs a time budget (e.g. --budget 25ms)")
    gflops = parse_budget(text, exits, dense)
    entry = calibrated_entry(gflops, table or [])
    cap = gflops
    if average:
        if entry is None:
            raise BudgetError("an average budget needs calibrated exit thresholds: run `adafocus calibrate "
                              "thresholds BUNDLE --data DIR` first, or drop --average for a per-video cap")
        cap = max(gflops, float(entry.get("max_gflops", exits[-1])))
    thresholds, calibrated = thresholds_for(gflops, table or [])
    return Budget(gflops, max_steps_within(cap, exits), thresholds, calibrated, average,
                  exit_fractions=_fractions(entry))


def time_budget(ms: float, exits: list[float], table: list[dict], cost, average: bool, includes_decode: bool,
                time_table: list[dict]) -> Budget:
    """A deadline (or with ``average`` an average) of ``ms`` per video, planned with ``cost``.

    A deadline below the glance's predicted time is refused (it is always paid). The deadline's thresholds
    are those calibrated for the GFLOPs of the exits that fit in it by the profile (a video that runs long
    is still stopped by the clock); an average takes the profile's calibrated time table."""
    if cost is None:
        raise BudgetError("a budget in milliseconds needs a profile of this device: run `adafocus profile BUNDLE`")
    steps = len(exits) - 1
    glance = cost.glance()
    if ms < glance * (1 - 1e-9):
        raise BudgetError(f"budget {ms:.4g} ms is below the glance's time on this device: the minimum is "
                          f"{glance:.4g} ms per video (profile {cost.profile.key})")
    if average:
        if includes_decode:
            raise BudgetError("--deadline-includes-decode is for a per-video deadline, not an --average")
        entry = calibrated_entry(ms, [dict(e, budget_gflops=e["budget_ms"]) for e in time_table])
        if entry is None:
            raise BudgetError(f"an average time budget needs thresholds calibrated on this profile "
                              f"({cost.profile.key}): run `adafocus calibrate thresholds BUNDLE --data DIR "
                              f"--budgets {ms:g}ms` with the same engine and threads, or drop --average for a deadline")
        return Budget(exits[-1], steps, tuple(entry["thresholds"]), None, True, ms=ms,
                      exit_fractions=_fractions(entry), calibrated_ms=float(entry["budget_ms"]))
    times = cost.exit_times()
    fit = max(k for k, t in enumerate(times) if k == 0 or t <= ms)
    entry = calibrated_entry(exits[fit], table)
    thresholds, calibrated = thresholds_for(exits[fit], table)
    return Budget(exits[-1], steps, thresholds, calibrated, False, ms=ms, includes_decode=includes_decode,
                  exit_fractions=_fractions(entry))


def _fractions(entry: dict | None) -> tuple[float, ...] | None:
    stats = (entry or {}).get("calibration") or {}
    fr = stats.get("exit_fractions") if isinstance(stats, dict) else None
    return tuple(float(x) for x in fr) if fr else None

"""Planning by time: the chunk sizes that minimise the expected time per video, and what a plan predicts.

With a device profile (:mod:`adafocus.runtime.profile`) a focus step's cost is known per chunk size: one
backbone call for the chunk's patches, then a head call per step. A chunk of ``n`` steps saves calls but
computes the patches of steps a video may never reach (it exits before). Given the share of videos that exit
at each step (calibrated with the thresholds, or none: every video runs every step), :func:`plan_chunks`
chooses, for every step a chunk may start at, the size that minimises the expected remaining time
(dynamic programming from the last step back). On a CPU a batched backbone call costs about its single
calls, so the plan is chunk 1; on a GPU, where launches and round trips bound the time, chunks grow.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ChunkPlan:
    chunks: list[int]  # chunks[k]: the size of a chunk that starts at step k (steps done)
    expected_ms: float  # expected model time per video under the plan (p50 costs)
    reach: list[float]  # reach[k]: share of videos that take focus step k+1 (after k steps)
    exit_ms: list[float]  # predicted cumulative ms at each exit for a video that runs the plan's chunks

    def schedule(self) -> list[int]:
        """The chunk sizes a video that never exits runs, in order."""
        out, k = [], 0
        while k < len(self.chunks):
            out.append(self.chunks[k])
            k += self.chunks[k]
        return out


def reach_shares(exit_fractions: list[float] | None, steps: int) -> list[float]:
    """reach[k]: the share of videos that take focus step k+1 (k = 0..steps-1), from the shares exiting at
    each exit (None: nobody exits early)."""
    if not exit_fractions:
        return [1.0] * steps
    left, out = 1.0, []
    for k in range(steps):
        left -= float(exit_fractions[k]) if k < len(exit_fractions) else 0.0
        out.append(max(0.0, left))
    return out


def plan_chunks(cost, exit_fractions: list[float] | None = None, max_chunk: int | None = None) -> ChunkPlan:
    """The chunk sizes minimising the expected time per video (see the module docstring)."""
    steps = cost.steps
    top = steps if max_chunk is None else max(1, min(max_chunk, steps))
    reach = reach_shares(exit_fractions, steps)
    head = cost.stage("head") + cost.profile.fixed.step
    best = [0.0] * (steps + 1)  # best[k]: expected ms from step k on, given the video takes step k+1
    choice = [1] * steps
    for k in range(steps - 1, -1, -1):
        here = reach[k] or 1e-12
        options = []
        for n in range(1, min(top, steps - k) + 1):
            t = cost.stage("backbone", n) + sum(reach[k + j] for j in range(n)) / here * head
            after = reach[k + n] / here if k + n < steps else 0.0
            options.append((t + after * best[k + n], n))
        best[k], choice[k] = min(options)
    return _plan(cost, choice, reach)


def fixed_plan(cost, chunk: int, exit_fractions: list[float] | None = None) -> ChunkPlan:
    """What a fixed ``--chunk`` predicts (for ``--explain`` and the bench)."""
    return _plan(cost, [max(1, chunk)] * cost.steps, reach_shares(exit_fractions, cost.steps))


def _plan(cost, chunks: list[int], reach: list[float]) -> ChunkPlan:
    times = cost.exit_times(chunks)
    shares = [1.0 - reach[0]] + [reach[k] - (reach[k + 1] if k + 1 < len(reach) else 0.0) for k in range(len(reach))]
    expected = sum(p * t for p, t in zip(shares, times, strict=True))
    return ChunkPlan(chunks, expected, reach, times)


def explain(plan: ChunkPlan, cost, budget) -> list[str]:
    """``adafocus-run --explain``: the profile, the chunks chosen and why, the predicted time per step."""
    prof = cost.profile
    lines = [f"plan: profile {prof.describe()}",
             f"plan: glance {cost.glance():.3f} ms, policy {cost.policy():.3f} ms; backbone per chunk of n: "
             + ", ".join(f"{n}: {cost.stage('backbone', n):.3f}" for n in sorted({1, 2, 4, cost.steps})
                         if n <= cost.steps)
             + f" ms; head + host per step {cost.stage('head') + prof.fixed.step:.3f} ms",
             f"plan: chunks {plan.schedule()} (expected {plan.expected_ms:.3f} ms a video)"]
    for k in range(cost.steps):
        lines.append(f"plan:   step {k + 1:>2}: reached by {plan.reach[k]:6.1%}, chunk {plan.chunks[k]}, "
                     f"done at {plan.exit_ms[k + 1]:.3f} ms")
    if getattr(budget, "ms", None) is not None and not budget.average:
        last = max((k for k, t in enumerate(plan.exit_ms) if t <= budget.ms), default=0)
        lines.append(f"plan: deadline {budget.ms:g} ms: a video that does not exit fits {last} steps by the profile; "
                     "the clock is read before every chunk and no chunk starts whose predicted end (p90) passes it")
    return lines

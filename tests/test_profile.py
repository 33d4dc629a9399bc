"""Planning by time: device profiles, deadlines in milliseconds, chunk plans, time-calibrated averages.

The planning tests run the real engines of the shipped demo bundle, but read deadlines on a clock the test
drives: every engine call moves it on by the profile's own figure for that call, so what is stopped where is
exact, whatever this machine's speed. Measured profiles are checked for their shape, never their figures.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adafocus.bench.profile import measure_profile
from adafocus.demo.shipped import bundle_path, sample_videos
from adafocus.errors import BudgetError, ConfigError
from adafocus.runtime.budget import Budget, parse_ms
from adafocus.runtime.pipeline import Pipeline
from adafocus.runtime.plan import fixed_plan, plan_chunks, reach_shares
from adafocus.runtime.profile import (
    CostModel,
    FixedCosts,
    Profile,
    Quantiles,
    device_name,
    read_profile,
    write_profile,
)

STEPS = 8  # the demo bundle's focus steps


@pytest.fixture()
def bundle(tmp_path) -> Path:
    out = tmp_path / "demo"
    shutil.copytree(bundle_path(), out)
    return out


def synthetic_profile(bundle: Path, backbone=lambda n: 10.0 * n, head=1.0, glance=5.0, policy=2.0, step=0.0,
                      threads=None, engine="ort") -> Profile:
    """A profile with chosen figures (p50 = p90) for the bundle's own files, as `adafocus profile` writes it."""
    from adafocus.bundle import load_bundle

    m = load_bundle(bundle).manifest
    sizes = [1, 2, 4, 8, 16, 64]
    stages = {"global": {str(n): Quantiles(glance * n, glance * n) for n in sizes},
              "policy": {str(n): Quantiles(policy * n, policy * n) for n in sizes},
              "backbone": {str(n): Quantiles(backbone(n), backbone(n)) for n in sizes},
              "head": {str(n): Quantiles(head, head) for n in sizes}}
    files = {m.stages[s].file: m.files[m.stages[s].file].sha256 for s in ("global", "policy", "backbone", "head")}
    prof = Profile("ort" if engine == "ort" else engine, m.precision, "cpu", device_name("cpu"), threads, stages,
                   FixedCosts(0.0, 0.0, step), files, measured={"glance_only_ms": glance, "full_ms": 99.0})
    write_profile(bundle, prof)
    return prof


class FakeClock:
    """Seconds that move only when an engine runs: by the profile's figure for that call."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Timed:
    """A real engine whose calls also move the fake clock on by ``ms(feeds)``."""

    def __init__(self, engine, clock: FakeClock, ms):
        self.engine, self.clock, self.ms = engine, clock, ms

    def run(self, feeds):
        out = self.engine.run(feeds)
        self.clock.now += self.ms(feeds) / 1e3
        return out

    def close(self):
        self.engine.close()


def driven(pipe: Pipeline, prof: Profile) -> FakeClock:
    clock = FakeClock()
    cost = CostModel(prof, pipe.manifest)
    first = {"global": "frames", "policy": "fmap", "backbone": "patch", "head": "features"}
    for stage, name in first.items():
        pipe.engines[stage] = Timed(pipe.engines[stage], clock,
                                    lambda f, s=stage, n=name: cost.stage(s, len(f[n]), "p90"))
    pipe.clock = clock
    return clock


# ------------------------------------------------------------------------------------------- parsing
def test_time_budgets_parse():
    assert parse_ms("25ms") == 25.0 and parse_ms("0.025s") == 25.0 and parse_ms(" 7.5 MS ") == 7.5
    assert parse_ms("0.08") is None and parse_ms("30%") is None and parse_ms(None) is None and parse_ms(1.0) is None
    with pytest.raises(BudgetError, match="not a time"):
        parse_ms("fastms")
    with pytest.raises(BudgetError, match="positive"):
        parse_ms("0ms")


# ------------------------------------------------------------------------------------------- profiles
def test_measured_profile_is_written_validated_and_listed(bundle, capsys):
    from adafocus.cli import main

    prof, path = measure_profile(bundle, engine="ort", threads=1, batches=[1, 2], seconds=0.01, min_reps=3)
    assert path == bundle / "profiles" / f"{prof.key}.json" and prof.key.endswith("-t1")
    assert prof.key.startswith("ort-fp32-cpu-")
    for stage in ("global", "policy", "head"):
        assert set(prof.stages[stage]) == {"1", "2"}
    assert {"1", str(STEPS), str(2 * STEPS)} <= set(prof.stages["backbone"])
    assert all(q.p50 <= q.p90 for t in prof.stages.values() for q in t.values())
    assert prof.environment["cpu"] and prof.measured["full_ms"] > 0
    again = read_profile(path)
    assert again.to_dict() == json.loads(path.read_text())
    assert not list((bundle / "profiles").glob(".*"))  # no temporary file left
    from adafocus.bundle import load_bundle

    load_bundle(bundle, verify=True)  # the profile is not part of the checksums
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", str(bundle), "--no-readiness"])
    assert exit_.value.code == 0
    assert f"profile    {prof.key}" in capsys.readouterr().out


def test_profile_mismatch_is_refused_in_one_line(bundle):
    synthetic_profile(bundle, threads=None)
    with Pipeline.from_bundle(bundle, engine="ort", threads=1) as pipe:
        with pytest.raises(ConfigError, match=r"no profile for this run .*-t1\); the bundle has .*-tdefault.*"
                                              r"--threads 1"):
            pipe.budget("30ms")
        assert pipe.chunk_auto is False  # auto chunks fall back to the fixed rule without a matching profile
    with Pipeline.from_bundle(bundle, engine="ort") as pipe:
        assert pipe.budget("30ms").ms == 30.0 and pipe.chunk_auto


def test_no_profile_names_the_command(tmp_path):
    shutil.copytree(bundle_path(), tmp_path / "b")
    with Pipeline.from_bundle(tmp_path / "b", engine="ort") as pipe, \
            pytest.raises(ConfigError, match=r"run `adafocus profile .* --engine ort --device cpu`"):
        pipe.budget("30ms")


def test_stale_and_malformed_profiles_are_refused(bundle):
    prof = synthetic_profile(bundle)
    path = bundle / "profiles" / f"{prof.key}.json"
    data = json.loads(path.read_text())
    data["stage_sha256"][next(iter(data["stage_sha256"]))] = "0" * 64
    path.write_text(json.dumps(data))
    with Pipeline.from_bundle(bundle, engine="ort", chunk=1) as pipe, \
            pytest.raises(ConfigError, match="measure it again"):
        pipe.budget("30ms")
    with Pipeline.from_bundle(bundle, engine="ort") as pipe:  # GFLOPs budgets do not need the stale profile
        assert not pipe.chunk_auto and pipe(sample_videos()[0], "0.08").exit_reason
    data = json.loads(json.dumps(prof.to_dict()))
    data["fixed"]["step"] = "fast"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"profile.fixed.step must be a number, found the string 'fast'"):
        read_profile(path)


def test_a_deadline_below_the_glance_names_the_minimum(bundle):
    synthetic_profile(bundle, glance=5.0)
    with Pipeline.from_bundle(bundle, engine="ort") as pipe, pytest.raises(BudgetError, match="minimum is 5 ms"):
        pipe.budget("4ms")


# ------------------------------------------------------------------------------------------- costs
def test_cost_model_interpolates_and_adds_up(bundle):
    prof = synthetic_profile(bundle, backbone=lambda n: 3.0 + 2.0 * n, head=1.0, glance=5.0, policy=2.0, step=0.5)
    from adafocus.bundle import load_bundle

    cost = CostModel(prof, load_bundle(bundle).manifest)
    assert cost.stage("backbone", 3) == pytest.approx(9.0)  # between 2 (7) and 4 (11)
    assert cost.stage("backbone", 128) == pytest.approx(131.0 * 128 / 64)  # past 64: per-item cost of 64
    times = cost.exit_times()
    assert times[0] == 5.0 and times[1] == pytest.approx(5 + 2 + 5 + 1.5)
    assert np.diff(times[1:]) == pytest.approx([6.5] * (STEPS - 1))
    chunked = cost.exit_times([4] * STEPS)  # backbone(4) = 11 at steps 1 and 5, head + step at each step
    assert chunked[1] == pytest.approx(5 + 2 + 11 + 1.5) and chunked[2] - chunked[1] == pytest.approx(1.5)
    assert chunked[5] - chunked[4] == pytest.approx(11 + 1.5)


def _expected_by_simulation(cost, chunks_at, fractions):
    """The mean time over exit steps (fractions[k] of the videos exit at k), running the chunk rule."""
    times = cost.exit_times(chunks_at)
    return sum(f * t for f, t in zip(fractions, times, strict=True))


def _compositions(n):
    for cuts in itertools.product([0, 1], repeat=n - 1):
        sizes, run = [], 1
        for c in cuts:
            if c:
                sizes.append(run)
                run = 1
            else:
                run += 1
        yield [*sizes, run]


@pytest.mark.parametrize("shape,fractions", [
    ("linear", None), ("flat", None), ("flat", "early"), ("affine", "early"), ("affine", "late")])
def test_chunk_plan_is_the_cheapest_schedule(bundle, shape, fractions):
    curve = {"linear": lambda n: 4.0 * n * (1 + 0.01 * n), "flat": lambda n: 6.0 + 0.01 * n,
             "affine": lambda n: 3.0 + 1.0 * n}[shape]
    prof = synthetic_profile(bundle, backbone=curve, head=0.5, step=0.25)
    from adafocus.bundle import load_bundle

    cost = CostModel(prof, load_bundle(bundle).manifest)
    fr = {None: None, "early": [0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.04, 0.03, 0.03],
          "late": [0.0] * 7 + [0.1, 0.9]}[fractions]
    plan = plan_chunks(cost, fr)
    full = fr or [0.0] * STEPS + [1.0]
    best = None
    for sizes in _compositions(STEPS):  # every way to cut 8 steps into chunks
        at, k = [1] * STEPS, 0
        for n in sizes:
            at[k] = n
            k += n
        t = _expected_by_simulation(cost, at, full)
        best = t if best is None else min(best, t)
    assert plan.expected_ms == pytest.approx(best, rel=1e-9)
    assert _expected_by_simulation(cost, plan.chunks, full) == pytest.approx(best, rel=1e-9)
    if shape == "linear":
        assert plan.schedule() == [1] * STEPS  # a batched call costs its single calls: no chunking
    if shape == "flat" and fractions is None:
        assert plan.schedule() == [STEPS]  # calls bound the time: one call for every step
    assert fixed_plan(cost, 1, fr).expected_ms >= plan.expected_ms - 1e-9
    assert reach_shares(fr, STEPS)[0] == pytest.approx(1 - full[0])


# ------------------------------------------------------------------------------------------- deadlines
@pytest.mark.parametrize("budget_ms,steps", [(9.0, 0), (18.9, 0), (19.5, 1), (30.9, 1), (31.5, 2), (67.5, 5),
                                             (200.0, STEPS)])
def test_deadline_stops_where_the_profile_says(bundle, budget_ms, steps):
    """glance 5, policy 2, a step 11 + 1 (p90): step k ends at 7 + 12k ms; no chunk starts that would end late."""
    prof = synthetic_profile(bundle, backbone=lambda n: 11.0 * n, head=1.0, glance=5.0, policy=2.0)
    video = sample_videos()[1]
    with Pipeline.from_bundle(bundle, engine="ort", chunk=1) as pipe:
        plan = pipe.budget(f"{budget_ms}ms")
        plan = Budget(plan.gflops, plan.max_steps, None, ms=plan.ms)  # no early exit: only the clock stops it
        clock = driven(pipe, prof)
        start = clock.now
        res = pipe(video, plan)
        used = (clock.now - start) * 1e3
    assert res.exit_step == steps
    assert res.exit_reason == ("last" if steps == STEPS else "deadline")
    assert used <= budget_ms + 1e-6 and res.budget_ms == budget_ms
    assert res.predicted_ms == pytest.approx(used)  # the cost model adds up the calls it was driven by
    if steps < STEPS:
        # and it did not stop early: one more step (with the policy before the first) would have passed it
        assert used + 12.0 + (2.0 if steps == 0 else 0.0) > budget_ms


def test_deadline_cuts_chunks_to_what_fits(bundle):
    prof = synthetic_profile(bundle, backbone=lambda n: 2.0 + 1.0 * n, head=1.0, glance=5.0, policy=2.0)
    video = sample_videos()[1]
    with Pipeline.from_bundle(bundle, engine="ort", chunk=4) as pipe:
        b = pipe.budget("20ms")
        b = Budget(b.gflops, b.max_steps, None, ms=b.ms)
        clock = driven(pipe, prof)
        start = clock.now
        res = pipe(video, b)
        used = (clock.now - start) * 1e3
    # 7 ms before the steps; a chunk of 4 = 6 + 4 = 10 ms (ends at 17); the next: 3 ms left, a chunk of n costs
    # 2 + 2n, so nothing fits and the video stops after 4 steps
    assert (res.exit_step, res.exit_reason) == (4, "deadline") and used == pytest.approx(17.0)


def test_deadline_with_decode_and_batched_flights(bundle):
    prof = synthetic_profile(bundle, backbone=lambda n: 11.0 * n, head=1.0, glance=5.0, policy=2.0)
    with Pipeline.from_bundle(bundle, engine="ort", chunk=1) as pipe:
        decoded = pipe.decode(sample_videos()[0])
        decoded.decode_ms = 12.0
        b = pipe.budget("43.5ms", includes_decode=True)
        assert b.includes_decode
        b = Budget(b.gflops, b.max_steps, None, ms=b.ms, includes_decode=True)
        driven(pipe, prof)
        flight = pipe._flight(decoded, b, decode_ms=12.0)
        (done,) = list(pipe.scheduler().run([flight]))
        assert (done.steps, done.reason) == (2, "deadline")  # 43.5 - 12 = 31.5 ms: 7 + 12 * 2 fits, not 3
        with pytest.raises(BudgetError, match="needs a time budget"):
            pipe.budget("0.1", includes_decode=True)


# ------------------------------------------------------------------------------------------- run, explain
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "adafocus.cli", *args], capture_output=True, text=True, timeout=300)


def test_run_with_a_time_budget_and_explain(bundle):
    synthetic_profile(bundle, backbone=lambda n: 0.5 + 0.5 * n, head=0.1, glance=1.0, policy=0.2)
    res = subprocess.run([sys.executable, "-c", "from adafocus.cli import run_main; run_main()", "--model",
                          str(bundle), "--budget", "1000ms", "--explain", "--json"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(rows) == 3 and all(r["budget_ms"] == 1000.0 and r["predicted_ms"] > 0 for r in rows)
    assert "plan: chunks" in res.stderr and "plan:   step  1: reached by" in res.stderr
    assert "deadline 1000 ms" in res.stderr


@pytest.mark.parametrize("args,line", [
    (["--budget", "0.5ms"], "below the glance's time on this device: the minimum is 1 ms"),
    (["--budget", "20ms", "--threads", "1"], "no profile for this run"),
    (["--budget", "20ms", "--average"], "needs thresholds calibrated on this profile"),
    (["--budget", "0.1", "--deadline-includes-decode"], "needs a time budget"),
    (["--budget", "quickms"], "is not a time"),
])
def test_run_time_budget_errors_are_one_line(bundle, args, line):
    synthetic_profile(bundle, backbone=lambda n: 0.5 + 0.5 * n, head=0.1, glance=1.0, policy=0.2)
    res = subprocess.run([sys.executable, "-c", "from adafocus.cli import run_main; run_main()", "--model",
                          str(bundle), *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and line in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_profile_command_bad_batches(bundle):
    from adafocus.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["profile", str(bundle), "--batches", "1,two"])
    assert exit_.value.code == 1 and not (bundle / "profiles").exists()


# ------------------------------------------------------------------------------------------- averages
@pytest.mark.slow
def test_time_targets_are_solved_stored_and_used(bundle, tmp_path):
    from adafocus.calibration.time_targets import calibrate_time_targets
    from adafocus.demo.data import generate

    generate(tmp_path / "data", videos=40, seed=11)
    prof = synthetic_profile(bundle, backbone=lambda n: n * (1 + 0.01 * n), head=0.5, glance=2.0, policy=0.5)
    exit_ms = [2.0 + (0.5 + 1.51 * k if k else 0) for k in range(STEPS + 1)]  # chunk 1: batching costs more
    result = calibrate_time_targets(bundle, tmp_path / "data", "5ms,9ms", calib_split="train", heldout_split="test",
                                    engine="ort")
    assert result.exit_ms == pytest.approx(exit_ms)
    assert [t.budget_ms for t in result.targets] == [5.0, 9.0]
    for t in result.targets:
        assert t.predicted_ms <= t.budget_ms + 1e-9  # the solver's average, by the profile, is within the target
        assert t.heldout_measured_ms > 0 and t.heldout_n > 0
        assert t.predicted_ms == pytest.approx(float(np.dot(t.exit_fractions, exit_ms)), rel=1e-6)
    stored = read_profile(bundle / "profiles" / f"{prof.key}.json").thresholds
    assert list(stored) == ["5ms", "9ms"] and stored["9ms"]["heldout"]["measured_ms"] > 0
    with Pipeline.from_bundle(bundle, engine="ort") as pipe:
        b = pipe.budget("10ms", average=True)  # the largest calibrated target not above 10 ms
        assert b.average and b.calibrated_ms == 9.0 and list(b.thresholds) == stored["9ms"]["thresholds"]
        assert pipe.budget("9ms").thresholds is not None  # a deadline uses the GFLOPs table's thresholds
    with pytest.raises(BudgetError, match="outside what this device reaches"):
        calibrate_time_targets(bundle, tmp_path / "data", "1ms", calib_split="train", heldout_split=None,
                               engine="ort")


def test_bench_reports_predicted_and_deadline_figures(bundle):
    from adafocus.bench.runner import BenchConfig, run_benchmark

    synthetic_profile(bundle, backbone=lambda n: 0.5 + 0.5 * n, head=0.1, glance=1.0, policy=0.2)
    videos = [str(v) for v in sample_videos()]
    config = BenchConfig(bundle, videos, None, ["ort"], "cpu", ["1000ms", "33%"], 0, 0.0, 1, None, None, False)
    report = run_benchmark(config, log=None)
    rows = {r["budget"]: r for r in report["results"] if r["model"] == "adafocus"}
    timed = rows["1000ms"]
    assert timed["budget_ms"] == 1000.0 and timed["predicted_ms"] > 0 and timed["deadline_stops"] == 0
    assert timed["p95_over_budget"] > 0 and rows["33%"]["predicted_ms"] > 0 and rows["33%"]["budget_ms"] is None


@pytest.mark.parametrize("args,line", [
    (["--budgets", "5ms,0.07"], "mixes times and GFLOPs"),
    (["--budgets", "10ms,2secs"], "'2secs' is not a time"),
    (["--budgets", "5ms", "--max-gflops", "0.1"], "are for GFLOPs budgets, not times"),
    (["--budgets", "5ms"], "run `adafocus profile"),
])
def test_calibrate_time_targets_errors_are_one_line(tmp_path, args, line, capsys):
    from adafocus.cli import main

    shutil.copytree(bundle_path(), tmp_path / "b")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "val.csv").write_text("video,label\n")
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", "thresholds", str(tmp_path / "b"), "--data", str(tmp_path / "data"), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and line in err and len(err.strip().splitlines()) == 1


def test_deadline_learns_a_slower_machine(bundle):
    """Calls taking twice the profile's time: the plan's slowdown follows the measured chunks (each counted
    as at most 1.5x: 1.1, 1.18, 1.244 after steps 1-3), so the fourth step, which the profile alone would let
    start at 86 ms and end at 110, is not started (12 x 1.244 > 14 ms left): the video stops at 86 ms of 100."""
    prof = synthetic_profile(bundle, backbone=lambda n: 11.0 * n, head=1.0, glance=5.0, policy=2.0)
    with Pipeline.from_bundle(bundle, engine="ort", chunk=1) as pipe:
        b = pipe.budget("100ms")
        b = Budget(b.gflops, b.max_steps, None, ms=b.ms)
        clock = FakeClock()
        cost = pipe.cost_model()
        first = {"global": "frames", "policy": "fmap", "backbone": "patch", "head": "features"}
        for stage, name in first.items():
            pipe.engines[stage] = Timed(pipe.engines[stage], clock,
                                        lambda f, s=stage, n=name: 2 * cost.stage(s, len(f[n]), "p90"))
        pipe.clock = clock
        start = clock.now
        res = pipe(sample_videos()[1], b)
    assert (res.exit_step, res.exit_reason) == (3, "deadline")
    assert (clock.now - start) * 1e3 == pytest.approx(86.0) and cost.slow == pytest.approx(1.244)
    cost.observe(10.0, 0.0)  # nothing predicted: nothing learnt
    cost.observe(1000.0, 1.0)  # a stall counts as 1.5x
    assert cost.slow == pytest.approx(0.8 * 1.244 + 0.2 * 1.5)


def test_batched_deadlines_price_the_whole_round(bundle):
    """Two videos in one call: the policy check prices the round both wait for (2 x 2 ms + one step of both,
    23 ms), and chunks are cut to the smallest a deadline allowed, since both wait for the longer one."""
    prof = synthetic_profile(bundle, backbone=lambda n: 11.0 * n, head=1.0, glance=5.0, policy=2.0)
    from adafocus.bundle import load_bundle

    cost = CostModel(prof, load_bundle(bundle).manifest)
    assert cost.policy_round(2) == pytest.approx(4.0) and cost.policy(2) == pytest.approx(2.0)
    with Pipeline.from_bundle(bundle, engine="ort", chunk=4) as pipe:
        b = pipe.budget("40ms")
        timed = Budget(b.gflops, b.max_steps, None, ms=b.ms)
        free = Budget(b.gflops, b.max_steps, None)
        clock = driven(pipe, prof)
        flights = [pipe._flight(pipe.decode(v), bud) for v, bud in zip(sample_videos()[:2], (timed, free),
                                                                      strict=True)]
        sched = pipe.scheduler()
        sched.max_batch = {"global": 2}
        done = {f.key: f for f in sched.run(flights, slots=2)}
    first, second = (done[str(v)] for v in sample_videos()[:2])
    # glance 10 ms (two videos), policy round 4 -> 14 ms; chunk of 1 for both (26 ms a round of 2 videos):
    # 40 ms leaves room for one round only, and the free video's chunk of 4 is cut to 1 alongside it
    assert (first.steps, first.reason) == (1, "deadline") and first.ran == [1] and second.ran[0] == 1
    assert clock.now > 100.0

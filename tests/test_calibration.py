"""Exit-threshold calibration: the MSDNet scheme on synthetic scores, and the command on a random-weight bundle
(offline decisions = runtime decisions, manifest written with checksums, one-line errors, bundle unchanged)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from bundles import digest as _digest
from bundles import random_demo_bundle

from adafocus.bundle import load_bundle
from adafocus.calibration.collect import ExitCache, collect, load_labelled
from adafocus.calibration.report import box_iou, compare_caches, format_thresholds
from adafocus.calibration.thresholds import (
    calibrate_thresholds,
    check_budget,
    default_budgets,
    evaluate,
    exit_ratios,
    exits_under,
    parse_budgets,
    schedule_thresholds,
    solve_budget,
    solve_budgets,
)
from adafocus.cli import main
from adafocus.errors import BudgetError, DataError
from adafocus.runtime.budget import make_budget
from adafocus.runtime.pipeline import Pipeline

COSTS = [0.04 + 0.01 * k for k in range(9)]  # exit 0 = glance, then 8 equal steps


def synthetic(n: int, seed: int = 0, exits: int = 9):
    """Scores that rise with the step and predictions that are right more often when confident and late."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    ease = rng.normal(0, 1, n)  # some videos are easy at every step
    scores = ease[:, None] + 0.25 * np.arange(exits) + rng.normal(0, 0.7, (n, exits))
    p_right = 1 / (1 + np.exp(-(scores - 1.5)))
    right = rng.random((n, exits)) < p_right
    preds = np.where(right, labels[:, None], (labels[:, None] + 1 + rng.integers(0, 9, (n, exits))) % 10)
    return scores, preds, labels


# ----------------------------------------------------------------------------------------- the scheme
def test_exit_ratios_are_geometric_and_normalised():
    p = exit_ratios(0.5, 5)
    assert p.sum() == pytest.approx(1.0)
    assert np.allclose(p[1:] / p[:-1], 0.5)
    assert np.allclose(exit_ratios(1.0, 4), 0.25)
    assert exit_ratios(0.0, 3).tolist() == [1, 0, 0] and exit_ratios(math.inf, 3).tolist() == [0, 0, 1]
    assert np.isfinite(exit_ratios(1e4, 17)).all()


def test_schedule_takes_floor_n_p_highest_not_yet_exited():
    scores = np.array([[5.0, 0.0, 0.0], [4.0, 9.0, 0.0], [3.0, 8.0, 0.0], [2.0, 1.0, 0.0], [1.0, 7.0, 0.0]])
    t = schedule_thresholds(scores, np.array([0.4, 0.4, 0.2]))  # floor(5*0.4) = 2 at exits 0 and 1
    assert t == [4.0, 7.0, None]  # exit 0 takes videos 0, 1; exit 1 the best two of the rest (2: 8.0, 4: 7.0)
    assert exits_under(scores, t, 2).tolist() == [0, 0, 1, 2, 1]
    # a count of zero never exits there
    assert schedule_thresholds(scores, np.array([0.1, 0.0, 0.9]))[:2] == [None, None]


def test_calibration_exit_counts_follow_the_ratios():
    scores, preds, labels = synthetic(1000)
    p = exit_ratios(0.8, 9)
    t = schedule_thresholds(scores, p)
    st = evaluate(scores, preds, labels, COSTS, t)
    counts = np.round(np.asarray(st.exit_fractions) * 1000).astype(int)
    assert counts[:-1].tolist() == [math.floor(1000 * x) for x in p[:-1]]  # continuous scores: no ties
    assert counts.sum() == 1000


def test_solved_budgets_meet_the_average_and_accuracy_rises():
    cal, held = synthetic(800, seed=1), synthetic(800, seed=2)
    budgets = default_budgets(COSTS)
    assert len(budgets) == 6 and COSTS[0] < budgets[0] < budgets[-1] < COSTS[-1]
    sols = solve_budgets(*cal, COSTS, budgets, heldout=(*held, "held"))
    for s in sols:
        assert s.calibration.avg_gflops <= s.budget_gflops * (1 + 1e-9)
        assert s.calibration.avg_gflops >= s.budget_gflops * 0.99  # the largest schedule under the budget
        assert abs(s.heldout.avg_gflops / s.budget_gflops - 1) < 0.05
        assert s.thresholds[-1] is None and len(s.thresholds) == len(COSTS)
    accs = [s.heldout.accuracy for s in sols]
    assert accs == sorted(accs) and accs[-1] > accs[0] + 0.05
    qs = [s.q for s in sols]
    assert qs == sorted(qs)
    text = format_thresholds(sols, COSTS)
    assert "held" in text and len(text.splitlines()) == 3 + len(sols)


def test_budget_ends_and_errors():
    scores, preds, labels = synthetic(200)
    low = solve_budget(scores, preds, labels, COSTS, COSTS[0])
    assert low.q == 0 and low.calibration.exit_fractions[0] == 1.0
    high = solve_budget(scores, preds, labels, COSTS, COSTS[-1])
    assert high.calibration.avg_gflops == pytest.approx(COSTS[-1]) and all(t is None for t in high.thresholds)
    with pytest.raises(BudgetError, match=r"below the glance cost: the minimum is 0\.04"):
        check_budget(0.01, COSTS)
    with pytest.raises(BudgetError, match=r"reachable range is 0\.04\.\.0\.12"):
        solve_budget(scores, preds, labels, COSTS, 0.5)
    with pytest.raises(BudgetError, match="not a number"):
        parse_budgets("0.05,lots")
    assert parse_budgets(" 0.05, 0.06,") == [0.05, 0.06]


def test_per_video_cap_limits_the_schedule():
    scores, preds, labels = synthetic(300)
    s = solve_budget(scores, preds, labels, COSTS, 0.07, max_gflops=0.1)  # exits 0..6 fit under 0.1
    assert s.max_gflops == 0.1 and all(t is None for t in s.thresholds[6:])
    st = evaluate(scores, preds, labels, COSTS, s.thresholds, 6)
    assert sum(st.exit_fractions[7:]) == 0 and st.avg_gflops <= 0.07 + 1e-12
    with pytest.raises(BudgetError, match="last exit under 0.1"):
        check_budget(0.11, COSTS, 0.1)


def test_runtime_budget_is_a_hard_cap_unless_average():
    """By default a budget is a hard per-video cap, with the thresholds calibrated for the largest average
    not above it; with average=True the calibrated entry's max_gflops is the per-video cap."""
    table = [{"budget_gflops": 0.07, "thresholds": [1.0] * 8 + [None], "max_gflops": COSTS[-1]}]
    capped = make_budget(0.075, COSTS, table)
    assert capped.calibrated_for == 0.07 and capped.max_steps == 3 and not capped.average
    assert COSTS[capped.max_steps] <= 0.075 < COSTS[capped.max_steps + 1]
    avg = make_budget(0.075, COSTS, table, average=True)
    assert avg.calibrated_for == 0.07 and avg.max_steps == 8 and avg.gflops == 0.075 and avg.average
    below = make_budget(0.055, COSTS, table)
    assert below.max_steps == 1 and below.thresholds == tuple(table[0]["thresholds"])
    assert make_budget(0.075, COSTS).max_steps == 3  # uncalibrated: a hard cap
    with pytest.raises(BudgetError, match="calibrated"):
        make_budget(0.075, COSTS, average=True)


def test_gate_comparison_of_identical_and_shifted_caches():
    rng = np.random.default_rng(0)
    n, e, k = 20, 9, 8
    logits = rng.normal(0, 1, (n, e, 10)).astype(np.float32)
    boxes = rng.uniform(0, 40, (n, k, 4)).astype(np.float32)
    ref = ExitCache("test", [f"v{i}" for i in range(n)], logits[:, -1].argmax(-1), logits, np.asarray(COSTS),
                    np.tile(np.arange(k), (n, 1)), boxes)
    same = compare_caches(ref, ref, [{"budget_gflops": 0.07, "thresholds": [1.5] * 8 + [None]}], max_drop=0.0)
    assert same.passed and same.box_iou == pytest.approx(1.0) and same.frame_agreement == 100.0
    assert [r.pred_agreement for r in same.rows] == [100.0, 100.0] and same.rows[0].top1_ref == 100.0
    worse = ExitCache("test", ref.videos, ref.labels, logits[:, :, ::-1].copy(), ref.costs, ref.positions,
                      boxes + 5)
    report = compare_caches(ref, worse, [], max_drop=1.0)
    assert not report.passed and report.worst_drop > 1.0 and report.box_iou < 1.0
    assert "FAILED" in report.format()
    assert box_iou(np.array([0, 0, 10, 10.0]), np.array([5, 0, 10, 10.0])) == pytest.approx(50 / 150)


# ------------------------------------------------------------------------------- on a random bundle
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny bundle with the demo data's classes, and a small demo data set."""
    return random_demo_bundle(tmp_path_factory.mktemp("cal"), model_seed=0, videos=30, data_seed=5)


def test_calibrated_table_drives_the_runtime(setup, tmp_path):
    bundle, data = setup
    work = tmp_path / "b"
    import shutil

    shutil.copytree(bundle, work)
    result = calibrate_thresholds(work, data, "0.055,0.07,0.09", calib_split="train", heldout_split="test",
                                  cache_dir=tmp_path / "cache", plot=tmp_path / "plot.png")
    assert result.written and (tmp_path / "plot.png").stat().st_size > 1000
    b = load_bundle(work)  # checksums still verify
    table = b.manifest.exit.thresholds
    assert list(table) == ["0.055", "0.07", "0.09"]
    entry = table["0.07"]
    assert entry["budget_gflops"] == 0.07 and len(entry["thresholds"]) == len(b.manifest.costs.exits)
    assert entry["calibration"]["split"] == "train" and entry["heldout"]["n"] == len(result.heldout)
    assert entry["calibration"]["avg_gflops"] <= 0.07
    # what the offline evaluation predicts is what the runtime does, video by video
    held = result.heldout
    with Pipeline.from_bundle(work, threads=1) as pipe:
        plan = pipe.budget("0.07", average=True)  # the calibrated average, as held-out evaluation runs it
        assert plan.calibrated_for == 0.07
        expected = exits_under(held.scores(), list(plan.thresholds), plan.max_steps)
        got = [pipe(v, budget=plan).exit_step for v in held.videos]
    assert got == expected.tolist()
    costs = np.asarray(b.manifest.costs.exits)
    assert np.mean(costs[got]) == pytest.approx(entry["heldout"]["avg_gflops"])
    # a rerun finds the per-video scores in the cache and gives the same thresholds
    again = calibrate_thresholds(work, data, "0.07", calib_split="train", heldout_split="test",
                                 cache_dir=tmp_path / "cache", write=False)
    assert again.solutions[0].thresholds == entry["thresholds"]


def test_collect_cache_roundtrip(setup, tmp_path):
    bundle, data = setup
    with Pipeline.from_bundle(bundle, threads=1) as pipe:
        videos, labels = load_labelled(data, "val", pipe.labels)
        cache = collect(pipe, videos, labels, "val")
    assert cache.logits.shape == (len(videos), len(pipe.exits), len(pipe.labels))
    assert (cache.positions >= 0).all() and np.isfinite(cache.boxes).all()
    back = ExitCache.load(cache.save(tmp_path / "c.npz"))
    assert back.videos == cache.videos and back.split == "val"
    assert np.array_equal(back.logits, cache.logits) and np.array_equal(back.timings_ms["local"],
                                                                         cache.timings_ms["local"])


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", *map(str, args)])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_cli_json_dry_run_leaves_the_bundle(setup, capsys):
    bundle, data = setup
    before = _digest(bundle)
    code, out, err = _cli(capsys, "thresholds", bundle, "--data", data, "--calib-split", "train", "--budgets",
                          "0.06", "--dry-run", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert list(d["budgets"]) == ["0.06"] and d["written"] is False
    assert _digest(bundle) == before


def test_cli_errors_are_one_line_and_leave_the_bundle(setup, tmp_path, capsys):
    bundle, data = setup
    before = _digest(bundle)
    bad = tmp_path / "bad"
    bad.mkdir()
    video = sorted((data / "val").glob("*.mp4"))[0]
    (bad / "val.csv").write_text(f"video,label\n{video},amber-checker\n{video},zebra\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--data", bad], "not among the bundle's 10 classes"),
        (["--data", empty], "is empty"),
        (["--data", data, "--budgets", "0.01"], "below the glance cost: the minimum is 0.04322"),
        (["--data", data, "--budgets", "1"], "reachable range"),
        (["--data", data, "--criterion", "vibes"], "unknown exit criterion"),
    ]
    for args, message in cases:
        code, out, err = _cli(capsys, "thresholds", bundle, *args)
        assert code == 1 and err.count("\n") == 1 and err.startswith("error: ") and message in err, (args, err)
    assert _digest(bundle) == before
    with pytest.raises(DataError, match="not among the bundle.s 1 classes: zebra"):
        load_labelled(bad, "val", ["amber-checker"])


def test_dense_reference_beside_the_thresholds(setup, tmp_path):
    """With a dense baseline in the bundle, the calibration reports (and plots) its held-out top-1, the same
    decisions the benchmark's dense path makes."""
    import shutil

    from adafocus.bench.runner import time_dense
    from adafocus.calibration.collect import dense_reference
    from adafocus.engines.registry import create_engine
    from adafocus.export.dense import add_dense

    bundle, data = setup
    work = tmp_path / "b"
    shutil.copytree(bundle, work)
    add_dense(work, None, log=lambda s: None)
    result = calibrate_thresholds(work, data, "0.07", calib_split="train", heldout_split="test", write=False,
                                  plot=tmp_path / "plot.png")
    dense = result.dense
    assert dense is not None and dense.split == "test" and dense.n == len(result.heldout)
    assert dense.gflops == load_bundle(work).manifest.costs.dense
    with Pipeline.from_bundle(work, threads=1) as pipe:
        engine = create_engine("ort", str(pipe.bundle.stage_path("dense")), threads=1)
        labels = [time_dense(pipe, engine, v)[1] for v in result.heldout.videos]
        truth = [pipe.labels[i] for i in result.heldout.labels]
        assert dense.accuracy == pytest.approx(np.mean([a == b for a, b in zip(labels, truth, strict=True)]))
        videos, _ = load_labelled(data, "test", pipe.labels)
        assert dense_reference(pipe, videos, np.full(len(videos), -1), "test") is None  # unlabelled
    assert "dense baseline:" in result.format() and result.to_dict()["dense"]["n"] == dense.n
    assert (tmp_path / "plot.png").stat().st_size > 1000

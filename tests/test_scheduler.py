"""The one step loop (runtime/scheduler.py) in every mode: one video at a time, many in flight
(``run_many(batch=N)``) and chunked focus steps (``chunk``) take the same decisions; a chunk is charged for
what it computed and a hard budget cuts it; a failing engine call fails only the videos in it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from adafocus.demo.data import generate
from adafocus.demo.shipped import bundle_path
from adafocus.errors import ConfigError, EngineError
from adafocus.runtime.budget import Budget
from adafocus.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[str]:
    """12 demo videos (the shipped model's task): they exit at different steps under its thresholds."""
    root = tmp_path_factory.mktemp("sched")
    generate(root / "data", videos=12, seed=3)
    return sorted(str(p) for p in (root / "data").rglob("*.mp4"))


def _key(r) -> tuple:
    return r.label, r.exit_step, r.exit_reason, [pt.frame for pt in r.patches]


def _spread(pipe, paths) -> tuple:
    """Thresholds halfway between the videos' scores at each step, so that they exit at different steps and no
    score sits on a threshold (batched float rounding must not flip a decision)."""
    full = pipe.budget(None)
    every = Budget(full.gflops, full.max_steps, None)  # no early exit: the scores of every step
    scores = np.array([[s["confidence"] for s in pipe(p, every).steps] for p in paths])
    out: list[float | None] = [None]
    for k in range(1, scores.shape[1]):
        s = np.sort(scores[:, k])
        j = k % (len(s) - 1)
        out.append(float((s[j] + s[j + 1]) / 2))
    return tuple(out)


@pytest.mark.parametrize("glance_batch", ["one", "all"])
def test_every_mode_takes_the_same_decisions(clips, glance_batch):
    """``glance_batch``: the CPU default (one video per glance call), or every stage batched (the GPU's)."""
    with Pipeline.from_bundle(bundle_path(), threads=1) as pipe:
        if glance_batch == "all":
            pipe.stage_batch = {}
        steps = len(pipe.exits) - 1
        full = pipe.budget(None)
        budgets = [Budget(full.gflops, full.max_steps, _spread(pipe, clips)), pipe.budget("0.09")]
        for budget in budgets:
            pipe.set_chunk(1)
            ref = {p: pipe(p, budget) for p in clips}
            assert len({r.exit_step for r in ref.values()}) > 1  # the videos really exit at several steps
            for batch in (1, 2, 5, 16):
                for chunk in (1, 3, steps):
                    pipe.set_chunk(chunk)
                    got = dict(pipe.run_many(clips, budget, batch=batch))
                    assert set(got) == set(clips)
                    for p in clips:
                        r, g = ref[p], got[p]
                        assert _key(g) == _key(r), (p, batch, chunk)
                        boxes = np.array([pt.box_model for pt in g.patches]).reshape(-1, 4)
                        want = np.array([pt.box_model for pt in r.patches]).reshape(-1, 4)
                        assert np.abs(boxes - want).max(initial=0.0) <= 1e-2
                        assert g.score == pytest.approx(r.score, abs=1e-4)
                        assert g.gflops_exit == r.gflops_exit == r.gflops
                        assert g.chunk == chunk
                        # a chunk runs the backbone past the exit step at most chunk - 1 times, under the cap
                        extra = round((g.gflops - g.gflops_exit) / pipe.manifest.stages["backbone"].gflops)
                        assert 0 <= extra <= chunk - 1 and g.gflops <= budget.gflops * (1 + 1e-9)
                    stats = pipe.last_stats
                    if batch > 1:
                        assert stats.mean_batch("head") > 1
                        glance = stats.mean_batch("global")
                        assert glance > 1 if glance_batch == "all" else glance == 1
                    if chunk > 1:  # fewer backbone calls than head calls: patches went through in chunks
                        assert stats.calls["backbone"] < stats.calls["head"]
                    else:
                        assert stats.items["backbone"] == stats.items["head"]


def test_hard_budget_cuts_the_chunk(clips):
    """A budget of 2 focus steps with chunk 8: the backbone computes at most 2 patches a video."""
    with Pipeline.from_bundle(bundle_path(), threads=1, chunk=8) as pipe:
        budget = pipe.budget(str(pipe.exits[2]))
        assert budget.max_steps == 2
        for _, r in pipe.run_many(clips, budget):
            assert r.exit_step <= 2 and r.gflops <= pipe.exits[2] * (1 + 1e-9)
        assert pipe.last_stats.items["backbone"] <= 2 * len(clips)


def test_chunk_values(clips):
    with Pipeline.from_bundle(bundle_path(), threads=1) as pipe:
        assert pipe.chunk == 1  # auto on the CPU
        assert pipe.set_chunk(100) == len(pipe.exits) - 1  # cut to the steps there are
        assert pipe.set_chunk("auto") == 1 and pipe.set_chunk("3") == 3
        for bad in ("0", "x", -1):
            with pytest.raises(ConfigError, match="chunk must be"):
                pipe.set_chunk(bad)
        with pytest.raises(ConfigError, match="batch must be >= 1"):
            list(pipe.run_many(clips, batch=0))


def test_a_failing_engine_call_fails_only_its_videos(clips, tmp_path):
    """An engine error in one round ends the videos in that round's calls with the error; the next videos run."""
    bundle = shutil.copytree(bundle_path(), tmp_path / "b")
    with Pipeline.from_bundle(bundle, threads=1) as pipe:
        real = pipe.engines["backbone"]
        calls = {"n": 0}

        class FailsOnce:
            def __init__(self, engine):
                self._engine = engine

            def run(self, feeds):
                calls["n"] += 1
                if calls["n"] == 1:
                    raise EngineError("backbone: forced failure")
                return self._engine.run(feeds)

            def __getattr__(self, name):
                return getattr(self._engine, name)

        pipe.engines["backbone"] = FailsOnce(real)
        got = list(pipe.run_many(clips[:4], pipe.budget(None), batch=2))
        pipe.engines["backbone"] = real
    failed = [r for _, r in got if isinstance(r, Exception)]
    assert len(got) == 4 and 1 <= len(failed) <= 2 and all("forced failure" in str(r) for r in failed)
    assert pipe.last_stats.calls["backbone"] >= 2  # the videos after the failing call ran

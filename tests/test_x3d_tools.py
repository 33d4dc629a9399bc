"""The tools on an X3D bundle: the dense baseline (X3D-L on every candidate in one clip) with ``add-dense`` and
``bench``, ``calibrate thresholds`` and ``calibrate int8``, on a random x3d-tiny model with the demo data's 10
classes (random weights: these tests check that the tools run and write what they should, not accuracy)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from bundles import one_torch_thread

from adafocus.bundle import load_bundle
from adafocus.cli import main
from adafocus.runtime.pipeline import Pipeline

PRESET = "x3d-tiny"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random x3d-tiny bundle with the demo classes (BatchNorm statistics set) beside 24 demo videos."""
    from adafocus.demo.data import CLASSES, generate
    from adafocus.export.exporter import export_bundle
    from adafocus.models import build_model, save
    from adafocus.models.checkpoint import set_batchnorm_statistics
    from adafocus.models.presets import preset_config

    root = tmp_path_factory.mktemp("x3d_tools")
    with one_torch_thread():
        torch.manual_seed(11)
        cfg = preset_config(PRESET).replace(num_classes=len(CLASSES), labels=list(CLASSES))
        model = set_batchnorm_statistics(build_model(cfg), seed=11)
        export_bundle(save(model, root / "m.pt", preset=PRESET), root / "bundle", verify=False, log=None)
    generate(root / "data", videos=24, seed=9)
    return root / "bundle", root / "data"


def _cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def _videos(data, split: str = "test", n: int = 3) -> list[str]:
    lines = (data / f"{split}.csv").read_text().splitlines()[1:n + 1]
    return [str(data / line.split(",")[0]) for line in lines]


def test_dense_baseline_is_x3d_l_on_one_clip_of_all_candidates(setup):
    """``dense.onnx`` of an x3d bundle: X3D-L (the local encoder's architecture) on the N candidates at the
    full frame size as one clip; its cost is the flops report's dense cost, and its output equals the
    PyTorch baseline's."""
    from adafocus.export.dense import random_dense
    from adafocus.models.config import ModelConfig
    from adafocus.models.dense import DenseX3D, dense_gflops
    from adafocus.models.flops import count_config_flops

    bundle, _ = setup
    cfg = ModelConfig.from_dict(load_bundle(bundle).manifest.config)
    with one_torch_thread():
        model = random_dense(cfg, seed=0)
        assert isinstance(model, DenseX3D)
        assert dense_gflops(model) == pytest.approx(count_config_flops(cfg).dense, rel=1e-12)
        frames = torch.randn(1, cfg.candidates, 3, cfg.frame_size, cfg.frame_size)
        with torch.no_grad():
            want = model.local_CNN(frames.transpose(1, 2))  # [B, 3, T, S, S]: the frames are the clip's time
            assert torch.equal(model(frames), want)


def test_add_dense_and_bench_on_an_x3d_bundle(setup, tmp_path, capsys):
    bundle, data = setup
    code, out, err = _cli(capsys, "add-dense", bundle)
    assert code == 0, err
    m = load_bundle(bundle).manifest
    assert (bundle / "dense.onnx").is_file()
    assert m.stages["dense"].inputs[0].shape[1:] == [m.preprocessing.candidates, 3, 96, 96]
    assert m.costs.dense == pytest.approx(m.stages["dense"].gflops) and m.costs.dense > m.costs.exits[-1]
    assert m.verification["dense"]["random_init"] and m.verification["dense"]["max_rel"] <= 1e-4
    report = tmp_path / "bench.json"
    code, out, err = _cli(capsys, "bench", *_videos(data), "--model", bundle, "-e", "ort", "--budgets", "full",
                          "--warmup", "0", "--repeats", "1", "--threads", "1", "--json", report)
    assert code == 0, err
    rows = {r["model"]: r for r in json.loads(report.read_text())["results"]}
    assert {"adafocus", "dense"} <= set(rows)
    assert rows["dense"]["gflops"] == pytest.approx(m.costs.dense)
    assert rows["adafocus"]["speedup_model"] > 0 and rows["adafocus"]["gflops_ratio"] > 1


def test_calibrate_thresholds_on_an_x3d_bundle(setup, capsys):
    """Exit thresholds for a budget between the glance and the full model are written into the manifest,
    and a run at that budget uses them."""
    bundle, data = setup
    m = load_bundle(bundle).manifest
    budget = round((m.costs.exits[0] + m.costs.exits[1]) / 2, 6)
    code, out, err = _cli(capsys, "calibrate", "thresholds", bundle, "--data", data, "--budgets", budget,
                          "--threads", "1", "--json")
    assert code == 0, err
    table = load_bundle(bundle).manifest.exit.table(None)
    assert len(table) == 1
    (entry,) = table.values()
    assert entry["budget_gflops"] == pytest.approx(budget) and len(entry["thresholds"]) == 2
    with Pipeline.from_bundle(bundle, threads=1) as pipe:
        plan = pipe.budget(str(budget))
        assert plan.thresholds == tuple(entry["thresholds"]) and plan.max_steps == 0  # a hard cap below exit 1
        assert pipe.budget(str(budget), average=True).max_steps == 1
        res = pipe(_videos(data)[0], budget=str(budget))
        assert res.exit_step == 0 and res.gflops <= budget


def test_calibrate_int8_on_an_x3d_bundle(setup, capsys):
    """INT8 X3D encoders (the glance's X3D-S and the X3D-L backbone; policy and heads stay float) are
    written with their own thresholds and run through the runtime."""
    bundle, data = setup
    code, out, err = _cli(capsys, "calibrate", "int8", bundle, "--data", data, "--max-drop", "100",
                          "--calib-videos", "2", "--threads", "1")
    assert code == 0, err
    for stage in ("global", "backbone"):  # X3D's 3-D (and channel-wise) convolutions get Q/DQ
        assert re.search(rf"quantize\s+{stage}\s+[1-9]\d* Conv nodes -> int8 Q/DQ", err), err  # the log
    m = load_bundle(bundle).manifest  # checksums verified
    files = m.precisions["int8"]
    assert files["global"] == "global.int8.onnx" and files["backbone"] == "backbone.int8.onnx"
    assert files["policy"] == "policy.onnx" and files["head"] == "head.onnx"
    assert all((bundle / f).is_file() for f in files.values())
    with Pipeline.from_bundle(bundle, threads=1, precision="int8") as pipe:
        res = pipe(_videos(data)[0])
        assert res.exit_step == 1 and np.isfinite(res.score) and res.label in pipe.labels

"""INT8 Q/DQ calibration: signed symmetric Q/DQ on the encoders' convolutions only, heads and policy float,
the accuracy gate against fp32, and a bundle that is either updated whole or left as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from bundles import digest as _digest
from bundles import random_demo_bundle

onnx = pytest.importorskip("onnx")

from adafocus.bundle import load_bundle  # noqa: E402
from adafocus.calibration.int8 import Int8Options, calibrate_int8, install_int8, int8_name  # noqa: E402
from adafocus.cli import main  # noqa: E402
from adafocus.dataset import load_split  # noqa: E402
from adafocus.errors import BundleError  # noqa: E402
from adafocus.runtime.pipeline import Pipeline  # noqa: E402

OPTIONS = {"calib_videos": 3, "calib_split": "train", "heldout_split": "test", "threads": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny bundle with the demo data's classes, and a small demo data set."""
    return random_demo_bundle(tmp_path_factory.mktemp("int8"), model_seed=1, videos=24, data_seed=7)


def _zero_points(model) -> list:
    inits = {i.name: i for i in model.graph.initializer}
    return [inits[n.input[2]] for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits]


def test_int8_bundle_is_written_and_runs(setup, tmp_path):
    bundle, data = setup
    work = tmp_path / "b"
    shutil.copytree(bundle, work)
    result = calibrate_int8(work, data, Int8Options(max_drop=100.0, **OPTIONS))
    assert result.passed and result.written
    assert result.files == {"global": "global.int8.onnx", "local": "local.int8.onnx"}
    assert result.quantized_nodes["global"] > 40 and result.quantized_nodes["local"] == 20  # every conv
    m = load_bundle(work).manifest  # checksums of the new files are recorded
    assert m.precisions["int8"] == {"global": "global.int8.onnx", "policy": "policy.onnx", "local": "local.int8.onnx"}
    assert {"global.int8.onnx", "local.int8.onnx"} <= set(m.files)
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temp files left behind

    from onnx import TensorProto, numpy_helper

    for stage in ("global", "local"):
        q = onnx.load(str(work / int8_name(f"{stage}.onnx")))
        zps = _zero_points(q)
        assert zps and all(z.data_type in (TensorProto.INT8, TensorProto.INT32) for z in zps)
        assert all(z.data_type == TensorProto.INT8 for z in zps)  # no int32 bias Q/DQ, no UINT8
        assert not any(numpy_helper.to_array(z).any() for z in zps)  # symmetric
        dq_out = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        heads = [n for n in q.graph.node if n.op_type in ("Gemm", "MatMul", "Gather")]
        assert heads and not any(i in dq_out for n in heads for i in n.input)  # heads stay float
    from adafocus.export.readiness import check_readiness

    for name in ("global.int8.onnx", "local.int8.onnx"):
        report = check_readiness(work / name)
        assert report.ok and not report.warnings and report.qdq_nodes > 0, report.format()

    with Pipeline.from_bundle(work, precision="int8", threads=1) as pipe:
        video = sorted((data / "test").glob("*.mp4"))[0]
        res = pipe(video)
        assert res.exit_step == len(pipe.exits) - 1 and res.label in pipe.labels
    report = result.report
    assert report.n == 4 and report.rows[0].name.startswith("full")
    assert 0.0 <= report.box_iou <= 1.0 and set(report.ms) == {"global", "local"}

    # a second calibration replaces the files and their checksums together
    new = tmp_path / "new"
    new.mkdir()
    for stage in ("global", "local"):
        shutil.copy(work / f"{stage}.onnx", new / int8_name(f"{stage}.onnx"))
    assert install_int8(work, {s: new / int8_name(f"{s}.onnx") for s in ("global", "local")})
    load_bundle(work)
    assert (work / "local.int8.onnx").read_bytes() == (work / "local.onnx").read_bytes()
    assert not [p for p in work.iterdir() if p.name.startswith(".")]


def _self_labelled(bundle: Path, data: Path, out: Path) -> Path:
    """Labels = the fp32 model's own predictions: fp32 scores 100%, and INT8 of a random model (logits nearly
    tied), calibrated on a single video (crude activation ranges), disagrees on some of the videos."""
    test = load_split(data, "test") + load_split(data, "train")  # more videos: more near-ties to flip
    with Pipeline.from_bundle(bundle, threads=1) as pipe:
        preds = [pipe(v.path).label for v in test]
    out.mkdir()
    rows = {"train": [(v.path, v.label) for v in load_split(data, "train")],
            "test": [(v.path, p) for v, p in zip(test, preds, strict=True)]}
    for split, pairs in rows.items():
        (out / f"{split}.csv").write_text("video,label\n" + "".join(f"{v},{lab}\n" for v, lab in pairs))
    return out


def test_failed_gate_leaves_the_bundle_as_it_was(setup, tmp_path, capsys):
    """Both encoders in INT8 against their own fp32 predictions: a gate of 0 points must fail."""
    bundle, data = setup
    bundle = Path(shutil.copytree(bundle, tmp_path / "copy"))  # a gate that passed must not touch the fixture
    fake = _self_labelled(bundle, data, tmp_path / "data")
    before = _digest(bundle)
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "int8", str(bundle), "--data", str(fake), "--max-drop", "0", "--calib-videos", "1",
              "--threads", "1", "--no-fallback"])
    out, err = capsys.readouterr()
    assert exc.value.code == 1
    assert "gate FAILED" in out and "100.0%" in out
    assert err.strip().splitlines()[-1].startswith("error: INT8 accuracy gate failed")
    assert _digest(bundle) == before


def test_fallback_tries_each_encoder_alone(setup, tmp_path):
    """After the failed gate above, the fallback quantizes one encoder at a time (local first); what it
    writes keeps the other encoder's float file, and its report is the try that passed."""
    bundle, data = setup
    bundle = Path(shutil.copytree(bundle, tmp_path / "copy"))
    fake = _self_labelled(bundle, data, tmp_path / "data")
    before = _digest(bundle)
    result = calibrate_int8(bundle, fake, Int8Options(**{**OPTIONS, "calib_videos": 1}, max_drop=0.0))
    tries = [a["stages"] for a in result.attempts]
    assert tries[0] == ["global", "local"] and not result.attempts[0]["passed"]
    assert tries[1:] == [["local"], ["global"]][:len(tries) - 1]
    assert [a["passed"] for a in result.attempts[1:]] == [False] * (len(tries) - 2) + [result.written]
    if result.written:
        (stage,) = result.stages
        assert result.report.worst_drop <= 0.0 and result.files == {stage: f"{stage}.int8.onnx"}
        files = load_bundle(bundle).manifest.precisions["int8"]
        other = "global" if stage == "local" else "local"
        assert files[stage] == f"{stage}.int8.onnx" and files[other] == f"{other}.onnx"
    else:
        assert _digest(bundle) == before and result.attempts[0]["worst_drop"] == result.report.worst_drop


@pytest.mark.parametrize("what, message", [("unknown", "not among the bundle's 10 classes"),
                                           ("empty", "is empty")])
def test_data_errors_are_one_line(setup, tmp_path, capsys, what, message):
    bundle, data = setup
    d = tmp_path / "d"
    d.mkdir()
    if what == "unknown":
        video = sorted((data / "train").glob("*.mp4"))[0]
        (d / "train.csv").write_text(f"video,label\n{video},mauve-plaid\n")
    before = _digest(bundle)
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "int8", str(bundle), "--data", str(d)])
    _, err = capsys.readouterr()
    assert exc.value.code == 1 and err.count("\n") == 1 and message in err
    assert _digest(bundle) == before


def test_recorded_calibration_inputs_are_what_the_stages_see(setup):
    from adafocus.calibration.int8 import record_stage_inputs

    bundle, data = setup
    with Pipeline.from_bundle(bundle, threads=1) as pipe:
        videos = sorted((data / "val").glob("*.mp4"))[:2]
        feeds = record_stage_inputs(pipe, videos)
        assert len(feeds["global"]) == 2 and len(feeds["local"]) == 2 * (len(pipe.exits) - 1)
        assert feeds["global"][0]["frames"].shape == (1, 8, 3, 128, 128)
        steps = [int(f["step"][0]) for f in feeds["local"][:len(pipe.exits) - 1]]
        assert steps == list(range(len(pipe.exits) - 1))
        assert not np.allclose(feeds["local"][1]["state"], 0)  # the running classifier state, not zeros
        assert all(type(e).__name__ != "_Recorder" for e in pipe.engines.values())


def test_uint8_cpu_variant_of_one_stage_is_its_own_precision(setup, tmp_path):
    from onnx import TensorProto

    from adafocus.export.readiness import check_readiness

    bundle, data = setup
    work = tmp_path / "b"
    shutil.copytree(bundle, work)
    result = calibrate_int8(work, data, Int8Options(max_drop=100.0, stages=("local",), activations="uint8",
                                                    **OPTIONS))
    assert result.written and result.files == {"local": "local.int8-u8.onnx"}
    m = load_bundle(work).manifest
    assert m.precisions == {"int8-u8": {"global": "global.onnx", "policy": "policy.onnx",
                                        "local": "local.int8-u8.onnx"}}
    zps = _zero_points(onnx.load(str(work / "local.int8-u8.onnx")))
    assert zps and any(z.data_type == TensorProto.UINT8 for z in zps)
    assert not check_readiness(work / "local.int8-u8.onnx").ok  # TensorRT would refuse it, and we say so
    with Pipeline.from_bundle(work, precision="int8-u8", threads=1) as pipe:
        assert pipe.precision == "int8-u8"
    with pytest.raises(BundleError, match="no int8 files"):
        Pipeline.from_bundle(work, precision="int8")


def test_int8_gets_its_own_exit_thresholds(setup, tmp_path):
    """A calibrated bundle: the INT8 precision is gated at thresholds solved on its own scores for the same
    budgets (equal average cost), and the runtime uses them for --precision int8 (fp32 keeps its own)."""
    from adafocus.calibration.thresholds import calibrate_thresholds

    bundle, data = setup
    work = Path(shutil.copytree(bundle, tmp_path / "b"))
    calibrate_thresholds(work, data, "0.06,0.09", calib_split="val", heldout_split="test", threads=1)
    result = calibrate_int8(work, data, Int8Options(max_drop=100.0, **OPTIONS))
    assert result.written and result.report.thresholds.startswith("its own, solved on val")
    exits = load_bundle(work).manifest.exit
    own = exits.by_precision["int8"]
    assert list(own) == list(exits.thresholds) == ["0.06", "0.09"]
    assert own["0.06"]["calibration"]["split"] == "val" and own["0.06"]["heldout"]["split"] == "test"
    assert own["0.06"]["calibration"]["avg_gflops"] <= 0.06
    with Pipeline.from_bundle(work, precision="int8", threads=1) as pipe:
        assert list(pipe.budget("0.06", average=True).thresholds) == own["0.06"]["thresholds"]
    with Pipeline.from_bundle(work, threads=1) as pipe:
        assert list(pipe.budget("0.06", average=True).thresholds) == exits.thresholds["0.06"]["thresholds"]
    # the gate's INT8 rows are decided by those thresholds: their held-out cost is the table's
    row = next(r for r in result.report.rows if r.budget_gflops == 0.06)
    assert row.gflops_test == pytest.approx(own["0.06"]["heldout"]["avg_gflops"])
    # recalibrating the INT8 table alone goes to by_precision and leaves fp32's
    before = dict(exits.thresholds)
    calibrate_thresholds(work, data, "0.07", calib_split="val", heldout_split="test", threads=1, precision="int8")
    exits = load_bundle(work).manifest.exit
    assert list(exits.by_precision["int8"]) == ["0.07"] and exits.thresholds == before

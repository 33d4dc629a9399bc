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
from adafocus.calibration.collect import collect  # noqa: E402
from adafocus.calibration.int8 import Int8Options, calibrate_int8, install_int8, int8_name  # noqa: E402
from adafocus.calibration.thresholds import calibrate_thresholds  # noqa: E402
from adafocus.cli import main  # noqa: E402
from adafocus.dataset import load_split  # noqa: E402
from adafocus.errors import AdaFocusError, BundleError  # noqa: E402
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
    assert result.files == {"global": "global.int8.onnx", "backbone": "backbone.int8.onnx"}
    assert result.quantized_nodes["global"] > 40 and result.quantized_nodes["backbone"] == 20  # every conv
    m = load_bundle(work).manifest  # checksums of the new files are recorded
    assert m.precisions["int8"] == {"global": "global.int8.onnx", "policy": "policy.onnx",
                                    "backbone": "backbone.int8.onnx", "head": "head.onnx"}
    assert {"global.int8.onnx", "backbone.int8.onnx"} <= set(m.files)
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temp files left behind

    from onnx import TensorProto, numpy_helper

    for stage in ("global", "backbone"):
        q = onnx.load(str(work / int8_name(f"{stage}.onnx")))
        zps = _zero_points(q)
        assert zps and all(z.data_type in (TensorProto.INT8, TensorProto.INT32) for z in zps)
        assert all(z.data_type == TensorProto.INT8 for z in zps)  # no int32 bias Q/DQ, no UINT8
        assert not any(numpy_helper.to_array(z).any() for z in zps)  # symmetric
        dq_out = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        if stage == "global":
            heads = [n for n in q.graph.node if n.op_type in ("Gemm", "MatMul", "Gather")]
            assert heads and not any(i in dq_out for n in heads for i in n.input)  # the glance's head stays float
        else:
            convs = [n for n in q.graph.node if n.op_type == "Conv"]
            assert len(convs) == 20 and all(any(i in dq_out for i in n.input) for n in convs)  # every conv
    # the classifier step (head.onnx) stays float: the int8 precision runs the bundle's own, untouched file
    assert (work / "head.onnx").read_bytes() == (bundle / "head.onnx").read_bytes()
    head = onnx.load(str(work / "head.onnx"))
    assert [n for n in head.graph.node if n.op_type in ("Gemm", "MatMul", "Gather")]
    assert not [n for n in head.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert not (work / int8_name("head.onnx")).exists()
    from adafocus.export.readiness import check_readiness

    for name in ("global.int8.onnx", "backbone.int8.onnx"):
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
    for stage in ("global", "backbone"):
        shutil.copy(work / f"{stage}.onnx", new / int8_name(f"{stage}.onnx"))
    assert install_int8(work, {s: new / int8_name(f"{s}.onnx") for s in ("global", "backbone")})
    load_bundle(work)
    assert (work / "backbone.int8.onnx").read_bytes() == (work / "backbone.onnx").read_bytes()
    assert not [p for p in work.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------- the gate, forced either way
# The quantizer is replaced (int8.quantize_stage, looked up on every call) by one that decides the gate: the
# stages that must pass get an exact copy of their float file (fp32's predictions: a drop of exactly 0), the
# stages that must fail a copy whose logits name class `hot` on every video, a class that no label uses (top-1
# 0 wherever that stage decides the prediction). The backbone has no logits (the step head, fed by it, has):
# a failing backbone is an exact copy, and the gate's INT8 pipeline (int8.pipeline_with_files, replaced too)
# then runs a head whose logits name `hot`. Nothing depends on how INT8 rounding treats a random model.
GATE = {**OPTIONS, "calib_videos": 1, "max_drop": 0.0}


@pytest.fixture(scope="module")
def gated(setup, tmp_path_factory):
    """The random bundle with a glance-only operating point (a per-video cap at the glance cost: the gate then
    reads the glance's predictions as well as the last exit's), and held-out labels fp32 gets right on both
    rows: the first video labelled with its glance prediction, the others with their last exit's. Returns
    (bundle, data, hot, drops): ``hot`` is a class no label uses, ``drops`` each row's top-1 drop when the
    stage deciding it predicts ``hot``: 'glance' (the global encoder's logits) and 'last' (the step head's, fed by
    the backbone)."""
    bundle, data = setup
    root = tmp_path_factory.mktemp("gated")
    work = Path(shutil.copytree(bundle, root / "bundle"))
    glance = load_bundle(work).manifest.costs.exits[0]
    calibrate_thresholds(work, data, [glance], max_gflops=glance, calib_split="val", heldout_split=None, threads=1)
    held = load_split(data, "test")
    with Pipeline.from_bundle(work, engine="ort", device="cpu", threads=1) as pipe:  # as the gate runs fp32
        preds = collect(pipe, [v.path for v in held]).preds  # [videos, exits]
        names = list(pipe.labels)
    assert len(held) >= 2 and preds.shape[1] > 1
    labels = np.concatenate([preds[:1, 0], preds[1:, -1]])
    hot = next(c for c in range(len(names)) if c not in labels)
    out = root / "data"  # no val.csv: INT8 is gated at the fp32 thresholds (no table of its own to solve)
    out.mkdir()
    rows = {"train": [(v.path, v.label) for v in load_split(data, "train")],
            "test": [(v.path, names[c]) for v, c in zip(held, labels, strict=True)]}
    for split, pairs in rows.items():
        (out / f"{split}.csv").write_text("video,label\n" + "".join(f"{v},{lab}\n" for v, lab in pairs))
    drops = {"glance": 100 * float(np.mean(preds[:, 0] == labels)),
             "last": 100 * float(np.mean(preds[:, -1] == labels))}
    assert drops["glance"] > 0 and drops["last"] > 0
    return work, out, hot, drops


def _write_forced_logits(src: Path, dst: Path, hot: int) -> None:
    """``src`` with its ``logits`` output replaced by ``logits * 0 + one_hot(hot)``; the other outputs as they were."""
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    (out,) = [o for o in model.graph.output if o.name == "logits"]
    classes = out.type.tensor_type.shape.dim[-1].dim_value
    for node in model.graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == "logits":
                    names[i] = "logits_float"
    one_hot = np.zeros(classes, np.float32)
    one_hot[hot] = 1.0
    model.graph.initializer.extend([numpy_helper.from_array(np.zeros(classes, np.float32), "forced_zero"),
                                    numpy_helper.from_array(one_hot, "forced_one_hot")])
    model.graph.node.extend([helper.make_node("Mul", ["logits_float", "forced_zero"], ["forced_zeroed"]),
                             helper.make_node("Add", ["forced_zeroed", "forced_one_hot"], ["logits"])])
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def _force(monkeypatch, hot: int, failing: set[str]) -> list[str]:
    """Replace the quantizer and the gate's INT8 pipeline (see above); returns the list of stages the
    quantizer is asked for, in order."""
    from adafocus.calibration import int8

    calls: list[str] = []
    pipeline_with_files = int8.pipeline_with_files

    def quantize(src, dst, feeds, *args, **kwargs) -> int:
        stage = Path(src).name.split(".")[0]
        calls.append(stage)
        if stage in failing and stage != "backbone":
            _write_forced_logits(Path(src), Path(dst), hot)
        else:
            shutil.copyfile(src, dst)
        return 0

    def with_files(bundle_dir, files, *args, **kwargs):
        if "backbone" in failing and "backbone" in files:  # next to the INT8 files: removed with them
            head = Path(files["backbone"]).with_name("head.forced.onnx")
            _write_forced_logits(Path(bundle_dir) / "head.onnx", head, hot)
            files = {**files, "head": str(head)}
        return pipeline_with_files(bundle_dir, files, *args, **kwargs)

    monkeypatch.setattr("adafocus.calibration.int8.quantize_stage", quantize)
    monkeypatch.setattr("adafocus.calibration.int8.pipeline_with_files", with_files)
    return calls


def _names(bundle: Path) -> list[str]:
    return sorted(p.name for p in bundle.iterdir())


def test_failed_gate_leaves_the_bundle_as_it_was(gated, tmp_path, capsys, monkeypatch):
    """--no-fallback, both encoders failing the gate: exit code 1, one error line, the bundle byte-identical."""
    bundle, data, hot, drops = gated
    bundle = Path(shutil.copytree(bundle, tmp_path / "copy"))
    calls = _force(monkeypatch, hot, {"global", "backbone"})
    before = _digest(bundle)
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "int8", str(bundle), "--data", str(data), "--max-drop", "0", "--calib-videos", "1",
              "--threads", "1", "--no-fallback"])
    out, err = capsys.readouterr()
    worst = max(drops.values())
    assert exc.value.code == 1 and calls == ["global", "backbone"]
    assert f"gate FAILED: worst top-1 drop {worst:+.2f} points (allowed 0)" in out and "tries:" not in out
    line = f"error: INT8 accuracy gate failed: top-1 drop {worst:.2f} points > --max-drop 0; {bundle} unchanged"
    assert [x for x in err.splitlines() if x.startswith("error")] == [line] and err.strip().splitlines()[-1] == line
    assert _digest(bundle) == before


def _try(stages: list[str], drop: float, passed: bool) -> dict:
    return {"stages": stages, "worst_drop": round(drop, 4), "passed": passed}


def test_fallback_keeps_backbone_alone_when_the_glance_fails(gated, tmp_path, monkeypatch):
    """The glance fails the gate: both encoders fail, then the backbone alone passes and is written (backbone
    first);
    global keeps its float file and the report is the try that passed."""
    bundle, data, hot, drops = gated
    bundle = Path(shutil.copytree(bundle, tmp_path / "copy"))
    calls = _force(monkeypatch, hot, {"global"})
    before = _names(bundle)
    result = calibrate_int8(bundle, data, Int8Options(**GATE))
    assert calls == ["global", "backbone", "backbone"]
    assert result.attempts == [_try(["global", "backbone"], drops["glance"], False), _try(["backbone"], 0.0, True)]
    assert result.written and result.stages == ("backbone",) and result.report.worst_drop == 0.0
    assert result.files == {"backbone": "backbone.int8.onnx"}
    m = load_bundle(bundle).manifest  # checksums verified
    assert m.precisions == {"int8": {"global": "global.onnx", "policy": "policy.onnx",
                                     "backbone": "backbone.int8.onnx", "head": "head.onnx"}}
    assert _names(bundle) == sorted([*before, "backbone.int8.onnx"])
    # what the fake wrote
    assert (bundle / "backbone.int8.onnx").read_bytes() == (bundle / "backbone.onnx").read_bytes()


def test_fallback_keeps_global_alone_when_the_backbone_fails(gated, tmp_path, monkeypatch):
    """The backbone fails the gate: both encoders fail, the backbone alone fails, global alone passes and is
    written."""
    bundle, data, hot, drops = gated
    bundle = Path(shutil.copytree(bundle, tmp_path / "copy"))
    calls = _force(monkeypatch, hot, {"backbone"})
    before = _names(bundle)
    result = calibrate_int8(bundle, data, Int8Options(**GATE))
    assert calls == ["global", "backbone", "backbone", "global"]
    assert result.attempts == [_try(["global", "backbone"], drops["last"], False),
                               _try(["backbone"], drops["last"], False), _try(["global"], 0.0, True)]
    assert result.written and result.stages == ("global",) and result.report.worst_drop == 0.0
    assert result.files == {"global": "global.int8.onnx"}
    m = load_bundle(bundle).manifest
    assert m.precisions == {"int8": {"global": "global.int8.onnx", "policy": "policy.onnx",
                                     "backbone": "backbone.onnx", "head": "head.onnx"}}
    assert _names(bundle) == sorted([*before, "global.int8.onnx"])
    assert (bundle / "global.int8.onnx").read_bytes() == (bundle / "global.onnx").read_bytes()


def test_fallback_writes_nothing_when_every_try_fails(gated, tmp_path, monkeypatch):
    """Both encoders fail the gate, together and alone: nothing is written, the report is the first try's."""
    bundle, data, hot, drops = gated
    bundle = Path(shutil.copytree(bundle, tmp_path / "copy"))
    calls = _force(monkeypatch, hot, {"global", "backbone"})
    before = _digest(bundle)
    result = calibrate_int8(bundle, data, Int8Options(**GATE))
    assert calls == ["global", "backbone", "backbone", "global"]
    assert result.attempts == [_try(["global", "backbone"], max(drops.values()), False),
                               _try(["backbone"], drops["last"], False), _try(["global"], drops["glance"], False)]
    assert not result.written and result.files == {} and result.stages == ("global", "backbone")
    assert result.report.worst_drop == max(drops.values())
    assert _digest(bundle) == before


@pytest.mark.parametrize("value, message", [("-1", "--max-drop must be >= 0 percentage points, got -1"),
                                            ("nan", "--max-drop must be a number of percentage points")])
def test_max_drop_below_zero_is_refused(setup, capsys, value, message):
    bundle, data = setup
    before = _digest(bundle)
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "int8", str(bundle), "--data", str(data), "--max-drop", value])
    _, err = capsys.readouterr()
    assert exc.value.code == 1 and err == f"error: {message}\n"
    assert _digest(bundle) == before
    with pytest.raises(AdaFocusError, match="must be >= 0"):
        Int8Options(max_drop=-0.5).validate()
    Int8Options(max_drop=0.0).validate()


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
        steps = len(pipe.exits) - 1
        assert len(feeds["global"]) == 2 and len(feeds["backbone"]) == 2 * steps  # one backbone call per step
        assert feeds["global"][0]["frames"].shape == (1, 8, 3, 128, 128)
        p = pipe.manifest.preprocessing.patch_size
        assert all(list(f) == ["patch"] and f["patch"].shape == (1, 3, p, p) for f in feeds["backbone"])
        first = [f["patch"] for f in feeds["backbone"][:steps]]  # every step's own patch, not one repeated
        assert all(not np.array_equal(a, b) for i, a in enumerate(first) for b in first[i + 1:])
        assert all(type(e).__name__ != "_Recorder" for e in pipe.engines.values())


def test_uint8_cpu_variant_of_one_stage_is_its_own_precision(setup, tmp_path):
    from onnx import TensorProto

    from adafocus.export.readiness import check_readiness

    bundle, data = setup
    work = tmp_path / "b"
    shutil.copytree(bundle, work)
    result = calibrate_int8(work, data, Int8Options(max_drop=100.0, stages=("backbone",), activations="uint8",
                                                    **OPTIONS))
    assert result.written and result.files == {"backbone": "backbone.int8-u8.onnx"}
    m = load_bundle(work).manifest
    assert m.precisions == {"int8-u8": {"global": "global.onnx", "policy": "policy.onnx",
                                        "backbone": "backbone.int8-u8.onnx", "head": "head.onnx"}}
    zps = _zero_points(onnx.load(str(work / "backbone.int8-u8.onnx")))
    assert zps and any(z.data_type == TensorProto.UINT8 for z in zps)
    assert not check_readiness(work / "backbone.int8-u8.onnx").ok  # TensorRT would refuse it, and we say so
    with Pipeline.from_bundle(work, precision="int8-u8", threads=1) as pipe:
        assert pipe.precision == "int8-u8"
    with pytest.raises(BundleError, match="no int8 files"):
        Pipeline.from_bundle(work, precision="int8")


def test_int8_gets_its_own_exit_thresholds(setup, tmp_path):
    """A calibrated bundle: the INT8 precision is gated at thresholds solved on its own scores for the same
    budgets (equal average cost), and the runtime uses them for --precision int8 (fp32 keeps its own)."""
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

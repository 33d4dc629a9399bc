"""Split export (adafocus.export): stages, verification, the bundle it writes, the CLI and its errors.

The ``tiny`` preset is exported once per module, from a random-init checkpoint (whose BatchNorm statistics
come from random frames, so activations have O(1) scale and the policy's boxes vary from video to video).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from bundles import one_torch_thread

from adafocus.bundle import load_bundle
from adafocus.cli import export_main, main
from adafocus.errors import BundleError
from adafocus.export import export_bundle
from adafocus.export.verify import check_stages, check_videos, ort_engines, verify_bundle
from adafocus.models import init_checkpoint, load
from adafocus.models.checkpoint import set_batchnorm_statistics
from adafocus.models.config import ModelConfig
from adafocus.models.uniadafocus import build_model

REPO = Path(__file__).resolve().parents[1]
TSM_SMALL = dict(family="tsm", num_classes=5, frame_size=64, resize_size=64, glance_size=64, num_segments=24,
                 num_glance=8, num_focus=8, patch_size=32, crop_min=24, crop_max=64, glance_width=0.25,
                 glance_last_channel=64, local_arch="resnet18", local_width=8, stn_hidden_dim=16,
                 temporal_hidden_dim=8)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():  # 2 shared cores: torch's thread pool only adds contention for batch-1 models
        yield


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return init_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny.pt", seed=0)


@pytest.fixture(scope="module")
def tiny_export(tiny_ckpt):
    lines: list[str] = []
    result = export_bundle(tiny_ckpt, log=lines.append)
    return result, lines


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    return load(tiny_ckpt)


# ------------------------------------------------------------------------------------------- bundle
def test_tiny_export_writes_a_verified_bundle(tiny_ckpt, tiny_export):
    result, lines = tiny_export
    assert result.path == tiny_ckpt.with_name("tiny_bundle")
    assert result.report is not None and result.report.passed
    assert sorted(p.name for p in result.path.iterdir()) == ["backbone.onnx", "global.onnx", "head.onnx",
                                                             "manifest.json", "policy.onnx"]
    assert not [p for p in result.path.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    m = load_bundle(result.path).manifest  # checksums verified
    assert (m.preset, m.family, m.precision, m.opset) == ("tiny", "base", "fp32", 17)
    assert m.labels == [f"class_{i}" for i in range(10)] and m.config["num_classes"] == 10
    assert m.exit.criterion == "max_logit" and m.exit.thresholds == {} and m.engines == {}
    assert m.training == {"kind": "random-init", "seed": 0}
    assert len(m.costs.exits) == 9 and m.costs.exits[0] == m.costs.glance
    assert m.stages["global"].gflops == m.costs.glance
    backbone, head = m.stages["backbone"], m.stages["head"]
    assert backbone.gflops > head.gflops > 0 and backbone.gflops + head.gflops == pytest.approx(m.costs.step)
    assert m.preprocessing.glance_positions == [1, 3, 5, 7, 9, 11, 13, 15]
    assert set(m.files) == {"global.onnx", "policy.onnx", "backbone.onnx", "head.onnx"}
    assert m.verification["passed"] and len(m.verification["videos"]) == 4
    # named I/O, batch the only symbolic dimension
    assert [t.name for t in backbone.inputs] == ["patch"] and [t.name for t in backbone.outputs] == ["features"]
    assert [t.name for t in head.inputs] == ["features", "state", "context", "step"]
    assert [t.name for t in head.outputs] == ["logits", "new_state"]
    assert backbone.inputs[0].shape == ["batch", 3, 64, 64] and head.inputs[3].dtype == "int64"
    assert head.inputs[0].shape == backbone.outputs[0].shape
    for st in m.stages.values():
        for t in st.inputs + st.outputs:
            assert t.shape[0] == "batch" and all(isinstance(d, int) for d in t.shape[1:])
    # one line per step: name, seconds, path, size
    for stage in ("backbone", "head"):
        assert any(ln.startswith(f"export {stage}") and f"{stage}.onnx" in ln and "MB" in ln for ln in lines)
    assert lines[-1].startswith("bundle") and str(result.path) in lines[-1]


def test_graphs_pass_the_tensorrt_readiness_check(tiny_export):
    readiness = pytest.importorskip("adafocus.export.readiness")
    bundle = load_bundle(tiny_export[0].path)
    for stage in ("global", "policy", "backbone", "head"):
        report = readiness.check_readiness(bundle.stage_path(stage))
        assert report.ok, report.format()


def test_no_control_flow_or_crop_inside_the_engines(tiny_export):
    for stage in ("global", "policy", "backbone", "head"):
        ops = {n.op_type for n in onnx.load(str(tiny_export[0].path / f"{stage}.onnx")).graph.node}
        assert not ops & {"If", "Loop", "Scan", "GridSample"}, (stage, ops)


# -------------------------------------------------------------------------------------- verification
def test_each_stage_matches_pytorch(tiny_model, tiny_export):
    checks = check_stages(tiny_model, ort_engines(tiny_export[0].path), "fp32", batch=3)
    assert {(c.stage, c.output) for c in checks} == {
        ("global", "fmap"), ("global", "vec"), ("global", "logits"), ("global", "context"),
        ("policy", "actions"), ("policy", "weights"), ("backbone", "features"), ("head", "logits"),
        ("head", "new_state")}
    for c in checks:
        assert c.ok and c.max_rel < 1e-4 and c.ref_max > 1e-2, c  # O(1) values, matched to 1e-4


def test_stage_check_catches_other_weights(tiny_ckpt, tiny_export):
    other = set_batchnorm_statistics(load(tiny_ckpt), seed=1)  # same weights, other BatchNorm statistics
    report = verify_bundle(other, tiny_export[0].path, "fp32", videos=0)
    assert not report.passed and {c.stage for c in report.stages if not c.ok} == {"global", "policy", "backbone",
                                                                                  "head"}


def test_end_to_end_decisions_match(tiny_model, tiny_export):
    report = tiny_export[0].report
    videos = report.videos
    assert all(v.ok for v in videos), report.format()
    assert all(v.exit_ref == v.exit_onnx and v.pred_ref == v.pred_onnx and v.positions_same for v in videos)
    assert len({v.exit_ref for v in videos}) > 1, "thresholds should make videos exit at different steps"
    assert report.video_tolerance.rtol == pytest.approx(6e-4)  # three stages' 1e-4, x2
    assert max(v.max_logit_rel for v in videos) <= report.video_tolerance.rtol
    assert 0 < max(v.max_box_err for v in videos) < 6e-4 * tiny_model.cfg.frame_size  # boxes vary per video


def test_end_to_end_check_catches_a_runtime_bug(tiny_model, tiny_export):
    from adafocus.runtime.pipeline import Pipeline

    engines = ort_engines(tiny_export[0].path)

    class ForgetsState:  # a runtime bug: the classifier state is not carried from step to step
        def run(self, feeds):
            return engines["head"].run({**feeds, "state": np.zeros_like(feeds["state"])})

    bundle = load_bundle(tiny_export[0].path)
    tol = tiny_export[0].report.video_tolerance
    good, _ = check_videos(tiny_model, Pipeline(bundle, engines, "ort"), "fp32", count=4, tol=tol)
    bad, _ = check_videos(tiny_model, Pipeline(bundle, {**engines, "head": ForgetsState()}, "ort"), "fp32",
                          count=4, tol=tol)
    assert all(c.ok for c in good) and not all(c.ok for c in bad)


def test_fp16_export(tiny_ckpt, tmp_path):
    result = export_bundle(tiny_ckpt, tmp_path / "b16", precision="fp16", videos=2, simplify_graphs=False,
                           log=None)
    assert result.report.passed, result.report.format()
    m = load_bundle(result.path).manifest
    assert m.precision == "fp16"
    for st in m.stages.values():  # the runtime still feeds and reads float32
        assert {t.dtype for t in st.inputs + st.outputs} <= {"float32", "int64"}
    weights = [i for i in onnx.load(str(result.path / "backbone.onnx")).graph.initializer if len(i.dims) == 4]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    # fp16 bounds follow PyTorch's own fp16 drift of these weights; every output reports it
    assert all(c.drift is not None and c.max_abs <= c.bound for c in result.report.stages)


def test_tsm_family_exports(tmp_path):
    torch.manual_seed(0)
    model = set_batchnorm_statistics(build_model(ModelConfig(**TSM_SMALL)))
    result = export_bundle(model, tmp_path / "tsm", videos=4, simplify_graphs=False, log=None)
    assert result.report.passed, result.report.format()
    m = load_bundle(result.path).manifest
    assert m.family == "tsm" and m.preprocessing.glance_positions is None and not m.preprocessing.focus_clamp
    assert [t.name for t in m.stages["backbone"].inputs] == ["patches"]
    assert [t.name for t in m.stages["head"].inputs] == ["features", "context"]  # no state: one step
    assert m.stages["backbone"].inputs[0].shape == ["batch", 8, 3, 32, 32]
    assert m.stages["head"].inputs[0].shape == m.stages["backbone"].outputs[0].shape
    assert m.stages["policy"].outputs[0].shape == ["batch", 1, 4]
    assert len(m.costs.exits) == 2


# ----------------------------------------------------------------------------------------------- CLI
def _cli(fn, argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        fn([str(a) for a in argv])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err, err


def _no_leftovers(parent: Path, name: str) -> bool:
    return not [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


def test_cli_refuses_a_truncated_checkpoint(tiny_ckpt, tmp_path, capsys):
    bad = tmp_path / "cut.pt"
    bad.write_bytes(tiny_ckpt.read_bytes()[:5000])
    code, _, err = _cli(export_main, [bad], capsys)
    _assert_one_line_error(code, err, "cut.pt", "truncated or corrupted")
    assert _no_leftovers(tmp_path, "cut_bundle")


def test_cli_refuses_a_checkpoint_of_another_preset(tiny_ckpt, tmp_path, capsys):
    code, _, err = _cli(export_main, [tiny_ckpt, "--preset", "base-p128", "--out", tmp_path / "b"], capsys)
    _assert_one_line_error(code, err, "preset 'tiny'", "base-p128")
    assert _no_leftovers(tmp_path, "b")


def test_cli_refuses_an_unwritable_out(tiny_ckpt, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    code, _, err = _cli(export_main, [tiny_ckpt, "--out", blocker / "bundle"], capsys)
    _assert_one_line_error(code, err, "cannot write the bundle")


def test_cli_refuses_an_existing_bundle_without_force(tiny_ckpt, tiny_export, capsys):
    before = (tiny_export[0].path / "manifest.json").read_bytes()
    code, _, err = _cli(export_main, [tiny_ckpt], capsys)
    _assert_one_line_error(code, err, "already exists", "--force")
    assert (tiny_export[0].path / "manifest.json").read_bytes() == before


def test_force_replaces_only_bundles(tiny_ckpt, tmp_path, capsys):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"...")
    code, _, err = _cli(export_main, [tiny_ckpt, "--out", other, "--force", "--no-verify"], capsys)
    _assert_one_line_error(code, err, "not a bundle")
    assert (other / "holiday.jpg").exists()


def test_force_replaces_a_bundle(tiny_ckpt, tiny_export, tmp_path, capsys):
    out = tmp_path / "b"
    shutil.copytree(tiny_export[0].path, out)
    argv = [tiny_ckpt, "--out", out, "--force", "--no-verify", "--no-simplify"]
    code, stdout, _ = _cli(export_main, argv, capsys)
    assert code == 0 and "manifest" in stdout and "onnxslim" not in stdout
    assert load_bundle(out).manifest.verification == {"skipped": True, "simplified": False}
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # the old bundle and the temp dir are gone


def test_adafocus_export_entry_point_runs_in_a_subprocess(tiny_export):
    code = "from adafocus.cli import export_main; export_main()"
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_export[0].path.with_name("tiny.pt"))],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "already exists" in proc.stderr


def test_inspect_prints_summary_and_readiness(tiny_export, capsys):
    code, out, _ = _cli(main, ["inspect", tiny_export[0].path], capsys)
    assert code == 0
    for word in ("preset tiny", "backbone.onnx", "head.onnx", "GFLOPs", "patch: float32[batch, 3, 64, 64]",
                 "verified   passed"):
        assert word in out, out
    assert "readiness" in out.lower()
    code, out, _ = _cli(main, ["inspect", tiny_export[0].path, "--json"], capsys)
    assert code == 0 and json.loads(out)["format"] == "adafocus-bundle"


def test_inspect_refuses_a_tampered_bundle(tiny_export, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_export[0].path, copy)
    data = bytearray((copy / "policy.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "policy.onnx").write_bytes(bytes(data))
    code, _, err = _cli(main, ["inspect", copy], capsys)
    _assert_one_line_error(code, err, "policy.onnx", "sha256")
    with pytest.raises(BundleError):
        load_bundle(copy)


def test_build_engines_names_the_gpu_extra(tiny_export, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed")
    except ImportError:
        pass
    code, _, err = _cli(main, ["build-engines", tiny_export[0].path], capsys)
    _assert_one_line_error(code, err, "tensorrt", "adafocus[gpu]")


def test_build_engines_bookkeeping_with_a_stand_in_builder(tiny_export, tmp_path, monkeypatch):
    """TensorRT cannot be installed here, so the builder is replaced by one that writes a few bytes: this
    checks what build_engines does around it (names, manifest record, checksums, cleanup on failure)."""
    import types

    from adafocus.export import tensorrt as trt_builder
    from adafocus.export.tensorrt import TrtBuildInfo

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    calls = []

    def fake_build(onnx_path, engine_path, **kwargs):
        calls.append((Path(onnx_path).name, kwargs))
        if Path(onnx_path).name == "head.onnx" and len(calls) == 4 and kwargs.get("workspace_mb") == 1:
            raise BundleError("builder failed")  # stands in for an out-of-memory build
        Path(engine_path).write_bytes(b"engine of " + Path(onnx_path).name.encode())
        return TrtBuildInfo(str(engine_path), str(onnx_path), "10.3.0", "8.7", "Orin", kwargs["fp16"], False,
                            False, kwargs.get("workspace_mb", 1024))

    monkeypatch.setattr(trt_builder, "build_engine", fake_build)
    from adafocus.export import build_engines

    bundle = tmp_path / "b"
    shutil.copytree(tiny_export[0].path, bundle)
    before = (bundle / "manifest.json").read_bytes()
    with pytest.raises(BundleError, match="builder failed"):
        build_engines(bundle, workspace_mb=1, log=None)
    assert (bundle / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in bundle.iterdir()) == ["backbone.onnx", "global.onnx", "head.onnx", "manifest.json",
                                                        "policy.onnx"]

    m = build_engines(bundle, batch=(1, 2, 4), log=None)
    key = "trt10.3.0.sm87.fp32"
    rec = m.engines[key]
    assert rec.files == {s: f"{s}.{key}.engine" for s in ("global", "policy", "backbone", "head")}
    assert (rec.tensorrt_version, rec.compute_capability, rec.batch) == ("10.3.0", "8.7", {"min": 1, "opt": 2,
                                                                                           "max": 4})
    for stage in ("backbone", "head"):  # relative, not the temp path
        assert rec.extra[stage]["engine_path"] == f"{stage}.{key}.engine"
    assert calls[-1][1]["profiles"] == (1, 2, 4) and calls[-1][1]["fp16"] is False
    loaded = load_bundle(bundle)  # engine files are covered by the checksums
    assert set(loaded.manifest.files) >= set(rec.files.values())


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_build_engines_records_tensorrt_engines(tiny_ckpt, tmp_path):
    pytest.importorskip("tensorrt", reason="needs the tensorrt Python package")
    from adafocus.engines import cuda_device_count

    if not cuda_device_count():
        pytest.skip("needs a CUDA GPU")
    from adafocus.export import build_engines

    result = export_bundle(tiny_ckpt, tmp_path / "b", videos=0, log=None)
    m = build_engines(result.path, timing_cache=tmp_path / "trt.cache", log=None)
    (key, rec), = m.engines.items()
    assert set(rec.files) == {"global", "policy", "backbone", "head"} and rec.compute_capability in key
    assert load_bundle(result.path).manifest.engines[key].tensorrt_version == rec.tensorrt_version
    assert (tmp_path / "trt.cache").is_file()


@pytest.mark.slow
def test_base_p128_export(tmp_path):
    ckpt = init_checkpoint("base-p128", tmp_path / "base.pt", seed=0)
    result = export_bundle(ckpt, videos=2, log=None)
    assert result.report.passed, result.report.format()
    m = load_bundle(result.path).manifest
    assert m.stages["backbone"].inputs[0].shape == ["batch", 3, 128, 128]
    assert m.stages["policy"].outputs[0].shape == ["batch", 48, 4]
    assert len(m.costs.exits) == 17

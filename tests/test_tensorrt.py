"""TensorRT engine build + run, checked against onnxruntime.

The build/run tests are marked ``tensorrt`` and skip ("tensorrt is not installed") where the tensorrt
package does not import, or where there is no CUDA device. The precision/profile rules of the builder
are plain Python and run everywhere.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from adafocus.engines import EngineError, create_engine, cuda_device_count
from adafocus.errors import MissingDependency
from adafocus.export.tensorrt import _profile_shapes, _write_atomic, build_engine, onnx_has_qdq, resolve_precision

try:
    import tensorrt as trt

    TRT_MAJOR = int(trt.__version__.split(".")[0])
except ImportError:
    trt = None
    TRT_MAJOR = 0

needs_trt = [
    pytest.mark.tensorrt,
    pytest.mark.gpu,
    pytest.mark.skipif(trt is None, reason="tensorrt is not installed"),
    pytest.mark.skipif(trt is not None and cuda_device_count() == 0, reason="no CUDA device"),
]


def trt_test(fn):
    for mark in reversed(needs_trt):
        fn = mark(fn)
    return fn


class Stage(torch.nn.Module):
    """Conv + pooling + linear with two outputs: enough to exercise profiles and named I/O."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, patch: torch.Tensor):
        feat = self.conv(patch).relu().mean(dim=(2, 3))
        return self.fc(feat), feat


@pytest.fixture(scope="module")
def stage_onnx(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("trt") / "stage.onnx"
    torch.onnx.export(Stage().eval(), (torch.randn(2, 3, 16, 16),), str(path), input_names=["patch"],
                      output_names=["logits", "feat"], opset_version=17, dynamo=False,
                      dynamic_axes={"patch": {0: "batch"}, "logits": {0: "batch"}, "feat": {0: "batch"}})
    return path


def patches(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"patch": np.random.default_rng(seed).standard_normal((batch, 3, 16, 16), dtype=np.float32)}


# ------------------------------------------------------------------------- rules (run everywhere)
def test_precision_rules_for_trt10_and_trt11():
    assert resolve_precision(10, fp16=True, strongly_typed="auto", has_qdq=False) is False
    assert resolve_precision(10, fp16=False, strongly_typed="auto", has_qdq=True) is True
    assert resolve_precision(11, fp16=False, strongly_typed="auto", has_qdq=False) is True
    with pytest.raises(EngineError, match="not allowed with a strongly typed network"):
        resolve_precision(10, fp16=True, strongly_typed="auto", has_qdq=True)
    with pytest.raises(EngineError, match="TensorRT 11 has no FP16 builder flag"):
        resolve_precision(11, fp16=True, strongly_typed="auto", has_qdq=False)
    with pytest.raises(EngineError, match="strongly typed networks only"):
        resolve_precision(11, fp16=False, strongly_typed=False, has_qdq=False)
    with pytest.raises(EngineError, match="True, False or 'auto'"):
        resolve_precision(10, fp16=False, strongly_typed="yes", has_qdq=False)


def test_profile_shapes_from_batch_sizes_or_full_shapes():
    assert _profile_shapes("patch", (-1, 3, 16, 16), (1, 4, 8)) == ((1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))
    full = ((1, 3, 16, 16), (2, 3, 16, 16), (4, 3, 16, 16))
    assert _profile_shapes("patch", (-1, 3, 16, 16), full) == full
    with pytest.raises(EngineError, match="dynamic dims besides the batch"):
        _profile_shapes("patch", (-1, 3, -1, 16), (1, 2, 4))
    with pytest.raises(EngineError, match="min <= opt <= max"):
        _profile_shapes("patch", (-1, 3, 16, 16), (4, 2, 8))
    with pytest.raises(EngineError, match="does not fit"):
        _profile_shapes("patch", (-1, 3, 16, 16), ((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8)))


def test_qdq_detection_and_atomic_write(stage_onnx, tmp_path):
    assert onnx_has_qdq(stage_onnx) is False
    target = tmp_path / "sub" / "x.bin"
    _write_atomic(target, b"abc")
    assert target.read_bytes() == b"abc" and [p.name for p in target.parent.iterdir()] == ["x.bin"]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed")
def test_build_without_tensorrt_names_the_gpu_extra(stage_onnx, tmp_path):
    with pytest.raises(MissingDependency, match=r"adafocus\[gpu\]"):
        build_engine(stage_onnx, tmp_path / "x.engine")


# ------------------------------------------------------------------------- builds (need TensorRT)
@trt_test
def test_build_and_run_matches_onnxruntime(stage_onnx, tmp_path):
    cache = tmp_path / "timing.cache"
    engine_path = tmp_path / "stage.engine"
    info = build_engine(stage_onnx, engine_path, workspace_mb=256, timing_cache=cache, profiles={"patch": (1, 2, 4)})
    assert engine_path.is_file() and cache.is_file()
    assert info.trt_version == trt.__version__ and info.compute_capability.count(".") == 1
    assert info.profiles == {"patch": [[1, 3, 16, 16], [2, 3, 16, 16], [4, 3, 16, 16]]}
    assert info.engine_bytes == engine_path.stat().st_size and info.build_seconds > 0
    assert info.strongly_typed is (TRT_MAJOR >= 11) and not info.timing_cache_loaded
    assert "stage.engine" in info.summary()

    ort_engine = create_engine("ort", stage_onnx)
    engine = create_engine("tensorrt", engine_path, device="cuda", expected_trt_version=info.trt_version,
                           expected_compute_capability=info.compute_capability)
    assert engine.input_names == ["patch"] and engine.output_names == ["logits", "feat"]
    assert engine.inputs[0].shape == (None, 3, 16, 16)
    for batch in (1, 3, 4):
        feeds = patches(batch, seed=batch)
        got, want = engine.run(feeds), ort_engine.run(feeds)
        for name in ("logits", "feat"):
            assert got[name].shape == want[name].shape
            np.testing.assert_allclose(got[name], want[name], rtol=1e-2, atol=2e-3)  # TF32 convs
    assert engine.calls == 3 and engine.last_ms > 0
    with pytest.raises(EngineError, match="outside the engine's profile"):
        engine.run(patches(5))
    engine.close()

    again = build_engine(stage_onnx, tmp_path / "stage2.engine", workspace_mb=256, timing_cache=cache,
                         profiles=(1, 2, 4))
    assert again.timing_cache_loaded


@trt_test
def test_engine_refuses_other_trt_version(stage_onnx, tmp_path):
    path = tmp_path / "stage.engine"
    build_engine(stage_onnx, path, workspace_mb=256, profiles={"patch": (1, 1, 2)})
    with pytest.raises(EngineError, match="rebuild it on this machine"):
        create_engine("tensorrt", path, device="cuda", expected_trt_version="0.0.1")
    with pytest.raises(EngineError, match="compute capability 1.0"):
        create_engine("tensorrt", path, device="cuda", expected_compute_capability="1.0")


@trt_test
def test_build_errors_are_clear(stage_onnx, tmp_path):
    with pytest.raises(EngineError, match="need a profile"):
        build_engine(stage_onnx, tmp_path / "a.engine")
    with pytest.raises(EngineError, match="did you mean 'patch'"):
        build_engine(stage_onnx, tmp_path / "a.engine", profiles={"patches": (1, 1, 2)})
    assert not (tmp_path / "a.engine").exists()


@trt_test
@pytest.mark.skipif(TRT_MAJOR >= 11, reason="TensorRT 11 has no FP16 builder flag")
def test_fp16_build_close_to_onnxruntime(stage_onnx, tmp_path):
    info = build_engine(stage_onnx, tmp_path / "fp16.engine", fp16=True, workspace_mb=256, profiles=(1, 2, 4))
    assert info.fp16
    engine = create_engine("tensorrt", tmp_path / "fp16.engine", device="cuda")
    feeds = patches(2)
    np.testing.assert_allclose(engine.run(feeds)["logits"], create_engine("ort", stage_onnx).run(feeds)["logits"],
                               rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="cupy is not installed")
@trt_test
def test_device_arrays_in_and_out(stage_onnx, tmp_path):
    import cupy

    build_engine(stage_onnx, tmp_path / "s.engine", workspace_mb=256, profiles=(1, 2, 4))
    engine = create_engine("tensorrt", tmp_path / "s.engine", device="cuda")
    feeds = patches(2)
    host = engine.run(feeds)
    with cupy.cuda.Stream(non_blocking=True):
        dev = engine.run({"patch": cupy.asarray(feeds["patch"])}, device_outputs=True)
        assert isinstance(dev["logits"], cupy.ndarray)
        logits = cupy.asnumpy(dev["logits"])
    np.testing.assert_allclose(logits, host["logits"], rtol=1e-5, atol=1e-5)


@trt_test
def test_qdq_graph_builds_strongly_typed(stage_onnx, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([patches(1, seed=s) for s in range(4)])

        def get_next(self):
            return next(self.items, None)

    qdq = tmp_path / "int8.onnx"
    quantize_static(str(stage_onnx), str(qdq), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True})
    assert onnx_has_qdq(qdq)
    with pytest.raises(EngineError, match="fp16"):
        build_engine(qdq, tmp_path / "bad.engine", fp16=True, profiles=(1, 1, 2))
    info = build_engine(qdq, tmp_path / "int8.engine", workspace_mb=256, profiles=(1, 2, 2))
    assert info.strongly_typed and info.has_qdq
    engine = create_engine("tensorrt", tmp_path / "int8.engine", device="cuda")
    feeds = patches(2)
    got = engine.run(feeds)["logits"]
    want = create_engine("ort", qdq).run(feeds)["logits"]
    np.testing.assert_allclose(got, want, rtol=0.1, atol=0.1)

"""Engine protocol, registry, onnxruntime and torch engines, on a tiny two-input two-output model."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adafocus.engines import (
    Engine,
    EngineError,
    TensorSpec,
    available_engines,
    create_engine,
    cuda_device_count,
    engine_names,
    parse_device,
    register_engine,
    resolve_engine,
)
from adafocus.engines.tensorrt import check_engine_compat, normalize_compute_capability
from adafocus.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


class TinyStage(torch.nn.Module):
    """Two named inputs, two named outputs, like a local-encoder step (patch + state -> logits + state)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 + 6, 5)

    def forward(self, patch: torch.Tensor, state: torch.Tensor):
        feat = self.conv(patch).relu().mean(dim=(2, 3))
        new_state = torch.cat([feat, state], dim=1)
        return self.fc(new_state), torch.maximum(new_state, torch.zeros_like(new_state))


IN, OUT = ["patch", "state"], ["logits", "new_state"]


@pytest.fixture(scope="module")
def stage() -> TinyStage:
    torch.manual_seed(0)
    return TinyStage().eval()


@pytest.fixture(scope="module")
def tiny_onnx(stage, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    example = (torch.randn(2, 3, 8, 8), torch.randn(2, 6))
    dyn = {n: {0: "batch"} for n in IN + OUT}
    torch.onnx.export(stage, example, str(path), input_names=IN, output_names=OUT, dynamic_axes=dyn,
                      opset_version=17, dynamo=False)
    return path


def feeds_for(batch: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"patch": rng.standard_normal((batch, 3, 8, 8), dtype=np.float32),
            "state": rng.standard_normal((batch, 6), dtype=np.float32)}


def torch_reference(stage, feeds):
    with torch.no_grad():
        out = stage(*(torch.from_numpy(feeds[n]) for n in IN))
    return {n: o.numpy() for n, o in zip(OUT, out, strict=True)}


# ------------------------------------------------------------------------------------ ort engine
def test_ort_engine_describes_named_io_with_dynamic_batch(tiny_onnx):
    with create_engine("ort", tiny_onnx) as engine:
        assert engine.input_names == IN and engine.output_names == OUT
        patch, state = engine.inputs
        assert patch == TensorSpec("patch", ("batch", 3, 8, 8), np.dtype(np.float32))
        assert state.shape == ("batch", 6) and state.dynamic_dims == (0,)
        assert [s.shape for s in engine.outputs] == [("batch", 5), ("batch", 10)]
        assert "patch: float32[batchx3x8x8]" in engine.describe()
        assert engine.providers == ["CPUExecutionProvider"]
    assert not engine.is_active


@pytest.mark.parametrize("batch", [1, 3])
def test_ort_engine_matches_torch(tiny_onnx, stage, batch):
    feeds = feeds_for(batch)
    engine = create_engine("ort", tiny_onnx, threads=1)
    out = engine.run(feeds)
    ref = torch_reference(stage, feeds)
    assert list(out) == OUT
    for name in OUT:
        assert out[name].shape == ref[name].shape
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-5, atol=1e-5)
    engine.close()


def test_engine_times_itself(tiny_onnx):
    engine = create_engine("ort", tiny_onnx, threads=1)
    assert (engine.calls, engine.total_ms, engine.mean_ms) == (0, 0.0, 0.0)
    for _ in range(3):
        engine(feeds_for(2))
    assert engine.calls == 3
    assert 0 < engine.last_ms <= engine.total_ms
    assert engine.mean_ms == pytest.approx(engine.total_ms / 3)
    engine.reset_timing()
    assert engine.calls == 0 and engine.total_ms == 0.0
    engine.close()


def test_ort_session_options(tiny_onnx, tmp_path):
    optimized = tmp_path / "opt.onnx"
    engine = create_engine("ort", tiny_onnx, threads=1, inter_threads=1, graph_optimization="disable",
                           optimized_model_path=optimized)
    assert engine.run(feeds_for(1))["logits"].shape == (1, 5)
    assert optimized.is_file()
    engine.close()
    with pytest.raises(EngineError, match="graph_optimization"):
        create_engine("ort", tiny_onnx, graph_optimization="max")


def test_ort_engine_explains_bad_feeds(tiny_onnx):
    engine = create_engine("ort", tiny_onnx)
    feeds = feeds_for(1)
    with pytest.raises(EngineError, match=r"missing \['state'\]"):
        engine.run({"patch": feeds["patch"]})
    with pytest.raises(EngineError, match="tiny.onnx"):
        engine.run({"patch": feeds["patch"].astype(np.float64), "state": feeds["state"]})
    engine.close()
    with pytest.raises(EngineError, match="not active"):
        engine.run(feeds)


def test_ort_engine_missing_file_and_cpu_only_providers(tmp_path, tiny_onnx):
    with pytest.raises(EngineError, match="not found"):
        create_engine("ort", tmp_path / "nope.onnx")
    with pytest.raises(EngineError, match="device='cuda'"):
        create_engine("ort", tiny_onnx, provider="tensorrt")


# -------------------------------------------------------------------------------------- registry
def test_unknown_engine_name_lists_known_ones():
    with pytest.raises(EngineError) as info:
        create_engine("onnxrt", "model.onnx")
    msg = str(info.value)
    assert "did you mean 'ort'" in msg
    for name in ("ort", "ort-cuda", "ort-tensorrt", "tensorrt", "torch", "auto"):
        assert name in msg


def test_auto_resolution_on_cpu_picks_ort(tiny_onnx):
    assert resolve_engine("auto", "cpu") == "ort"
    engine = create_engine("auto", tiny_onnx, device="cpu")
    assert engine.name == "ort"
    engine.close()


def test_available_engines_give_reasons():
    cpu = available_engines("cpu")
    assert set(cpu) == set(engine_names()) >= {"ort", "ort-cuda", "ort-tensorrt", "tensorrt", "torch"}
    assert cpu["ort"] is None
    assert "CUDA" in cpu["tensorrt"] and "CUDA" in cpu["ort-cuda"]
    with pytest.raises(EngineError, match="cannot run on cpu"):
        resolve_engine("tensorrt", "cpu")


@pytest.mark.skipif(cuda_device_count() > 0, reason="this machine has a CUDA device")
def test_auto_resolution_on_cuda_without_gpu_explains_every_candidate():
    with pytest.raises(EngineError) as info:
        resolve_engine("auto", "cuda")
    msg = str(info.value)
    for name in ("tensorrt", "ort-tensorrt", "ort-cuda", "torch"):
        assert f"{name}:" in msg


@pytest.mark.parametrize("text, canonical", [
    ("cpu", "cpu"), ("CPU", "cpu"), ("cpu:0", "cpu"), (" cpu ", "cpu"), ("Cpu:00", "cpu"),
    ("cuda", "cuda:0"), ("cuda:1", "cuda:1"), ("CUDA:1", "cuda:1"), ("gpu", "cuda:0"), ("GPU:1", "cuda:1"),
    ("\tgpu : 2 \n", "cuda:2"),
])
def test_parse_device(text, canonical):
    dev = parse_device(text)
    assert str(dev) == canonical and parse_device(canonical) == dev and parse_device(dev) is dev
    kind, index = dev  # unpacks like the (kind, index) tuple it used to be
    assert (kind, index) == (dev.kind, dev.index) and dev.is_cuda == (kind == "cuda")
    assert Engine(text).device == canonical and Engine(text).device_kind == kind  # engines keep the canonical form


@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "cpu:1", "", "cuda:", "gpu1", "cuda:-1", "cuda:1:2", "cuda:١"])
def test_parse_device_refuses_anything_else(bad):
    with pytest.raises(ConfigError) as info:
        parse_device(bad)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == f"unknown device {bad!r}; known: cpu, cuda, cuda:N, gpu, gpu:N (any case)"
    with pytest.raises(ConfigError):
        create_engine("auto", "model.onnx", device=bad)


def test_registry_takes_every_device_spelling(tiny_onnx):
    assert resolve_engine("auto", "CPU:0") == "ort"
    assert available_engines(" Cpu ") == available_engines("cpu")
    engine = create_engine("auto", tiny_onnx, device="CPU:0")
    assert engine.name == "ort" and engine.device == "cpu"
    engine.close()


@pytest.mark.skipif(cuda_device_count() > 0, reason="this machine has a CUDA device")
@pytest.mark.parametrize("device", ["gpu", "cuda", "GPU:1"])
def test_cuda_without_a_gpu_fails_before_an_engine_is_picked(device, tmp_path):
    from adafocus.runtime.pipeline import Pipeline

    line = f"device {device!r}: no CUDA device found (no CUDA driver, or it reports no GPU); use device 'cpu'"
    with pytest.raises(EngineError) as info:
        create_engine("auto", "model.onnx", device=device)
    assert str(info.value) == line
    with pytest.raises(EngineError) as info:  # before the bundle is even read: this one does not exist
        Pipeline.from_bundle(tmp_path / "no-bundle", device=device)
    assert str(info.value) == line


def test_cuda_index_beyond_the_devices_found(monkeypatch):
    import adafocus.device as device_mod

    monkeypatch.setattr(device_mod, "cuda_device_count", lambda: 2)
    assert str(device_mod.require_device("GPU:1")) == "cuda:1"
    assert str(device_mod.require_device("cpu:0")) == "cpu"
    with pytest.raises(EngineError, match=r"^device 'cuda:2': no CUDA device 2; this machine has 2 \(cuda:0 to"):
        device_mod.require_device("cuda:2")


def test_register_custom_engine():
    from adafocus.engines import registry

    @register_engine("test-echo")
    class Echo(Engine):
        def __init__(self, device: str = "cpu", path=None) -> None:
            super().__init__(device)

        def _activate_impl(self) -> None:
            self._inputs = [TensorSpec("x", (None,), np.dtype(np.float32))]
            self._outputs = [TensorSpec("y", (None,), np.dtype(np.float32))]

        def _run_impl(self, feeds, device_outputs):
            return {"y": feeds["x"] * 2}

    try:
        engine = create_engine("test-echo")
        assert isinstance(engine, Echo) and engine.name == "test-echo"
        np.testing.assert_array_equal(engine.run({"x": np.ones(2, np.float32)})["y"], [2, 2])
        assert engine.calls == 1
        with pytest.raises(TypeError):
            register_engine("test-bad")(dict)
    finally:
        registry._REGISTRY.pop("test-echo", None)


def test_engines_package_does_not_import_torch(tiny_onnx):
    code = (
        "import sys; from adafocus.engines import available_engines, create_engine, resolve_engine\n"
        "available_engines('cpu'); available_engines('cuda'); resolve_engine('auto', 'cpu')\n"
        f"e = create_engine('ort', {str(tiny_onnx)!r}); e.close()\n"
        "bad = [m for m in ('torch', 'tensorrt', 'onnx') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# ---------------------------------------------------------------------------------- torch engine
def test_torch_engine_same_outputs_as_ort(tiny_onnx, stage):
    feeds = feeds_for(3, seed=7)
    ort_out = create_engine("ort", tiny_onnx).run(feeds)
    engine = create_engine("torch", module=stage, input_names=IN, output_names=OUT,
                           input_shapes={"patch": (None, 3, 8, 8)})
    assert engine.inputs[0].shape == (None, 3, 8, 8) and engine.inputs[1].shape is None
    out = engine.run(feeds)
    assert list(out) == OUT and all(isinstance(v, np.ndarray) for v in out.values())
    for name in OUT:
        np.testing.assert_allclose(out[name], ort_out[name], rtol=1e-5, atol=1e-5)
    tensors = engine.run({k: torch.from_numpy(v) for k, v in feeds.items()})
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    np.testing.assert_allclose(tensors["logits"].numpy(), ort_out["logits"], rtol=1e-5, atol=1e-5)
    # a device array that is neither numpy nor torch (the GPU crop's cupy patches) goes in through DLPack
    # and, like the ort engines' device feeds, gives host outputs
    mixed = engine.run({"patch": DLPackOnly(feeds["patch"]), "state": feeds["state"]})
    assert all(isinstance(v, np.ndarray) for v in mixed.values())
    np.testing.assert_allclose(mixed["logits"], ort_out["logits"], rtol=1e-5, atol=1e-5)
    assert engine.calls == 3


class DLPackOnly:
    """An array that offers only the DLPack protocol (as cupy does on a GPU), here over host memory."""

    def __init__(self, array: np.ndarray):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**{k: v for k, v in kwargs.items() if k != "stream"})

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


def test_torch_engine_checks_its_arguments(stage):
    with pytest.raises(EngineError, match="needs module="):
        create_engine("torch", "stage.onnx")
    with pytest.raises(EngineError, match="2 outputs"):
        create_engine("torch", module=stage, input_names=IN, output_names=["logits"]).run(feeds_for(1))
    with pytest.raises(EngineError, match="not among input_names"):
        create_engine("torch", module=stage, input_names=IN, output_names=OUT, input_shapes={"frames": (1,)})


# ------------------------------------------------------------------------ TensorRT compatibility
def test_engine_compat_refuses_other_trt_version_or_gpu():
    check_engine_compat("local.engine", "10.3.0", "8.7", "10.3.0", (8, 7))
    check_engine_compat("local.engine", None, None, "10.3.0", "8.7")  # nothing recorded: nothing to refuse
    with pytest.raises(EngineError, match=r"TensorRT 10\.3\.0 \(this machine has TensorRT 10\.7\.0\)"):
        check_engine_compat("local.engine", "10.3.0", "8.7", "10.7.0", "8.7")
    with pytest.raises(EngineError, match=r"compute capability 8\.6 \(this GPU is 8\.7\)"):
        check_engine_compat("local.engine", "10.3.0", "sm_86", "10.3.0", "8.7")
    assert normalize_compute_capability("sm_87") == normalize_compute_capability((8, 7)) == "8.7"
    assert normalize_compute_capability("90") == "9.0"


def test_tensorrt_engine_refuses_cpu_device(tmp_path):
    from adafocus.engines.tensorrt import TensorRTEngine

    with pytest.raises(EngineError, match="CUDA devices only"):
        TensorRTEngine(tmp_path / "x.engine", device="cpu")


# ------------------------------------------------------------------------------------ GPU paths
def _ort_cuda_reason() -> str | None:
    import onnxruntime as ort

    if cuda_device_count() == 0:
        return "no CUDA device"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDA execution provider"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_ort_cuda_reason() is not None, reason=str(_ort_cuda_reason()))
def test_ort_cuda_iobinding_host_and_device(tiny_onnx, stage):
    feeds = feeds_for(2)
    ref = torch_reference(stage, feeds)
    engine = create_engine("ort-cuda", tiny_onnx, device="cuda")
    out = engine.run(feeds)
    np.testing.assert_allclose(out["logits"], ref["logits"], rtol=1e-3, atol=1e-3)
    dev = engine.run(feeds, device_outputs=True)
    try:
        import cupy
    except ImportError:  # OrtValues on the GPU
        np.testing.assert_allclose(dev["logits"].numpy(), ref["logits"], rtol=1e-3, atol=1e-3)
    else:
        np.testing.assert_allclose(cupy.asnumpy(dev["logits"]), ref["logits"], rtol=1e-3, atol=1e-3)
        on_gpu = engine.run({k: cupy.asarray(v) for k, v in feeds.items()}, device_outputs=True)
        np.testing.assert_allclose(cupy.asnumpy(on_gpu["logits"]), ref["logits"], rtol=1e-3, atol=1e-3)
    engine.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for torch")
def test_torch_engine_cuda_graphs_match_eager(stage):
    """CUDA graphs: batches padded to a power of two give the eager outputs; device outputs are not overwritten
    by the next replay; cupy feeds go in through DLPack."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        eager = create_engine("torch", module=copy.deepcopy(stage), input_names=IN, output_names=OUT, device="cuda",
                              cuda_graphs=False)
        graphs = create_engine("torch", module=copy.deepcopy(stage), input_names=IN, output_names=OUT, device="cuda")
        for batch in (1, 3, 4, 5, 3):
            feeds = feeds_for(batch, seed=batch)
            want, got = eager.run(feeds), graphs.run(feeds)
            for name in OUT:
                assert got[name].shape == want[name].shape
                np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
        assert graphs.cuda_graphs and len(graphs._graphs) == 3  # batches 1, 4 and 8
        first = graphs.run({k: torch.from_numpy(v) for k, v in feeds_for(2, seed=1).items()})
        graphs.run(feeds_for(2, seed=2))  # same graph, new inputs
        np.testing.assert_allclose(first["logits"].cpu().numpy(), eager.run(feeds_for(2, seed=1))["logits"],
                                   rtol=1e-5, atol=1e-5)
        cupy = pytest.importorskip("cupy")
        feeds = feeds_for(2, seed=9)
        on_gpu = graphs.run({k: cupy.asarray(v) for k, v in feeds.items()})
        np.testing.assert_allclose(on_gpu["logits"], eager.run(feeds)["logits"], rtol=1e-5, atol=1e-5)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def test_shared_cpu_pool_in_a_cli_process(tmp_path):
    """The CLI's one onnxruntime pool for the process (threads spinning between stages): same decisions as
    per-session pools, every session on it, and a second size refused in one line."""
    import json
    import os
    import subprocess
    import sys

    def run(shared: str) -> list[dict]:
        env = {**os.environ, "ADAFOCUS_ORT_SHARED_POOL": shared}
        res = subprocess.run([sys.executable, "-c", "from adafocus.cli import run_main; run_main()", "--json",
                              "--threads", "2"], capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr
        return [json.loads(line) for line in res.stdout.splitlines()]

    keys = ("video", "label", "exit_step", "exit_reason", "frames_used", "patches", "gflops")
    assert [{k: r[k] for k in keys} for r in run("1")] == [{k: r[k] for k in keys} for r in run("0")]
    code = ("import os; os.environ['ADAFOCUS_ORT_SHARED_POOL'] = '1'\n"
            "from adafocus.engines.ort import use_shared_pool\n"
            "from adafocus.runtime.pipeline import Pipeline\n"
            "from adafocus.errors import EngineError\n"
            "assert use_shared_pool(2) and use_shared_pool(2)\n"
            "with Pipeline.from_bundle(__import__('adafocus.demo.shipped').demo.shipped.bundle_path(), engine='ort',"
            " threads=2) as p:\n"
            "    assert all(e.shared_pool for e in p.engines.values())\n"
            "for bad in (lambda: use_shared_pool(1), lambda: Pipeline.from_bundle("
            "__import__('adafocus.demo.shipped').demo.shipped.bundle_path(), engine='ort', threads=1)):\n"
            "    try:\n        bad()\n    except EngineError as e:\n        assert 'one shared pool of 2' in str(e)\n"
            "    else:\n        raise SystemExit('not refused')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr

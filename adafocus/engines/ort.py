"""onnxruntime engines: ``ort`` (CPU EP on cpu, best GPU EP on cuda), ``ort-cuda``, ``ort-tensorrt``.

CPU: ``run`` hands the caller's dict straight to ``InferenceSession.run`` (no copies, no per-call
checks; errors are explained after the fact), so the wrapper costs a few microseconds per call.

CUDA: inputs and outputs go through an ``IOBinding``. Feeds may be numpy arrays (copied to the GPU),
``OrtValue``s, or device arrays exposing ``__cuda_array_interface__`` (cupy, torch CUDA tensors), which
are bound in place. With ``device_outputs=True`` outputs stay on the GPU: cupy arrays when cupy is
installed (zero copy, they keep the ORT buffer alive), otherwise ``OrtValue``s, which the next ort
stage accepts as feeds. The GPU execution providers come from the ``onnxruntime-gpu`` wheel
(``pip install 'adafocus[gpu]'``); a session that silently falls back to the CPU is refused.

CPU threads. By default every CPU session has its own intra-op pool, without spin-waiting (one session's
spinning threads would steal the cores the next stage needs). A process that runs only adafocus engines can
instead call :func:`use_shared_pool` before its first session (the CLI's run, bench, profile and calibrate
thresholds do): then every CPU session shares **one** pool whose threads spin between runs, and since the
stages run one after another they never compete. Measured on the 2-core dev CPU, alternating runs: the demo one
at a time 8.1-9.1 -> 5.3-7.2 ms a video, base-p128 all 16 steps (2 threads) 652 -> 523-590 ms. onnxruntime
then refuses sessions with their own pools in that process (``onnxruntime.quantization`` makes such
sessions), so the shared pool is the CLI's choice, not the library's default.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import importlib.util
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from adafocus.engines.base import Engine, TensorSpec, cuda_device_count
from adafocus.engines.registry import register_engine
from adafocus.errors import EngineError, require

# ONNX tensor type strings as onnxruntime reports them -> numpy dtypes.
ORT_DTYPES: dict[str, np.dtype] = {
    f"tensor({k})": np.dtype(v)
    for k, v in {
        "float": np.float32, "float16": np.float16, "double": np.float64,
        "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
        "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
        "bool": np.bool_,
    }.items()
}

GRAPH_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

_CPU_EP, _CUDA_EP, _TRT_EP = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
_GPU_HINT = "install onnxruntime-gpu instead of onnxruntime: pip install 'adafocus[gpu]'"
_POOL: dict[str, Any] = {}  # "threads": the size asked of this process's shared CPU pool, once made
_POOL_LOCK = threading.Lock()
SHARED_POOL_ENV = "ADAFOCUS_ORT_SHARED_POOL"  # "0": use_shared_pool() does nothing (per-session pools)


def use_shared_pool(threads: int | None) -> bool:
    """Make every CPU session of this process share one intra-op pool of ``threads`` threads (None:
    onnxruntime's default, one per physical core), spinning between runs. Call it before the first session;
    returns whether the shared pool is in use. A second call with another size is an EngineError (a process
    has one pool). ``ADAFOCUS_ORT_SHARED_POOL=0`` turns it off."""
    if os.environ.get(SHARED_POOL_ENV, "1") == "0":
        return False
    with _POOL_LOCK:
        if "threads" in _POOL:
            if _POOL["threads"] != threads:
                raise EngineError(f"this process runs onnxruntime on one shared pool of {_POOL['threads'] or 'default'}"
                                  f" threads; {threads or 'default'} threads cannot be given as well")
            return True
        try:
            from onnxruntime.capi import _pybind_state

            _pybind_state.set_global_thread_pool_sizes(int(threads or 0), 1)
        except Exception:  # noqa: BLE001 - an onnxruntime without global pools: keep per-session pools
            return False
        _POOL["threads"] = threads
        return True


def _tensorrt_libs_present() -> bool:
    """The TensorRT EP is compiled into onnxruntime-gpu, but it needs libnvinfer at session creation."""
    if importlib.util.find_spec("tensorrt") or importlib.util.find_spec("tensorrt_libs"):
        return True
    return bool(ctypes.util.find_library("nvinfer"))


def _spec_of(meta: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) else None) for d in meta.shape)
    dtype = ORT_DTYPES.get(meta.type)
    if dtype is None:
        raise EngineError(f"tensor {meta.name!r} has type {meta.type}, which adafocus engines do not handle")
    return TensorSpec(meta.name, shape, dtype)


@register_engine("ort")
class OrtEngine(Engine):
    """onnxruntime session for one ``.onnx`` stage.

    Args:
        path: the ``.onnx`` file.
        device: ``'cpu'``, ``'cuda'`` or ``'cuda:N'``.
        provider: ``'auto'`` (cpu: CPU EP; cuda: TensorRT EP if present, else CUDA EP), ``'cpu'``,
            ``'cuda'`` or ``'tensorrt'``.
        threads: intra-op threads (None: onnxruntime's default, one per physical core).
        inter_threads: inter-op threads (None: default; only matters for parallel execution).
        graph_optimization: ``'disable'``, ``'basic'``, ``'extended'`` or ``'all'``.
        optimized_model_path: if set, onnxruntime writes the optimised graph there (for inspection).
        trt_cache_dir: TensorRT EP only: directory for its engine and timing caches. Strongly advised,
            builds take seconds to minutes (on Jetson) and are redone for every new session without it.
        fp16: TensorRT EP only: allow FP16 kernels.
        provider_options: extra options for the GPU execution provider (onnxruntime's names).
        log_level: onnxruntime's severity (0 verbose .. 4 fatal); 3 keeps warnings quiet.
    """

    default_provider = "auto"

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "cpu",
        *,
        provider: str | None = None,
        threads: int | None = None,
        inter_threads: int | None = None,
        graph_optimization: str = "all",
        optimized_model_path: str | os.PathLike | None = None,
        trt_cache_dir: str | os.PathLike | None = None,
        fp16: bool = False,
        provider_options: Mapping[str, Any] | None = None,
        log_level: int = 3,
    ) -> None:
        super().__init__(device)
        self.path = Path(path)
        self.provider = provider or self.default_provider
        if self.provider not in ("auto", "cpu", "cuda", "tensorrt"):
            raise EngineError(f"unknown onnxruntime provider {self.provider!r}: use auto, cpu, cuda or tensorrt")
        if graph_optimization not in GRAPH_OPT_LEVELS:
            raise EngineError(
                f"unknown graph_optimization {graph_optimization!r}: use {', '.join(GRAPH_OPT_LEVELS)}"
            )
        self.threads = threads
        self.inter_threads = inter_threads
        self.graph_optimization = graph_optimization
        self.optimized_model_path = optimized_model_path
        self.trt_cache_dir = trt_cache_dir
        self.fp16 = fp16
        self.provider_options = dict(provider_options or {})
        self.log_level = log_level
        self.session: ort.InferenceSession | None = None
        self.providers: list[str] = []
        self.shared_pool = False  # this session runs on the process's shared CPU pool (use_shared_pool)

    # ------------------------------------------------------------------------------ availability
    @classmethod
    def availability(cls, device: str = "cpu") -> str | None:
        kind = device.split(":")[0].lower()
        if kind == "cpu":
            return None if cls.default_provider in ("auto", "cpu") else "needs a CUDA device"
        available = ort.get_available_providers()
        if cuda_device_count() == 0:
            return "no CUDA device found"
        if _CUDA_EP not in available:
            return f"onnxruntime has no CUDA execution provider ({_GPU_HINT})"
        if cls.default_provider == "tensorrt":
            if _TRT_EP not in available:
                return f"onnxruntime has no TensorRT execution provider ({_GPU_HINT})"
            if not _tensorrt_libs_present():
                return "the TensorRT libraries (libnvinfer) are not installed: pip install 'adafocus[gpu]'"
        return None

    def _provider_list(self) -> list[Any]:
        if self.device_kind == "cpu":
            if self.provider not in ("auto", "cpu"):
                raise EngineError(f"provider {self.provider!r} needs device='cuda', not 'cpu'")
            return [_CPU_EP]
        if self.provider == "cpu":
            raise EngineError("provider 'cpu' runs on the host: use device='cpu'")
        available = ort.get_available_providers()
        if cuda_device_count() == 0:
            raise EngineError(f"onnxruntime cannot use {self.device}: no CUDA device found")
        if _CUDA_EP not in available:
            raise EngineError(f"onnxruntime has no CUDA execution provider ({_GPU_HINT})")
        want = self.provider
        if want == "auto":
            want = "tensorrt" if _TRT_EP in available and _tensorrt_libs_present() else "cuda"
        providers: list[Any] = []
        cuda_opts: dict[str, Any] = {"device_id": self.device_index}
        if want == "tensorrt":
            if _TRT_EP not in available:
                raise EngineError(f"onnxruntime has no TensorRT execution provider ({_GPU_HINT})")
            trt_opts: dict[str, Any] = {"device_id": self.device_index, "trt_fp16_enable": bool(self.fp16)}
            if self.trt_cache_dir is not None:
                cache = Path(self.trt_cache_dir)
                cache.mkdir(parents=True, exist_ok=True)
                trt_opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache),
                                trt_timing_cache_enable=True, trt_timing_cache_path=str(cache))
            trt_opts.update(self.provider_options)
            providers.append((_TRT_EP, trt_opts))
        else:
            cuda_opts.update(self.provider_options)
        providers.append((_CUDA_EP, cuda_opts))
        providers.append(_CPU_EP)  # for nodes no GPU EP takes (onnxruntime logs them at log_level 2)
        return providers

    # -------------------------------------------------------------------------------- life cycle
    def _activate_impl(self) -> None:
        if not self.path.is_file():
            raise EngineError(f"ONNX file not found: {self.path}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = GRAPH_OPT_LEVELS[self.graph_optimization]
        opts.log_severity_level = self.log_level
        if "threads" in _POOL:  # the process's shared pool (see the module docstring): threads spin between runs
            if self.threads is not None and self.threads != _POOL["threads"]:
                raise EngineError(f"this process runs onnxruntime on one shared pool of "
                                  f"{_POOL['threads'] or 'default'} threads, not {self.threads}")
            opts.use_per_session_threads = False
            self.shared_pool = True
        else:
            if self.threads is not None:
                opts.intra_op_num_threads = int(self.threads)
            if self.inter_threads is not None:
                opts.inter_op_num_threads = int(self.inter_threads)
            # no spin-waiting after a run: the runtime alternates sessions (backbone, head, the next video's
            # glance), and one session's spinning threads steal the cores the next one needs. Measured with 2
            # threads on the 2-core dev CPU, base-p128: backbone + head alternating 52.4 ms a step spinning,
            # 31.8 ms without
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.optimized_model_path is not None:
            opts.optimized_model_filepath = str(self.optimized_model_path)
        providers = self._provider_list()
        if self.device_kind == "cuda" and hasattr(ort, "preload_dlls"):
            with contextlib.suppress(Exception):  # onnxruntime >= 1.21: CUDA/cuDNN from the nvidia-* wheels
                ort.preload_dlls()
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:
            raise EngineError(f"onnxruntime cannot load {self.path}: {exc}") from exc
        self.providers = self.session.get_providers()
        wanted = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        if wanted not in self.providers:  # onnxruntime falls back to the CPU with only a log line
            raise EngineError(
                f"onnxruntime could not start {wanted} for {self.path.name} (it would have run on {self.providers}); "
                "run with log_level=1 to see why"
            )
        self._inputs = [_spec_of(m) for m in self.session.get_inputs()]
        self._outputs = [_spec_of(m) for m in self.session.get_outputs()]
        self._output_name_list = [s.name for s in self._outputs]
        self._on_gpu = self.device_kind == "cuda" and wanted != _CPU_EP

    def _close_impl(self) -> None:
        self.session = None

    # ---------------------------------------------------------------------------------------- run
    def _run_impl(self, feeds: Mapping[str, Any], device_outputs: bool) -> dict[str, Any]:
        if self._on_gpu:
            return self._run_bound(feeds, device_outputs)
        # CPU: device memory is host memory, so device_outputs changes nothing.
        try:
            values = self.session.run(self._output_name_list, feeds)
        except Exception as exc:
            self._check_feeds(feeds)
            raise EngineError(f"onnxruntime failed on {self.path.name}: {exc}") from exc
        return dict(zip(self._output_name_list, values, strict=True))

    def _run_bound(self, feeds: Mapping[str, Any], device_outputs: bool) -> dict[str, Any]:
        self._check_feeds(feeds)
        binding = self.session.io_binding()
        for spec in self._inputs:
            _bind_input(binding, spec, feeds[spec.name], self.device_index)
        for name in self._output_name_list:
            binding.bind_output(name, "cuda", self.device_index)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise EngineError(f"onnxruntime failed on {self.path.name}: {exc}") from exc
        if not device_outputs:
            return dict(zip(self._output_name_list, binding.copy_outputs_to_cpu(), strict=True))
        values = binding.get_outputs()
        if importlib.util.find_spec("cupy") is not None:
            values = [ortvalue_to_cupy(v) for v in values]
        return dict(zip(self._output_name_list, values, strict=True))


def _bind_input(binding: Any, spec: TensorSpec, value: Any, device_index: int) -> None:
    """Bind one feed without a host round trip when it is already on the GPU."""
    if isinstance(value, ort.OrtValue):
        binding.bind_ortvalue_input(spec.name, value)
        return
    cai = getattr(value, "__cuda_array_interface__", None)
    if cai is None:
        binding.bind_cpu_input(spec.name, np.ascontiguousarray(value))
        return
    dtype = np.dtype(cai["typestr"])
    shape = tuple(cai["shape"])
    strides = cai.get("strides")
    if strides is not None and strides != _c_strides(shape, dtype.itemsize):
        raise EngineError(f"device input {spec.name!r} is not C-contiguous: make it contiguous first")
    if dtype != spec.dtype:
        raise EngineError(f"device input {spec.name!r} is {dtype.name}, the model expects {spec.dtype.name}")
    _wait_for_producer(value)
    binding.bind_input(spec.name, "cuda", device_index, dtype, list(shape), int(cai["data"][0]))


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _wait_for_producer(value: Any) -> None:
    """onnxruntime runs on its own CUDA stream: finish the producer's stream before reading its array."""
    module = type(value).__module__.split(".")[0]
    if module == "cupy":
        import cupy

        cupy.cuda.get_current_stream().synchronize()
    elif module == "torch":
        import torch  # only reached when the caller already passes torch tensors

        torch.cuda.current_stream(value.device).synchronize()


def ortvalue_to_cupy(value: Any) -> Any:
    """View a CUDA ``OrtValue`` as a cupy array without copying; the array keeps the OrtValue alive."""
    cp = require("cupy", "gpu", "device arrays")
    dtype = ORT_DTYPES[value.data_type()]
    shape = tuple(value.shape())
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    mem = cp.cuda.UnownedMemory(value.data_ptr(), nbytes, value)
    return cp.ndarray(shape, dtype=dtype, memptr=cp.cuda.MemoryPointer(mem, 0))


@register_engine("ort-cuda")
class OrtCudaEngine(OrtEngine):
    """onnxruntime with the CUDA execution provider (``device='cuda[:N]'``)."""

    default_provider = "cuda"

    def __init__(self, path: str | os.PathLike, device: str = "cuda", **kwargs: Any) -> None:
        if kwargs.pop("provider", "cuda") != "cuda":
            raise EngineError("engine 'ort-cuda' fixes provider='cuda'; use engine 'ort' to choose")
        super().__init__(path, device, provider="cuda", **kwargs)
        if self.device_kind != "cuda":
            raise EngineError("engine 'ort-cuda' needs device='cuda' or 'cuda:N'")


@register_engine("ort-tensorrt")
class OrtTensorRTEngine(OrtEngine):
    """onnxruntime with the TensorRT execution provider (CUDA EP for what TensorRT does not take)."""

    default_provider = "tensorrt"

    def __init__(self, path: str | os.PathLike, device: str = "cuda", **kwargs: Any) -> None:
        if kwargs.pop("provider", "tensorrt") != "tensorrt":
            raise EngineError("engine 'ort-tensorrt' fixes provider='tensorrt'; use engine 'ort' to choose")
        super().__init__(path, device, provider="tensorrt", **kwargs)
        if self.device_kind != "cuda":
            raise EngineError("engine 'ort-tensorrt' needs device='cuda' or 'cuda:N'")

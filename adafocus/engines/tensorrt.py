"""The ``tensorrt`` engine: native TensorRT ``.engine`` files (TensorRT 10.x and 11.x).

Uses the tensor-name API (``get_tensor_name``, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``). Device memory and the stream come from cuda-python (preferred) or pycuda,
whichever imports; everything is imported when an engine is created, and a missing package raises
MissingDependency naming ``pip install 'adafocus[gpu]'``.

An engine only runs on the TensorRT version and GPU compute capability it was built for. The caller
passes what the bundle manifest recorded (``expected_trt_version``, ``expected_compute_capability``);
a mismatch is refused with one clear line before TensorRT tries (and fails less clearly) to load it.

Feeds: numpy arrays (copied into device buffers owned by the engine) or device arrays exposing
``__cuda_array_interface__`` (cupy, torch CUDA tensors), used in place. With device feeds the engine
runs on the producer's current stream (cupy or torch), so no synchronisation is needed between
stages. ``device_outputs=True`` returns cupy arrays (freshly allocated, so they stay valid).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from adafocus.engines.base import Engine, TensorSpec, cuda_device_count, cuda_device_info
from adafocus.engines.registry import register_engine
from adafocus.errors import EngineError, MissingDependency, require

GPU_EXTRA_HINT = "pip install 'adafocus[gpu]'"


# ----------------------------------------------------------------------------------- versions
def tensorrt_version() -> str | None:
    """The installed TensorRT Python package's version, or None (imports tensorrt)."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return str(trt.__version__)


def normalize_compute_capability(cc: Any) -> str | None:
    """``"8.6"``, ``(8, 6)``, ``8.6``, ``"sm_86"`` or ``"86"`` -> ``"8.6"``; None stays None."""
    if cc is None or cc == "":
        return None
    if isinstance(cc, (tuple, list)):
        return f"{int(cc[0])}.{int(cc[1])}"
    text = str(cc).strip().lower().removeprefix("sm_").removeprefix("sm")
    if "." in text:
        major, minor = text.split(".", 1)
        return f"{int(major)}.{int(minor)}"
    if text.isdigit() and len(text) >= 2:
        return f"{int(text[:-1])}.{int(text[-1])}"
    raise EngineError(f"cannot read compute capability {cc!r}: expected e.g. '8.6'")


def check_engine_compat(
    engine_name: str,
    recorded_trt: str | None,
    recorded_cc: Any,
    running_trt: str | None,
    running_cc: Any,
) -> None:
    """Refuse an engine built for another TensorRT version or GPU compute capability.

    ``recorded_*`` come from the bundle manifest (None: not recorded, not checked); ``running_*`` from
    this machine. TensorRT engines are tied to the exact TensorRT build and to the GPU architecture.
    """
    problems = []
    if recorded_trt and running_trt and str(recorded_trt) != str(running_trt):
        problems.append(f"TensorRT {recorded_trt} (this machine has TensorRT {running_trt})")
    want_cc, have_cc = normalize_compute_capability(recorded_cc), normalize_compute_capability(running_cc)
    if want_cc and have_cc and want_cc != have_cc:
        problems.append(f"compute capability {want_cc} (this GPU is {have_cc})")
    if problems:
        raise EngineError(
            f"{engine_name} was built for {' and '.join(problems)}: TensorRT engines do not carry over; "
            "rebuild it on this machine (adafocus.export.tensorrt.build_engine) or run the ONNX with engine 'ort'"
        )


# ------------------------------------------------------------------------------------- CUDA
class _CudaPython:
    """Device memory, copies and streams through cuda-python's runtime bindings.

    Streams are plain integer handles, so a stream made by cupy or torch can be used directly.
    """

    external_streams = True

    def __init__(self, device_index: int) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
        self.rt = cudart
        self._h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(cudart.cudaSetDevice(device_index), "cudaSetDevice")

    def _call(self, result: Any, what: str) -> Any:
        err, rest = result[0], result[1:]
        if int(getattr(err, "value", err)) != 0:  # cudaError_t: an IntEnum in 12.x, .value everywhere
            name = self.rt.cudaGetErrorName(err)[1]
            raise EngineError(f"CUDA error in {what}: {name.decode() if isinstance(name, bytes) else name}")
        return rest[0] if len(rest) == 1 else None

    def malloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self._call(self.rt.cudaFree(ptr), "cudaFree")

    def new_stream(self) -> Any:
        return self._call(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def destroy_stream(self, stream: Any) -> None:
        self._call(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def handle(self, stream: Any) -> int:
        return int(stream)

    def synchronize(self, stream: Any) -> None:
        self._call(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def htod(self, ptr: int, host: np.ndarray, stream: Any) -> None:
        self._call(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, self._h2d, stream), "cudaMemcpyAsync")

    def dtoh(self, host: np.ndarray, ptr: int, stream: Any) -> None:
        self._call(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, self._d2h, stream), "cudaMemcpyAsync")

    def close(self) -> None:
        pass


class _PyCuda:
    """The same through pycuda, on the device's primary context (the one TensorRT's runtime uses).

    pycuda cannot wrap a foreign stream handle: device feeds are waited for, then run on our stream.
    """

    external_streams = False

    def __init__(self, device_index: int) -> None:
        import pycuda.driver as cuda

        cuda.init()
        self.cuda = cuda
        self.ctx = cuda.Device(device_index).retain_primary_context()
        self.ctx.push()
        self._allocs: dict[int, Any] = {}

    def malloc(self, nbytes: int) -> int:
        alloc = self.cuda.mem_alloc(max(int(nbytes), 1))
        self._allocs[int(alloc)] = alloc
        return int(alloc)

    def free(self, ptr: int) -> None:
        self._allocs.pop(ptr).free()

    def new_stream(self) -> Any:
        return self.cuda.Stream()

    def destroy_stream(self, stream: Any) -> None:
        pass  # pycuda frees the stream with its Python object

    def handle(self, stream: Any) -> int:
        return int(stream.handle)

    def synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def htod(self, ptr: int, host: np.ndarray, stream: Any) -> None:
        self.cuda.memcpy_htod_async(ptr, host, stream)

    def dtoh(self, host: np.ndarray, ptr: int, stream: Any) -> None:
        self.cuda.memcpy_dtoh_async(host, ptr, stream)

    def close(self) -> None:
        for alloc in self._allocs.values():
            alloc.free()
        self._allocs.clear()
        with contextlib.suppress(Exception):
            self.ctx.pop()


def open_cuda(device_index: int) -> Any:
    """cuda-python if it imports, else pycuda; MissingDependency naming the gpu extra otherwise."""
    errors = []
    for package, backend in (("cuda", _CudaPython), ("pycuda", _PyCuda)):
        if importlib.util.find_spec(package) is None:
            errors.append(f"{package} is not installed")
            continue
        try:
            return backend(device_index)
        except ImportError as exc:
            errors.append(str(exc))
    raise MissingDependency(
        f"TensorRT engines need cuda-python or pycuda for device memory ({'; '.join(errors)}): {GPU_EXTRA_HINT}"
    )


def _producer_stream(value: Any) -> tuple[int | None, Any]:
    """(stream handle, synchronise function) of the library that made device array ``value``."""
    module = type(value).__module__.split(".")[0]
    if module == "cupy":
        import cupy

        stream = cupy.cuda.get_current_stream()
        return int(stream.ptr), stream.synchronize
    if module == "torch":
        torch = importlib.import_module("torch")  # only reached when the caller passes torch tensors
        stream = torch.cuda.current_stream(value.device)
        return int(stream.cuda_stream), stream.synchronize
    return None, None


def _cai_pointer(name: str, value: Any, dtype: np.dtype) -> tuple[int, tuple[int, ...]]:
    cai = value.__cuda_array_interface__
    shape = tuple(int(d) for d in cai["shape"])
    got = np.dtype(cai["typestr"])
    if got != dtype:
        raise EngineError(f"device input {name!r} is {got.name}, the engine expects {dtype.name}")
    strides = cai.get("strides")
    if strides is not None:
        expected, step = [], dtype.itemsize
        for dim in reversed(shape):
            expected.append(step)
            step *= dim
        if tuple(strides) != tuple(reversed(expected)):
            raise EngineError(f"device input {name!r} is not C-contiguous: make it contiguous first")
    return int(cai["data"][0]), shape


# ----------------------------------------------------------------------------------- engine
@register_engine("tensorrt")
class TensorRTEngine(Engine):
    """A serialized TensorRT engine (``.engine`` / ``.plan``) for one stage.

    Args:
        path: the engine file.
        device: ``'cuda'`` or ``'cuda:N'``.
        expected_trt_version: TensorRT version recorded when the engine was built (bundle manifest).
        expected_compute_capability: the GPU's compute capability at build time, e.g. ``"8.7"``.
        log_level: TensorRT logger severity: ``'error'``, ``'warning'``, ``'info'`` or ``'verbose'``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "cuda",
        *,
        expected_trt_version: str | None = None,
        expected_compute_capability: Any = None,
        log_level: str = "warning",
    ) -> None:
        super().__init__(device)
        if self.device_kind != "cuda":
            raise EngineError("engine 'tensorrt' runs on CUDA devices only: use device='cuda' or 'cuda:N'")
        self.path = Path(path)
        self.expected_trt_version = expected_trt_version
        self.expected_compute_capability = expected_compute_capability
        self.log_level = log_level
        self._cuda: Any = None
        self._buffers: dict[str, tuple[int, int]] = {}

    @classmethod
    def availability(cls, device: str = "cpu") -> str | None:
        if not device.lower().startswith("cuda"):
            return "TensorRT engines run on CUDA devices only"
        if importlib.util.find_spec("tensorrt") is None:
            return f"tensorrt is not installed: {GPU_EXTRA_HINT}"
        if importlib.util.find_spec("cuda") is None and importlib.util.find_spec("pycuda") is None:
            return f"neither cuda-python nor pycuda is installed: {GPU_EXTRA_HINT}"
        if cuda_device_count() == 0:
            return "no CUDA device found"
        return None

    # -------------------------------------------------------------------------------- life cycle
    def _activate_impl(self) -> None:
        trt = require("tensorrt", "gpu", "TensorRT engines")
        if not self.path.is_file():
            raise EngineError(f"TensorRT engine not found: {self.path}")
        info = cuda_device_info(self.device_index)
        if info is None:
            raise EngineError(f"no CUDA device {self.device_index} found")
        self.device_name, self.compute_capability = info
        self.trt_version = str(trt.__version__)
        check_engine_compat(
            self.path.name, self.expected_trt_version, self.expected_compute_capability,
            self.trt_version, self.compute_capability,
        )
        self._cuda = open_cuda(self.device_index)
        severity = {"error": trt.Logger.ERROR, "warning": trt.Logger.WARNING,
                    "info": trt.Logger.INFO, "verbose": trt.Logger.VERBOSE}.get(self.log_level, trt.Logger.WARNING)
        self._logger = trt.Logger(severity)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise EngineError(
                f"TensorRT {self.trt_version} could not load {self.path.name}: built by another TensorRT version "
                "or for another GPU, or the file is damaged; rebuild it on this machine"
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"TensorRT could not create an execution context for {self.path.name} (out of memory?)")
        self._stream = self._cuda.new_stream()
        self._inputs, self._outputs, self._profile = [], [], {}
        input_mode = trt.TensorIOMode.INPUT
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            shape = tuple(int(d) if d >= 0 else None for d in self._engine.get_tensor_shape(name))
            spec = TensorSpec(name, shape, np.dtype(trt.nptype(self._engine.get_tensor_dtype(name))))
            if self._engine.get_tensor_mode(name) == input_mode:
                self._inputs.append(spec)
                if None in shape:  # (min, opt, max) of optimisation profile 0, for readable errors
                    lo, _, hi = self._engine.get_tensor_profile_shape(name, 0)
                    self._profile[name] = (tuple(lo), tuple(hi))
            else:
                self._outputs.append(spec)

    def _close_impl(self) -> None:
        cuda, self._cuda = self._cuda, None
        if cuda is None:
            return
        try:
            for ptr, _ in self._buffers.values():
                cuda.free(ptr)
            if getattr(self, "_stream", None) is not None:
                cuda.destroy_stream(self._stream)
                self._stream = None
        finally:
            self._buffers.clear()
            self._context = self._engine = self._runtime = None
            cuda.close()

    def _buffer(self, name: str, nbytes: int) -> int:
        """A device buffer of at least ``nbytes`` for tensor ``name``; grows, never shrinks."""
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self._cuda.free(ptr)
            ptr = self._cuda.malloc(nbytes)
            self._buffers[name] = (ptr, nbytes)
        return ptr

    # ---------------------------------------------------------------------------------------- run
    def _run_impl(self, feeds: Mapping[str, Any], device_outputs: bool) -> dict[str, Any]:
        self._check_feeds(feeds)
        cuda, ctx = self._cuda, self._context
        stream = self._stream
        foreign = False
        for spec in self._inputs:  # run on the producer's stream when device arrays come in
            handle, sync = _producer_stream(feeds[spec.name])
            if handle is not None:
                if cuda.external_streams:
                    stream, foreign = handle, True
                else:
                    sync()
                break
        staged = []  # host arrays being copied: kept referenced until the stream is synchronised
        for spec in self._inputs:
            value = feeds[spec.name]
            if hasattr(value, "__cuda_array_interface__"):
                ptr, shape = _cai_pointer(spec.name, value, spec.dtype)
            else:
                host = np.ascontiguousarray(value)
                if host.dtype != spec.dtype:
                    raise EngineError(f"input {spec.name!r} is {host.dtype.name}, the engine expects {spec.dtype.name}")
                shape = host.shape
                ptr = self._buffer(spec.name, host.nbytes)
                cuda.htod(ptr, host, stream)
                staged.append(host)
            if not ctx.set_input_shape(spec.name, shape):
                raise EngineError(self._shape_error(spec, shape))
            ctx.set_tensor_address(spec.name, ptr)
        results: dict[str, Any] = {}
        hosts: list[tuple[np.ndarray, int]] = []
        cp = require("cupy", "gpu", "device outputs") if device_outputs else None
        for spec in self._outputs:
            shape = tuple(ctx.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise EngineError(f"output {spec.name!r} has a data-dependent shape {shape}; adafocus stages have none")
            if cp is not None:
                arr = cp.empty(shape, dtype=spec.dtype)
                ptr = int(arr.data.ptr)
            else:
                arr = np.empty(shape, dtype=spec.dtype)
                ptr = self._buffer(spec.name, arr.nbytes)
                hosts.append((arr, ptr))
            ctx.set_tensor_address(spec.name, ptr)
            results[spec.name] = arr
        if not ctx.execute_async_v3(cuda.handle(stream) if not foreign else stream):
            raise EngineError(f"TensorRT failed to run {self.path.name} (see the TensorRT log above)")
        for arr, ptr in hosts:
            cuda.dtoh(arr, ptr, stream)
        # Host outputs need the copies finished; device outputs made on our own stream must be
        # finished before another library's stream reads them. On the producer's stream, order is kept.
        if hosts or not foreign:
            cuda.synchronize(stream)
        del staged
        return results

    def _shape_error(self, spec: TensorSpec, shape: tuple[int, ...]) -> str:
        if spec.name in self._profile:
            lo, hi = self._profile[spec.name]
            return f"input {spec.name!r} shape {tuple(shape)} is outside the engine's profile {lo} .. {hi}"
        return f"input {spec.name!r} shape {tuple(shape)} does not fit the engine's {spec.shape}"

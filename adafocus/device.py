"""Device strings: the one parser every part of adafocus uses, and the CUDA probe.

``parse_device`` accepts ``cpu``, ``cpu:0``, ``cuda``, ``cuda:N``, ``gpu`` and ``gpu:N`` in any case, with
surrounding whitespace, and gives a :class:`Device` whose ``str()`` is the canonical form (``cpu`` or
``cuda:N``). Entry points (``Pipeline.from_bundle``, ``create_engine``) parse once and pass the canonical
string on, so code further in may compare with ``"cpu"`` directly. ``require_device`` also checks that a
CUDA device is there, asking the driver library through ctypes (no torch, no cupy).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from adafocus.errors import ConfigError, EngineError

ACCEPTED = "cpu, cuda, cuda:N, gpu, gpu:N (any case)"


@dataclass(frozen=True)
class Device:
    """A parsed device: ``kind`` is ``"cpu"`` or ``"cuda"``, ``index`` the CUDA device number (0 on cpu)."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def __iter__(self) -> Iterator[str | int]:  # ``kind, index = parse_device(...)`` keeps working
        return iter((self.kind, self.index))


def parse_device(device: str | Device) -> Device:
    """``'cpu'``, ``'CPU'``, ``'cpu:0'``, ``'cuda'``, ``'cuda:1'``, ``'gpu'``, ``' GPU:1 '`` -> :class:`Device`.

    Raises ConfigError (a ValueError) naming the accepted forms for anything else.
    """
    if isinstance(device, Device):
        return device
    text = str(device).strip().lower()
    kind, sep, index = text.partition(":")
    kind = kind.strip()
    index = index.strip()
    if kind == "gpu":
        kind = "cuda"
    valid = kind in ("cpu", "cuda") and (not sep or (index.isascii() and index.isdigit()))
    if not valid or (kind == "cpu" and sep and int(index) != 0):
        raise ConfigError(f"unknown device {device!r}; known: {ACCEPTED}")
    return Device(kind, int(index) if sep else 0)


def require_device(device: str | Device) -> Device:
    """Parse ``device`` and, for CUDA, check that the driver reports that device; EngineError otherwise.

    Cheap after the first call (the driver is asked once per process).
    """
    dev = parse_device(device)
    if dev.is_cuda:
        count = cuda_device_count()
        if count == 0:
            raise EngineError(f"device {str(device).strip()!r}: no CUDA device found (no CUDA driver, or it reports "
                              "no GPU); use device 'cpu'")
        if dev.index >= count:
            raise EngineError(f"device {str(device).strip()!r}: no CUDA device {dev.index}; this machine has {count} "
                              f"(cuda:0 to cuda:{count - 1})")
    return dev


# ------------------------------------------------------------------------------------------ CUDA probe
def _libcuda():
    """The CUDA driver library through ctypes, initialised; None without a driver or GPU."""
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so", "libcuda.dylib"]
    for lib_name in names:
        try:
            lib = ctypes.CDLL(lib_name)
        except OSError:
            continue
        return lib if lib.cuInit(0) == 0 else None
    return None


@functools.cache
def cuda_device_count() -> int:
    """Number of CUDA devices the driver reports (0 when there is no driver or no GPU).

    Asks the driver library directly through ctypes, so it needs neither torch nor cuda-python and
    costs a few milliseconds once per process.
    """
    lib = _libcuda()
    count = ctypes.c_int(0)
    if lib is None or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


@functools.cache
def cuda_device_info(index: int = 0) -> tuple[str, str] | None:
    """``(device name, compute capability "major.minor")`` of CUDA device ``index``, or None.

    Through the driver library (ctypes), like ``cuda_device_count``: the manifest records both for
    TensorRT engines, and engines are refused on a GPU of another compute capability.
    """
    lib = _libcuda()
    if lib is None or index >= cuda_device_count():
        return None
    dev, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    name = ctypes.create_string_buffer(256)
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76 (cuda.h)
    if (
        lib.cuDeviceGet(ctypes.byref(dev), index) != 0
        or lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev) != 0
        or lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev) != 0
    ):
        return None
    if lib.cuDeviceGetName(name, len(name), dev) != 0:
        name.value = b"unknown CUDA device"
    return name.value.decode(errors="replace"), f"{major.value}.{minor.value}"

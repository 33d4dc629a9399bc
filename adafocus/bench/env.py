"""The environment block of every benchmark report: what hardware and software produced the numbers.

Every field is read without importing torch and without failing: a tool or file that is missing (no GPU, not
a Jetson, TensorRT not installed) gives ``'unknown'`` (or ``'not installed'`` for a Python package), so a
report from any machine has the same keys. External tools (``nvidia-smi``, ``nvpmodel``, ``jetson_clocks``)
run with a short timeout, once per report, never inside a timed region.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

UNKNOWN = "unknown"
NOT_INSTALLED = "not installed"


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    """stdout of ``cmd`` (stripped), or None when the tool is missing, fails or hangs."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout or "").strip()
    return text if out.returncode == 0 and text else None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").strip("\x00 \n")
    except OSError:
        return None


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``; Jetson/ARM: the SoC model or ``platform.processor``)."""
    info = _read("/proc/cpuinfo") or ""
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", info, re.MULTILINE)
        if m and m.group(1).strip():
            return m.group(1).strip()
    return platform.processor() or UNKNOWN


def cpu_flags() -> list[str]:
    """The vector extensions that decide CPU inference speed (AVX2, AVX-512, VNNI, NEON...), when listed."""
    info = _read("/proc/cpuinfo") or ""
    m = re.search(r"^(flags|Features)\s*:\s*(.+)$", info, re.MULTILINE)
    if not m:
        return []
    have = set(m.group(2).split())
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "asimd", "asimddp", "neon")
    return [f for f in wanted if f in have]


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def onnxruntime_info() -> dict[str, Any]:
    """Version, package (onnxruntime / onnxruntime-gpu) and execution providers of onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"version": NOT_INSTALLED}
    package = next((p for p in ("onnxruntime-gpu", "onnxruntime") if _package_version(p) != NOT_INSTALLED),
                   "onnxruntime")
    return {"version": ort.__version__, "package": package, "providers": list(ort.get_available_providers())}


def tensorrt_version() -> str:
    """TensorRT's Python package version (metadata first: importing tensorrt costs seconds)."""
    for name in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_libs"):
        version = _package_version(name)
        if version != NOT_INSTALLED:
            return version
    try:  # JetPack installs the bindings as a deb, without pip metadata
        import tensorrt

        return str(tensorrt.__version__)
    except ImportError:
        return NOT_INSTALLED


def gpus() -> list[dict[str, str]]:
    """One entry per NVIDIA GPU from ``nvidia-smi`` (name, driver, memory, compute capability); [] without."""
    out = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                "--format=csv,noheader"])
    if out is None:  # older drivers lack compute_cap
        out = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    rows = []
    for line in (out or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            rows.append({"name": parts[0], "driver": parts[1], "memory": parts[2],
                         "compute_capability": parts[3] if len(parts) > 3 else UNKNOWN})
    return rows


def cuda_version() -> str:
    """The CUDA version the driver supports (``nvidia-smi`` header), else the installed toolkit's, else
    'unknown'; the source is named in brackets (a toolkit without a driver runs nothing on a GPU)."""
    out = _run(["nvidia-smi"])
    m = re.search(r"CUDA Version:\s*([\d.]+)", out or "")
    if m:
        return f"{m.group(1)} (driver)"
    for path in ("/usr/local/cuda/version.json", "/usr/local/cuda/version.txt"):
        text = _read(path)
        m = re.search(r'"cuda"\s*:\s*\{[^}]*"version"\s*:\s*"([\d.]+)"', text or "") or \
            re.search(r"CUDA Version\s+([\d.]+)", text or "")
        if m:
            return f"{m.group(1)} (toolkit)"
    out = _run(["nvcc", "--version"])
    m = re.search(r"release ([\d.]+)", out or "")
    return f"{m.group(1)} (toolkit)" if m else UNKNOWN


def jetson_info() -> dict[str, str] | None:
    """Jetson model, L4T release, power mode (``nvpmodel -q``) and whether ``jetson_clocks`` pinned the
    clocks; None on a machine that is not a Jetson."""
    model = _read("/proc/device-tree/model")
    release = _read("/etc/nv_tegra_release")
    if not release and not (model and ("jetson" in model.lower() or "nvidia" in model.lower())):
        return None
    power = _run(["nvpmodel", "-q"])
    mode = UNKNOWN
    if power:
        m = re.search(r"NV Power Mode:\s*(.+)", power)
        mode = m.group(1).strip() if m else power.splitlines()[0].strip()
        m = re.search(r"^\s*(\d+)\s*$", power, re.MULTILINE)
        mode += f" (mode {m.group(1)})" if m else ""
    clocks = UNKNOWN
    show = _run(["jetson_clocks", "--show"])  # needs root on most images; 'unknown' then
    if show:
        # with jetson_clocks on, every CPU runs at its maximum: MinFreq == MaxFreq == CurrentFreq
        cpus = re.findall(r"MinFreq=(\d+)\s+MaxFreq=(\d+)\s+CurrentFreq=(\d+)", show)
        if cpus:
            clocks = "on" if all(lo == hi == cur for lo, hi, cur in cpus) else "off"
    l4t = UNKNOWN
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release or "")
    if m:
        l4t = f"{m.group(1)}.{m.group(2)}"
    return {"model": model or UNKNOWN, "l4t": l4t, "power_mode": mode, "jetson_clocks": clocks}


def environment(threads: int | None = None) -> dict[str, Any]:
    """The environment block: host, CPU, GPUs, Jetson facts and the versions of the inference stack.

    ``threads``: the intra-op threads the engines were given (None: onnxruntime's default).
    """
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 0
    gpu_list = gpus()
    import adafocus

    env: dict[str, Any] = {
        "host": platform.node() or UNKNOWN,
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count() or 0,
        "cpus_usable": affinity,
        "threads": threads if threads else "default (onnxruntime: one per physical core)",
        "gpu": gpu_list[0]["name"] if gpu_list else UNKNOWN,
        "gpu_driver": gpu_list[0]["driver"] if gpu_list else UNKNOWN,
        "gpus": gpu_list,
        "cuda": cuda_version(),
        "tensorrt": tensorrt_version(),
        "onnxruntime": onnxruntime_info(),
        "opencv": _package_version("opencv-python-headless") if _package_version("opencv-python") == NOT_INSTALLED
        else _package_version("opencv-python"),
        "numpy": _package_version("numpy"),
        "torch": _package_version("torch"),  # the torch engine's (package metadata: torch is not imported)
        "cupy": next((v for v in map(_package_version, ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy"))
                      if v != NOT_INSTALLED), NOT_INSTALLED),  # the GPU crop's
        "python": sys.version.split()[0],
        "adafocus": adafocus.__version__,
        "jetson": jetson_info() or UNKNOWN,
    }
    return env


def format_environment(env: dict[str, Any]) -> str:
    """The block as a few lines for the console and the docs."""
    ort = env.get("onnxruntime") or {}
    jetson = env.get("jetson")
    lines = [
        f"host    {env.get('host')} ({env.get('os')}, {env.get('machine')}), python {env.get('python')}, "
        f"adafocus {env.get('adafocus')}",
        f"cpu     {env.get('cpu')}, {env.get('cpus_usable')} of {env.get('cpu_count')} logical CPUs usable, "
        f"threads {env.get('threads')}" + (f", {' '.join(env['cpu_flags'])}" if env.get("cpu_flags") else ""),
        f"gpu     {env.get('gpu')}, driver {env.get('gpu_driver')}, CUDA {env.get('cuda')}",
        f"stack   onnxruntime {ort.get('version', UNKNOWN)} ({ort.get('package', '-')}: "
        f"{', '.join(ort.get('providers', [])) or '-'}), TensorRT {env.get('tensorrt')}, "
        f"OpenCV {env.get('opencv')}, numpy {env.get('numpy')}, torch {env.get('torch', UNKNOWN)}, "
        f"CuPy {env.get('cupy', UNKNOWN)}",
    ]
    if isinstance(jetson, dict):
        lines.append(f"jetson  {jetson['model']}, L4T {jetson['l4t']}, power mode {jetson['power_mode']}, "
                     f"jetson_clocks {jetson['jetson_clocks']}")
    else:
        lines.append("jetson  not a Jetson (nvpmodel / jetson_clocks: unknown)")
    return "\n".join(lines)


__all__ = ["NOT_INSTALLED", "UNKNOWN", "cpu_model", "cuda_version", "environment", "format_environment", "gpus",
           "jetson_info", "onnxruntime_info", "tensorrt_version"]

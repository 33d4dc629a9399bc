"""Patch crop outside the engines: the reference model's bilinear ``grid_sample`` crop, on the CPU or GPU.

It reproduces ``adafocus.models.ops.crop_patches`` exactly: a box ``(y0, x0, h, w)`` in pixels (from
``adafocus.runtime.sampling.crop_boxes``) is sampled at P x P points ``y0 + (i + 0.5) * h / P`` (pixel-edge
coordinates, i.e. ``align_corners=False``), bilinearly, with zeros outside the frame. The zeros matter when
a box is smaller than P (upsampling): the outermost samples then fall less than half a pixel from the border
and blend with the padding. The grid goes through the same float32 steps as the torch op
(``2 * y / S - 1``, then grid_sample's un-normalisation), so results agree to float rounding (~1e-6).

Frames are ``[T, C, S, S]`` float32 (normalised, as the global encoder saw them); ``indices`` picks the frame
of each patch, so focus frames need not be gathered first. C may be any count (TSM crops 3K channels).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from adafocus.device import parse_device
from adafocus.errors import require

Cropper = Callable[..., Any]


def _check(frames_shape: tuple[int, ...], boxes_shape: tuple[int, ...], num_indices: int | None) -> tuple[int, int]:
    if len(frames_shape) != 4 or frames_shape[2] != frames_shape[3]:
        raise ValueError(f"frames must be square [T, C, S, S], got {list(frames_shape)}")
    if len(boxes_shape) != 2 or boxes_shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4] (y0, x0, h, w), got {list(boxes_shape)}")
    n = boxes_shape[0]
    if num_indices is None and n != frames_shape[0]:
        raise ValueError(f"{n} boxes for {frames_shape[0]} frames: give indices to say which frame each box is on")
    if num_indices is not None and num_indices != n:
        raise ValueError(f"{num_indices} frame indices for {n} boxes")
    return n, frames_shape[2]


def _axis(start: np.ndarray, length: np.ndarray, size: int, patch: int):
    """Neighbour indices and weights along one axis: ``[N, P]`` each, zero weight outside the frame."""
    steps = (np.arange(patch, dtype=np.float32) + np.float32(0.5)) / np.float32(patch)
    pos = start[:, None] + steps[None, :] * length[:, None]  # pixel-edge coordinates, as in crop_grid
    grid = np.float32(2.0) * pos / np.float32(size) - np.float32(1.0)
    # grid_sample's un-normalisation (g + 1) * S / 2 - 0.5, rounded once as torch's CPU kernel does with a
    # fused multiply-add (and torch's CUDA kernel, compiled with FMA contraction): float64 holds the exact
    # product, so one cast to float32 is the fused result. Unfused rounding would differ by up to ~4e-5.
    src = ((grid + np.float32(1.0)).astype(np.float64) * (size / 2) - 0.5).astype(np.float32)
    lo_f = np.floor(src)
    w_hi = src - lo_f
    w_lo = np.float32(1.0) - w_hi
    lo = lo_f.astype(np.int64)
    hi = lo + 1
    w_lo = np.where((lo >= 0) & (lo < size), w_lo, np.float32(0.0))  # zero padding
    w_hi = np.where((hi >= 0) & (hi < size), w_hi, np.float32(0.0))
    # np.minimum/np.maximum rather than np.clip: same result, a fraction of the call overhead
    return (np.maximum(np.minimum(lo, size - 1), 0), np.maximum(np.minimum(hi, size - 1), 0), w_lo, w_hi)


@dataclass(frozen=True)
class CropPlan:
    """Neighbour indices and weights of every box, computed once (``plan_crop``) so that patches can then be
    cut one at a time (``crop_planned``) with only the gathers left per patch: the runtime knows all K boxes
    after the policy but cuts patch k only when step k runs."""

    size: int
    patch: int
    y: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # lo, hi, w_lo, w_hi: [N, P] each
    x: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def plan_crop(boxes: np.ndarray, size: int, patch_size: int) -> CropPlan:
    """Prepare the crops of ``boxes`` ``[N, 4]`` (y0, x0, h, w) from ``size`` x ``size`` frames."""
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4] (y0, x0, h, w), got {list(boxes.shape)}")
    return CropPlan(size, patch_size, _axis(boxes[:, 0], boxes[:, 2], size, patch_size),
                    _axis(boxes[:, 1], boxes[:, 3], size, patch_size))


def crop_planned(frames: np.ndarray, plan: CropPlan, k: int, frame_index: int,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Patch ``[1, C, P, P]`` of box ``k`` of ``plan`` on ``frames[frame_index]`` (float32 ``[T, C, S, S]``)."""
    c, p = frames.shape[1], plan.patch
    if out is None:
        out = np.empty((1, c, p, p), np.float32)
    _blend(frames[frame_index], plan, k, out[0].reshape(c * p, p))
    return out


def _blend(frame: np.ndarray, plan: CropPlan, k: int, patch: np.ndarray) -> None:
    """Bilinear patch of box k into ``patch`` ``[C*P, P]``: the 2 neighbouring rows blended, then the 2
    neighbouring columns of those (the 4 neighbours of every sample), zero weight outside the frame."""
    y_lo, y_hi, wy_lo, wy_hi = plan.y
    x_lo, x_hi, wx_lo, wx_hi = plan.x
    c, size, p = frame.shape[0], plan.size, plan.patch
    rows = np.take(frame, y_lo[k], axis=1)  # [C, P, S]
    below = np.take(frame, y_hi[k], axis=1)
    rows *= wy_lo[k][None, :, None]
    below *= wy_hi[k][None, :, None]
    rows += below  # the box's rows, blended vertically
    flat_rows = rows.reshape(c * p, size)
    np.take(flat_rows, x_lo[k], axis=1, out=patch)
    right = np.take(flat_rows, x_hi[k], axis=1)
    patch *= wx_lo[k]
    right *= wx_hi[k]
    patch += right


def crop_cpu(frames: np.ndarray, boxes: np.ndarray, patch_size: int, indices: np.ndarray | None = None,
             out: np.ndarray | None = None) -> np.ndarray:
    """Bilinear patches ``[N, C, P, P]`` float32 from ``frames`` ``[T, C, S, S]`` and ``boxes`` ``[N, 4]``.

    ``boxes`` rows are ``(y0, x0, h, w)`` in pixels; ``indices`` ``[N]`` names each box's frame (default:
    box n on frame n); ``out`` may be a preallocated float32 ``[N, C, P, P]`` array. Bilinear weights are
    separable for an axis-aligned box, so each patch gathers and blends the 2 neighbouring rows, then the
    2 neighbouring columns of those (the 4 neighbours of every sample), with zero weight for neighbours
    outside the frame. One patch at a time keeps the work in cache and measured faster than gathering all
    patches at once (which also needs large index arrays).
    """
    frames = np.ascontiguousarray(frames, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32)
    n, size = _check(frames.shape, boxes.shape, None if indices is None else len(indices))
    if indices is None:
        fi = np.arange(n)
    else:
        fi = np.asarray(indices, dtype=np.int64)
        if fi.size and (fi.min() < 0 or fi.max() >= frames.shape[0]):
            raise ValueError(f"frame indices must lie in [0, {frames.shape[0]})")
    c, p = frames.shape[1], patch_size
    if out is None:
        out = np.empty((n, c, p, p), np.float32)
    elif out.shape != (n, c, p, p) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous float32 array {[n, c, p, p]}")
    plan = plan_crop(boxes, size, p)
    for k in range(n):
        _blend(frames[fi[k]], plan, k, out[k].reshape(c * p, p))
    return out


_KERNEL_SOURCE = r"""
extern "C" __global__
void adafocus_crop_bilinear(const float* __restrict__ frames, const float* __restrict__ boxes,
                            const long long* __restrict__ frame_index, float* __restrict__ out,
                            const int n, const int c, const int s, const int p) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long pp = (long long)p * p;
    if (i >= (long long)n * c * pp) return;
    const int qx = (int)(i % p);
    const int qy = (int)((i / p) % p);
    const int ch = (int)((i / pp) % c);
    const int k = (int)(i / (pp * c));
    const float fs = (float)s;
    const float fp = (float)p;
    // the grid as crop_grid builds it, each op rounded on its own (no FMA contraction)
    const float* box = boxes + 4 * k;
    const float ys = __fadd_rn(box[0], __fmul_rn(__fdiv_rn(__fadd_rn((float)qy, 0.5f), fp), box[2]));
    const float xs = __fadd_rn(box[1], __fmul_rn(__fdiv_rn(__fadd_rn((float)qx, 0.5f), fp), box[3]));
    const float gy = __fsub_rn(__fdiv_rn(__fmul_rn(2.0f, ys), fs), 1.0f);
    const float gx = __fsub_rn(__fdiv_rn(__fmul_rn(2.0f, xs), fs), 1.0f);
    // grid_sample's un-normalisation ((g + 1) * S - 1) / 2, with the fused multiply-add nvcc emits for it
    const float iy = __fmaf_rn(__fadd_rn(gy, 1.0f), fs, -1.0f) * 0.5f;
    const float ix = __fmaf_rn(__fadd_rn(gx, 1.0f), fs, -1.0f) * 0.5f;
    const float y0f = floorf(iy);
    const float x0f = floorf(ix);
    const int y0 = (int)y0f;
    const int x0 = (int)x0f;
    const float ny = iy - y0f;
    const float nx = ix - x0f;
    const float* img = frames + ((long long)frame_index[k] * c + ch) * (long long)s * s;
    const bool y0in = y0 >= 0 && y0 < s, y1in = y0 + 1 >= 0 && y0 + 1 < s;
    const bool x0in = x0 >= 0 && x0 < s, x1in = x0 + 1 >= 0 && x0 + 1 < s;
    float v = 0.0f;
    if (y0in && x0in) v += img[(long long)y0 * s + x0] * ((1.0f - nx) * (1.0f - ny));
    if (y0in && x1in) v += img[(long long)y0 * s + x0 + 1] * (nx * (1.0f - ny));
    if (y1in && x0in) v += img[(long long)(y0 + 1) * s + x0] * ((1.0f - nx) * ny);
    if (y1in && x1in) v += img[(long long)(y0 + 1) * s + x0 + 1] * (nx * ny);
    out[i] = v;
}
"""

_kernels: dict[int, Any] = {}


def _cupy():
    return require("cupy", "gpu", "the GPU patch crop")


def _kernel(cp) -> Any:
    device = cp.cuda.Device().id
    if device not in _kernels:
        _kernels[device] = cp.RawKernel(_KERNEL_SOURCE, "adafocus_crop_bilinear")
    return _kernels[device]


def crop_gpu(frames: Any, boxes: Any, patch_size: int, indices: Any = None, out: Any = None) -> Any:
    """:func:`crop_cpu` on the current CUDA device with CuPy: cupy arrays in (frames stay on the GPU), cupy out.

    ``boxes`` and ``indices`` may be numpy or cupy arrays; numpy ``frames`` are copied to the device.
    ``out`` may be a preallocated float32 cupy array ``[N, C, P, P]``. Runs on the current CuPy stream.
    Needs ``pip install 'adafocus[gpu]'`` (cupy).
    """
    cp = _cupy()
    frames = cp.ascontiguousarray(cp.asarray(frames, dtype=cp.float32))
    boxes_d = cp.ascontiguousarray(cp.asarray(boxes, dtype=cp.float32))
    n, size = _check(frames.shape, boxes_d.shape, None if indices is None else len(indices))
    if indices is None:
        fi = cp.arange(n, dtype=cp.int64)
    else:
        if isinstance(indices, np.ndarray | list | tuple):  # check on the host; a device array is trusted
            host = np.asarray(indices, dtype=np.int64)
            if host.size and (host.min() < 0 or host.max() >= frames.shape[0]):
                raise ValueError(f"frame indices must lie in [0, {frames.shape[0]})")
        fi = cp.ascontiguousarray(cp.asarray(indices, dtype=cp.int64))
    shape = (n, frames.shape[1], patch_size, patch_size)
    if out is None:
        out = cp.empty(shape, dtype=cp.float32)
    elif tuple(out.shape) != shape or out.dtype != cp.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous float32 cupy array {list(shape)}")
    total = int(np.prod(shape))
    if total:
        threads = 256
        _kernel(cp)(((total + threads - 1) // threads,), (threads,),
                    (frames, boxes_d, fi, out, np.int32(n), np.int32(frames.shape[1]), np.int32(size),
                     np.int32(patch_size)))
    return out


def get_cropper(device: str = "cpu") -> Cropper:
    """The crop function for ``device`` (any form :func:`adafocus.device.parse_device` accepts): cpu ->
    :func:`crop_cpu`; ``cuda``, ``cuda:N``, ``gpu`` -> :func:`crop_gpu` on CUDA device N (0 when not given).
    Raises ConfigError for an unknown device, MissingDependency naming the ``gpu`` extra when cupy is absent."""
    dev = parse_device(device)
    if dev.kind == "cpu":
        return crop_cpu
    cp = _cupy()
    index = dev.index

    def crop_on_device(*args: Any, **kwargs: Any) -> Any:
        with cp.cuda.Device(index):
            return crop_gpu(*args, **kwargs)

    return crop_on_device


@dataclass(frozen=True)
class CropTiming:
    """Per-call crop time for one shape on one device (milliseconds)."""

    device: str
    num_patches: int
    channels: int
    frame_size: int
    patch_size: int
    repeats: int
    median_ms: float
    mean_ms: float
    min_ms: float


def random_boxes(num: int, frame_size: int, crop_min: float = 96.0, crop_max: float = 224.0,
                 seed: int = 0) -> np.ndarray:
    """Boxes ``[num, 4]`` from uniform random policy actions (for tests and benchmarks)."""
    from adafocus.runtime.sampling import crop_boxes

    actions = np.random.default_rng(seed).uniform(0.0, 1.0, (num, 4)).astype(np.float32)
    return crop_boxes(actions, frame_size, crop_min, min(crop_max, float(frame_size)))


def benchmark_crop(device: str = "cpu", num_patches: int = 16, frame_size: int = 224, patch_size: int = 128,
                   channels: int = 3, warmup: int = 3, repeats: int = 20, seed: int = 0) -> CropTiming:
    """Time one crop call of ``num_patches`` P x P patches from as many S x S frames (random data)."""
    crop = get_cropper(device)
    rng = np.random.default_rng(seed)
    frames = rng.standard_normal((num_patches, channels, frame_size, frame_size), dtype=np.float32)
    boxes = random_boxes(num_patches, frame_size, seed=seed)
    sync: Callable[[], None] = lambda: None  # noqa: E731
    device = str(parse_device(device))
    if device != "cpu":
        cp = _cupy()
        frames, boxes = cp.asarray(frames), cp.asarray(boxes)
        sync = cp.cuda.get_current_stream().synchronize
    times = []
    for i in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        crop(frames, boxes, patch_size)
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return CropTiming(device, num_patches, channels, frame_size, patch_size, repeats, statistics.median(times),
                      statistics.fmean(times), min(times))

"""Frame-sampling arithmetic of Uni-AdaFocus, in numpy (the runtime and the PyTorch reference share it).

Upstream computes these with float32 torch ops; the same float32 steps are done here, so that the
reference model and the runtime pick the same frames.
"""

from __future__ import annotations

import functools

import numpy as np


def segment_indices(num_frames: int, num_segments: int) -> np.ndarray:
    """TSN evaluation sampling: the centre frame of each of ``num_segments`` equal segments (0-based).

    Upstream's 1-based ``floor((i + 0.5) * n / N) + 1`` on JPEG names is the same frame. Videos with fewer
    frames than segments repeat frames, as upstream does.
    """
    if num_frames < 1:
        raise ValueError("a video needs at least one frame")
    i = np.arange(num_segments, dtype=np.float64)
    idx = np.floor((i + 0.5) * num_frames / num_segments).astype(np.int64)
    return np.minimum(idx, num_frames - 1)


def glance_positions(num_segments: int, num_glance: int) -> np.ndarray:
    """Which of the N candidate frames the glance sees at evaluation: every (N/Tg)-th, from position 1."""
    stride = num_segments // num_glance
    start = 1 if stride > 1 else 0
    return np.arange(num_segments)[start::stride][:num_glance].astype(np.int64)


def focus_positions(weights: np.ndarray, num_candidates: int, num_focus: int, clamp: bool = True,
                    quantiles: np.ndarray | None = None) -> np.ndarray:
    """Deterministic inverse-CDF sampling of K focus frames from the temporal policy's weights.

    weights: ``[B, Tg]`` softmax weights over the glance frames. Returns ``[B, K]`` strictly increasing
    candidate positions in ``[0, num_candidates)``, in temporal order. ``clamp`` is the base family's
    clamping of the segment index to ``[1, Tg]`` before subtracting 1; TSM subtracts 1 without it. Both agree
    for every target in (0, 1), which includes all evaluation targets; on a target of exactly 0 (possible only
    with ``quantiles``) upstream's TSM variant would gather at index -1 and fail, and we take the first
    segment, as the base variant does. ``quantiles`` ``[B, K]`` overrides the evaluation targets
    ``(i + 0.5) / K`` (training draws ``(i + U) / K``).
    """
    w = np.asarray(weights, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weights must be [B, Tg], got shape {w.shape}")
    # (numpy calls picked for speed: this runs once per video on the runtime's critical path, where np.clip
    # and take_along_axis cost ~10 us each; the float32 steps are the same as upstream's)
    b, tg = w.shape
    cdf = np.empty((b, tg + 1), np.float32)
    cdf[:, 0] = 0.0
    np.cumsum(w, axis=1, dtype=np.float32, out=cdf[:, 1:])
    cdf[:, -1] = 1.0  # upstream's fix for the rounding of the last sum
    targets = _centre_targets(num_focus)[None, :] if quantiles is None else np.asarray(quantiles, dtype=np.float32)
    # first CDF boundary at or above each target (argmax of a boolean = first True, 0 if none), minus one and
    # floored at 0. With ``clamp`` (base) upstream clamps to [1, Tg] before subtracting 1, without it (TSM) it
    # subtracts 1 directly: both are max(first - 1, 0) here (first <= Tg), see the docstring for target 0.
    first = np.maximum((cdf[:, :, None] >= targets[:, None, :]).argmax(axis=1) - 1, 0)
    rows = np.arange(b)[:, None]
    y1 = cdf[rows, first]
    y2 = cdf[rows, first + 1]
    x1 = first.astype(np.float32) / np.float32(tg)
    x2 = (first + 1).astype(np.float32) / np.float32(tg)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = (x2 * (targets - y1) - x1 * (targets - y2)) / (y2 - y1)
    q = np.where(np.isfinite(q), q, x1)  # a zero-weight segment (fp16 underflow): take its start
    idx = np.floor(q * np.float32(num_candidates)).astype(np.int64)
    # strictly increasing, as upstream's loop idx_i = max(idx_i, idx_{i-1} + 1) does: unrolled, that loop is
    # idx_i = i + max_{j <= i}(idx_j - j), a running maximum
    steps = np.arange(num_focus)
    idx = np.maximum.accumulate(idx - steps, axis=1) + steps
    idx = np.minimum(idx, num_candidates - num_focus + steps)
    return np.maximum(idx, 0)


@functools.lru_cache(maxsize=32)
def _centre_targets(num_focus: int) -> np.ndarray:
    """Evaluation quantiles ``(i + 0.5) / K`` in float32 (read-only, shared)."""
    t = (np.arange(num_focus, dtype=np.float32) + 0.5) / num_focus
    t.setflags(write=False)
    return t


def crop_boxes(actions: np.ndarray, frame_size: int, crop_min: float, crop_max: float) -> np.ndarray:
    """Policy actions ``[..., 4]`` (y, x, h-scale, w-scale in (0, 1)) -> boxes ``[..., 4]`` (y0, x0, h, w).

    Box side = crop_min + (crop_max - crop_min) * scale pixels; the top-left corner moves over the room
    left in the frame, so the box always lies inside it (upstream: 96 + 128 * a, a * (224 - side)).
    """
    a = np.asarray(actions, dtype=np.float32)
    side = np.float32(crop_min) + np.float32(crop_max - crop_min) * a[..., 2:4]
    corner = a[..., 0:2] * (np.float32(frame_size) - side)
    return np.concatenate([corner, side], axis=-1).astype(np.float32)

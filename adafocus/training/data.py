"""Decoded clips for training: every video's N candidate frames, cropped, cached in memory as uint8.

Frames are chosen and cropped as at inference: TSN segment centres (:func:`segment_indices`), shorter side
resized to ``resize_size``, centre crop ``frame_size`` (:mod:`adafocus.runtime.preprocess`). Normalising to
float happens per batch (:func:`to_input`), so the cache costs N x S x S x 3 bytes per video.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from adafocus.dataset import LabelledVideo, label_indices
from adafocus.errors import VideoError
from adafocus.models.config import ModelConfig
from adafocus.runtime.preprocess import center_crop_offsets, resize_short_side, resized_shape
from adafocus.runtime.sampling import segment_indices


def read_frames(path: str | Path, num_segments: int) -> np.ndarray:
    """The ``num_segments`` TSN segment-centre frames of a video, uint8 RGB ``[N, H, W, 3]``.

    Reads the whole video in order (short clips: grabbing through is cheaper than seeking) and keeps the
    sampled frames; the frame count is the number of frames actually decoded, not the container's claim.
    """
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoError(f"cannot open video {path}")
    frames = []
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(frame)
    finally:
        cap.release()
    if not frames:
        raise VideoError(f"no frames decoded from {path}")
    idx = segment_indices(len(frames), num_segments)
    return np.stack([frames[i][..., ::-1] for i in idx])


def crop_frames(frames: np.ndarray, resize_size: int, frame_size: int) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` -> uint8 ``[T, S, S, 3]``: shorter side to ``resize_size``, centre crop."""
    h, w = frames.shape[1:3]
    nh, nw = resized_shape(h, w, resize_size)
    top, left = center_crop_offsets(nh, nw, frame_size)
    out = np.empty((len(frames), frame_size, frame_size, 3), np.uint8)
    for i, f in enumerate(frames):
        out[i] = resize_short_side(f, resize_size)[top:top + frame_size, left:left + frame_size]
    return out


@dataclass
class Clips:
    """A split decoded into memory: ``frames`` uint8 ``[V, N, S, S, 3]``, ``labels`` int64 ``[V]``."""

    frames: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_clips(videos: list[LabelledVideo], classes: list[str], cfg: ModelConfig,
               progress: Callable[[int, int], None] | None = None) -> Clips:
    """Decode and crop every video of a split (``progress(done, total)`` after each)."""
    labels = np.asarray(label_indices(videos, classes), np.int64)
    n, s = cfg.num_segments, cfg.frame_size
    frames = np.empty((len(videos), n, s, s, 3), np.uint8)
    for i, video in enumerate(videos):
        frames[i] = crop_frames(read_frames(video.path, n), cfg.resize_size, s)
        if progress is not None:
            progress(i + 1, len(videos))
    return Clips(frames, labels)


def to_input(frames: np.ndarray, cfg: ModelConfig) -> torch.Tensor:
    """uint8 ``[B, N, S, S, 3]`` -> normalised float32 ``[B, N, 3, S, S]``, with torchvision's float steps
    (``x / 255``, then ``(x - mean) / std``) like the runtime's preprocessing."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 1, 4, 2, 3).float().div_(255.0)
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 1, 3, 1, 1)
    return x.sub_(mean).div_(std)

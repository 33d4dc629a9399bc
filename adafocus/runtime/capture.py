"""Live capture: a thread that never stops reading a source, and a bounded ring of the frames windows use.

A reader that stops reading when its queue is full ends up minutes behind live (the complaint about
threaded stream loaders): the source's own buffers fill and it hands over stale frames. Here the capture
thread ``grab()``-s every frame as it comes and keeps only what a window can use: stream time is cut into
slots of ``slot_s`` seconds (a window's candidate spacing, window / N), and each slot keeps the one frame
nearest its centre, converted and preprocessed right away (``retrieve`` + colour conversion + resize + crop +
normalise, off the inference thread). Other frames are grabbed and let go (``skipped``, by design); slots
that fall out of the ring before any window used them are ``dropped`` (the consumer was behind).

Time is the stream's: the frames' presentation timestamps (``CAP_PROP_POS_MSEC`` of OpenCV's FFmpeg backend,
which is the PTS since the stream's start) where the source has them, else the receive clock. The receive
clock is wrong for network streams: FFmpeg's probe reads the first second or more before the first frame
comes out, then hands those frames over in a burst. Timestamps that stall or jump (a camera without PTS, a
discontinuity) re-anchor on the receive clock; after a reconnect, stream time goes on from where it was
plus the time the source was away, so windows never go back in time.

Sources: ``rtsp(s)://``, ``tcp://``, ``udp://``, ``http(s)://``, ``rtmp://`` (OpenCV's FFmpeg, with its open and
read timeouts, RTSP always over TCP), a camera index or ``/dev/videoN`` (V4L2), a GStreamer pipeline (only
where OpenCV was built with GStreamer: JetPack's is, the pip wheels are not), or a file replayed at its own
frame rate.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import cv2
import numpy as np

from adafocus.errors import ConfigError, VideoError

_URL_SCHEMES = ("rtsp://", "rtsps://", "tcp://", "udp://", "http://", "https://", "rtmp://", "rtmps://", "srt://")
_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
_env_lock = threading.Lock()
PTS_JUMP_S = 5.0  # a timestamp step larger than this (or backwards) is a discontinuity, not elapsed time


def source_kind(source: str) -> str:
    """``url``, ``camera`` (an index or /dev/videoN), ``gstreamer`` (a pipeline string) or ``file``."""
    s = str(source).strip()
    if s.lower().startswith(_URL_SCHEMES):
        return "url"
    if s.isdigit() or s.startswith("/dev/video"):
        return "camera"
    if " ! " in s or s.startswith(("v4l2src", "nvarguscamerasrc", "rtspsrc", "filesrc", "udpsrc", "videotestsrc")):
        return "gstreamer"
    return "file"


def has_gstreamer() -> bool:
    """Whether this OpenCV was built with GStreamer (the pip wheels are not; JetPack's OpenCV is)."""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line
    return False


@contextmanager
def _ffmpeg_options(url: str):
    """OpenCV's FFmpeg capture options for this open: RTSP over TCP (UDP loses packets behind NAT and on
    busy links, and a lost packet is a grey smear), unless the user's own options name a transport."""
    with _env_lock:  # the variable is process-wide and read during open
        before = os.environ.get(_ENV)
        if url.lower().startswith(("rtsp://", "rtsps://")) and "rtsp_transport" not in (before or ""):
            os.environ[_ENV] = "rtsp_transport;tcp" + (f"|{before}" if before else "")
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(_ENV, None)
            else:
                os.environ[_ENV] = before


@contextmanager
def _quiet_opencv():
    """OpenCV's own warnings off while it opens (a refused or silent source is our one line, not three)."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def open_source(source: str, timeout: float = 10.0) -> cv2.VideoCapture:
    """An opened capture for ``source``, or a VideoError / ConfigError in one line. Network sources fail
    within ``timeout`` seconds (FFmpeg's open timeout), and a read that waits longer than that fails too."""
    # FFmpeg's own log lines ("Connection refused", "Stream timeout triggered") off too, unless the user
    # asked for them; OpenCV reads this once, when its FFmpeg backend first starts in the process
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    with _quiet_opencv():
        return _open_source(str(source).strip(), timeout)


def _open_source(s: str, timeout: float) -> cv2.VideoCapture:
    kind = source_kind(s)
    ms = int(max(0.1, timeout) * 1000)
    if kind == "url":
        with _ffmpeg_options(s):
            cap = cv2.VideoCapture(s, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms,
                                                       cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])
        why = f"no stream within {timeout:g} s (refused, silent, or not a stream OpenCV's FFmpeg reads)"
    elif kind == "camera":
        cap = cv2.VideoCapture(int(s)) if s.isdigit() else cv2.VideoCapture(s, cv2.CAP_V4L2)
        why = "no such camera, or it is busy"
    elif kind == "gstreamer":
        if not has_gstreamer():
            raise ConfigError("this OpenCV has no GStreamer (the pip wheels are built without it; JetPack's "
                              "OpenCV has it): use a URL, a camera, or OpenCV built with GStreamer")
        cap = cv2.VideoCapture(s, cv2.CAP_GSTREAMER)
        why = "GStreamer could not start this pipeline (end it with ! appsink drop=true max-buffers=1 sync=false)"
    else:
        from adafocus.runtime.decode import probe

        probe(s)  # a missing file, a directory, a still image: its own line
        cap = cv2.VideoCapture(s)
        why = "not a video OpenCV can open"
    if not cap.isOpened():
        cap.release()
        raise VideoError(f"{s}: {why}")
    return cap


@dataclass
class Slot:
    """The frame kept for one slot of stream time."""

    t: float  # stream time, seconds since the first frame
    wall: float  # time.time() when it was grabbed
    frame_no: int  # frames read from the source before it (all segments)
    array: np.ndarray  # preprocessed [3, S, S] float32
    width: int
    height: int
    segment: int
    used: bool = False


@dataclass
class CaptureStats:
    """What the capture thread did so far."""

    frames_read: int = 0
    frames_kept: int = 0  # retrieved and preprocessed (a slot's nearest frame so far)
    frames_skipped: int = 0  # grabbed and let go: no window needs them
    slots_dropped: int = 0  # kept frames that left the ring before any window used them (consumer behind)
    reconnects: int = 0
    clock: str = "pts"  # what stream time comes from: "pts" or "receive"
    pts_fallbacks: int = 0  # frames whose timestamp stalled or jumped: re-anchored on the receive clock

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(kw_only=True)
class CaptureConfig:
    """How to read one source."""

    source: str
    slot_s: float  # seconds of stream per slot (window / candidates)
    keep: int  # slots kept in the ring (a window's and the next stride's)
    preprocess: Callable[[np.ndarray], np.ndarray]  # uint8 RGB [H, W, 3] -> [3, S, S] float32
    timeout: float = 10.0  # open and read timeout, seconds
    reconnect: int = 3  # tries after the source is lost (0: give up at once)
    replay: bool = False  # a file played at its own frame rate; its end is the end of the stream
    clock: str = "pts"  # "pts" (presentation timestamps where the source has them) or "receive"
    backoff_s: tuple[float, float] = (0.5, 5.0)  # first wait between tries, and the longest


@dataclass
class _Clock:
    """Stream time of a segment: its timestamps from an anchor, or the receive clock."""

    t0: float = 0.0  # stream time at the anchor
    pts0: float | None = None
    mono0: float = 0.0
    last_t: float = -math.inf
    last_pts: float | None = None
    last_mono: float = 0.0
    receive: bool = False
    fallbacks: int = 0  # re-anchors because the timestamps stalled or jumped

    def anchor(self, t0: float, pts: float | None, mono: float) -> None:
        self.t0, self.pts0, self.mono0, self.last_pts = t0, pts, mono, None  # the next frame is t0

    def time(self, pts: float | None, mono: float) -> float:
        if self.receive or pts is None:
            t = self.t0 + (mono - self.mono0)
        elif self.last_pts is not None and not 0.0 < pts - self.last_pts <= PTS_JUMP_S:
            # stalled (a source without timestamps reports 0) or a discontinuity: re-anchor on receive time
            self.anchor(self.last_t + max(mono - self.last_mono, 1e-3), pts, mono)
            self.fallbacks += 1
            t = self.t0
        else:
            t = self.t0 + (pts - self.pts0)
        self.last_t, self.last_pts, self.last_mono = t, pts, mono
        return t


class Capture:
    """A capture thread filling a ring of slots; ``start()`` opens the source (errors raised there)."""

    def __init__(self, cfg: CaptureConfig, wake: threading.Event | None = None):
        if cfg.clock not in ("pts", "receive"):
            raise ConfigError(f"clock must be 'pts' or 'receive', got {cfg.clock!r}")
        self.cfg = cfg
        self.stats = CaptureStats(clock=cfg.clock)
        self.ring: dict[int, Slot] = {}
        self.newest_t = -math.inf  # stream time of the newest frame read in the current segment
        self.period = 0.0  # the frame period (median of the last steps of stream time; 0 until known)
        self._steps: deque[float] = deque(maxlen=15)
        self.segment = 0  # +1 at each reconnect (the ring is cleared)
        self.segment_start = 0.0  # stream time where the current segment began
        self.error: Exception | None = None
        self.ended = False
        self.lock = threading.Lock()  # guards the ring, newest_t, segment
        self.wake = wake or threading.Event()  # set at every frame, error and end (may be shared by sources)
        self._stop = threading.Event()
        self._clock = _Clock(receive=cfg.clock == "receive" and not cfg.replay)  # a file is paced by its PTS
        self._cap: cv2.VideoCapture | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------- lifecycle
    def start(self) -> Capture:
        self._cap = open_source(self.cfg.source, self.cfg.timeout)
        self._thread = threading.Thread(target=self._run, name=f"adafocus-capture {self.cfg.source}", daemon=True)
        self._thread.start()
        return self

    def stop(self, wait: float = 1.0) -> None:
        """Ask the thread to end and wait up to ``wait`` s for it (it releases the capture itself, as soon as
        its current read returns)."""
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(wait)

    def settled_slot(self) -> float:
        """Slots up to this (fractional) index are final: no frame still to come can be nearer their centres.
        The next frame comes a period after the newest (ties keep the frame already there); at the end of the
        stream every slot is final. Call with ``lock`` held."""
        if self.ended:
            return float(math.floor(self.newest_t / self.cfg.slot_s + 1e-9))
        return (self.newest_t + self.period / 2) / self.cfg.slot_s - 0.5 + 1e-6

    @property
    def released(self) -> bool:
        return self._cap is None

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------------- thread
    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # handed to the consumer, which reports it in one line
            self.error = exc if isinstance(exc, VideoError) else VideoError(f"{self.cfg.source}: {exc}")
        finally:
            cap, self._cap = self._cap, None
            if cap is not None:
                cap.release()
            self.ended = True
            self.wake.set()

    def _loop(self) -> None:
        cfg, clock = self.cfg, self._clock
        start_mono = time.monotonic()
        first = True
        while not self._stop.is_set():
            if not self._cap.grab():
                if cfg.replay or self._stop.is_set():
                    return
                self._reconnect()
                first = True
                continue
            mono, wall = time.monotonic(), time.time()
            pts = self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1e3 if not clock.receive else None
            first_of_segment = first
            if first:
                resume = clock.last_t + (mono - clock.last_mono) if self.stats.frames_read else 0.0
                clock.anchor(resume, pts, mono)
                with self.lock:
                    self.segment_start = resume
                first = False
            last = clock.last_t
            t = clock.time(pts, mono)
            self.stats.pts_fallbacks = clock.fallbacks
            if not first_of_segment and t > last:
                self._steps.append(t - last)
                self.period = float(np.median(self._steps))
            if cfg.replay:  # a file: play it at its own rate (it is "captured" when its time comes)
                delay = start_mono + t - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
                wall = time.time()
            self._offer(t, wall)
            self.stats.frames_read += 1

    def _offer(self, t: float, wall: float) -> None:
        """Keep the frame when it is its slot's nearest to the centre so far; else let it go."""
        dt = self.cfg.slot_s
        j = math.floor(t / dt + 1e-9)
        centre = (j + 0.5) * dt
        old = self.ring.get(j)
        if old is not None and abs(old.t - centre) <= abs(t - centre):
            self.stats.frames_skipped += 1
            with self.lock:
                self.newest_t = t
            self.wake.set()
            return
        ok, image = self._cap.retrieve()
        if not ok or image is None:
            self.stats.frames_skipped += 1
            return
        from adafocus.runtime.decode import to_rgb

        rgb = to_rgb(image)
        slot = Slot(t, wall, self.stats.frames_read, self.cfg.preprocess(rgb), rgb.shape[1], rgb.shape[0],
                    self.segment)
        with self.lock:
            if old is not None:
                self.stats.frames_skipped += 1  # the frame it replaces
            self.ring[j] = slot
            self.stats.frames_kept += 1
            self.newest_t = t
            for k in [k for k in self.ring if k <= j - self.cfg.keep]:
                if not self.ring.pop(k).used:
                    self.stats.slots_dropped += 1
        self.wake.set()

    def _reconnect(self) -> None:
        """Reopen the source with exponential backoff, or raise VideoError once ``reconnect`` tries failed."""
        cfg = self.cfg
        self._cap.release()
        lost = f"{cfg.source}: stream lost"
        if cfg.reconnect <= 0:
            raise VideoError(f"{lost} (no frame within {cfg.timeout:g} s, or the server closed it); "
                             "not reconnecting (--reconnect 0)")
        wait, longest = cfg.backoff_s
        last = ""
        for _ in range(cfg.reconnect):
            if self._stop.wait(wait):
                raise VideoError(f"{lost}: stopped while reconnecting")
            try:
                self._cap = open_source(cfg.source, cfg.timeout)
            except VideoError as exc:
                last = str(exc)
                wait = min(longest, wait * 2)
                continue
            with self.lock:
                self.stats.reconnects += 1
                self.segment += 1
                for k, s in list(self.ring.items()):  # frames before the gap never mix with those after it
                    if not s.used:
                        self.stats.slots_dropped += 1
                    del self.ring[k]
                self.newest_t = -math.inf
            self.wake.set()
            return
        raise VideoError(f"{lost}; {cfg.reconnect} reconnect tries failed ({last.split(': ', 1)[-1]})")


@dataclass
class WindowFrames:
    """The frames of one window, one per slot (a slot without its own frame repeats the nearest one)."""

    frames: np.ndarray  # [M, 3, S, S] float32
    times: np.ndarray  # [M] stream time of each frame
    walls: np.ndarray  # [M] capture wall time of each frame
    frame_nos: np.ndarray  # [M] frame numbers in the source
    width: int
    height: int
    missing: int  # slots that had no frame of their own
    segment: int
    ids: list[int] = field(default_factory=list)  # the slot ids (for reuse across windows)


def take_window(cap: Capture, first: int, count: int) -> WindowFrames | None:
    """Slots ``first .. first + count - 1`` of the ring (marked used), or None if none of them has a frame.
    Call with ``cap.lock`` held."""
    present = sorted(k for k in cap.ring if first <= k < first + count)
    if not present:
        return None
    picks = []
    for k in range(first, first + count):
        if k in cap.ring:
            picks.append(k)
        else:
            i = int(np.searchsorted(present, k))
            near = [present[j] for j in (i - 1, i) if 0 <= j < len(present)]
            picks.append(min(near, key=lambda p: abs(p - k)))
    slots = [cap.ring[k] for k in picks]
    for s in slots:
        s.used = True
    newest = max(slots, key=lambda s: s.t)
    return WindowFrames(np.stack([s.array for s in slots]), np.array([s.t for s in slots]),
                        np.array([s.wall for s in slots]), np.array([s.frame_no for s in slots], np.int64),
                        newest.width, newest.height, count - len(set(present)), newest.segment, picks)

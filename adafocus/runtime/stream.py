"""Live streams: a rolling window over a capture ring, sampled by stream time, one result per stride.

    with Pipeline.from_bundle(bundle) as pipe:
        for w in pipe.stream("tcp://127.0.0.1:9000", window=2.0, stride=1.0, budget=0.08):
            print(w.t0, w.t1, w.label, w.latency_ms)

A window of ``window`` seconds is cut into the model's M candidate slots (window / M seconds each, M = the
N candidates of the base family); the capture thread (:mod:`adafocus.runtime.capture`) keeps each slot's
frame, preprocessed, in a bounded ring. Window k covers slots ``k*s .. k*s + M - 1`` (``s`` = stride in
slots, so window starts fall on the slot grid) and is run as soon as a frame at or past its last slot's
centre has come in. When inference falls behind, windows that are already complete are skipped in favour
of the newest one (``windows_skipped``): the result stays live instead of queueing up. ``latency_ms`` is
the result's wall time minus the capture time of the newest frame the model used: how old the evidence is.
A window's result is due before the next window ends (``late`` counts those that were not).
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from adafocus.errors import ConfigError
from adafocus.runtime.capture import Capture, CaptureConfig, source_kind, take_window

DEFAULT_WINDOW_S = 2.0  # the demo model's clip: 32 frames at 16 fps (bundles do not record a clip length yet)


def is_stream_source(source: str) -> bool:
    """A live source rather than a file: a stream URL, a camera index, /dev/videoN or a GStreamer pipeline."""
    return source_kind(str(source)) != "file"


@dataclass
class WindowResult:
    """One window's result (``to_dict`` is the JSON line ``adafocus-run SOURCE --json`` prints)."""

    source: str
    window: int  # 0-based window number (counts skipped windows too)
    t0: float  # stream seconds since the first frame: window start
    t1: float  # window end
    capture_t0: float  # wall clock (unix seconds) of the window's first and newest frame
    capture_t1: float
    label: str
    score: float
    topk: list[tuple[str, float]]
    exit_step: int
    exit_reason: str
    gflops: float
    latency_ms: float  # result time minus the capture time of the newest frame used
    behind_s: float  # stream seconds between the window's end and the newest frame read when it was taken
    frames_dropped: int  # since the start: kept frames no window used (inference behind)
    windows_skipped: int  # since the start: complete windows passed over to stay live
    reconnects: int
    frames_read: int
    width: int
    height: int
    missing_slots: int  # slots of this window without a frame of their own (the nearest one repeated)
    glance_reused: int  # glance frames whose features came from an earlier window (not computed again)
    gflops_saved: float  # the glance encoder's GFLOPs those frames would have cost (``gflops`` is net of it)
    clock: str  # "pts" or "receive"
    frame_numbers: list[int] = field(default_factory=list)  # source frame numbers of the window's slots
    result: Any = field(default=None, repr=False)  # the VideoResult

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("result", "frame_numbers")}
        d["topk"] = [{"label": k, "score": v} for k, v in self.topk]
        for k in ("t0", "t1", "behind_s"):
            d[k] = round(d[k], 4)
        d["latency_ms"] = round(d["latency_ms"], 3)
        return d


@dataclass(kw_only=True)
class StreamOptions:
    """How a stream is cut into windows and read."""

    window: float = DEFAULT_WINDOW_S
    stride: float | None = None  # None: the window (no overlap)
    reconnect: int = 3
    timeout: float = 10.0
    replay: bool = False  # the CLI's --stream; a file source is played at its own rate either way
    clock: str = "pts"
    reuse: bool = True  # the base family's glance features of frames shared by overlapping windows

    def checked(self) -> StreamOptions:
        if not (self.window and self.window > 0 and math.isfinite(self.window)):
            raise ConfigError(f"--window must be a positive number of seconds, got {self.window}")
        stride = self.window if self.stride is None else self.stride
        if not (stride > 0 and math.isfinite(stride)):
            raise ConfigError(f"--stride must be a positive number of seconds, got {stride}")
        if self.reconnect < 0:
            raise ConfigError(f"--reconnect must be >= 0, got {self.reconnect}")
        if not self.timeout > 0:
            raise ConfigError(f"--timeout must be > 0 seconds, got {self.timeout}")
        return StreamOptions(window=float(self.window), stride=float(stride), reconnect=int(self.reconnect),
                             timeout=float(self.timeout), replay=self.replay, clock=self.clock, reuse=self.reuse)


class StreamSource:
    """One source: its capture and where its next window starts."""

    def __init__(self, pipe, source: str, opts: StreamOptions, wake: threading.Event | None = None):
        from adafocus.runtime.preprocess import preprocess_one

        p = pipe.pre
        self.pipe, self.name, self.opts = pipe, str(source), opts
        # slots per window: the base family's N candidates (TSM: its glance and candidate samplings both
        # pick from the denser of the two grids)
        self.slots = max(p.candidates, p.num_glance)
        self.slot_s = opts.window / self.slots
        self.stride_slots = max(1, int(round(opts.stride / self.slot_s)))
        self.positions = pipe.sample_indices(self.slots)  # rows of a window's slots the model reads
        pre = partial(preprocess_one, resize_size=p.resize_size, crop_size=p.frame_size, mean=p.mean, std=p.std)
        replay = source_kind(self.name) == "file"  # a file is always played at its own rate, to its end
        self.capture = Capture(CaptureConfig(source=self.name, slot_s=self.slot_s,
                                             keep=self.slots + self.stride_slots + 1, preprocess=pre,
                                             timeout=opts.timeout, reconnect=opts.reconnect, replay=replay,
                                             clock=opts.clock), wake)
        self.next = 0  # first slot of the next window
        self.window_no = 0
        self.segment = 0
        self.skipped = 0
        self.latencies: list[float] = []
        self.late = 0
        self.started = time.time()
        self.reuse, self.reuse_off = None, "off" if not opts.reuse else "off (windows do not overlap)"
        if opts.reuse and opts.stride < opts.window:  # windows overlap: their shared frames are glanced once
            from adafocus.runtime.stream_reuse import GlanceReuse

            self.reuse, self.reuse_off = GlanceReuse.build(pipe)
        parts = pipe.manifest.costs.parts or {}
        self.frame_gflops = float(parts.get("glance encoder (per frame)", 0.0))  # what a reused frame saves
        self.gflops_saved = 0.0
        self.glance_reused = 0

    def close(self) -> None:
        self.capture.stop()
        if self.reuse is not None:
            self.reuse.close()
            self.reuse = None

    def ready(self):
        """The next window's frames once its last slot is final (skipping to the newest complete one), or None."""
        cap, m, s = self.capture, self.slots, self.stride_slots
        with cap.lock:
            if cap.segment != self.segment:  # reconnected: windows start again at the new segment
                self.segment = cap.segment
                self.next = math.ceil(cap.segment_start / self.slot_s - 1e-9)
            settled = cap.settled_slot()
            while True:
                behind = settled - (self.next + m - 1)  # complete slots past the window
                if behind < 0:
                    return None
                # later windows complete too: run the newest, skip the others
                extra = int(behind // s)
                self.skipped += extra
                self.next += extra * s
                self.window_no += extra
                frames = take_window(cap, self.next, m)
                first, number, newest = self.next, self.window_no, cap.newest_t
                self.next += s
                self.window_no += 1
                if frames is not None:
                    return first, number, frames, newest

    def run(self, item, budget, topk: int) -> WindowResult:
        """Run one window through the pipeline."""
        from adafocus.runtime.decode import DecodedVideo

        first, number, w, newest = item
        pos = self.positions
        decoded = DecodedVideo(self.name, None, w.frame_nos[pos], self.slots, 1.0 / self.slot_s, w.width, w.height,
                               "stream", 0.0)
        decoded.preprocessed = w.frames[pos]
        res = self.pipe(decoded, budget, topk) if self.reuse is None else self._run_reusing(decoded, w, budget, topk)
        reused = self.reuse.last_reused if self.reuse is not None else 0
        saved = reused * self.frame_gflops
        self.gflops_saved += saved
        self.glance_reused += reused
        now = time.time()
        wall_of = dict(zip(w.frame_nos.tolist(), w.walls.tolist(), strict=True))
        newest_used = max(wall_of[f] for f in res.frames_used)
        latency = (now - newest_used) * 1e3
        self.latencies.append(latency)
        if latency > self.opts.stride * 1e3:
            self.late += 1
        st = self.capture.stats
        t1 = (first + self.slots) * self.slot_s
        return WindowResult(
            source=self.name, window=number, t0=first * self.slot_s, t1=t1,
            capture_t0=float(w.walls.min()), capture_t1=float(w.walls.max()), label=res.label, score=res.score,
            topk=res.topk, exit_step=res.exit_step, exit_reason=res.exit_reason, gflops=res.gflops - saved,
            latency_ms=latency, behind_s=max(0.0, newest - t1), frames_dropped=st.slots_dropped,
            windows_skipped=self.skipped, reconnects=st.reconnects, frames_read=st.frames_read, width=w.width,
            height=w.height, missing_slots=w.missing, glance_reused=reused, gflops_saved=saved, clock=st.clock,
            frame_numbers=w.frame_nos.tolist(), result=res)

    def _run_reusing(self, decoded, w, budget, topk: int):
        """The window through the pipeline's step loop with the glance engine swapped for the reuse."""
        pipe = self.pipe
        glance = np.asarray(pipe.pre.glance_positions)
        ids, nos = np.asarray(w.ids)[self.positions][glance], w.frame_nos[self.positions][glance]
        self.reuse.expect(list(zip(ids.tolist(), nos.tolist(), strict=True)))
        return pipe(decoded, budget, topk, engines={"global": self.reuse})

    def summary(self, ended: str) -> dict:
        lat = np.asarray(self.latencies) if self.latencies else np.zeros(0)
        st = self.capture.stats
        return {"source": self.name, "ended": ended, "windows": len(self.latencies),
                "latency_ms_p50": round(float(np.percentile(lat, 50)), 3) if lat.size else None,
                "latency_ms_p95": round(float(np.percentile(lat, 95)), 3) if lat.size else None,
                "latency_ms_max": round(float(lat.max()), 3) if lat.size else None,
                "late": self.late, "windows_skipped": self.skipped, "frames_read": st.frames_read,
                "frames_kept": st.frames_kept, "frames_skipped": st.frames_skipped, "frames_dropped": st.slots_dropped,
                "reconnects": st.reconnects, "clock": st.clock, "pts_fallbacks": st.pts_fallbacks,
                "glance_reused": self.glance_reused,
                "gflops_saved": round(self.gflops_saved, 6), "glance_reuse": self.reuse_off or "on",
                "seconds": round(time.time() - self.started, 3)}


def _options(window, stride, reconnect, timeout, replay, clock, reuse=True) -> StreamOptions:
    return StreamOptions(window=DEFAULT_WINDOW_S if window is None else window, stride=stride, reconnect=reconnect,
                         timeout=timeout, replay=replay, clock=clock, reuse=reuse).checked()


def _windows(sources: list[StreamSource], budget, topk: int, stop: threading.Event, wake: threading.Event,
             ended: dict[str, str]) -> Iterator[WindowResult]:
    """Window results of all sources as they come, until every source ended or ``stop`` is set. ``ended``
    gets each source's reason ("end of stream", "stopped", or the error's line)."""
    active = list(sources)
    while active and not stop.is_set():
        wake.clear()
        progressed = False
        for src in list(active):
            done = src.capture.ended  # read first: once ended, the newest frame's slot is final too
            item = src.ready()
            if item is not None:
                progressed = True
                yield src.run(item, budget, topk)
                if stop.is_set():
                    break
            elif done:
                err = src.capture.error
                ended[src.name] = f"error: {err}" if err is not None else "end of stream"
                active.remove(src)
        if not progressed and active:
            wake.wait(0.25)
    for src in active:
        ended.setdefault(src.name, "stopped")


def stream(pipe, source, window: float | None = None, stride: float | None = None, budget=None, topk: int = 5,
           replay: bool = False, reconnect: int = 3, timeout: float = 10.0, clock: str = "pts", reuse: bool = True,
           stop: threading.Event | None = None) -> Iterator[WindowResult]:
    """Iterate window results of a live ``source`` (see ``Pipeline.stream``); a lost source (after its
    reconnect tries) raises VideoError after the windows it gave. ``stop`` (an Event) ends it cleanly; so
    does closing the iterator. The capture is released at the end either way."""
    from adafocus.runtime.budget import Budget

    opts = _options(window, stride, reconnect, timeout, replay, clock, reuse)
    plan = budget if isinstance(budget, Budget) else pipe.budget(budget)
    wake, stop = threading.Event(), stop or threading.Event()
    src = StreamSource(pipe, source, opts, wake)
    src.capture.start()
    ended: dict[str, str] = {}
    try:
        yield from _windows([src], plan, topk, stop, wake, ended)
    finally:
        src.close()
    if src.capture.error is not None and not stop.is_set():
        raise src.capture.error


@contextmanager
def _signals(stop: threading.Event, caught: list[str]):
    """SIGINT / SIGTERM set ``stop`` (the windows loop ends, captures are released, the summary printed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        caught.append(signal.Signals(signum).name)
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def format_line(w: WindowResult) -> str:
    """The table mode's live line for one window."""
    return (f"{w.source}  {w.t0:8.2f}-{w.t1:<8.2f} {w.label:<18} {w.score:5.2f}  exit {w.exit_step} "
            f"({w.exit_reason:<9}) {w.gflops:7.4f} GFLOPs  latency {w.latency_ms:7.1f} ms  "
            f"dropped {w.frames_dropped}  skipped {w.windows_skipped}  reconnects {w.reconnects}")


def format_summary(s: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.1f}"

    return (f"summary {s['source']}: {s['windows']} windows in {s['seconds']:.1f} s, latency p50 "
            f"{ms(s['latency_ms_p50'])} ms p95 {ms(s['latency_ms_p95'])} ms max {ms(s['latency_ms_max'])} ms, "
            f"{s['late']} late, {s['windows_skipped']} skipped; frames read {s['frames_read']}, kept "
            f"{s['frames_kept']}, dropped {s['frames_dropped']}; reconnects {s['reconnects']}; clock {s['clock']}; "
            f"glance reuse {s['glance_reuse']} ({s['glance_reused']} frames, {s['gflops_saved']:.4g} GFLOPs saved); "
            f"ended: {s['ended'].split(':', 1)[0]}")  # an error's own line follows


def run_streams(pipe, sources: list[str], plan, *, window: float | None, stride: float | None, reconnect: int,
                timeout: float, replay: bool, topk: int, as_json: bool, clock: str = "pts",
                reuse: bool = True) -> int:
    """``adafocus-run SOURCE``: print one line (table) or JSON object per window and a summary per source at
    the end of the streams or on SIGINT / SIGTERM; return the exit code: 0 when every source ended (or was
    stopped by a signal: the usual end of a live run, with its summary), 1 when one failed (its line on
    stderr)."""
    import json

    if not sources:
        raise ConfigError("give a stream source (a URL, a camera index, /dev/videoN, or --stream FILE)")
    opts = _options(window, stride, reconnect, timeout, replay, clock, reuse)
    wake, stop = threading.Event(), threading.Event()
    srcs = [StreamSource(pipe, s, opts, wake) for s in sources]
    ended: dict[str, str] = {}
    caught: list[str] = []
    try:
        with _signals(stop, caught):
            for src in srcs:  # a source that does not open fails here, in one line, before any window
                src.capture.start()
            for w in _windows(srcs, plan, topk, stop, wake, ended):
                print(json.dumps(w.to_dict()) if as_json else format_line(w), flush=True)
    finally:
        for src in srcs:
            src.close()
    failed = False
    for src in srcs:
        why = ended.get(src.name, "stopped")
        if why == "stopped" and caught:
            why = f"stopped ({caught[0]})"
        summary = src.summary(why)
        if as_json:
            print(json.dumps({"summary": summary}), flush=True)
        else:
            print(format_summary(summary), file=sys.stderr, flush=True)
        if why.startswith("error: "):
            failed = True
            print(why, file=sys.stderr, flush=True)
    return 1 if failed else 0



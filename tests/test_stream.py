"""Live streams: windows by stream time, a real local MPEG-TS stream (PyAV server on 127.0.0.1, read back by
OpenCV's FFmpeg), reconnects, drops, timeouts and clean shutdown.

Every wait has a limit: streams are read with short open/read timeouts and consumed under a watchdog that
sets the stream's stop event, subprocesses run with ``timeout=``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import videos
from streams import StreamServer

from adafocus.demo.shipped import bundle_path, sample_videos
from adafocus.errors import ConfigError, VideoError
from adafocus.runtime import capture
from adafocus.runtime.pipeline import Pipeline
from adafocus.runtime.stream import is_stream_source, stream

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, "-m", "adafocus", "run"]


@pytest.fixture(scope="module")
def pipe():
    with Pipeline.from_bundle(bundle_path(), threads=1) as p:
        yield p


@pytest.fixture(scope="module")
def clips() -> list[str]:
    return [str(v) for v in sample_videos()]  # three 2 s demo clips (32 frames at 16 fps), one class each


def collect(it, limit_s: float, stop: threading.Event, count: int | None = None, each=None,
            lost: bool = False) -> list:
    """Windows of ``it`` until it ends, ``count`` came, or ``limit_s`` passed (the watchdog sets ``stop``).
    ``lost``: a live source that ends is lost (VideoError after its windows), as a camera that goes away."""
    timer = threading.Timer(limit_s, stop.set)
    timer.start()
    out = []
    try:
        for w in it:
            out.append(w)
            if each is not None:
                each(w)
            if count is not None and len(out) >= count:
                break
    except VideoError as exc:
        if not lost:
            raise
        assert "stream lost" in str(exc)
    finally:
        timer.cancel()
        it.close()
    assert not stop.is_set() or count is not None or each is not None, f"no end within {limit_s} s"
    return out


def run_cli(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# ------------------------------------------------------------------------------------------- sources
def test_source_kinds():
    for url in ("rtsp://cam/1", "RTSPS://cam", "tcp://127.0.0.1:9", "udp://@:5000", "http://x/s.ts", "https://x"):
        assert is_stream_source(url) and capture.source_kind(url) == "url"
    assert capture.source_kind("0") == capture.source_kind("/dev/video2") == "camera"
    assert capture.source_kind("v4l2src ! videoconvert ! appsink") == "gstreamer"
    assert not is_stream_source("clip.mp4") and capture.source_kind("clip.mp4") == "file"


def test_rtsp_goes_over_tcp_and_the_users_options_stay(monkeypatch):
    monkeypatch.delenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", raising=False)
    with capture._ffmpeg_options("rtsp://127.0.0.1:1/x"):
        assert os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] == "rtsp_transport;tcp"
    assert "OPENCV_FFMPEG_CAPTURE_OPTIONS" not in os.environ
    monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", "stimeout;100")
    with capture._ffmpeg_options("rtsp://127.0.0.1:1/x"):
        assert os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] == "rtsp_transport;tcp|stimeout;100"
    with capture._ffmpeg_options("tcp://127.0.0.1:1"):
        assert os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] == "stimeout;100"
    with pytest.raises(VideoError, match="rtsp://127.0.0.1:1/x: no stream within"):
        capture.open_source("rtsp://127.0.0.1:1/x", timeout=2)  # refused at once: no RTSP server here


@pytest.mark.skipif(capture.has_gstreamer(), reason="this OpenCV has GStreamer")
def test_gstreamer_without_gstreamer_is_one_line():
    with pytest.raises(ConfigError, match="no GStreamer"):
        capture.open_source("videotestsrc ! videoconvert ! appsink")


def test_missing_camera_is_one_line():
    with pytest.raises(VideoError, match="no such camera"):
        capture.open_source("/dev/video97")


def test_silent_source_fails_within_the_open_timeout():
    """A server that accepts and never sends: the open gives up after --timeout, in one line, exit 1."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    held = []
    threading.Thread(target=lambda: held.append(srv.accept()), daemon=True).start()
    try:
        proc = run_cli([f"tcp://127.0.0.1:{port}", "--timeout", "1"], timeout=60)  # a hang fails here
    finally:
        srv.close()
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: tcp://127.0.0.1:{port}: no stream within 1 s"), proc.stderr
    assert "Traceback" not in proc.stderr and "WARN" not in proc.stderr


# ------------------------------------------------------------------------------------ windows by PTS
def test_replay_windows_by_timestamp(pipe, tmp_path):
    """A file replayed live: window k covers [k*stride, k*stride + window) of the file's own timestamps, its
    slots hold the frames nearest their centres, preprocessed exactly as the file's decode would be."""
    path = videos.make_numbered_video(tmp_path / "n.mp4", 24, fps=16.0)
    stop = threading.Event()
    got = collect(stream(pipe, str(path), window=1.0, stride=0.5, replay=True, stop=stop), 30, stop)
    assert [(w.t0, w.t1) for w in got] == [(0.0, 1.0), (0.5, 1.5)]
    # 16 slots of 1/16 s over 16 fps: slot j holds frame 8k + j
    assert [w.frame_numbers for w in got] == [list(range(0, 16)), list(range(8, 24))]
    frames = np.stack(videos.read_all_frames(path))[..., ::-1]
    for w in got:
        want = pipe.preprocess(np.ascontiguousarray(frames[w.frame_numbers]))
        res = pipe(_decoded(pipe, path, want, w.frame_numbers))
        assert (w.label, w.exit_step) == (res.label, res.exit_step)
        assert w.gflops + w.gflops_saved == pytest.approx(res.gflops)  # the glance of shared frames reused
        assert w.missing_slots == 0 and w.frames_dropped == 0 and w.clock == "pts" and w.latency_ms > 0
        assert w.capture_t0 <= w.capture_t1
    assert all(np.isfinite(w.latency_ms) for w in got)


def _decoded(pipe, path, pre, numbers):
    from adafocus.runtime.decode import DecodedVideo

    d = DecodedVideo(str(path), None, np.asarray(numbers), len(numbers), 16.0, 80, 48, "stream", 0.0)
    d.preprocessed = pre
    return d


def test_capture_stop_releases_the_source(tmp_path):
    path = videos.make_numbered_video(tmp_path / "long.mp4", 200, fps=16.0)
    cap = capture.Capture(capture.CaptureConfig(source=str(path), slot_s=0.125, keep=4, replay=True,
                                                preprocess=lambda rgb: rgb.astype(np.float32)))
    cap.start()
    assert cap.wake.wait(20) and not cap.released
    cap.stop(wait=20)  # the thread ends at once (its pacing wait is the stop event); 20 s only bounds a hang
    assert cap.released and cap.ended and cap.error is None  # stopped long before the file's 12.5 s
    assert len(cap.ring) <= 4


def test_glance_reuse_takes_the_same_decisions(pipe, clips):
    """Windows of 1 s every 0.5 s share half their glance frames: with reuse those are not encoded again
    (4 of 8 per window after the first), and every decision and score is the one of the whole glance."""
    runs = {}
    for reuse in (False, True):
        stop = threading.Event()
        runs[reuse] = collect(stream(pipe, clips[0], window=1.0, stride=0.5, replay=True, reuse=reuse, stop=stop),
                              30, stop)
    plain, reused = runs[False], runs[True]
    assert [w.glance_reused for w in reused] == [0, 4, 4] and [w.glance_reused for w in plain] == [0, 0, 0]
    per_frame = pipe.manifest.costs.parts["glance encoder (per frame)"]
    for a, b in zip(plain, reused, strict=True):
        assert (a.label, a.exit_step, a.exit_reason) == (b.label, b.exit_step, b.exit_reason)
        assert np.allclose([s["confidence"] for s in a.result.steps], [s["confidence"] for s in b.result.steps],
                           rtol=1e-5, atol=1e-5)
        assert b.gflops == pytest.approx(a.gflops - b.glance_reused * per_frame)


def test_clock_falls_back_on_stalled_or_jumping_timestamps():
    c = capture._Clock()
    c.anchor(0.0, 10.0, 100.0)
    assert [c.time(p, m) for p, m in ((10.0, 100.0), (10.5, 100.5), (11.0, 101.0))] == [0.0, 0.5, 1.0]
    assert c.time(11.0, 101.25) == pytest.approx(1.25) and c.fallbacks == 1  # stalled: the receive clock
    assert c.time(11.5, 101.75) == pytest.approx(1.75)
    assert c.time(500.0, 102.0) == pytest.approx(2.0) and c.fallbacks == 2  # a jump: no 488 s gap
    assert c.time(3.0, 102.5) == pytest.approx(2.5) and c.fallbacks == 3  # backwards: time still goes on
    assert c.time(3.5, 103.0) == pytest.approx(3.0)


def test_two_sources_in_one_run(pipe, clips, capsys):
    """Two files replayed side by side through one pipeline: each gets its windows and its summary."""
    import json

    from adafocus.runtime.stream import run_streams

    rc = run_streams(pipe, clips[:2], pipe.budget(None), window=1.0, stride=1.0, reconnect=0, timeout=5,
                     replay=True, topk=3, as_json=True)
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 0
    for clip in clips[:2]:
        mine = [x for x in lines if x.get("source") == clip]
        assert [(x["t0"], x["t1"]) for x in mine] == [(0.0, 1.0), (1.0, 2.0)]
        assert all(len(x["topk"]) == 3 and x["label"] == Path(clip).stem for x in mine)
    summaries = [x["summary"] for x in lines if "summary" in x]
    assert sorted(x["source"] for x in summaries) == sorted(clips[:2])
    assert all(x["ended"] == "end of stream" and x["windows"] == 2 and x["glance_reuse"].startswith("off")
               for x in summaries)


def test_slower_stream_repeats_the_nearest_frame(pipe, tmp_path):
    """A 4 fps stream under 8 slots a second: every other slot repeats its neighbour, counted as missing."""
    path = videos.make_numbered_video(tmp_path / "slow.mp4", 10, fps=4.0)
    stop = threading.Event()
    got = collect(stream(pipe, str(path), window=2.0, stride=1.0, replay=True, stop=stop), 30, stop)
    assert [(w.t0, w.t1) for w in got] == [(0.0, 2.0)]
    (w,) = got
    assert w.missing_slots == 8
    assert sorted(set(w.frame_numbers)) == list(range(8))


def test_consumer_slower_than_the_stream_drops_and_stays_live(pipe, tmp_path):
    """The reader never waits for the consumer: while it sleeps, complete windows are passed over (counted),
    unused frames leave the ring (counted), and the window it gets is the newest complete one."""
    path = videos.make_numbered_video(tmp_path / "fast.mp4", 64, fps=16.0)
    stop = threading.Event()
    got = collect(stream(pipe, str(path), window=1.0, stride=0.25, replay=True, stop=stop), 40, stop,
                  each=lambda w: stop.wait(1.6))  # longer than a window: some slots are never used
    assert len(got) >= 2
    assert got[-1].windows_skipped > 0 and got[-1].frames_dropped > 0
    for w in got:  # never more than a stride (+ one slot being filled) behind the newest frame read
        assert w.behind_s <= 0.25 + 1 / 16 + 1e-9
    numbers = [w.window for w in got]
    assert numbers == sorted(numbers) and numbers[-1] - numbers[0] > len(numbers) - 1


# ---------------------------------------------------------------------------------------- live streams
@pytest.mark.slow
def test_live_tcp_stream_labels_and_clock(pipe, clips):
    """The three demo clips served back to back at 16 fps over TCP: windows by PTS line up with the clips
    (the one fully inside each clip gets its frames and its label) although the probe hands the first
    second over in a burst."""
    with StreamServer(clips) as srv:
        stop = threading.Event()
        got = collect(stream(pipe, srv.url, window=2.0, stride=1.0, timeout=5, reconnect=0, stop=stop), 40,
                      stop, lost=True)
    assert [w.t0 for w in got][:5] == [0.0, 1.0, 2.0, 3.0, 4.0]
    names = [Path(c).stem for c in clips]
    for k, name in enumerate(names):
        (w,) = [w for w in got if w.t0 == 2.0 * k]
        assert w.frame_numbers == list(range(32 * k + 1, 32 * k + 32, 2))  # the file decode's frames
        assert w.label == name
        assert w.width == w.height == 128 and w.clock == "pts"


@pytest.mark.slow
def test_udp_stream(pipe, clips):
    """MPEG-TS pushed over UDP to 127.0.0.1 (a receiver binds the port): windows come, by PTS."""
    with StreamServer(clips, scheme="udp", loop=True) as srv:
        stop = threading.Event()
        got = collect(stream(pipe, srv.url, window=1.0, stride=1.0, timeout=5, reconnect=0, stop=stop), 40, stop,
                      count=2)
    assert [w.t1 - w.t0 for w in got] == [1.0, 1.0] and got[1].t0 == got[0].t1
    assert all(w.clock == "pts" and w.missing_slots == 0 for w in got)


@pytest.mark.slow
def test_server_restart_reconnects_and_a_new_frame_size(pipe, clips, tmp_path):
    """Killed mid-stream and back a moment later with a video of another size: the runner reconnects and
    goes on giving windows, in new stream time after the gap, at the new size."""
    other = videos.make_numbered_video(tmp_path / "wide.mp4", 48, height=48, width=80, fps=16.0)
    events = []
    with StreamServer([clips[0], clips[1]]) as srv:
        stop = threading.Event()

        def each(w):
            events.append(w)
            if len(events) == 1:
                srv.restart([other], after=0.5)

        got = collect(stream(pipe, srv.url, window=1.0, stride=1.0, timeout=3, reconnect=6, stop=stop), 60, stop,
                      count=3, each=each)
    before, after = got[0], got[-1]
    assert before.reconnects == 0 and after.reconnects == 1
    assert (before.width, before.height) == (128, 128) and (after.width, after.height) == (80, 48)
    assert after.t0 >= before.t1


@pytest.mark.slow
def test_reconnect_0_exits_1_with_one_line(clips):
    with StreamServer([clips[0]]) as srv:
        proc = run_cli([srv.url, "--reconnect", "0", "--timeout", "3", "--window", "1"], timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.count("\n") >= 1  # the windows it gave before the stream ended
    err = proc.stderr.strip().splitlines()
    assert err[-1] == f"error: {srv.url}: stream lost (no frame within 3 s, or the server closed it); " \
                      "not reconnecting (--reconnect 0)"
    assert err[-2].startswith(f"summary {srv.url}:") and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_ends_cleanly_with_the_summary(clips, sig):
    """Ctrl-C (or SIGTERM) while streaming over HTTP: the summary line and exit 0, promptly."""
    with StreamServer(clips, scheme="http", loop=True) as srv:
        proc = subprocess.Popen([*RUN, srv.url, "--json", "--window", "1", "--timeout", "5"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = proc.stdout.readline()  # a window came: the stream runs
            assert '"window": 0' in first, first or proc.stderr.read()
            proc.send_signal(sig)
            start = time.monotonic()
            out, err = proc.communicate(timeout=20)
            took = time.monotonic() - start
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith('{"summary": ') and f'"ended": "stopped ({sig.name})"' in last
    assert took < 10  # generous on a loaded machine; without the handler it would run until timeout=20


def test_stream_modules_import_no_heavy_dependency():
    """The edge install runs streams: torch, ray, PyAV and onnx are imported only where used (the server,
    the glance cut), never on import."""
    code = ("import sys, adafocus.runtime.stream, adafocus.runtime.capture, adafocus.runtime.stream_reuse, "
            "adafocus.runtime.stream_serve, adafocus.runtime.stream_bench\n"
            "bad = [m for m in ('torch', 'ray', 'av', 'onnx') if m in sys.modules]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr

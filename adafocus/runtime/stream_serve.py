"""A local live stream for tests and demos: video files played one after another, at their frame rate, as
MPEG-TS over TCP, HTTP or UDP on 127.0.0.1 (PyAV muxes; the ``stream`` extra).

    python -m adafocus.runtime.stream_serve tcp://127.0.0.1:0 a.mp4 b.mp4 [--fps 16] [--loop]
    python -m adafocus.runtime.stream_serve http://127.0.0.1:8554/live a.mp4
    python -m adafocus.runtime.stream_serve udp://127.0.0.1:5000 a.mp4     # pushed to the receiver's port

The server binds the socket itself (port 0: the OS picks one) and prints one JSON line on stdout,
``{"url": ...}``, once it accepts connections, so a caller never races the listen (UDP is pushed to the
given port from the start: a receiver that joins late starts at the next keyframe). Each client gets the
stream from its first frame, paced at real time from its connection (frame ``i`` is sent at
``i / fps`` seconds, with presentation timestamps ``i / fps``): what a camera or an RTSP relay delivers,
reproducibly. H.264 (libx264, ``zerolatency``: no B-frames, no lookahead), a keyframe every second so that a
client that reconnects finds a picture within a second. There is no RTSP server here (none is installable
on the development machines); OpenCV reads ``tcp://`` and ``http://`` MPEG-TS with the same FFmpeg demuxer
it uses behind RTSP.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np


@dataclass(kw_only=True)
class ServeConfig:
    """What to serve and how."""

    videos: list[str]
    url: str = "tcp://127.0.0.1:0"  # tcp://HOST:PORT (raw MPEG-TS) or http://HOST:PORT/PATH
    fps: float | None = None  # None: the first video's own rate
    loop: bool = False  # start again after the last video (a stream that never ends)
    codec: str = "libx264"
    keyframe_s: float = 1.0
    clients: int = 0  # stop after this many clients were served (0: serve until killed)


def _frames(videos: list[str], loop: bool) -> Iterator[np.ndarray]:
    """RGB frames of the videos, one after another (OpenCV decode)."""
    import cv2

    while True:
        for path in videos:
            cap = cv2.VideoCapture(path)
            try:
                while True:
                    ok, bgr = cap.read()
                    if not ok:
                        break
                    yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            finally:
                cap.release()
        if not loop:
            return


def video_fps(path: str) -> float:
    """A video file's frame rate (OpenCV header), 25 when it says nothing."""
    import cv2

    cap = cv2.VideoCapture(path)
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS))
    finally:
        cap.release()
    return fps if fps > 0 else 25.0


def mux(out, cfg: ServeConfig, fps: float) -> int:
    """Encode the videos into the writable file object ``out`` as MPEG-TS at real time; returns frames sent.
    Stops quietly when the client goes away."""
    from fractions import Fraction

    import av

    rate = Fraction(fps).limit_denominator(1001)
    container = av.open(out, "w", format="mpegts", options={"flush_packets": "1"})
    stream = None
    sent = 0
    start = time.monotonic()
    try:
        for rgb in _frames(cfg.videos, cfg.loop):
            h, w = rgb.shape[:2]
            if stream is None:
                stream = container.add_stream(cfg.codec, rate=rate)
                stream.width, stream.height, stream.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
                stream.time_base = 1 / rate
                stream.codec_context.gop_size = max(1, int(round(fps * cfg.keyframe_s)))
                if cfg.codec == "libx264":
                    stream.codec_context.options = {"preset": "ultrafast", "tune": "zerolatency"}
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:stream.height, :stream.width]),
                                               format="rgb24")
            frame.pts = sent
            delay = start + sent / fps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            container.mux(stream.encode(frame))
            sent += 1
        if stream is not None:
            container.mux(stream.encode(None))
        container.close()
    except (BrokenPipeError, ConnectionResetError, OSError, EOFError):
        pass  # the client left (or was killed): nothing to flush to
    return sent


def _serve_client(conn: socket.socket, cfg: ServeConfig, fps: float, http: bool) -> None:
    with conn:
        out = conn.makefile("wb", buffering=0)
        try:
            if http:
                conn.recv(65536)  # the request; any path gets the stream
                out.write(b"HTTP/1.0 200 OK\r\nContent-Type: video/mp2t\r\nCache-Control: no-cache\r\n\r\n")
            mux(out, cfg, fps)
        except OSError:
            pass


def serve(cfg: ServeConfig) -> None:
    """Bind, print ``{"url": ...}`` on stdout, and serve each client in its own thread (until killed, or until
    ``cfg.clients`` clients were served)."""
    from adafocus.errors import ConfigError, require

    require("av", "stream", "serving a local stream")
    parsed = urlparse(cfg.url)
    if parsed.scheme not in ("tcp", "http", "udp"):
        raise ConfigError(f"{cfg.url}: serve tcp://HOST:PORT, http://HOST:PORT/PATH or udp://HOST:PORT")
    if not cfg.videos:
        raise ConfigError("give at least one video to serve")
    fps = cfg.fps or video_fps(cfg.videos[0])
    if parsed.scheme == "udp":  # pushed to HOST:PORT whether or not anyone listens, as a UDP camera does
        if not parsed.port:
            raise ConfigError(f"{cfg.url}: UDP needs the receiver's port")
        print(json.dumps({"url": f"udp://{parsed.hostname}:{parsed.port}", "fps": fps}), flush=True)
        mux(f"udp://{parsed.hostname}:{parsed.port}?pkt_size=1316", cfg, fps)
        return
    host = parsed.hostname or "127.0.0.1"
    srv = socket.create_server((host, parsed.port or 0))
    port = srv.getsockname()[1]
    path = parsed.path if parsed.scheme == "http" else ""
    print(json.dumps({"url": f"{parsed.scheme}://{host}:{port}{path}", "fps": fps}), flush=True)
    served = 0
    with srv:
        while not cfg.clients or served < cfg.clients:
            conn, _ = srv.accept()
            served += 1
            threading.Thread(target=_serve_client, args=(conn, cfg, fps, parsed.scheme == "http"),
                             daemon=True).start()
        while threading.active_count() > 1:
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from adafocus.errors import AdaFocusError

    ap = argparse.ArgumentParser(prog="python -m adafocus.runtime.stream_serve",
                                 description="Serve videos as a live MPEG-TS stream on 127.0.0.1.")
    ap.add_argument("url", help="tcp://127.0.0.1:PORT or http://127.0.0.1:PORT/PATH (port 0: any free port)")
    ap.add_argument("videos", nargs="+")
    ap.add_argument("--fps", type=float, default=None)
    ap.add_argument("--loop", action="store_true")
    ap.add_argument("--clients", type=int, default=0)
    ap.add_argument("--codec", default="libx264")
    args = ap.parse_args(argv)
    try:
        serve(ServeConfig(videos=args.videos, url=args.url, fps=args.fps, loop=args.loop, clients=args.clients,
                          codec=args.codec))
    except AdaFocusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

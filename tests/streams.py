"""A local live stream for the tests: ``python -m adafocus.runtime.stream_serve`` in a subprocess on 127.0.0.1.

The server binds before it prints its URL, so a test connects only once the port listens; ``restart`` brings
it back on the same port (a camera or relay that went away and came back).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("av")  # the stream extra (in dev): PyAV muxes the served streams


class StreamServer:
    """Serves ``videos`` one after another at their frame rate as MPEG-TS over ``scheme`` (tcp, http or udp)."""

    def __init__(self, videos: list[str | os.PathLike], scheme: str = "tcp", port: int = 0, fps: float | None = None,
                 loop: bool = False):
        self.videos = [str(v) for v in videos]
        self.scheme, self.port, self.fps, self.loop = scheme, port, fps, loop
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, videos: list[str | os.PathLike] | None = None, timeout: float = 20.0) -> StreamServer:
        if videos is not None:
            self.videos = [str(v) for v in videos]
        if self.scheme == "udp" and not self.port:  # pushed to a port the receiver will bind
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
        path = "/live" if self.scheme == "http" else ""
        cmd = [sys.executable, "-m", "adafocus.runtime.stream_serve", f"{self.scheme}://127.0.0.1:{self.port}{path}",
               *self.videos]
        if self.fps:
            cmd += ["--fps", str(self.fps)]
        if self.loop:
            cmd.append("--loop")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=Path(__file__).resolve().parents[1])
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.stop()
            raise RuntimeError(f"the stream server did not start within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()
            raise RuntimeError(f"the stream server failed: {err.strip()}")
        self.url = json.loads(line)["url"]
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])
        return self

    def stop(self) -> None:
        """Kill the server (SIGKILL: the stream just stops, as when a camera loses power)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def restart(self, videos: list[str | os.PathLike] | None = None, after: float = 0.0) -> StreamServer:
        self.stop()
        time.sleep(after)
        return self.start(videos)

    def __enter__(self) -> StreamServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""Live streams: a capture thread that never stops reading, a rolling window sampled by stream time.

Work in progress (issue: live streams).
"""

from __future__ import annotations

_SCHEMES = ("rtsp://", "rtsps://", "tcp://", "udp://", "http://", "https://", "rtmp://")


def is_stream_source(source: str) -> bool:
    """A live source rather than a file: a stream URL, a camera index or /dev/videoN."""
    s = str(source)
    return s.lower().startswith(_SCHEMES) or s.isdigit() or s.startswith("/dev/video")


def stream(pipe, source, window: float | None = None, stride: float | None = None, budget=None, topk: int = 5,
           replay: bool = False, reconnect: int = 3, timeout: float = 10.0):
    """Iterate window results of a live ``source`` (see ``Pipeline.stream``)."""
    from adafocus.errors import ConfigError

    raise ConfigError("live streams are not implemented yet")


def run_streams(pipe, sources: list[str], plan, *, window: float | None, stride: float | None, reconnect: int,
                timeout: float, replay: bool, topk: int, as_json: bool) -> int:
    """``adafocus-run SOURCE``: print one line (table) or JSON object per window; return the exit code."""
    from adafocus.errors import ConfigError

    raise ConfigError("live streams are not implemented yet")

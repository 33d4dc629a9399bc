"""Measure live streams on a local MPEG-TS stream: in-clip label accuracy, latency, memory over time.

    python -m adafocus.runtime.stream_bench [--segments 10] [--hold 6] [--clock pts,receive] [--minutes M]

The stream: demo clips (``adafocus.demo.data``, the shipped model's task, new seeds), each class held for
``--hold`` seconds (consecutive 2 s clips of one class), served at real time at 16 fps over TCP on 127.0.0.1
by :mod:`adafocus.runtime.stream_serve` in a subprocess, read by :func:`adafocus.runtime.stream.stream`.
A window "inside one clip" lies in one class segment; it is judged two ways: by the stream time it reports
(``t0``, ``t1``: what a user sees) and by the content of its frames (the frame numbers: the server sends
frame ``i`` at ``i / fps``). ``--minutes`` loops the stream for that long and samples the process's RSS.
Needs the ``stream`` extra (PyAV) for the server.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def make_clips(out: Path, segments: int = 10, hold_s: float = 6.0, seed: int = 0) -> tuple[list[str], list[str]]:
    """Demo clips for ``segments`` class segments of ``hold_s`` seconds (classes in turn); returns the clip
    paths in play order and the class of each segment."""
    from adafocus.demo.data import DemoDataConfig, render_video, write_video

    cfg = DemoDataConfig()
    per = max(1, int(round(hold_s * cfg.fps / cfg.frames)))
    paths, labels = [], []
    for k in range(segments):
        label = k % len(cfg.classes)
        labels.append(cfg.classes[label])
        for r in range(per):
            rng = np.random.default_rng([seed, 1000 + k, r])  # not the data set's seeds: unseen videos
            path = out / f"seg{k:03d}_{r}.mp4"
            write_video(path, render_video(cfg, label, rng), cfg.fps)
            paths.append(str(path))
    return paths, labels


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _serve(clips: list[str], loop: bool) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "adafocus.runtime.stream_serve", "tcp://127.0.0.1:0", *clips]
    proc = subprocess.Popen(cmd + (["--loop"] if loop else []), stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise RuntimeError("the stream server did not start")
    return proc, json.loads(line)["url"]


def measure(pipe, clips: list[str], labels: list[str], *, hold_s: float, fps: float = 16.0, clock: str = "pts",
            window: float = 2.0, stride: float = 1.0, budget=None, minutes: float = 0.0, reuse: bool = True) -> dict:
    """Stream the clips once (or loop them for ``minutes``) and judge every window; returns the figures."""
    from adafocus.errors import VideoError
    from adafocus.runtime.stream import stream

    proc, url = _serve(clips, loop=minutes > 0)
    stop = threading.Event()
    timer = threading.Timer(minutes * 60, stop.set) if minutes > 0 else None
    total_s = hold_s * len(labels)
    rows = []
    start = time.monotonic()
    try:
        if timer is not None:
            timer.start()
        try:
            for w in stream(pipe, url, window=window, stride=stride, budget=budget, reconnect=0, timeout=10,
                            clock=clock, reuse=reuse, stop=stop):
                content = np.asarray(w.frame_numbers) / fps
                rows.append({"t0": w.t0, "t1": w.t1, "c0": float(content.min()), "c1": float(content.max()) + 1 / fps,
                             "label": w.label, "latency_ms": w.latency_ms, "gflops": w.gflops, "exit": w.exit_step,
                             "rss_mb": _rss_mb(), "at_s": time.monotonic() - start, "skipped": w.windows_skipped,
                             "dropped": w.frames_dropped, "glance_ms": w.result.timings_ms["glance"],
                             "total_ms": w.result.timings_ms["total"], "reused": w.glance_reused})
        except VideoError:
            pass  # the served stream ended: a live source that goes away
    finally:
        if timer is not None:
            timer.cancel()
        proc.kill()
        proc.wait(10)

    def judged(a: str, b: str) -> tuple[int, int]:
        inside = right = 0
        for r in rows:
            s0, s1 = math.floor((r[a] % total_s) / hold_s + 1e-9), math.floor(((r[b] - 1e-9) % total_s) / hold_s)
            if s0 == s1 and r[b] - r[a] <= hold_s:
                inside += 1
                right += r["label"] == labels[s0 % len(labels)]
        return inside, right

    lat = np.array([r["latency_ms"] for r in rows]) if rows else np.zeros(1)
    by_time, by_content = judged("t0", "t1"), judged("c0", "c1")
    def mean(key: str) -> float | None:
        return round(float(np.mean([r[key] for r in rows])), 4) if rows else None

    out = {"clock": clock, "reuse": reuse, "windows": len(rows), "window_s": window, "stride_s": stride,
           "inside_by_time": by_time[0], "accuracy_by_time": round(by_time[1] / max(1, by_time[0]), 4),
           "inside_by_content": by_content[0], "accuracy_by_content": round(by_content[1] / max(1, by_content[0]), 4),
           "time_minus_content_s": round(float(np.median([r["t0"] - r["c0"] for r in rows])), 3) if rows else None,
           "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
           "latency_ms_p95": round(float(np.percentile(lat, 95)), 2),
           "gflops_mean": mean("gflops"), "glance_ms_mean": mean("glance_ms"), "total_ms_mean": mean("total_ms"),
           "glance_frames_reused_mean": mean("reused"),
           "windows_skipped": rows[-1]["skipped"] if rows else 0, "frames_dropped": rows[-1]["dropped"] if rows else 0}
    if minutes > 0 and rows:
        def rss_in(lo: float, hi: float) -> float | None:
            vals = [r["rss_mb"] for r in rows if lo <= r["at_s"] < hi]
            return round(float(np.mean(vals)), 1) if vals else None

        end = rows[-1]["at_s"]
        out["rss_mb_second_minute"] = rss_in(60, 120)
        out["rss_mb_last_minute"] = rss_in(end - 60, end + 1)
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.machine()


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    import platform

    from adafocus.demo.shipped import bundle_path
    from adafocus.runtime.pipeline import Pipeline

    ap = argparse.ArgumentParser(prog="python -m adafocus.runtime.stream_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="bundle (default: the shipped demo)")
    ap.add_argument("--segments", type=int, default=10)
    ap.add_argument("--hold", type=float, default=6.0)
    ap.add_argument("--window", type=float, default=2.0)
    ap.add_argument("--stride", type=float, default=1.0)
    ap.add_argument("--budget", default=None)
    ap.add_argument("--runs", default="pts+reuse,pts,receive+reuse",
                    help="comma-separated runs: a clock (pts or receive), +reuse for glance reuse")
    ap.add_argument("--minutes", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="adafocus-stream-") as tmp:
        clips, labels = make_clips(Path(tmp), args.segments, args.hold)
        with Pipeline.from_bundle(args.model or bundle_path(), threads=args.threads) as pipe:
            plan = pipe.budget(args.budget)
            results = [measure(pipe, clips, labels, hold_s=args.hold, clock=run.split("+")[0].strip(),
                               window=args.window, stride=args.stride, budget=plan, minutes=args.minutes,
                               reuse=run.strip().endswith("+reuse"))
                       for run in args.runs.split(",")]
    machine = {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
               "load_average": [round(x, 2) for x in os.getloadavg()]}
    report = {"machine": machine, "segments": args.segments, "hold_s": args.hold, "budget_gflops": plan.gflops,
              "results": results}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

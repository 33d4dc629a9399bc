"""Soak: 1,000 videos through ``Pipeline.run_many`` one at a time and 1,000 through its batched mode
(``run_many(batch=8)``: 8 videos in flight, engine calls batched across them), with the process's resident
memory sampled as they go.

What is checked, per mode:

- every input gives exactly one row, a result or an error (inputs repeat, so rows are counted per path);
  the bad inputs (a missing path, an empty file, two truncated copies of a real mp4) give errors, the good
  ones results; in ``run_many`` a video gives the same prediction every time it comes back;
- memory does not grow. The ``VIDEOS`` inputs go through one pipeline in consecutive ``run_many`` calls of
  ``CHUNK`` (25) videos each, and RSS (``VmRSS``) is sampled after every call, when no video is queued or in
  flight: what a sample holds is then the same at every sample but for what leaked. (Sampled during a call
  instead, the batched mode's RSS follows how many of its 16 queued videos, 3 MB of frames each, the decode
  thread has ready, a race with the engines: 190-250 MB from run to run, depending on the machine's load.)
  The first ``WINDOW`` (10%) of the videos is the warm-up (engine arenas, thread pools, decoder buffers grow
  to their working size there) and is not compared; the *first window* is the next 10% (videos 101-200 of
  1,000: 4 samples), the *last window* the final 10% (901-1,000: 4 samples). The median of the last window
  must be within ``RSS_TOLERANCE`` (5%) of that of the first.

Each mode runs in a fresh process (this file run as a script), so that the RSS is this soak's alone, not
what earlier tests left in the test process's heap; and with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at
128 KiB, so that every frame-sized array is its own mapping, returned on free. With glibc's default (a
threshold that grows to 32 MiB as arrays are freed) the frames live in the heap, whose RSS then follows
fragmentation and trim timing (single samples 15 MB above their neighbours in the batched mode).

The same soak runs from the command line, printing the figures (rows, wall time, RSS windows)::

    MALLOC_MMAP_THRESHOLD_=131072 python tests/test_soak.py --videos 1000 --mode both
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from adafocus.errors import AdaFocusError

VIDEOS = 1000
CHUNK = 25  # videos per run_many call; RSS is sampled after each call
WINDOW = 0.10  # share of the rows in the warm-up, in the first window (right after it) and in the last one
RSS_TOLERANCE = 0.05
BAD_EVERY = 50  # one input in BAD_EVERY is a bad one (20 of 1,000)
MODES = ("run_many", "batched")  # Pipeline.run_many one at a time, and with BATCH videos in flight
BATCH = 8
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
PROCESS_TIMEOUT_S = 600  # a bound on one mode's process, not a speed check


def rss_mb() -> float:
    """This process's current resident set size in MB (``VmRSS``; Linux only: ``resource`` gives only the peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise OSError("no VmRSS line in /proc/self/status")


# ------------------------------------------------------------------------------------------- inputs
@dataclass
class SoakInputs:
    good: list[str]
    bad: list[str]

    def stream(self, n: int) -> list[str]:
        """``n`` inputs: the good videos repeated, with a bad one (each kind in turn) every ``BAD_EVERY``-th."""
        good, bad = itertools.cycle(self.good), itertools.cycle(self.bad)
        return [next(bad) if i % BAD_EVERY == BAD_EVERY // 2 else next(good) for i in range(n)]


def make_inputs(root: Path, generated: int = 8) -> SoakInputs:
    """The shipped sample videos + ``generated`` demo-data videos, and four bad inputs, made in ``root`` (or
    taken from it when an earlier call made them there)."""
    from adafocus.demo.data import generate
    from adafocus.demo.shipped import sample_videos

    root.mkdir(parents=True, exist_ok=True)
    samples = [str(p) for p in sample_videos()]
    if not (root / "gen").is_dir():
        generate(root / "gen", videos=generated, seed=11)
    good = samples + sorted(str(p) for p in (root / "gen").rglob("*.mp4"))
    data = Path(samples[0]).read_bytes()
    bad = {"missing.mp4": None, "empty.mp4": b"", "truncated-half.mp4": data[:len(data) // 2],
           "truncated-head.mp4": data[:256]}
    for name, content in bad.items():
        if content is not None:
            (root / name).write_bytes(content)
    return SoakInputs(good, [str(root / name) for name in bad])


# -------------------------------------------------------------------------------------------- soak
@dataclass
class SoakReport:
    mode: str
    inputs: int
    rows: int = 0
    results: int = 0
    errors: int = 0
    wall_s: float = 0.0
    samples: list[tuple[int, float]] = field(default_factory=list)  # (rows done, RSS MB) after each call
    per_path: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # path -> outcome counts

    def window(self, which: str) -> list[float]:
        """RSS samples (MB) of a window: ``warmup`` (the first 10% of the rows), ``first`` (the next 10%) or
        ``last`` (the final 10%)."""
        cut = self.rows * WINDOW
        lo, hi = {"warmup": (0, cut), "first": (cut, 2 * cut), "last": (self.rows - cut, self.rows)}[which]
        return [mb for n, mb in self.samples if lo < n <= hi]

    def window_mb(self, which: str) -> float:
        return statistics.median(self.window(which))

    def growth(self) -> float:
        """Relative change of the median RSS from the first window to the last."""
        return self.window_mb("last") / self.window_mb("first") - 1

    def summary(self) -> str:
        mbs = [m for _, m in self.samples]
        return (f"{self.mode:<9} {self.rows} rows ({self.results} results, {self.errors} errors) in "
                f"{self.wall_s:.1f}s; RSS MB median warm-up {self.window_mb('warmup'):.1f}, "
                f"first window {self.window_mb('first'):.1f}, last window {self.window_mb('last'):.1f} "
                f"({self.growth() * 100:+.2f}%), min {min(mbs):.1f}, max {max(mbs):.1f} over {len(mbs)} samples")

    def to_dict(self) -> dict:
        return {"mode": self.mode, "inputs": self.inputs, "rows": self.rows, "results": self.results,
                "errors": self.errors, "wall_s": self.wall_s, "samples": self.samples,
                "per_path": {p: [[list(o), n] for o, n in c.items()] for p, c in self.per_path.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> SoakReport:
        per_path = defaultdict(Counter, {p: Counter({tuple(o): n for o, n in rows}) for p, rows in
                                         d["per_path"].items()})
        return cls(d["mode"], d["inputs"], d["rows"], d["results"], d["errors"], d["wall_s"],
                   [(int(n), float(mb)) for n, mb in d["samples"]], per_path)


def _caller(pipe, mode: str) -> Callable[[list[str], object], Iterator[tuple[str, object]]]:
    """``rows(paths, budget)`` of a mode: ``Pipeline.run_many`` one video at a time, or with ``BATCH`` in flight."""
    batch = 1 if mode == "run_many" else BATCH
    return lambda paths, budget: pipe.run_many(paths, budget=budget, batch=batch)


def _outcome(mode: str, res: object) -> tuple:
    """A small, hashable summary of one row (the soak keeps no result objects: they would look like a leak)."""
    if isinstance(res, AdaFocusError):
        return ("error", type(res).__name__)
    if isinstance(res, Exception):
        return ("foreign-error", type(res).__name__)  # not an AdaFocusError: a failure of its own
    if mode == "run_many":  # one video at a time: deterministic, so the prediction is part of the outcome
        return ("ok", res.label, res.exit_step)
    return ("ok",)  # batched: a batch's float rounding may differ with its companions


def soak(pipe, mode: str, inputs: SoakInputs, videos: int = VIDEOS, chunk: int = CHUNK,
         budget=None) -> SoakReport:
    """Run ``videos`` inputs through ``pipe`` in ``mode``, ``chunk`` per call, sampling RSS after each call."""
    report = SoakReport(mode, videos)
    rows = _caller(pipe, mode)
    paths = inputs.stream(videos)
    tick = time.perf_counter()
    for start in range(0, videos, chunk):
        for path, res in rows(paths[start:start + chunk], budget):
            out = _outcome(mode, res)
            del res
            report.per_path[path][out] += 1
            report.rows += 1
            if out[0] == "ok":
                report.results += 1
            else:
                report.errors += 1
        report.samples.append((report.rows, rss_mb()))
    report.wall_s = time.perf_counter() - tick
    return report


# ------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def soak_inputs(tmp_path_factory) -> tuple[Path, SoakInputs]:
    root = tmp_path_factory.mktemp("soak")
    return root, make_inputs(root)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_soak_memory_and_rows(mode, soak_inputs, tmp_path):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("RSS sampling reads /proc/self/status (Linux)")
    root, inputs = soak_inputs
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, __file__, "--mode", mode, "--videos", str(VIDEOS), "--inputs",
                           str(root), "--json", str(out)], env={**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report,) = [SoakReport.from_dict(d) for d in json.loads(out.read_text())]
    print("\n" + report.summary())

    # every input: one row, an error for the bad ones, a result for the good ones
    wanted = Counter(inputs.stream(VIDEOS))
    bad = set(inputs.bad)
    assert bad <= set(wanted), "every kind of bad input is in the run"
    assert report.mode == mode and report.rows == VIDEOS
    assert {p: sum(c.values()) for p, c in report.per_path.items()} == dict(wanted)
    for path, outcomes in report.per_path.items():
        kinds = {o[0] for o in outcomes}
        assert kinds == ({"error"} if path in bad else {"ok"}), (path, dict(outcomes))
        if mode == "run_many":
            assert len(outcomes) == 1, f"{path} gave different predictions: {dict(outcomes)}"
    assert report.errors == sum(wanted[p] for p in bad) > 0

    # memory: the RSS over the last 10% of the videos within 5% of that over the 10% after the warm-up
    assert len(report.samples) == VIDEOS // CHUNK
    assert len(report.window("first")) == len(report.window("last")) == int(VIDEOS * WINDOW) // CHUNK
    series = " ".join(f"{mb:.1f}" for _, mb in report.samples)
    assert abs(report.growth()) <= RSS_TOLERANCE, f"{report.summary()}\nRSS MB after each call: {series}"


# --------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    from adafocus.demo.shipped import bundle_path
    from adafocus.runtime.pipeline import Pipeline

    ap = argparse.ArgumentParser(description="Soak the runtime: videos through run_many and the batched mode, "
                                 "RSS sampled as they go (the soak test's figures).")
    ap.add_argument("--videos", type=int, default=VIDEOS)
    ap.add_argument("--chunk", type=int, default=CHUNK, help="videos per call (RSS is sampled after each)")
    ap.add_argument("--mode", choices=[*MODES, "both"], default="both")
    ap.add_argument("--model", default=None, help="bundle (default: the shipped demo)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", default=None)
    ap.add_argument("--inputs", default=None, help="directory for the generated and bad inputs (default: a "
                    "temporary one)")
    ap.add_argument("--json", default=None, help="write the reports here (a JSON list)")
    args = ap.parse_args(argv)
    root = Path(args.inputs) if args.inputs else Path(tempfile.mkdtemp(prefix="adafocus-soak."))
    reports = []
    try:
        inputs = make_inputs(root)
        for mode in MODES if args.mode == "both" else (args.mode,):
            with Pipeline.from_bundle(args.model or bundle_path(), threads=args.threads) as pipe:
                reports.append(soak(pipe, mode, inputs, args.videos, args.chunk, args.budget))
            print(reports[-1].summary(), flush=True)
    finally:
        if not args.inputs:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in reports]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

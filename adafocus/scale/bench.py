"""Benchmarks of the scale-out commands.

    python -m adafocus.scale.bench batch CORPUS [--actors 1,2] [--off-threads 1,2] [--threads 1] [--repeats 1]
    python -m adafocus.scale.bench serve [VIDEO...] [--requests 100] [--concurrency 100] [--replicas 1]

``batch``: the same corpus in-process and on local Ray with 1, 2 .. N actors, in one run.
Each configuration writes into a fresh temporary ``--out`` (removed after); Ray is started once before the Ray
rows and its start-up is not counted. A row's time is ``run_batch``'s: from after Ray is joined to the last row
written, so it includes starting the actors and opening the bundle in each; "first rows" is that part (the time to
the first rows written) and "after them" the videos/s from there on, the workers' rate once they are up. The
table also checks that every configuration gave the same label and exit step for every video.

``serve``: a local Ray Serve on a free 127.0.0.1 port, ``--requests`` uploads of the videos (default: the bundled
samples) from ``--concurrency`` client threads of this process at once (urllib); latency per request (p50, p95,
p99, max), requests/s, and whether every answer has the label and exit step the in-process pipeline gives. The
clients share the machine with the server.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import typer

from adafocus.scale.batch import BatchConfig, run_batch
from adafocus.scale.output import read_rows
from adafocus.scale.rows import RunnerOptions

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def measure(config: BatchConfig) -> tuple[dict, dict]:
    """One run of ``config`` into a temporary out: its summary and {id: (label, exit step, status)}."""
    tmp = Path(tempfile.mkdtemp(prefix="adafocus-bench-"))
    try:
        summary = run_batch(replace(config, out=str(tmp / "out")))
        decisions = {r["id"]: (r["label"], r["exit_step"], r["status"]) for r in read_rows(tmp / "out")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary.to_dict(), decisions


@app.command("batch")
def batch_bench(
    source: str = typer.Argument(..., help="Corpus (directory, glob, CSV or JSONL list)."),
    model: Path = typer.Option(None, "--model", "-m", help="Bundle (default: the bundled demo)."),
    actors: str = typer.Option("1,2", "--actors", help="Actor counts to measure on local Ray."),
    off_threads: str = typer.Option("1,2", "--off-threads", help="Engine threads of the in-process rows."),
    threads: int = typer.Option(1, "--threads", help="Engine threads per actor."),
    batch: int = typer.Option(4, "--batch", help="Videos in flight per worker."),
    task_size: int = typer.Option(32, "--task-size", help="Most videos per Ray task."),
    repeats: int = typer.Option(1, "--repeats", help="Runs of each configuration (the best is kept)."),
    json_out: Path = typer.Option(None, "--json", help="Write the rows as JSON here."),
):
    from adafocus.demo.shipped import bundle_path
    from adafocus.scale.cluster import connect

    runner = RunnerOptions(bundle=str(model or bundle_path()), batch=batch)
    plans = [(f"in-process, {t} thread{'s' if t > 1 else ''}",
              BatchConfig(source=source, out="", ray="off", runner=replace(runner, threads=t), task_size=task_size))
             for t in _ints(off_threads)]
    results = [(name, _best(cfg, repeats)) for name, cfg in plans]
    with connect("local", log=lambda s: typer.echo(s, err=True)):
        for n in _ints(actors):
            cfg = BatchConfig(source=source, out="", ray="local", actors=n, runner=replace(runner, threads=threads),
                              task_size=task_size)
            results.append((f"ray, {n} actor{'s' if n > 1 else ''} x {threads} thread", _best(cfg, repeats)))
    first = results[0][1][1]
    typer.echo(f"{platform.processor() or platform.machine()}, {len(first)} videos, batch {batch} in flight per worker")
    typer.echo(f"{'configuration':<32} {'videos/s':>9} {'seconds':>8} {'first rows':>10} {'after them':>10} "
               f"{'errors':>7}  same decisions")
    rows = []
    for name, (summary, decisions) in results:
        same = decisions == first
        steady = summary["steady_videos_per_s"]
        typer.echo(f"{name:<32} {summary['videos_per_s']:>9.2f} {summary['seconds']:>8.2f} "
                   f"{summary['first_rows_s'] or 0:>9.2f}s {steady or 0:>10.2f} {summary['failed']:>7}  "
                   f"{'yes' if same else 'NO'}")
        rows.append({"configuration": name, "same_decisions": same, **summary})
    if json_out is not None:
        json_out.write_text(json.dumps(rows, indent=2) + "\n")


@app.command("serve")
def serve_bench(
    videos: list[Path] = typer.Argument(None, help="Videos to upload, in turn (default: the bundled samples)."),
    model: Path = typer.Option(None, "--model", "-m", help="Bundle (default: the bundled demo)."),
    requests: int = typer.Option(100, "--requests", help="Requests in all."),
    concurrency: int = typer.Option(100, "--concurrency", help="Client threads sending at once."),
    replicas: int = typer.Option(1, "--replicas", help="Serve replicas."),
    max_batch: int = typer.Option(8, "--max-batch", help="Requests batched into one scheduler run."),
    threads: int = typer.Option(None, "--threads", help="Engine threads per replica."),
    json_out: Path = typer.Option(None, "--json", help="Write the figures as JSON here."),
):
    import socket
    import time
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from adafocus.demo.shipped import bundle_path, sample_videos
    from adafocus.runtime.pipeline import Pipeline
    from adafocus.scale.cluster import connect
    from adafocus.scale.serve import ServeConfig, start, stop

    bundle = str(model or bundle_path())
    paths = [Path(v) for v in videos] if videos else sample_videos()
    with Pipeline.from_bundle(bundle) as pipe:
        ref = {str(p): (r.label, r.exit_step) for p, r in pipe.run_many([str(p) for p in paths])}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bodies = [p.read_bytes() for p in paths]

    def post(i: int) -> tuple[float, bool]:
        req = urllib.request.Request(url + "/classify", data=bodies[i % len(bodies)], method="POST")
        tick = time.perf_counter()
        with urllib.request.urlopen(req, timeout=300) as resp:
            body = json.loads(resp.read())
        ms = (time.perf_counter() - tick) * 1e3
        return ms, (body["label"], body["exit_step"]) == ref[str(paths[i % len(paths)])]

    with connect("local", log=lambda s: typer.echo(s, err=True)):
        url = start(ServeConfig(bundle=bundle, port=port, replicas=replicas, max_batch=max_batch, threads=threads,
                                max_ongoing=max(16, concurrency)))
        try:
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                list(pool.map(post, range(min(requests, 2 * max_batch))))  # warm-up
                tick = time.perf_counter()
                answers = list(pool.map(post, range(requests)))
                wall = time.perf_counter() - tick
        finally:
            stop()
    ms = np.asarray([a[0] for a in answers])
    figures = {"requests": requests, "concurrency": concurrency, "replicas": replicas, "max_batch": max_batch,
               "requests_per_s": round(requests / wall, 2), "p50_ms": round(float(np.percentile(ms, 50)), 1),
               "p95_ms": round(float(np.percentile(ms, 95)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
               "max_ms": round(float(ms.max()), 1), "same_labels": all(a[1] for a in answers),
               "machine": platform.processor() or platform.machine()}
    typer.echo(" ".join(f"{k} {v}" for k, v in figures.items()))
    if json_out is not None:
        json_out.write_text(json.dumps(figures, indent=2) + "\n")


def _best(config: BatchConfig, repeats: int) -> tuple[dict, dict]:
    runs = [measure(config) for _ in range(max(1, repeats))]
    return max(runs, key=lambda r: r[0]["videos_per_s"])


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


if __name__ == "__main__":  # pragma: no cover
    app()

"""The ``adafocus batch`` and ``adafocus serve`` commands (registered on the main typer app).

Thin layers over :func:`adafocus.scale.batch.run_batch` and :func:`adafocus.scale.serve.serve_forever`; ray is
imported only inside them, so ``adafocus --help`` works without the ``ray`` extra.
"""

from __future__ import annotations

from pathlib import Path

import typer


def _default_bundle() -> str:
    from adafocus.demo.shipped import bundle_path

    return str(bundle_path())


def register(app: typer.Typer) -> None:
    """Add ``batch`` and ``serve`` to ``app``."""

    @app.command("batch")
    def batch_cmd(
        source: str = typer.Argument(..., help="Videos: a directory, a glob, or a CSV/JSONL list (video or path, "
                                     "optional id and label columns)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output directory (part files + summary.json); a second "
                                 "run with the same --out skips the videos already written."),
        model: Path = typer.Option(None, "--model", "-m", help="Bundle directory (default: the bundled demo model)."),
        ray: str = typer.Option("auto", "--ray", help="auto (Ray if installed: RAY_ADDRESS or a local instance), "
                                "off (in-process), local, or a cluster address."),
        actors: int = typer.Option(1, "--actors", help="Actor pool size on Ray (one per device)."),
        cpus_per_actor: float = typer.Option(1.0, "--cpus-per-actor", help="CPUs each actor holds (its engine threads "
                                             "unless --threads)."),
        gpus_per_actor: float = typer.Option(0.0, "--gpus-per-actor", help="GPUs each actor holds (> 0 runs on cuda)."),
        batch: int = typer.Option(4, "--batch", help="Videos in flight in each worker's step scheduler."),
        budget: str = typer.Option(None, "--budget", "-b", help="Per-video GFLOPs (e.g. 0.08) or a share of the "
                                   "dense cost (e.g. 30%)."),
        average: bool = typer.Option(False, "--average", help="Treat --budget as a calibrated average over videos."),
        engine: str = typer.Option("auto", "--engine", "-e", help="auto, ort, ort-cuda, ort-tensorrt, tensorrt."),
        device: str = typer.Option("cpu", "--device", "-d", help="cpu or cuda[:N] (in-process)."),
        threads: int = typer.Option(None, "--threads", help="CPU threads per engine (default on Ray: "
                                    "--cpus-per-actor; in-process: onnxruntime's)."),
        fmt: str = typer.Option("parquet", "--format", help="parquet or jsonl."),
        task_size: int = typer.Option(32, "--task-size", help="Most videos per Ray task (the unit retried after a "
                                       "fault)."),
        stall_timeout: float = typer.Option(600.0, "--stall-timeout", help="Stop when no task finishes for this "
                                            "many seconds (the rows written are kept)."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ):
        """Classify a corpus of videos into result rows (one per video), in-process or on Ray Data."""
        import json
        import sys

        from rich.progress import Progress

        from adafocus.scale.batch import BatchConfig, run_batch
        from adafocus.scale.rows import RunnerOptions

        runner = RunnerOptions(bundle=str(model or _default_bundle()), engine=engine, device=device, threads=threads,
                               budget=budget, average=average, batch=batch)
        config = BatchConfig(source=source, out=str(out), runner=runner, ray=ray, actors=actors,
                             cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, task_size=task_size,
                             fmt=fmt, stall_timeout=stall_timeout)
        with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
            task = progress.add_task("videos", total=None)
            summary = run_batch(config, log=lambda s: typer.echo(s, err=True),
                                progress=lambda done, total: progress.update(task, completed=done, total=total))
        typer.echo(json.dumps(summary.to_dict(), indent=2) if as_json else summary.format())
        if not as_json:
            typer.echo(f"summary {Path(out) / 'summary.json'}", err=True)
        return 0

    @app.command("serve")
    def serve_cmd(
        model: Path = typer.Argument(None, help="Bundle directory (default: the bundled demo model)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Bind address (0.0.0.0 to accept other machines)."),
        port: int = typer.Option(8000, "--port", help="HTTP port."),
        replicas: int = typer.Option(1, "--replicas", help="Ray Serve replicas (each opens the bundle once)."),
        max_body: float = typer.Option(64.0, "--max-body", help="Largest upload accepted, in MB (larger: 413)."),
        budget: str = typer.Option(None, "--budget", "-b", help="Per-video GFLOPs or a share of the dense cost."),
        average: bool = typer.Option(False, "--average", help="Treat --budget as a calibrated average over videos."),
        max_batch: int = typer.Option(8, "--max-batch", help="Requests batched into one scheduler run."),
        threads: int = typer.Option(None, "--threads", help="CPU threads per engine (default: --cpus-per-replica)."),
        cpus_per_replica: float = typer.Option(1.0, "--cpus-per-replica", help="CPUs each replica holds."),
        gpus_per_replica: float = typer.Option(0.0, "--gpus-per-replica", help="GPUs each replica holds (> 0: cuda)."),
        timeout: float = typer.Option(60.0, "--timeout", help="Seconds a request may take before a 504."),
        allow_paths: bool = typer.Option(False, "--allow-paths", help="Also accept {\"path\": ...} JSON bodies naming "
                                         "a video the server reads itself (trusted clients only)."),
        ray: str = typer.Option("auto", "--ray", help="auto (RAY_ADDRESS or a local instance), local, or an address."),
    ):
        """Serve a bundle over HTTP with Ray Serve: POST /classify (a video as the body or a multipart field
        'video'), GET /healthz."""
        from adafocus.scale.serve import ServeConfig, serve_forever

        config = ServeConfig(bundle=str(model or _default_bundle()), host=host, port=port, replicas=replicas,
                             max_body_mb=max_body, budget=budget, average=average, max_batch=max_batch, threads=threads,
                             cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica, timeout_s=timeout,
                             allow_paths=allow_paths, ray=ray)
        serve_forever(config, log=lambda s: typer.echo(s, err=True))
        return 0

"""The `adafocus` command line: a thin typer layer over the Python API.

Every command calls one public function that a notebook can call with the same arguments. User errors
(``AdaFocusError``, ``OSError``) become one line on stderr and exit code 1; ``--verbose`` (or
``ADAFOCUS_VERBOSE=1``) shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from adafocus.errors import AdaFocusError, ConfigError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Deploy Uni-AdaFocus adaptive video recognition models: export, run, calibrate, benchmark.",
    pretty_exceptions_enable=False,
)
calibrate_app = typer.Typer(help="Calibrate a bundle: exit thresholds for budgets, INT8 precision.",
                            no_args_is_help=True)
app.add_typer(calibrate_app, name="calibrate")

_VERBOSE = {"on": os.environ.get("ADAFOCUS_VERBOSE", "") not in ("", "0")}


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors.")):
    if verbose:
        _VERBOSE["on"] = True


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2))


def _shared_threads(threads: int | None) -> None:
    """Commands that run only adafocus engines share one onnxruntime CPU pool (see adafocus.engines.ort)."""
    from adafocus.engines.ort import use_shared_pool

    use_shared_pool(threads)


# ----------------------------------------------------------------------------------------------- models
@app.command("presets")
def presets_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List the model presets, one line each."""
    from adafocus.models.presets import list_presets

    rows = list_presets()
    if as_json:
        _echo_json([r.to_dict() for r in rows])
        return
    for p in rows:
        typer.echo(f"{p.name:<22} {p.description}")


@app.command("init")
def init_cmd(
    preset: str = typer.Option(..., "--preset", help="Preset name (see `adafocus presets`)."),
    out: Path = typer.Option(..., "--out", help="Checkpoint to write (.pt)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    num_classes: int = typer.Option(None, "--num-classes", help="Override the preset's class count."),
):
    """Write a randomly initialised checkpoint in adafocus's format (for trying the exporter, tests)."""
    from adafocus.models import init_checkpoint

    path = init_checkpoint(preset, out, seed=seed, num_classes=num_classes)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command("flops")
def flops_cmd(
    preset: str = typer.Option(..., "--preset", help="Preset name."),
    num_classes: int = typer.Option(None, "--num-classes", help="Override the preset's class count."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Multiply-add GFLOPs per stage and the cumulative cost at every exit, counted on the real modules."""
    from adafocus.models.flops import count_flops

    report = count_flops(preset, num_classes=num_classes)
    if as_json:
        _echo_json(report.to_dict())
        return
    typer.echo(report.format())


# ---------------------------------------------------------------------------------------- data, training
@app.command("demo-data")
def demo_data_cmd(
    out: Path = typer.Argument(..., help="Directory to create (train/val/test CSVs + mp4 videos)."),
    videos: int = typer.Option(1500, "--videos", "-n", help="Number of videos over the three splits."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same videos."),
    frames: int = typer.Option(32, "--frames", help="Frames per video."),
    size: int = typer.Option(128, "--size", help="Frame side in pixels."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it is not empty."),
):
    """Generate the procedural labelled demo data set (a small textured target in a cluttered frame)."""
    import time

    from rich.progress import Progress

    from adafocus.demo.data import generate

    start = time.perf_counter()
    with Progress(transient=True) as progress:
        task = progress.add_task("videos", total=videos)
        res = generate(out, videos=videos, seed=seed, overwrite=overwrite, frames=frames, size=size,
                       progress=lambda done, total: progress.update(task, completed=done))
    splits = ", ".join(f"{k} {v}" for k, v in res.counts.items())
    typer.echo(f"wrote {sum(res.counts.values())} videos ({splits}; {len(res.classes)} classes) to {res.root} "
               f"({res.bytes / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s)")


@app.command("train")
def train_cmd(
    data: Path = typer.Option(..., "--data", help="Data set directory with train/val/test.csv (video,label)."),
    out: Path = typer.Option(..., "--out", help="Checkpoint to write (.pt)."),
    preset: str = typer.Option("tiny", "--preset", help="Model preset (see `adafocus presets`)."),
    dense: bool = typer.Option(False, "--dense", help="Train the dense baseline (local encoder on whole frames)."),
    epochs: int = typer.Option(None, "--epochs", help="Epochs (default: TrainOptions.epochs)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Videos per step."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (cosine schedule)."),
    optimizer: str = typer.Option(None, "--optimizer", help="adamw, or sgd (upstream's, with lr multipliers)."),
    seed: int = typer.Option(None, "--seed", help="Random seed (weights, data order, sampling)."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads (fixed, for reproducibility)."),
    max_videos: int = typer.Option(None, "--max-videos", help="Use only the first videos of each split."),
    init_local: Path = typer.Option(None, "--init-local", help="Start the local encoder from this checkpoint's "
                                    "(e.g. the dense baseline's), as upstream starts from ImageNet weights."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
):
    """Train the reference model on the CPU as Uni-AdaFocus does (one stage), or the dense baseline."""
    from adafocus.training import TrainOptions, train

    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": optimizer, "seed": seed,
             "threads": threads, "max_videos": max_videos, "init_local": str(init_local) if init_local else None}
    options = TrainOptions(preset=preset, dense=dense, **{k: v for k, v in given.items() if v is not None})
    train(data, out, options, log=typer.echo, progress=progress)


@app.command("demo-build")
def demo_build_cmd(
    model: Path = typer.Option(..., "--model", help="Trained adafocus checkpoint (adafocus train)."),
    data: Path = typer.Option(..., "--data", help="Its data set (val to calibrate, test held out and samples)."),
    out: Path = typer.Option(..., "--out", help="Assets directory to (re)create: OUT/bundle, OUT/videos."),
    dense: Path = typer.Option(None, "--dense", help="Dense baseline checkpoint (adafocus train --dense)."),
    budgets: str = typer.Option(None, "--budgets", help="Average GFLOPs budgets to calibrate (default: a spread)."),
    samples: int = typer.Option(3, "--samples", help="Sample videos to copy (one per class)."),
):
    """Build the shipped demo: export, add the dense baseline, calibrate thresholds, copy sample videos."""
    from adafocus.demo.build import build_demo

    build_demo(model, data, out, dense_checkpoint=dense, budgets=budgets, samples=samples, log=typer.echo)


# ----------------------------------------------------------------------------------------------- export
@app.command("export")
def export_cmd(
    model: Path = typer.Argument(..., help="Checkpoint (.pt): adafocus format, or an official one with --preset."),
    preset: str = typer.Option(None, "--preset", help="Preset name (needed for official checkpoints)."),
    out: Path = typer.Option(None, "--out", help="Bundle directory [default: MODEL's stem + _bundle]."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or fp16 (weights and activations; the "
                                  "engines' inputs and outputs stay float32)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset (>= 16)."),
    tensorrt: bool = typer.Option(False, "--tensorrt", help="Also build TensorRT engines (adafocus[gpu], GPU)."),
    workspace: int = typer.Option(None, "--workspace", help="TensorRT builder workspace limit in MB."),
    timing_cache: Path = typer.Option(None, "--timing-cache", help="TensorRT timing cache file (read + saved)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the ONNX-vs-PyTorch verification."),
    no_simplify: bool = typer.Option(False, "--no-simplify", help="Skip the onnxslim pass."),
    videos: int = typer.Option(4, "--videos", help="Random videos in the end-to-end check."),
):
    """Export a checkpoint as a verified bundle: global, policy, backbone, head .onnx + manifest.json."""
    from adafocus.export.exporter import export_bundle

    export_bundle(model, out, preset=preset, precision=precision, opset=opset, tensorrt=tensorrt,
                  workspace_mb=workspace, timing_cache=timing_cache, force=force, verify=not no_verify,
                  simplify_graphs=not no_simplify, videos=videos, log=typer.echo)


@app.command("inspect")
def inspect_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
    readiness: bool = typer.Option(True, "--readiness/--no-readiness", help="Run the TensorRT readiness check."),
):
    """Check a bundle's checksums and print its manifest summary, I/O shapes, GFLOPs and TensorRT readiness."""
    from adafocus.bundle import load_bundle

    b = load_bundle(bundle, verify=True)
    if as_json:
        _echo_json(b.manifest.to_dict())
        return
    typer.echo(b.describe())
    if readiness:
        from adafocus.errors import MissingDependency

        try:
            from adafocus.export.readiness import check_readiness

            for stage in b.manifest.stages:
                typer.echo(check_readiness(b.stage_path(stage)).format())
        except (ImportError, MissingDependency) as exc:
            typer.echo(f"readiness  not checked: {exc}")
    _echo_profiles(b)


def _echo_profiles(b) -> None:
    from adafocus.runtime.profile import profile_paths, read_profile

    paths = profile_paths(b.path)
    if not paths:
        typer.echo("profiles   none (`adafocus profile BUNDLE` measures this device's stage times)")
    for path in paths:
        try:
            prof = read_profile(path, b.manifest)
        except AdaFocusError as exc:
            typer.echo(f"profile    {path.name}: not usable: {exc}")
            continue
        ms = ", ".join(sorted(prof.thresholds)) or "none"
        typer.echo(f"profile    {prof.describe()}: glance only {prof.measured.get('glance_only_ms', 0):.3f} ms, "
                   f"full {prof.measured.get('full_ms', 0):.3f} ms, measured {prof.created}; "
                   f"time-calibrated averages: {ms}")


@app.command("profile")
def profile_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory (the profile is written into it)."),
    videos: list[str] = typer.Argument(None, help="Videos the fixed costs are fitted on (default: the bundled "
                                       "samples)."),
    engine: str = typer.Option("auto", "--engine", "-e", help="auto, ort, ort-cuda, ort-tensorrt, tensorrt."),
    device: str = typer.Option("cpu", "--device", "-d", help="cpu or cuda[:N]."),
    threads: int = typer.Option(None, "--threads", help="CPU threads per engine (default: onnxruntime's)."),
    precision: str = typer.Option(None, "--precision", help="Which stage files: the bundle's own, or e.g. int8."),
    batches: str = typer.Option("1,2,4,8", "--batches", help="Batch sizes to time each stage at."),
    seconds: float = typer.Option(0.6, "--seconds", help="Seconds of timed calls per stage and batch size."),
):
    """Measure every stage's p50/p90 time per batch size and the fixed costs on this device, for budgets in
    milliseconds (--budget 25ms) and --chunk auto; writes profiles/<key>.json inside the bundle."""
    from adafocus.bench.profile import measure_profile

    _shared_threads(threads)
    try:
        sizes = [int(x) for x in batches.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--batches must be comma separated integers, got {batches!r}") from None
    if seconds <= 0:
        raise ConfigError(f"--seconds must be positive, got {seconds}")
    from adafocus.runtime.pipeline import expand_videos

    paths = expand_videos(videos) if videos else None
    prof, path = measure_profile(bundle, engine=engine, device=device, threads=threads, precision=precision,
                                 batches=sizes, seconds=seconds, videos=paths, log=typer.echo)
    typer.echo(f"glance only {prof.measured['glance_only_ms']:.3f} ms, every step {prof.measured['full_ms']:.3f} ms "
               f"a video (p50, decode excluded)")
    typer.echo(f"wrote {path}")


@app.command("migrate")
def migrate_cmd(
    bundle: Path = typer.Argument(..., help="Format-1 bundle directory (local.onnx), rewritten in place."),
):
    """Split a format-1 bundle's local.onnx into backbone.onnx + head.onnx (format 2), checked to be exact."""
    from adafocus.export.migrate import migrate_bundle

    migrate_bundle(bundle, log=typer.echo)


@app.command("build-engines")
def build_engines_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    fp16: bool = typer.Option(None, "--fp16/--no-fp16", help="FP16 builder flag [default: on for fp16 bundles "
                              "on TensorRT 10]."),
    workspace: int = typer.Option(None, "--workspace", help="Builder workspace limit in MB."),
    timing_cache: Path = typer.Option(None, "--timing-cache", help="Timing cache file (read if present, saved)."),
    max_batch: int = typer.Option(8, "--max-batch", help="Largest batch of the optimisation profile."),
    device: int = typer.Option(0, "--device", help="CUDA device index."),
):
    """Build one TensorRT engine per stage of a bundle and record them (version, GPU) in its manifest."""
    from adafocus.errors import require

    require("tensorrt", "gpu", "building TensorRT engines")
    from adafocus.export.exporter import build_engines

    build_engines(bundle, fp16=fp16, workspace_mb=workspace, timing_cache=timing_cache, batch=(1, 1, max_batch),
                  device=device, log=typer.echo)


# ------------------------------------------------------------------------------------------ calibrate
def _progress_callback(label: str, show: bool):
    """A rich progress bar on stderr driven by ``progress(done, total)`` callbacks (a no-op when hidden)."""
    from contextlib import contextmanager

    from rich.console import Console
    from rich.progress import Progress

    @contextmanager
    def bar():
        with Progress(transient=True, disable=not (show and sys.stderr.isatty()),
                      console=Console(stderr=True)) as progress:
            task = progress.add_task(label, total=None)

            def update(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            yield update

    return bar()


@calibrate_app.command("thresholds")
def calibrate_thresholds_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory (its manifest gets the threshold table)."),
    data: Path = typer.Option(..., "--data", help="Labelled data: <split>.csv files (video,label), e.g. from "
                              "`adafocus demo-data`."),
    budgets: str = typer.Option(None, "--budgets", help="Average GFLOPs per video, comma separated (e.g. "
                                "0.05,0.06,0.08) [default: 6 between the exit-0 and the full cost], or average "
                                "model times (e.g. 10ms,20ms: needs `adafocus profile` of this device)."),
    calib_split: str = typer.Option("val", "--calib-split", help="Split the thresholds are solved on."),
    heldout_split: str = typer.Option("test", "--heldout-split", help="Split they are evaluated on ('none': "
                                      "skip)."),
    criterion: str = typer.Option(None, "--criterion", help="max_logit or neg_entropy [default: the bundle's]."),
    max_gflops: float = typer.Option(None, "--max-gflops", help="Per-video cap the thresholds are solved under "
                                     "[default: the full model]."),
    max_videos: int = typer.Option(None, "--max-videos", help="Use at most this many videos per split."),
    merge: bool = typer.Option(False, "--merge", help="Keep the table's other budgets (default: replace it)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Report only; leave the bundle unchanged."),
    plot: Path = typer.Option(None, "--plot", help="Write accuracy vs GFLOPs as an image (adafocus[plot])."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Keep per-video exit scores here for reruns."),
    engine: str = typer.Option("auto", "--engine", "-e", help="auto, ort, ort-cuda, ort-tensorrt, tensorrt."),
    device: str = typer.Option("cpu", "--device", "-d", help="cpu or cuda[:N]."),
    threads: int = typer.Option(None, "--threads", help="CPU threads per engine (default: onnxruntime's)."),
    precision: str = typer.Option(None, "--precision", help="Score with these stage files (e.g. int8) "
                                  "[default: the bundle's own]."),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
):
    """Solve exit thresholds for average budgets on labelled videos: GFLOPs (stored in the manifest), or
    times such as 10ms,20ms (solved with this device's profile as the cost model, stored in that profile)."""
    from adafocus.calibration.thresholds import calibrate_thresholds
    from adafocus.calibration.time_targets import calibrate_time_targets, is_time_budgets

    _shared_threads(threads)
    held = None if heldout_split.lower() in ("", "none") else heldout_split
    timed = is_time_budgets(budgets)
    if timed and (merge or plot is not None or cache_dir is not None or max_gflops is not None):
        raise ConfigError("--merge, --plot, --cache-dir and --max-gflops are for GFLOPs budgets, not times")
    common = {"calib_split": calib_split, "heldout_split": held, "criterion": criterion, "max_videos": max_videos,
              "engine": engine, "device": device, "threads": threads, "precision": precision, "write": not dry_run,
              "log": None if as_json else (lambda s: typer.echo(s, err=True))}
    with _progress_callback("videos", not as_json) as progress:
        if timed:
            result = calibrate_time_targets(bundle, data, budgets, progress=progress, **common)
        else:
            result = calibrate_thresholds(bundle, data, budgets, max_gflops=max_gflops, merge=merge, plot=plot,
                                          cache_dir=cache_dir, progress=progress, **common)
    if timed and not as_json:
        typer.echo(result.format())
        typer.echo(f"profile    {len(result.targets)} time targets written to {result.written}" if result.written
                   else "profile    unchanged (--dry-run)")
        return 0
    if as_json:
        _echo_json(result.to_dict())
        return 0
    typer.echo(result.format())
    if result.plot:
        typer.echo(f"plot       {result.plot}")
    typer.echo(f"manifest   {len(result.solutions)} threshold tables written to {bundle}" if result.written
               else "manifest   unchanged (--dry-run)")
    return 0


@calibrate_app.command("int8")
def calibrate_int8_cmd(
    bundle: Path = typer.Argument(..., help="fp32 bundle directory (gets global.int8.onnx, backbone.int8.onnx)."),
    data: Path = typer.Option(..., "--data", help="Labelled data: <split>.csv files (video,label)."),
    max_drop: float = typer.Option(1.0, "--max-drop", help="Top-1 percentage points INT8 may lose at any "
                                   "operating point; more fails the command and leaves the bundle as it was."),
    calib_videos: int = typer.Option(32, "--calib-videos", help="Videos whose glance frames and patches "
                                     "calibrate the activation ranges."),
    calib_split: str = typer.Option("train", "--calib-split", help="Split the calibration videos come from."),
    heldout_split: str = typer.Option("test", "--heldout-split", help="Split of the accuracy gate."),
    max_heldout: int = typer.Option(None, "--max-heldout", help="At most this many held-out videos."),
    method: str = typer.Option("minmax", "--method", help="Activation ranges: minmax, entropy or percentile."),
    stages: str = typer.Option("global,backbone", "--stages", help="Encoders to quantize (the others stay fp32)."),
    activations: str = typer.Option("int8", "--activations", help="int8: signed symmetric, for TensorRT "
                                    "(precision 'int8'); uint8: onnxruntime's faster x86 CPU kernels, not "
                                    "for TensorRT (precision 'int8-u8')."),
    threads: int = typer.Option(None, "--threads", help="CPU threads per engine (default: onnxruntime's)."),
    fallback: bool = typer.Option(True, "--fallback/--no-fallback", help="When the gate fails with both encoders, "
                                  "try each alone (the other stays float) and keep the first that passes."),
    as_json: bool = typer.Option(False, "--json", help="Print the gate report as JSON."),
):
    """Quantize the encoders to INT8 Q/DQ (onnxruntime, per-channel, signed symmetric) and gate them vs fp32."""
    from adafocus.calibration.int8 import Int8Options, calibrate_int8

    opts = Int8Options(calib_videos=calib_videos, calib_split=calib_split, heldout_split=heldout_split,
                       max_heldout=max_heldout, method=method, max_drop=max_drop, threads=threads,
                       stages=tuple(x.strip() for x in stages.split(",") if x.strip()), activations=activations,
                       fallback=fallback)
    with _progress_callback("videos", not as_json) as progress:
        result = calibrate_int8(bundle, data, opts, log=None if as_json else (lambda s: typer.echo(s, err=True)),
                                progress=progress)
    if as_json:
        _echo_json({**result.report.to_dict(), "written": result.written, "files": result.files,
                    "quantized_nodes": result.quantized_nodes, "stages": list(result.stages),
                    "attempts": result.attempts})
    else:
        typer.echo(result.report.format())
        if len(result.attempts) > 1:
            typer.echo("tries: " + "; ".join(f"{'+'.join(a['stages'])} in INT8: worst drop {a['worst_drop']:+.2f} "
                                             f"({'passed' if a['passed'] else 'failed'})" for a in result.attempts))
        if result.written and set(result.stages) != set(opts.stages):
            kept = ", ".join(x for x in opts.stages if x not in result.stages)
            typer.echo(f"kept in float: {kept} (INT8 there failed the gate); wrote {', '.join(result.files.values())}")
    if not result.written:
        typer.echo(f"error: INT8 accuracy gate failed: top-1 drop {result.report.worst_drop:.2f} points > "
                   f"--max-drop {max_drop:g}; {bundle} unchanged", err=True)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------- bench
@app.command("add-dense")
def add_dense_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory (gets dense.onnx and a 'dense' stage)."),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="Dense baseline checkpoint (`adafocus train "
                                    "--dense`) [default: random weights of the bundle's config, timing only]."),
    precision: str = typer.Option(None, "--precision", help="fp32 or fp16 [default: the bundle's]."),
):
    """Export the dense baseline (the local encoder on every whole candidate frame) into a bundle for `bench`."""
    from adafocus.export.dense import add_dense

    add_dense(bundle, checkpoint, precision=precision, log=typer.echo)


@app.command("bench")
def bench_cmd(
    videos: list[str] = typer.Argument(None, help="Videos, globs or directories [default: the --labels videos, "
                                       "else the bundled samples]."),
    more_videos: list[str] = typer.Option(None, "--videos", help="More videos, globs or directories (repeatable)."),
    model: Path = typer.Option(None, "--model", "-m", help="Bundle directory (default: the bundled demo model)."),
    labels: Path = typer.Option(None, "--labels", help="video,label CSV: adds accuracy; its videos are used when "
                                "none are given."),
    engine: list[str] = typer.Option(None, "--engine", "-e", help="Engine(s), repeatable or comma separated "
                                     "[default: every engine of the device kind; unavailable ones are reported]."),
    device: str = typer.Option("cpu", "--device", "-d", help="cpu or cuda[:N]."),
    budgets: str = typer.Option("33%,full", "--budgets", "-b", help="Comma separated budgets: GFLOPs, % of the "
                                "dense baseline's GFLOPs, or 'full'."),
    batch: int = typer.Option(0, "--batch", help="Throughput mode: videos/s with 1, 2, 4 .. N videos in flight."),
    warmup: float = typer.Option(2.0, "--warmup", help="Warm-up seconds before timing."),
    repeats: int = typer.Option(3, "--repeats", help="Timed passes over the videos."),
    threads: int = typer.Option(None, "--threads", help="CPU threads per engine (default: onnxruntime's)."),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="PyTorch checkpoint (for the torch engine)."),
    no_dense: bool = typer.Option(False, "--no-dense", help="Skip the dense baseline."),
    dense_checkpoint: Path = typer.Option(None, "--dense-checkpoint", help="Dense baseline checkpoint "
                                          "(adafocus train --dense): the torch engine's dense row."),
    chunk: str = typer.Option("auto", "--chunk", help="Focus steps per backbone call: N or auto."),
    no_cuda_graphs: bool = typer.Option(False, "--no-cuda-graphs", help="torch engine on cuda: run eager PyTorch "
                                        "instead of replaying CUDA graphs."),
    max_videos: int = typer.Option(None, "--max-videos", help="Use at most this many videos."),
    json_out: Path = typer.Option(None, "--json", help="Report file [default: ./bench_<model>_<device>_<hw>.json]."),
    plot: Path = typer.Option(None, "--plot", help="Write a plot (.png; adafocus[plot])."),
):
    """Latency per stage, videos/s and memory per engine and precision, against the dense baseline."""
    from adafocus.bench.report import default_name, print_report, save_json, save_plot
    from adafocus.bench.runner import BenchConfig, run_benchmark
    from adafocus.runtime.pipeline import expand_videos

    _shared_threads(threads)

    truth = None
    if labels is not None:
        from adafocus.dataset import read_labels_csv

        truth = {str(v.path): v.label for v in read_labels_csv(labels)}
    paths = expand_videos(list(videos or []) + list(more_videos or []))
    if not paths:
        paths = list(truth) if truth else _default_videos()
    paths = paths[:max_videos] if max_videos else paths
    names = [n.strip() for e in (engine or []) for n in e.split(",") if n.strip()] or None
    plan = [b.strip() for b in budgets.split(",") if b.strip()]
    config = BenchConfig(model or _default_bundle(), paths, truth, names, device, plan, batch, warmup, repeats,
                         threads, checkpoint, not no_dense, dense_checkpoint, cuda_graphs=not no_cuda_graphs,
                         chunk=chunk)
    report = run_benchmark(config, log=lambda s: typer.echo(s, err=True))
    print_report(report)
    out = save_json(report, json_out or Path(default_name(report)))
    typer.echo(f"saved {out}")
    if plot is not None:
        typer.echo(f"plot  {save_plot(report, plot)}")
    return 0


# -------------------------------------------------------------------------------------------- runtime
def _default_bundle() -> Path:
    from adafocus.demo.shipped import bundle_path

    return bundle_path()


@app.command("run")
def run_cmd(
    videos: list[str] = typer.Argument(None, help="Videos, globs or directories (default: the bundled samples)."),
    model: Path = typer.Option(None, "--model", "-m", help="Bundle directory (default: the bundled demo model)."),
    budget: str = typer.Option(None, "--budget", "-b",
                               help="Per-video GFLOPs (e.g. 0.08) or a share of the dense cost (e.g. 30%)."),
    engine: str = typer.Option("auto", "--engine", "-e", help="auto, ort, ort-cuda, ort-tensorrt, tensorrt, torch."),
    average: bool = typer.Option(False, "--average", help="Treat --budget as a calibrated average over videos "
                                 "(single videos may spend more) instead of a hard per-video cap."),
    device: str = typer.Option("cpu", "--device", "-d", help="cpu or cuda[:N]."),
    topk: int = typer.Option(5, "--topk", help="How many classes to report."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per video on stdout."),
    save_vis: Path = typer.Option(None, "--save-vis", help="Write a video with the patches drawn (.mp4)."),
    threads: int = typer.Option(None, "--threads", help="CPU threads per engine (default: onnxruntime's)."),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="PyTorch checkpoint (for --engine torch)."),
    batch: int = typer.Option(1, "--batch", help="Videos in flight at once, their engine calls batched per stage "
                              "(results then come in the order videos finish)."),
    chunk: str = typer.Option("auto", "--chunk", help="Focus steps per backbone call: N, or auto (planned per "
                              "step from this device's profile; without one 1 on the CPU, all steps on a GPU); "
                              "a hard --budget or a deadline cuts a chunk to the steps that fit."),
    stream: bool = typer.Option(False, "--stream", help="Treat the video files as live streams, replayed at their "
                                "own frame rate (a result per window)."),
    window: float = typer.Option(None, "--window", help="Live streams: seconds of stream a result looks at "
                                 "(default: the model's clip)."),
    stride: float = typer.Option(None, "--stride", help="Live streams: seconds between results (default: the window)."),
    reconnect: int = typer.Option(3, "--reconnect", help="Live streams: reconnect tries with backoff (0: give up)."),
    timeout: float = typer.Option(10.0, "--timeout", help="Live streams: open and read timeout in seconds."),
    clock: str = typer.Option("pts", "--clock", help="Live streams: cut windows by presentation timestamps (pts) "
                              "or arrival (receive)."),
    reuse: bool = typer.Option(True, "--reuse/--no-reuse", help="Live streams: glance each frame once across "
                               "overlapping windows (base family)."),
    explain: bool = typer.Option(False, "--explain", help="Print the plan: the profile used, the chunks chosen "
                                 "and the predicted time per step."),
    includes_decode: bool = typer.Option(False, "--deadline-includes-decode", help="A time budget (--budget "
                                         "25ms) counts the video's decode too."),
    views: int = typer.Option(1, "--views", help="Crops of every frame, logits averaged per exit: 1, or 3 (left, "
                              "right, centre, as upstream's X3D test; the cost counts every view)."),
):
    """Run videos through a bundle: glance, policy, patches, early exit under the budget."""
    from adafocus.runtime.pipeline import Pipeline, expand_videos
    from adafocus.runtime.stream import is_stream_source, run_streams

    _shared_threads(threads)
    bundle = model or _default_bundle()
    live = stream or any(is_stream_source(v) for v in videos or [])
    if live:
        if save_vis is not None or batch != 1 or views != 1:
            raise ConfigError("--save-vis, --batch and --views are for video files, not live streams")
        paths = list(videos or [])
    else:
        paths = expand_videos(videos) if videos else _default_videos()  # VideoError for a dir or glob without video
    with Pipeline.from_bundle(bundle, engine=engine, device=device, threads=threads,
                              checkpoint=checkpoint, chunk=chunk, views=views) as pipe:
        plan = pipe.budget(budget, average, includes_decode)  # a bad or too small budget fails here
        pipe.keep_decoded = save_vis is not None
        if not as_json:
            shown = f" | {pipe.views} views" if pipe.views > 1 else ""
            typer.echo(f"bundle {bundle} | engine {pipe.engine_name} on {pipe.device}{shown} | {_budget_line(plan)}",
                       err=True)
            cost = pipe.cost_model(required=False)
            if cost is not None:
                typer.echo(f"profile {cost.profile.describe()}", err=True)
        if explain:
            _explain(pipe, plan)
        if live:
            return run_streams(pipe, paths, plan, window=window, stride=stride, reconnect=reconnect,
                               timeout=timeout, replay=stream, topk=topk, as_json=as_json, clock=clock, reuse=reuse)
        results, failures = _run_videos(pipe, paths, plan, topk, as_json, save_vis, batch)
    if not as_json:
        _print_table(results)
    for path, err in failures:
        typer.echo(f"error: {path}: {err}" if str(path) not in str(err) else f"error: {err}", err=True)
    return 1 if failures else 0


def _budget_line(plan) -> str:
    kind = "on average" if plan.average else "per video"
    calibrated = (f", thresholds calibrated for {plan.calibrated_ms:.4g} ms" if plan.calibrated_ms is not None else
                  f", thresholds calibrated for {plan.calibrated_for:.4g} GFLOPs" if plan.thresholds else
                  ", no calibrated thresholds: no early exit")
    if plan.ms is not None:
        what = f"{plan.ms:.4g} ms on average" if plan.average else f"a deadline of {plan.ms:.4g} ms per video"
        decode = ", decode included" if plan.includes_decode else ""
        return f"budget {what}{decode} (<= {plan.max_steps} focus steps{calibrated})"
    return f"budget {plan.gflops:.4g} GFLOPs {kind} (<= {plan.max_steps} focus steps{calibrated})"


def _explain(pipe, plan) -> None:
    from adafocus.runtime.plan import explain, fixed_plan

    cost = pipe.cost_model(required=False)
    if cost is None:
        typer.echo(f"plan: no profile for {pipe.engine_name} {pipe.precision} on {pipe.device} (threads "
                   f"{pipe.threads or 'default'}): fixed chunk {pipe.chunk}; `adafocus profile` measures one", err=True)
        return
    chosen = pipe.plan(plan) or fixed_plan(cost, pipe.chunk, list(plan.exit_fractions or []) or None)
    if not pipe.chunk_auto:
        typer.echo(f"plan: --chunk {pipe.chunk} fixed (auto would plan the chunks from the profile)", err=True)
    for line in explain(chosen, cost, plan):
        typer.echo(line, err=True)


def _default_videos() -> list[str]:
    from adafocus.demo.shipped import sample_videos

    return [str(p) for p in sample_videos()]


def _run_videos(pipe, paths, plan, topk, as_json, save_vis, batch=1):
    from rich.progress import Progress

    from adafocus.runtime.visualize import save_visualization

    results, failures = [], []
    show = len(paths) > 1 and not as_json
    with Progress(transient=True, disable=not show) as progress:
        task = progress.add_task("videos", total=len(paths))
        for path, res in pipe.run_many(paths, plan, topk=topk, batch=batch):
            progress.advance(task)
            if isinstance(res, Exception):
                failures.append((path, res))
                continue
            results.append(res)
            if as_json:
                typer.echo(json.dumps(res.to_dict()))
            if save_vis is not None:
                out = save_vis if len(paths) == 1 else save_vis.with_name(f"{save_vis.stem}_{Path(path).stem}.mp4")
                save_visualization(res, res.decoded, out)
                res.decoded = None
                if not as_json:
                    typer.echo(f"wrote {out}", err=True)
    return results, failures


def _print_table(results) -> None:
    from rich.console import Console
    from rich.table import Table

    if not results:
        return
    table = Table(box=None)
    for col in ("video", "label", "score", "exit", "GFLOPs", "budget", "ms"):
        table.add_column(col, justify="left" if col in ("video", "label") else "right")
    for r in results:
        table.add_row(Path(r.video).name, r.label, f"{r.score:.3f}", f"{r.exit_step} ({r.exit_reason})",
                      f"{r.gflops:.4g}", f"{r.budget_ms:g} ms" if r.budget_ms is not None else f"{r.budget_gflops:.4g}",
                      f"{r.timings_ms['total']:.1f}")
    Console(width=120).print(table)


def _register_scale_out() -> None:
    from adafocus.scale.cli import register

    register(app)


_register_scale_out()


# ------------------------------------------------------------------------------------- entry points
def _click():
    try:  # recent typer vendors click as typer._click
        from typer import _click as click

        click.exceptions.ClickException  # noqa: B018
        return click
    except (ImportError, AttributeError):
        import click

        return click


def _run(typer_app: typer.Typer, argv: list[str] | None = None) -> int:
    click = _click()
    try:
        rv = typer_app(args=argv, standalone_mode=False, prog_name=Path(sys.argv[0]).name)
        return rv if isinstance(rv, int) else 0
    except (typer.Exit, getattr(click.exceptions, "Exit", typer.Exit)) as exc:
        return getattr(exc, "exit_code", 0)
    except (typer.Abort, getattr(click.exceptions, "Abort", typer.Abort)):
        typer.echo("aborted", err=True)
        return 130
    except click.exceptions.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except (AdaFocusError, OSError) as exc:  # only typed errors are the user's; anything else is a bug
        if _VERBOSE["on"]:
            raise
        typer.echo(f"error: {_one_line(exc)}", err=True)
        return 1
    except Exception as exc:  # noqa: BLE001 - last resort: never a bare traceback for users
        if _VERBOSE["on"]:
            raise
        typer.echo(f"error: internal error {type(exc).__name__}: {_one_line(exc)} (rerun with --verbose)",
                   err=True)
        return 1


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if "\n" not in text else text  # multi-line blocks (key mismatches) are kept whole


def _single(command_name: str) -> typer.Typer:
    """A one-command app that runs `adafocus <command_name>` directly (adafocus-export, adafocus-run)."""
    sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    for info in app.registered_commands:
        if info.name == command_name:
            sub.command(command_name, help=info.help)(info.callback)
            return sub
    raise RuntimeError(f"no command {command_name}")


def main(argv: list[str] | None = None) -> None:
    sys.exit(_run(app, argv))


def export_main(argv: list[str] | None = None) -> None:
    sys.exit(_run(_single("export"), argv))


def run_main(argv: list[str] | None = None) -> None:
    sys.exit(_run(_single("run"), argv))


if __name__ == "__main__":  # pragma: no cover
    main()

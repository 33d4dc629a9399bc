"""Latency and throughput measurement: the adaptive pipeline and the dense baseline, in the same run.

For each engine (and each precision the bundle holds) this module

1. opens the pipeline and the bundle's ``dense.onnx`` with the same engine, device and threads;
2. warms up: every budget and the dense baseline on the videos, round robin, for ``warmup_s`` seconds (at
   least one video each), so that first-call costs (allocations, kernel selection) stay out of the numbers;
3. times ``repeats`` passes over the videos, **interleaved per video** (the adaptive model at every budget,
   then the dense baseline, then the next video), so that load from other processes on a shared machine
   hits both alike;
4. optionally (``batch``) measures throughput: videos/s of :class:`~adafocus.bench.batched.BatchedRunner`
   against the batch size, the dense baseline batched the same way, decode overlapped with compute.

What is measured, per video (milliseconds; percentiles over videos x repeats):

- ``decode`` (sampled frames, OpenCV), ``preprocess`` (resize, crop, normalise), ``upload`` (GPU only),
  ``crop`` (patch crops) come from the pipeline's own timers;
- ``glance``, ``policy``, ``local`` (backbone + head) are the engines' own timers (the wall time of their ``run``
  calls), read as differences of ``Engine.total_ms`` around the video; ``local_step`` = ``local`` / head calls;
- ``overhead`` (orchestration) = total - decode - preprocess - upload - engines - crop: the Python between
  the engines (focus-frame choice, boxes, exit checks, result assembly);
- ``total`` (end to end, with decode) and ``model`` = total - decode (what differs between the adaptive model
  and the dense baseline: both decode the same candidate frames).

The benchmark's own bookkeeping (reading counters, storing samples) happens outside these intervals.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adafocus.bundle import STAGES
from adafocus.device import require_device
from adafocus.errors import AdaFocusError
from adafocus.runtime.budget import parse_ms

ENGINE_STAGES = STAGES  # the bundle's stages, in run order
STAGE_ORDER = ("decode", "preprocess", "upload", "glance", "policy", "crop", "local", "local_step", "dense",
               "overhead", "model", "total")
DEFAULT_ENGINES = {"cpu": ("ort", "torch"), "cuda": ("ort-cuda", "ort-tensorrt", "tensorrt", "torch")}
Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------- settings
@dataclass
class BenchConfig:
    """What to benchmark and how (the CLI's options; every field has a usable default but ``bundle``).

    ``engines``: names, or None for every engine this device kind knows (unavailable ones are reported).
    ``budgets``: budget strings as ``adafocus run --budget`` takes them ('33%' = a third of the dense cost,
    'full' = every step). ``batch``: largest batch of the throughput mode (0: no throughput mode); it is
    measured at 1, 2, 4, ... up to ``batch``. ``labels``: video path -> true class name, for accuracy.
    """

    bundle: str | Path
    videos: list[str] = field(default_factory=list)
    labels: dict[str, str] | None = None
    engines: list[str] | None = None
    device: str = "cpu"
    budgets: list[str] = field(default_factory=lambda: ["33%", "full"])
    batch: int = 0
    warmup_s: float = 2.0
    repeats: int = 3
    threads: int | None = None
    checkpoint: str | Path | None = None  # PyTorch checkpoint for the torch engine
    dense: bool = True
    dense_checkpoint: str | Path | None = None  # dense baseline checkpoint: the torch engine's dense row
    cuda_graphs: bool = True  # the torch engine on cuda replays CUDA graphs (False: eager PyTorch)
    decode_workers: int | None = None  # throughput mode's decode threads (None: a quarter of the CPUs, 1..8)
    chunk: int | str | None = None  # focus steps per backbone call (None/'auto': the runtime's choice)

    def workers(self) -> int:
        """Decode threads of the throughput mode: on a small CPU, more threads only steal the engines' cores."""
        if self.decode_workers:
            return max(1, int(self.decode_workers))
        return max(1, min(8, (os.cpu_count() or 2) // 4))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bundle"] = str(self.bundle)
        d["checkpoint"] = None if self.checkpoint is None else str(self.checkpoint)
        d["dense_checkpoint"] = None if self.dense_checkpoint is None else str(self.dense_checkpoint)
        d["labels"] = None if self.labels is None else len(self.labels)
        d["videos"] = len(self.videos)
        d["decode_workers"] = self.workers()
        return d


# ------------------------------------------------------------------------------------------- results
@dataclass
class Stats:
    """Percentiles of one timing (ms) over the samples."""

    p50: float
    p90: float
    p99: float
    mean: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        a = np.asarray(values, np.float64)
        if a.size == 0:
            return cls(0.0, 0.0, 0.0, 0.0, 0)
        p50, p90, p99 = (float(x) for x in np.percentile(a, [50, 90, 99]))
        return cls(round(p50, 4), round(p90, 4), round(p99, 4), round(float(a.mean()), 4), int(a.size))


@dataclass
class BenchRow:
    """One line of the table: one model (adaptive at one budget, or dense) on one engine and precision.

    ``status``: ``ok``, ``unavailable`` (engine not installed / no device), ``skipped`` (e.g. no dense file),
    or ``failed``; ``reason`` says why when not ok. ``ms_e2e`` / ``ms_model``: mean ms per video with and
    without decode; ``ms_compute``: without decode and preprocessing (the networks, crops and the Python
    between them: what the GFLOPs count speaks about). ``speedup_*`` = dense ms / this row's ms (the dense
    row measured with it, same engine; ``dense_precision`` names the dense file's precision, which an int8
    adaptive row is compared against); ``gflops_ratio`` = dense GFLOPs / this row's mean GFLOPs;
    ``efficiency`` = speedup_model / gflops_ratio.
    """

    engine: str
    precision: str
    model: str  # "adafocus" or "dense"
    budget: str | None = None
    budget_gflops: float | None = None
    status: str = "ok"
    reason: str = ""
    videos: int = 0
    samples: int = 0
    accuracy: float | None = None
    gflops: float | None = None
    mean_exit_step: float | None = None
    ms_e2e: float | None = None
    ms_model: float | None = None
    ms_compute: float | None = None
    videos_per_s: float | None = None
    speedup_e2e: float | None = None
    speedup_model: float | None = None
    speedup_compute: float | None = None
    gflops_ratio: float | None = None
    efficiency: float | None = None
    overhead_pct: float | None = None
    stages: dict[str, Stats] = field(default_factory=dict)
    peak_rss_mb: float | None = None
    gpu_memory_mb: float | None = None
    dense_precision: str | None = None
    # with a device profile: the mean predicted model ms of what the videos ran, against ms_model; with a
    # time budget also the p95 model ms over the budget and, of the videos the deadline stopped, how many and
    # the least share of the budget one used
    budget_ms: float | None = None
    predicted_ms: float | None = None
    p95_over_budget: float | None = None
    deadline_stops: int | None = None
    deadline_min_used: float | None = None
    over_budget: int | None = None  # samples whose model time passed 1.1x the time budget
    over_in_glance: int | None = None  # of those, how many had passed the budget already in the glance
    labels: dict[str, str] = field(default_factory=dict, repr=False)  # video -> predicted label (first repeat)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("labels")
        return d


@dataclass
class ThroughputRow:
    """Videos/s of one model at one batch size (throughput mode), decode overlapped."""

    engine: str
    precision: str
    model: str
    budget: str | None
    batch: int
    status: str = "ok"
    reason: str = ""
    videos: int = 0
    wall_s: float | None = None
    videos_per_s: float | None = None
    mean_batch: float | None = None  # videos per local (or dense) engine call actually achieved
    batch_stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------ memory
def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """Peak resident set size (MB) since the last :func:`reset_peak_rss` (``VmHWM``), None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    try:  # other unixes: the process-lifetime peak
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0), 1)
    except (ImportError, OSError):
        return None


def gpu_memory_mb(pid: int | None = None) -> float | None:
    """GPU memory held by this process (MB) as ``nvidia-smi`` reports it; None without nvidia-smi/GPU.

    CUDA allocators keep what they took, so read after a run this is close to the run's peak.
    """
    import shutil

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    pid = pid or os.getpid()
    total = None
    for line in out.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) == pid:
            try:
                total = (total or 0.0) + float(parts[1])
            except ValueError:
                continue
    return total


# --------------------------------------------------------------------------------------- one sample
def time_adafocus(pipe, path: str, budget) -> tuple[dict[str, float], Any]:
    """Run one video through the pipeline; its per-stage times (ms) and the result."""
    engines = [pipe.engines[s] for s in ENGINE_STAGES]
    before = [(e.total_ms, e.calls) for e in engines]
    res = pipe(path, budget)
    after = [(e.total_ms, e.calls) for e in engines]
    t = res.timings_ms
    eng = {s: a[0] - b[0] for s, a, b in zip(ENGINE_STAGES, after, before, strict=True)}
    steps = after[3][1] - before[3][1]  # head calls: one per focus step
    sample = {
        "decode": t.get("decode", 0.0), "preprocess": t.get("preprocess", 0.0), "upload": t.get("upload", 0.0),
        "glance": eng["global"], "policy": eng["policy"], "crop": t.get("crop", 0.0),
        "local": eng["backbone"] + eng["head"],
        "total": t["total"],
    }
    if steps:
        sample["local_step"] = sample["local"] / steps
    sample["overhead"] = max(0.0, sample["total"] - sample["decode"] - sample["preprocess"] - sample["upload"]
                             - sum(eng.values()) - sample["crop"])
    sample["model"] = sample["total"] - sample["decode"]
    return sample, res


def time_dense(pipe, engine, path: str) -> tuple[dict[str, float], str]:
    """Run one video through the dense baseline (same decode and preprocessing); times (ms) and label."""
    start = time.perf_counter()
    decoded = pipe.decode_dense(path)
    t_decode = time.perf_counter()
    frames = pipe.preprocess(decoded.frames)
    t_pre = time.perf_counter()
    out = engine.run({"frames": frames[None]})
    logits = out["logits"]
    logits = logits if isinstance(logits, np.ndarray) else np.asarray(logits)
    label = pipe.labels[int(np.argmax(logits[0]))]
    end = time.perf_counter()
    sample = {"decode": (t_decode - start) * 1e3, "preprocess": (t_pre - t_decode) * 1e3, "dense": engine.last_ms,
              "total": (end - start) * 1e3}
    sample["overhead"] = max(0.0, sample["total"] - sample["decode"] - sample["preprocess"] - sample["dense"])
    sample["model"] = sample["total"] - sample["decode"]
    return sample, label


# --------------------------------------------------------------------------------------- the bench
@dataclass
class _Model:
    """One measured model within an engine/precision: how to run a video, and what came out."""

    name: str  # "adafocus" or "dense"
    budget_text: str | None
    run: Callable[[str], tuple[dict[str, float], Any]]
    budget_gflops: float | None = None
    samples: list[dict[str, float]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    gflops: list[float] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    peak: float | None = None
    budget_ms: float | None = None
    predicted: list[float] = field(default_factory=list)
    deadline_used: list[float] = field(default_factory=list)  # model ms / budget of the videos stopped by it


def engine_list(config: BenchConfig) -> list[str]:
    """The engines to try: the configured ones, or every one this device kind knows."""
    from adafocus.engines.base import parse_device
    from adafocus.engines.registry import get_engine_class

    kind, _ = parse_device(config.device)
    names = list(config.engines) if config.engines else list(DEFAULT_ENGINES[kind])
    out = []
    for name in names:
        if name == "auto":
            from adafocus.engines.registry import resolve_engine

            name = resolve_engine("auto", config.device)
        get_engine_class(name)  # an unknown name is a user error, with a suggestion
        if name not in out:
            out.append(name)
    return out


def bundle_precisions(manifest) -> list[str]:
    """The precisions a bundle holds: its main one, then any others recorded under ``precisions``."""
    out = [manifest.precision]
    extra = getattr(manifest, "precisions", None) or {}
    out += [p for p in extra if p not in out]
    return out


def open_pipeline(config: BenchConfig, engine: str, precision: str, main_precision: str):
    """A pipeline of ``engine`` at ``precision`` (the bundle's own, or an extra one where supported)."""
    from adafocus.runtime.pipeline import Pipeline

    kwargs: dict[str, Any] = {"engine": engine, "device": config.device, "threads": config.threads,
                              "chunk": config.chunk}
    if engine == "torch":
        kwargs["checkpoint"] = config.checkpoint
        kwargs["cuda_graphs"] = config.cuda_graphs
    if precision != main_precision:
        if "precision" not in inspect.signature(Pipeline.from_bundle).parameters:
            raise _Skip(f"this adafocus cannot load the {precision} files of the bundle")
        kwargs["precision"] = precision
    return Pipeline.from_bundle(config.bundle, **kwargs)


def open_dense(pipe, config: BenchConfig, engine: str, precision: str):
    """The dense baseline on ``engine``; raises _Skip with the reason when this engine has none."""
    from adafocus.runtime.engine_set import open_engines

    bundle = pipe.bundle
    if engine == "torch":
        if config.dense_checkpoint is None:
            raise _Skip("no dense baseline for the torch engine without --dense-checkpoint "
                        "(the adafocus train --dense checkpoint)")
        return open_engines(bundle, "torch", config.device, stages=("dense",), checkpoint=config.dense_checkpoint,
                            cuda_graphs=config.cuda_graphs)[1]["dense"]
    if not bundle.has_stage("dense"):
        raise _Skip("the bundle has no dense baseline (adafocus add-dense BUNDLE adds one)")
    if not engine.startswith("ort"):
        raise _Skip(f"no dense baseline for the {engine} engine (dense.onnx runs on the ort engines)")
    return open_engines(bundle, engine, config.device, stages=("dense",), threads=config.threads)[1]["dense"]


def check_torch_checkpoints(config: BenchConfig, bundle) -> None:
    """The torch engine's checkpoints must be the ones the bundle was made from (weights digest, or without
    one the model config; the dense checkpoint the one ``add_dense`` recorded, or at least one that fits):
    a wrong one is a CheckpointError before anything is measured, not a row of another model's timings."""
    if config.checkpoint is None:  # the torch rows are skipped, and the dense checkpoint is never used
        return
    from adafocus.models import load
    from adafocus.models.checkpoint import check_source

    m = bundle.manifest
    check_source(load(config.checkpoint), config.checkpoint, m.source, m.config, str(bundle.path))
    if config.dense and config.dense_checkpoint is not None:
        from adafocus.export.dense import check_dense_source
        from adafocus.models.dense import load_dense

        check_dense_source(load_dense(config.dense_checkpoint), config.dense_checkpoint, m, str(bundle.path))


class _Skip(Exception):
    """A model or engine that cannot be measured here, for a reason the table shows (not an error)."""


def run_benchmark(config: BenchConfig, log: Log | None = print) -> dict[str, Any]:
    """Measure every engine/precision/budget of ``config`` and the dense baseline; the report as a dict.

    The dict is what :func:`adafocus.bench.report.save_json` writes: ``environment``, ``bundle``,
    ``settings``, ``results`` (:class:`BenchRow` dicts), ``throughput`` (:class:`ThroughputRow` dicts).
    """
    from adafocus.bench.env import environment
    from adafocus.bundle import load_bundle, now_iso
    from adafocus.engines.registry import available_engines

    say = log or (lambda _line: None)
    if not config.videos:
        raise AdaFocusError("no videos to benchmark")
    config = dataclasses.replace(config, device=str(require_device(config.device)))  # "CPU" -> "cpu", once
    if config.repeats < 1:
        raise AdaFocusError(f"repeats must be >= 1, got {config.repeats}")
    check_videos(config.videos)
    bundle = load_bundle(config.bundle, verify=True)
    m = bundle.manifest
    for text in config.budgets:  # a malformed or too small budget fails here, before anything is measured
        if parse_ms(text) is None:  # a time budget is checked against the profile when the pipeline opens
            budget_gflops(m, text)
    if config.labels:  # labels of another class list would give 0% accuracy without a word
        unknown = sorted(set(config.labels.values()) - set(m.labels))
        if unknown:
            from adafocus.errors import DataError

            raise DataError(f"labels not among the bundle's {len(m.labels)} classes: {', '.join(unknown[:5])}"
                            + (" ..." if len(unknown) > 5 else ""))
    names = engine_list(config)
    avail = available_engines(config.device)
    if "torch" in names and avail.get("torch") is None:
        check_torch_checkpoints(config, bundle)
    rows: list[BenchRow] = []
    throughput: list[ThroughputRow] = []
    for engine in names:
        for precision in bundle_precisions(m):
            reason, status = avail.get(engine), "unavailable"
            if reason is None and engine == "torch" and config.checkpoint is None:
                reason, status = "needs the PyTorch checkpoint (--checkpoint)", "skipped"
            if reason is not None:
                say(f"{engine:<13} {precision:<5} {status}: {reason}")
                rows.append(BenchRow(engine, precision, "adafocus", status=status, reason=reason))
                continue
            say(f"{engine:<13} {precision:<5} measuring ...")
            try:
                rows_e, tp = _bench_engine(config, engine, precision, m.precision, say)
            except _Skip as exc:
                rows_e, tp = [BenchRow(engine, precision, "adafocus", status="skipped", reason=str(exc))], []
            except (AdaFocusError, OSError, RuntimeError, ValueError) as exc:
                text = " ".join(str(exc).split()) or type(exc).__name__
                rows_e, tp = [BenchRow(engine, precision, "adafocus", status="failed", reason=text)], []
            for r in rows_e:
                if r.status != "ok":
                    say(f"{engine:<13} {precision:<5} {r.model} {r.status}: {r.reason}")
            rows += rows_e
            throughput += tp
    dense_info = m.verification.get("dense", {}) if isinstance(m.verification, dict) else {}
    return {
        "format": "adafocus-bench",
        "version": 1,
        "created": now_iso(),
        "environment": environment(config.threads),
        "bundle": {"path": str(bundle.path), "preset": m.preset, "family": m.family, "precision": m.precision,
                   "precisions": bundle_precisions(m), "labels": len(m.labels), "exits_gflops": list(m.costs.exits),
                   "dense_gflops": _dense_gflops(m), "dense_source": dense_info.get("source"),
                   "dense_random_init": dense_info.get("random_init"),
                   "calibrated_budgets": list(m.exit.thresholds)},
        "settings": config.to_dict(),
        "definitions": DEFINITIONS,
        "results": [r.to_dict() for r in rows],
        "throughput": [t.to_dict() for t in throughput],
    }


DEFINITIONS = {
    "ms_e2e": "mean ms per video, end to end: decode + preprocess + engines + crop + orchestration",
    "ms_model": "mean ms per video without decode (the adaptive model and the dense baseline decode the same "
                "candidate frames)",
    "ms_compute": "mean ms per video without decode and preprocessing (both preprocess the same frames): "
                  "engines + crop + orchestration",
    "videos_per_s": "1000 / ms_e2e: one video at a time, decode not overlapped (see throughput for batches)",
    "overhead": "orchestration = total - decode - preprocess - upload - engine calls - crop; overhead_pct is "
                "its share of ms_model",
    "speedup": "dense ms / adafocus ms on the same engine and precision, measured in the same run, "
               "interleaved per video",
    "gflops_ratio": "dense GFLOPs / mean GFLOPs the adaptive model spent per video",
    "efficiency": "speedup_model / gflops_ratio (1.0: every FLOP saved is time saved)",
    "stages": "per-video ms, percentiles over videos x repeats; local_step = local engine ms per step",
    "peak_rss_mb": "peak resident memory of the process while this model ran (every model of this engine "
                   "loaded)",
}


def check_videos(paths: list[str]) -> None:
    """Every video must open (header only): a bad file fails the run before anything is measured, instead of
    failing every engine in turn."""
    from adafocus.errors import VideoError
    from adafocus.runtime.decode import probe

    bad = []
    for path in paths:
        try:
            probe(path)
        except VideoError as exc:
            bad.append(str(exc))
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise VideoError(f"cannot benchmark {len(bad)} of {len(paths)} videos: {'; '.join(bad[:3])}{more}")


def budget_gflops(manifest, text: str | None) -> float:
    """A budget string -> GFLOPs per video, as ``adafocus run --budget`` reads it, with one addition: a
    percentage is of the dense baseline's cost whenever the bundle has one (``costs.dense``, or the GFLOPs of
    its dense stage), so that '33%' means a third of the dense GFLOPs. BudgetError when malformed or too small.
    """
    from adafocus.runtime.budget import parse_budget

    full = text is None or str(text).strip().lower() in ("", "full", "max")
    return parse_budget(None if full else str(text), list(manifest.costs.exits), _dense_gflops(manifest))


def _dense_gflops(manifest) -> float | None:
    value = getattr(manifest.costs, "dense", None)
    if value:
        return float(value)
    stage = manifest.stages.get("dense")
    return float(stage.gflops) if stage is not None else None


def _bench_engine(config: BenchConfig, engine: str, precision: str, main_precision: str, say: Log
                  ) -> tuple[list[BenchRow], list[ThroughputRow]]:
    rows: list[BenchRow] = []
    pipe = open_pipeline(config, engine, precision, main_precision)
    dense_engine = None
    try:
        models: list[_Model] = []
        pipe.cost_model(required=False)  # with this device's profile, rows predict their ms too
        for text in config.budgets:
            budget = pipe.budget(text if parse_ms(text) is not None else budget_gflops(pipe.manifest, text))
            models.append(_Model("adafocus", text, lambda path, b=budget: _adafocus_sample(pipe, path, b),
                                 budget.gflops, budget_ms=budget.ms))
        dense_reason = None
        if config.dense:
            try:
                dense_engine = open_dense(pipe, config, engine, precision)
                models.append(_Model("dense", None, lambda path: time_dense(pipe, dense_engine, path)))
            except _Skip as exc:
                dense_reason = str(exc)
        _warm_up(models, config.videos, config.warmup_s)
        for model in models:
            model.peak = None
        for _ in range(config.repeats):
            for path in config.videos:
                for model in models:
                    reset_peak_rss()
                    sample, out = model.run(path)
                    peak = peak_rss_mb()
                    model.peak = max(model.peak or 0.0, peak or 0.0) or None
                    model.samples.append(sample)
                    if model.name == "adafocus":
                        model.labels.setdefault(path, out.label)
                        model.gflops.append(out.gflops)
                        model.exits.append(out.exit_step)
                        if out.predicted_ms is not None:
                            model.predicted.append(out.predicted_ms)
                        if out.exit_reason == "deadline":
                            model.deadline_used.append(sample["model"] / model.budget_ms)
                    else:
                        model.labels.setdefault(path, out)
        gpu_mb = gpu_memory_mb() if config.device != "cpu" else None
        dense_row = None
        for model in models:
            row = _row(model, engine, precision, config, pipe, gpu_mb)
            if model.name == "dense":
                dense_row = row
            rows.append(row)
        if dense_reason is not None:
            rows.append(BenchRow(engine, precision, "dense", status="skipped", reason=dense_reason))
        if dense_row is not None:
            dense_row.dense_precision = _dense_precision(pipe.manifest)
            for row in rows:
                if row.model == "adafocus" and row.status == "ok":
                    _compare(row, dense_row)
                    row.dense_precision = dense_row.dense_precision
        for row in rows:
            if row.status == "ok":
                say(_summary(row))
        throughput = _throughput(config, engine, precision, pipe, dense_engine, say) if config.batch else []
    finally:
        pipe.close()
        if dense_engine is not None:
            dense_engine.close()
    return rows, throughput


def _adafocus_sample(pipe, path: str, budget) -> tuple[dict[str, float], Any]:
    return time_adafocus(pipe, path, budget)


def _warm_up(models: list[_Model], videos: list[str], seconds: float) -> None:
    """Round robin over models x videos: at least one video per model, then until ``seconds`` have passed."""
    start = time.perf_counter()
    i = 0
    while i == 0 or time.perf_counter() - start < seconds:
        path = videos[i % len(videos)]
        for model in models:
            model.run(path)
        i += 1


def _row(model: _Model, engine: str, precision: str, config: BenchConfig, pipe, gpu_mb) -> BenchRow:
    keys = [k for k in STAGE_ORDER if any(k in s for s in model.samples)]
    stages = {k: Stats.of([s[k] for s in model.samples if k in s]) for k in keys}
    e2e = stages["total"].mean
    ms_model = stages["model"].mean
    row = BenchRow(engine, precision, model.name, budget=model.budget_text, budget_gflops=model.budget_gflops,
                   videos=len(config.videos), samples=len(model.samples), ms_e2e=round(e2e, 3),
                   ms_model=round(ms_model, 3), videos_per_s=round(1000.0 / e2e, 3) if e2e > 0 else None,
                   stages=stages, peak_rss_mb=model.peak, gpu_memory_mb=gpu_mb, labels=dict(model.labels))
    row.ms_compute = round(ms_model - stages["preprocess"].mean, 3)
    if ms_model > 0:
        row.overhead_pct = round(100.0 * stages["overhead"].mean / ms_model, 3)
    if model.name == "adafocus":
        row.gflops = round(statistics.fmean(model.gflops), 6)
        row.mean_exit_step = round(statistics.fmean(model.exits), 3)
        if model.predicted:
            row.predicted_ms = round(statistics.fmean(model.predicted), 3)
        if model.budget_ms is not None:
            row.budget_ms = model.budget_ms
            p95 = float(np.percentile([s["model"] for s in model.samples], 95))
            row.p95_over_budget = round(p95 / model.budget_ms, 4)
            row.deadline_stops = len(model.deadline_used)
            over = [s for s in model.samples if s["model"] > 1.1 * model.budget_ms]
            row.over_budget = len(over)
            row.over_in_glance = sum(s["preprocess"] + s["upload"] + s["glance"] > model.budget_ms for s in over)
            row.deadline_min_used = round(min(model.deadline_used), 4) if model.deadline_used else None
    else:
        row.gflops = _dense_gflops(pipe.manifest)
    if config.labels:
        truth = {os.path.abspath(k): v for k, v in config.labels.items()}
        known = [p for p in model.labels if os.path.abspath(p) in truth]
        if known and not (model.name == "dense" and _dense_is_random(pipe.manifest)):
            hits = sum(model.labels[p] == truth[os.path.abspath(p)] for p in known)
            row.accuracy = round(hits / len(known), 4)
    return row


def _dense_precision(manifest) -> str:
    info = manifest.verification.get("dense", {}) if isinstance(manifest.verification, dict) else {}
    return str(info.get("precision") or manifest.precision)


def _dense_is_random(manifest) -> bool:
    info = manifest.verification.get("dense", {}) if isinstance(manifest.verification, dict) else {}
    return bool(info.get("random_init"))


def _compare(row: BenchRow, dense: BenchRow) -> None:
    if dense.ms_e2e and row.ms_e2e:
        row.speedup_e2e = round(dense.ms_e2e / row.ms_e2e, 3)
    if dense.ms_model and row.ms_model:
        row.speedup_model = round(dense.ms_model / row.ms_model, 3)
    if dense.ms_compute and row.ms_compute:
        row.speedup_compute = round(dense.ms_compute / row.ms_compute, 3)
    if dense.gflops and row.gflops:
        row.gflops_ratio = round(dense.gflops / row.gflops, 3)
    if row.speedup_model and row.gflops_ratio:
        row.efficiency = round(row.speedup_model / row.gflops_ratio, 3)


def _summary(row: BenchRow) -> str:
    what = "dense" if row.model == "dense" else f"adafocus @ {row.budget}"
    text = (f"  {what:<18} {row.ms_e2e:8.2f} ms/video e2e, {row.ms_model:8.2f} model-only, "
            f"{row.gflops or 0:.4g} GFLOPs, overhead {row.overhead_pct or 0:.1f}%")
    if row.predicted_ms is not None:
        text += f", predicted {row.predicted_ms:.2f} ms"
    if row.budget_ms is not None:
        text += (f", p95/budget {row.p95_over_budget:.2f} ({row.over_budget} over 1.1x, {row.over_in_glance} of "
                 f"them past it in the glance), {row.deadline_stops} stopped by the deadline"
                 + (f" (least share used {row.deadline_min_used:.0%})" if row.deadline_stops else ""))
    if row.speedup_model:
        text += (f", speedup {row.speedup_model:.2f}x (w/o preprocess {row.speedup_compute or 0:.2f}x; GFLOPs "
                 f"ratio {row.gflops_ratio or 0:.2f}x)")
    return text


def batch_sizes(largest: int) -> list[int]:
    """1, 2, 4, ... up to ``largest`` (which is always included)."""
    sizes, b = [], 1
    while b < largest:
        sizes.append(b)
        b *= 2
    return sizes + [largest]


def _throughput(config: BenchConfig, engine: str, precision: str, pipe, dense_engine, say: Log
                ) -> list[ThroughputRow]:
    """Videos/s against batch size: the adaptive model at each budget, and the dense baseline."""
    from adafocus.bench.batched import BatchedRunner, dense_batched

    out: list[ThroughputRow] = []
    # at least a few batches' worth of videos per measurement, so that filling and draining do not dominate
    for size in batch_sizes(config.batch):
        passes = max(config.repeats, -(-3 * size // len(config.videos)))
        work = list(config.videos) * passes
        for text in config.budgets:
            budget = pipe.budget(budget_gflops(pipe.manifest, text))
            runner = BatchedRunner(pipe, batch=size, workers=config.workers())
            for _ in runner.run(config.videos[:size], budget):  # warm-up at this batch size
                pass
            start = time.perf_counter()
            done = sum(1 for _, r in runner.run(work, budget) if not isinstance(r, Exception))
            wall = time.perf_counter() - start
            out.append(ThroughputRow(engine, precision, "adafocus", text, size, videos=done, wall_s=round(wall, 4),
                                     videos_per_s=round(done / wall, 3), mean_batch=round(runner.stats.mean_batch(), 3),
                                     batch_stats=runner.stats.to_dict()))
            say(f"  batch {size:<3} adafocus @ {text:<6} {done / wall:8.2f} videos/s "
                f"(mean {runner.stats.mean_batch():.2f} videos per head call)")
        if dense_engine is not None:
            workers = config.workers()
            for _ in dense_batched(dense_engine, pipe, config.videos[:size], size, workers):
                pass
            start = time.perf_counter()
            done = sum(1 for _, r in dense_batched(dense_engine, pipe, work, size, workers)
                       if not isinstance(r, Exception))
            wall = time.perf_counter() - start
            out.append(ThroughputRow(engine, precision, "dense", None, size, videos=done, wall_s=round(wall, 4),
                                     videos_per_s=round(done / wall, 3), mean_batch=float(min(size, len(work)))))
            say(f"  batch {size:<3} dense             {done / wall:8.2f} videos/s")
    return out


__all__ = [
    "DEFINITIONS", "BenchConfig", "BenchRow", "Stats", "ThroughputRow", "batch_sizes", "budget_gflops",
    "bundle_precisions", "check_videos", "engine_list", "gpu_memory_mb", "open_dense", "open_pipeline", "peak_rss_mb",
    "reset_peak_rss", "run_benchmark", "time_adafocus", "time_dense",
]

"""``export_bundle``: checkpoint -> verified bundle directory (the Python API behind ``adafocus-export``).

The bundle is written into a temporary directory next to ``out`` and renamed into place only when every
step (export, simplification, verification, manifest, engines) succeeded, so a failure never leaves a
partial bundle. Each step logs one line: name, seconds, artefact path, size.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any

import adafocus
from adafocus.bundle import (
    MANIFEST_NAME,
    STAGES,
    Costs,
    EngineRecord,
    ExitPolicy,
    Manifest,
    Preprocessing,
    StageInfo,
    checksum_files,
    load_bundle,
    now_iso,
    update_manifest,
    write_manifest,
)
from adafocus.errors import AdaFocusError, BundleError, require
from adafocus.export.onnx_export import DEFAULT_OPSET, MIN_OPSET
from adafocus.runtime.sampling import glance_positions

if TYPE_CHECKING:  # torch is imported when exporting, not for build_engines (a TensorRT box needs no torch)
    import torch.nn as nn

    from adafocus.export.verify import VerificationReport

PRECISIONS = ("fp32", "fp16")
TRACE_BATCH = 2  # traced at 2 and verified at 3, so a batch dimension baked into the graph shows up
Log = Callable[[str], None]


@dataclass
class ExportResult:
    path: Path
    manifest: Manifest
    report: VerificationReport | None
    seconds: float


def default_out(model_path: str | Path) -> Path:
    """``runs/model.pt`` -> ``runs/model_bundle``."""
    p = Path(model_path)
    return p.with_name(p.stem + "_bundle")


def export_bundle(
    model: str | Path | nn.Module,
    out: str | Path | None = None,
    *,
    preset: str | None = None,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    tensorrt: bool = False,
    workspace_mb: int | None = None,
    timing_cache: str | Path | None = None,
    force: bool = False,
    verify: bool = True,
    simplify_graphs: bool = True,
    videos: int = 4,
    seed: int = 0,
    log: Log | None = print,
) -> ExportResult:
    """Export ``model`` (a checkpoint path, or a loaded reference model) as a bundle directory.

    Args:
        model: ``model.pt`` (adafocus or official checkpoint) or an ``nn.Module`` with ``cfg``.
        out: bundle directory (default: the checkpoint's stem + ``_bundle``; required for a module).
        preset: preset name; needed for official checkpoints, checked against adafocus checkpoints.
        precision: ``fp32`` or ``fp16`` (fp16 weights and activations, float32 inputs and outputs).
        opset: ONNX opset (>= 16).
        tensorrt: also build TensorRT engines (needs the ``gpu`` extra and a GPU).
        workspace_mb, timing_cache: TensorRT builder workspace limit and timing-cache file.
        force: replace an existing bundle at ``out``.
        verify: compare every stage and whole videos against PyTorch; a mismatch raises VerificationError.
        simplify_graphs: run onnxslim when installed (verified after).
        videos, seed: random videos for the end-to-end check.
        log: where the per-step lines go (None: silent).
    """
    t_start = time.perf_counter()
    say = log or (lambda _line: None)
    # argument and --out checks first: they fail in a second, before torch is even imported
    if precision not in PRECISIONS:
        raise AdaFocusError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if opset < MIN_OPSET:
        raise AdaFocusError(f"opset {opset} is too old: the bundle needs opset >= {MIN_OPSET}")
    from_file = isinstance(model, (str, os.PathLike))
    if not from_file and out is None:
        raise AdaFocusError("out is required when exporting a model object")
    out = Path(out) if out is not None else default_out(model)
    _check_out(out, force)
    if tensorrt:
        require("tensorrt", "gpu", "building TensorRT engines")
    from adafocus.export.verify import VerificationError, verify_bundle

    tmp = _make_temp_dir(out)
    try:
        t = time.perf_counter()
        from adafocus.models.checkpoint import weights_sha256

        if not from_file:
            net, meta = model.eval(), {"preset": preset, "training": None}
            source = type(model).__name__
        else:
            from adafocus.models.checkpoint import load

            net = load(model, preset)
            meta = _checkpoint_meta(model)
            source = str(model)
        preset = preset or meta.get("preset")
        params = sum(p.numel() for p in net.parameters()) / 1e6
        say(_line("load", t, source, note=f"{preset or net.cfg.family}, {params:.1f}M params"))
        # provenance without machine paths: the checkpoint's file name and a digest of its float weights
        # (what the torch engine checks a checkpoint against)
        origin = {"checkpoint": Path(model).name} if from_file else {}
        origin["weights_sha256"] = weights_sha256(net)

        manifest = _export_stages(net, tmp, out, preset, precision, opset, simplify_graphs, say)
        manifest.source = origin
        manifest.training = without_paths(meta.get("training"))
        report = None
        if verify:
            t = time.perf_counter()
            report = verify_bundle(net, tmp, precision, videos=videos, seed=seed, manifest=manifest)
            manifest.verification.update(report.to_dict())
            status = "passed" if report.passed else "FAILED"
            worst = max((c.max_rel for c in report.stages), default=0.0)
            say(_line("verify", t, note=f"{status}: max rel err {worst:.2g}, {len(report.videos)} videos, "
                                        f"exits at {[v.exit_onnx for v in report.videos]}"))
            for row in report.format().splitlines():
                say("    " + row)
            if not report.passed:
                raise VerificationError(f"verification failed ({precision}): " + "; ".join(report.failures()))
        else:
            manifest.verification["skipped"] = True
        manifest.files = checksum_files(tmp, manifest.referenced_files())
        t = time.perf_counter()
        write_manifest(tmp, manifest)
        say(_line("manifest", t, out / MANIFEST_NAME, tmp / MANIFEST_NAME))
        if tensorrt:
            manifest = build_engines(tmp, workspace_mb=workspace_mb,
                                     timing_cache=timing_cache, log=say, display_dir=out)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(f.size for f in manifest.files.values())
    say(f"{'bundle':<16} {time.perf_counter() - t_start:6.1f}s  {out}  ({_size(total)}, {len(manifest.files)} files)")
    return ExportResult(out, manifest, report, time.perf_counter() - t_start)


# ---------------------------------------------------------------------------------------------- steps
def _export_stages(net: nn.Module, tmp: Path, out: Path, preset: str | None, precision: str, opset: int,
                   simplify_graphs: bool, say: Log) -> Manifest:
    from adafocus.export.onnx_export import export_stage, io_specs, simplify
    from adafocus.export.stages import build_stages, example_inputs
    from adafocus.models.flops import count_model_flops

    cfg = net.cfg
    t = time.perf_counter()
    flops = count_model_flops(net, preset)
    say(_line("flops", t, note=f"glance {flops.glance:.3g}, policy {flops.policy:.3g}, step {flops.step:.3g} "
                               f"GFLOPs"))
    stages = build_stages(net, precision)
    inputs = example_inputs(net, TRACE_BATCH)
    backbone = flops.parts["local encoder (per patch)"] * cfg.patches_per_step  # one call at batch 1
    gflops = {"global": flops.glance, "policy": flops.policy, "backbone": backbone, "head": flops.step - backbone}
    infos: dict[str, StageInfo] = {}
    simplified = False
    for name in STAGES:
        t = time.perf_counter()
        path = export_stage(stages[name], inputs[name], tmp / f"{name}.onnx", opset)
        say(_line(f"export {name}", t, out / path.name, path))
        if simplify_graphs:
            t = time.perf_counter()
            simplified = simplify(path)
            if simplified:
                say(_line(f"onnxslim {name}", t, out / path.name, path))
        ins, outs = io_specs(path)
        infos[name] = StageInfo(path.name, ins, outs, gflops[name])
    base = cfg.family == "base"
    pre = Preprocessing(
        resize_size=cfg.resize_size, frame_size=cfg.frame_size, glance_size=cfg.glance_size,
        mean=list(cfg.mean), std=list(cfg.std), rgb=True, num_segments=cfg.num_segments,
        num_glance=cfg.num_glance,
        glance_positions=glance_positions(cfg.num_segments, cfg.num_glance).tolist() if base else None,
        candidates=cfg.candidates, num_focus=cfg.num_focus, focus_clamp=base, patch_size=cfg.patch_size,
        crop_min=float(cfg.crop_min), crop_max=float(cfg.crop_max), patches_per_step=cfg.patches_per_step,
    )
    return Manifest(
        producer=_producer(), created=now_iso(), preset=preset, family=cfg.family, config=cfg.to_dict(),
        labels=cfg.label_names(), preprocessing=pre, stages=infos,
        costs=Costs(flops.glance, flops.policy, flops.step, list(flops.exits), flops.patches_per_step,
                    dict(flops.parts)),
        exit=ExitPolicy("max_logit", {}), opset=opset, precision=precision,
        verification={"simplified": simplified},
    )


def build_engines(bundle_dir: str | Path, *, fp16: bool | None = None, workspace_mb: int | None = None,
                  timing_cache: str | Path | None = None, batch: tuple[int, int, int] = (1, 1, 8),
                  device: int = 0, log: Log | None = print, display_dir: str | Path | None = None) -> Manifest:
    """Build one TensorRT engine per stage of a bundle and record them in its manifest.

    ``fp16`` (the FP16 builder flag) defaults to on for an fp16 bundle on TensorRT 10; TensorRT 11 has no
    such flag and takes the precision from the (fp16) graph itself. ``batch`` is the (min, opt, max)
    optimisation profile of every stage. Engine files are named
    ``<stage>.trt<version>.sm<cc>.<precision>.engine``, so that builds for several GPUs can live in one
    bundle; the manifest's engine record is keyed the same way, without the stage.
    """
    trt = require("tensorrt", "gpu", "building TensorRT engines")
    from adafocus.export.tensorrt import build_engine

    say = log or (lambda _line: None)
    bundle = load_bundle(bundle_dir, verify=True)
    shown = Path(display_dir) if display_dir is not None else bundle.path
    m = bundle.manifest
    if fp16 is None:
        fp16 = m.precision == "fp16" and int(str(trt.__version__).split(".")[0]) < 11
    kwargs = {"fp16": fp16, "timing_cache": timing_cache, "profiles": tuple(batch), "device": device}
    if workspace_mb is not None:
        kwargs["workspace_mb"] = workspace_mb
    precision = "fp16" if fp16 or m.precision == "fp16" else "fp32"
    infos: dict[str, tuple[str, str, Any]] = {}
    # engines are built into a private directory of the bundle (a build takes minutes; the bundle's own
    # files, which a rebuild of the same key would replace, stay as the manifest describes them meanwhile)
    # and installed by update_manifest under the bundle's exclusive lock; whatever fails, only this
    # directory goes, so the bundle is left as it was
    work = Path(tempfile.mkdtemp(prefix=".engines.", dir=bundle.path))
    try:
        for stage in STAGES:
            t = time.perf_counter()
            built = work / f"{stage}.engine"
            info = build_engine(bundle.stage_path(stage), built, **kwargs)
            key = f"trt{info.trt_version}.sm{info.compute_capability.replace('.', '')}.{precision}"
            name = f"{stage}.{key}.engine"
            infos[stage] = (key, name, info)
            say(_line(f"tensorrt {stage}", t, shown / name, built))
        key, _, first = infos[STAGES[0]]

        def build_details(stage: str) -> dict:
            _, name, info = infos[stage]
            # relative names: the bundle may have been built in a temporary directory and moved since; the
            # timing cache by file name only (no machine paths in a bundle)
            details = {**info.to_dict(), "engine_path": name, "onnx_path": m.stages[stage].file}
            if details.get("timing_cache"):
                details["timing_cache"] = file_name(details["timing_cache"])
            return details

        def record(manifest: Manifest) -> None:
            manifest.engines[key] = EngineRecord(
                tensorrt_version=first.trt_version, compute_capability=first.compute_capability,
                device=first.device_name, precision=precision,
                files={stage: name for stage, (_, name, _) in infos.items()},
                batch={"min": batch[0], "opt": batch[1], "max": batch[2]}, created=now_iso(),
                extra={stage: build_details(stage) for stage in infos},
            )

        return update_manifest(bundle.path, record,
                               install={name: work / f"{stage}.engine" for stage, (_, name, _) in infos.items()})
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -------------------------------------------------------------------------------------------- helpers
def _check_out(out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise BundleError(f"{out} already exists; pass --force to replace it")
        if not out.is_dir():
            raise BundleError(f"{out} exists and is not a directory; refusing to replace it")
        if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
            raise BundleError(f"{out} is not empty and not a bundle (no {MANIFEST_NAME}); --force only replaces "
                              "bundles")


def _make_temp_dir(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise BundleError(f"cannot write the bundle to {out}: {exc.strerror or exc}") from exc


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing bundle is moved aside first and removed after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _checkpoint_meta(path: str | Path) -> dict:
    """``preset`` and ``training`` of an adafocus checkpoint (memory-mapped: the tensors are not read)."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - load() already read it; this is metadata only
        return {}
    if not isinstance(ckpt, dict) or ckpt.get("format") != "adafocus":
        return {}
    return {"preset": ckpt.get("preset"), "training": ckpt.get("training")}


# directory-valued fields of a training record (adafocus train): kept as their last component only
PATH_KEYS = ("data", "init_local", "out", "cache_dir")


def without_paths(record: Any) -> Any:
    """A copy of a (training) record fit for a bundle: the values of PATH_KEYS and every absolute path
    anywhere in it reduced to their file name, so that no directory of the machine that trained the model
    ends up in the manifest."""
    if isinstance(record, dict):
        return {k: file_name(v) if k in PATH_KEYS and isinstance(v, str) and v else without_paths(v)
                for k, v in record.items()}
    if isinstance(record, (list, tuple)):
        return [without_paths(v) for v in record]
    if isinstance(record, str) and is_machine_path(record):
        return file_name(record)
    return record


def machine_paths(record: Any, where: str = "") -> list[str]:
    """``key.path: value`` of every absolute path among the string values of a (manifest) dict, so that a
    build can refuse to ship a bundle that names directories of the machine that made it."""
    if isinstance(record, dict):
        return [hit for k, v in record.items() for hit in machine_paths(v, f"{where}.{k}" if where else str(k))]
    if isinstance(record, (list, tuple)):
        return [hit for i, v in enumerate(record) for hit in machine_paths(v, f"{where}[{i}]")]
    return [f"{where}: {record}"] if isinstance(record, str) and is_machine_path(record) else []


def is_machine_path(text: str) -> bool:
    """An absolute POSIX or Windows path, or one from the home directory (``~/...``)."""
    return text.startswith(("/", "\\", "~/", "~\\")) or re.match(r"[A-Za-z]:[\\/]", text) is not None


def file_name(path: str) -> str:
    """The last component of a POSIX or Windows path (``/tmp/v2/dense.pt`` -> ``dense.pt``)."""
    return PureWindowsPath(str(path).rstrip("/\\")).name or str(path)


def _producer() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    out = {"name": "adafocus", "version": adafocus.__version__, "torch": torch.__version__,
           "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import onnxslim

        out["onnxslim"] = onnxslim.__version__
    except ImportError:
        pass
    return out


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _line(name: str, t0: float, shown: str | Path | None = None, real: str | Path | None = None,
          note: str = "") -> str:
    """``name  seconds  path  (size)  note`` (``real`` is the file to measure when it is not yet at ``shown``)."""
    parts = [f"{name:<16} {time.perf_counter() - t0:6.1f}s"]
    if shown is not None:
        parts.append(str(shown))
        f = Path(real if real is not None else shown)
        if f.is_file():
            parts.append(f"({_size(f.stat().st_size)})")
    if note:
        parts.append(note)
    return "  ".join(parts)


__all__ = ["PRECISIONS", "ExportResult", "build_engines", "default_out", "export_bundle", "file_name",
           "is_machine_path", "machine_paths", "without_paths"]

"""One factory for a bundle's stage engines: the pipeline, the INT8 gate, the exporter's verification, the
benchmark's and calibration's dense baseline all open stages here.

    name, engines = open_engines(bundle, engine="auto", device="cpu")          # global, policy, backbone, head
    name, dense = open_engines(bundle, "ort", stages=("dense",))               # the dense baseline alone

What it decides, in one place: which engine runs (``resolve_engine``), which files a precision runs
(the bundle's own, or those under ``manifest.precisions``), TensorRT engines from the manifest's engine
record, the ``torch`` engine's stages rebuilt from the checkpoint the bundle was made from (its digest
checked first), and that every engine's real I/O matches the manifest (the manifest is not checksummed).
On any failure the engines opened so far are closed. Nothing here imports torch (the torch engine imports
it when asked for).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from adafocus.bundle import STAGES, Bundle, load_bundle
from adafocus.device import require_device
from adafocus.errors import BundleError, EngineError

if TYPE_CHECKING:
    from adafocus.engines.base import Engine

DENSE = "dense"


def open_engines(bundle: Bundle | str | os.PathLike, engine: str = "auto", device: str = "cpu", *,
                 stages: Iterable[str] | None = None, threads: int | None = None, precision: str | None = None,
                 files: Mapping[str, str | os.PathLike] | None = None,
                 checkpoint: str | os.PathLike | None = None,
                 cuda_graphs: bool = True) -> tuple[str, dict[str, Engine]]:
    """Open one engine per stage of ``bundle``; returns the resolved engine name and ``{stage: engine}``.

    ``bundle``: a loaded :class:`Bundle` (or a bundle directory, loaded with its checksums verified).
    ``engine``: ``auto`` or a registered name (``ort``, ``ort-cuda``, ``ort-tensorrt``, ``tensorrt``, ``torch``);
    ``device``: ``cpu`` or ``cuda[:N]`` (checked here). ``stages``: default global, policy, backbone, head; ``dense``
    opens the dense baseline (``dense.onnx``; with ``torch``, alone, from the dense ``checkpoint``).
    ``threads``: onnxruntime intra-op threads. ``precision``: the stage files to run, the bundle's own (None)
    or one recorded under ``manifest.precisions`` (ONNX engines only; an unknown one is a BundleError).
    ``files``: stage -> ONNX file replacing that stage's (relative to the bundle, or absolute; ONNX engines
    only). ``checkpoint``: the PyTorch checkpoint the ``torch`` engine builds the stages from (it must be the
    one the bundle was exported from). ``cuda_graphs``: the torch engine on cuda replays stages as CUDA graphs.

    Every engine's inputs and outputs are checked against the stage's manifest record (BundleError naming
    the stage, the file and the difference). On any failure, the engines opened so far are closed.
    """
    from adafocus.engines.registry import resolve_engine

    device = str(require_device(device))  # canonical: "cpu" or "cuda:N"
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle, verify=True)
    stages = STAGES if stages is None else tuple(stages)
    name = resolve_engine(engine, device)
    torch_dense = name == "torch" and DENSE in stages
    if torch_dense and len(stages) > 1:
        raise EngineError("the torch engine builds the dense stage from the dense baseline's checkpoint and the "
                          "other stages from the model's: open the dense stage on its own")
    paths = {} if torch_dense else _stage_paths(bundle, precision, name, stages, files)
    engines: dict[str, Engine] = {}
    opened: dict[str, str] = {}  # stage -> what it was built from, for messages
    try:
        if name == "tensorrt":
            _open_tensorrt(bundle, stages, device, engines, opened)
        elif name == "torch":
            _open_torch(bundle, stages, device, checkpoint, cuda_graphs, torch_dense, engines, opened)
        else:
            from adafocus.engines.registry import create_engine

            options = {"threads": threads} if threads else {}
            for stage in stages:
                opened[stage] = paths[stage].name
                engines[stage] = create_engine(name, str(paths[stage]), device=device, **options)
        check_io(bundle, engines, opened)
    except BaseException:
        for e in engines.values():  # the error that stopped us is the one to see, not a failing close
            with contextlib.suppress(Exception):
                e.close()
        raise
    return name, engines


def _stage_paths(bundle: Bundle, precision: str | None, name: str, stages: tuple[str, ...],
                 files: Mapping[str, str | os.PathLike] | None) -> dict[str, Path]:
    """The ONNX file of each stage: the precision's, with ``files`` overrides (ONNX engines only)."""
    paths = _precision_files(bundle, precision, name, stages)
    if files:
        if name in ("tensorrt", "torch"):
            raise EngineError(f"files= replaces ONNX stage files: use an ort engine, not {name}")
        unknown = [s for s in files if s not in stages]
        if unknown:
            raise EngineError(f"files= names stages that are not opened: {', '.join(unknown)} "
                              f"(opened: {', '.join(stages)})")
        paths.update({stage: bundle.path / Path(f) for stage, f in files.items()})
    return paths


def _open_tensorrt(bundle: Bundle, stages: tuple[str, ...], device: str, engines: dict, opened: dict) -> None:
    from adafocus.engines.registry import create_engine

    record = _engine_record(bundle)
    for stage in stages:
        if stage not in record.files:
            raise BundleError(f"bundle {bundle.path} has no TensorRT engine for stage {stage} "
                              f"(the engines have: {', '.join(record.files)})")
        path = bundle.file(record.files[stage])
        opened[stage] = path.name
        engines[stage] = create_engine(
            "tensorrt", str(path), device=device, expected_trt_version=record.tensorrt_version,
            expected_compute_capability=record.compute_capability)


def _open_torch(bundle: Bundle, stages: tuple[str, ...], device: str, checkpoint, cuda_graphs: bool,
                torch_dense: bool, engines: dict, opened: dict) -> None:
    if checkpoint is None:
        if torch_dense:
            raise EngineError("the torch engine's dense stage needs the dense baseline's checkpoint: pass "
                              "checkpoint=PATH (--dense-checkpoint, the adafocus train --dense checkpoint)")
        raise EngineError("the torch engine needs the PyTorch checkpoint: pass checkpoint=PATH "
                          "(--checkpoint) of the model the bundle was exported from")
    opened.update({stage: f"torch, from {Path(checkpoint).name}" for stage in stages})
    if torch_dense:
        from adafocus.export.dense import dense_engine

        engines[DENSE] = dense_engine(checkpoint, bundle.manifest, device, cuda_graphs, bundle=str(bundle.path))
    else:
        _torch_stage_engines(checkpoint, bundle, device, cuda_graphs, stages, engines)


def check_io(bundle: Bundle, engines: Mapping[str, Engine], opened: Mapping[str, str] | None = None) -> None:
    """Each engine's real I/O against its stage's manifest record (the manifest is not checksummed, the
    files are): a one-line BundleError for the first that differs. Stages the manifest does not record (a
    torch dense baseline of a bundle without ``dense.onnx``) have nothing to be checked against."""
    stages = bundle.manifest.stages
    for stage, eng in engines.items():
        if stage not in stages:
            continue
        why = stages[stage].io_mismatch(eng.inputs, eng.outputs)
        if why is not None:
            label = (opened or {}).get(stage) or stages[stage].file
            raise BundleError(f"bundle {bundle.path}: stage {stage} ({label}) does not match its manifest "
                              f"record: {why}")


def close_engines(engines: Mapping[str, Engine]) -> None:
    """Close every engine, even when one of them fails to close (the first error is raised after)."""
    error: BaseException | None = None
    for e in engines.values():
        try:
            e.close()
        except Exception as exc:  # close the others first
            error = error or exc
    if error is not None:
        raise error


# ------------------------------------------------------------------------------------------ helpers
def _precision_files(bundle: Bundle, precision: str | None, engine: str,
                     stages: Iterable[str] | None = None) -> dict[str, Path]:
    """Stage files of ``precision``: the bundle's own, or those recorded under ``manifest.precisions`` (a
    stage a precision does not replace keeps the bundle's file). ``stages``: default every stage of the
    manifest; a stage the bundle does not have is a BundleError."""
    m = bundle.manifest
    wanted = list(m.stages) if stages is None else list(stages)
    if precision is None or precision == m.precision:
        return {stage: bundle.stage_path(stage) for stage in wanted}
    if precision not in m.precisions:
        known = ", ".join([m.precision, *m.precisions])
        hint = " (adafocus calibrate int8 BUNDLE --data DIR adds it)" if precision == "int8" else ""
        raise BundleError(f"bundle {bundle.path} has no {precision} files (has: {known}){hint}")
    if engine in ("tensorrt", "torch"):
        raise EngineError(f"precision {precision} runs the bundle's {precision} ONNX files: use an ort engine, "
                          f"not {engine}")
    chosen = m.precisions[precision]
    for stage in wanted:
        bundle.stage_path(stage)  # BundleError for a stage the bundle does not have
    return {stage: bundle.file(chosen.get(stage, m.stages[stage].file)) for stage in wanted}


def _engine_record(bundle: Bundle):
    """The bundle's (first) TensorRT engine record; BundleError when it has none."""
    if not bundle.manifest.engines:
        raise BundleError(f"{bundle.path} has no TensorRT engines: run `adafocus build-engines {bundle.path}`")
    return next(iter(bundle.manifest.engines.values()))


def _torch_stage_engines(checkpoint, bundle: Bundle, device: str, cuda_graphs: bool = True,
                         stages: Iterable[str] = STAGES, into: dict | None = None) -> dict[str, Engine]:
    """The ``torch`` engine's stages, rebuilt from ``checkpoint`` after checking it is the bundle's model; each
    engine goes into ``into`` as soon as it is made (so that a caller can close them on a later failure)."""
    from adafocus.engines.registry import create_engine
    from adafocus.export.stages import SIGNATURES, StageModule
    from adafocus.models import load
    from adafocus.models.checkpoint import check_source

    model = load(checkpoint)
    # the checkpoint must be the one the bundle was exported from (its weights digest, or for bundles without
    # one its model config), before any stage is built: another model's weights would run without a word
    m = bundle.manifest
    check_source(model, checkpoint, m.source, m.config, str(bundle.path))
    engines = {} if into is None else into
    for stage in stages:
        if (model.cfg.family, stage) not in SIGNATURES:
            raise EngineError(f"the torch engine has no {stage} stage for the {model.cfg.family} family")
        ins, outs = SIGNATURES[(model.cfg.family, stage)]
        engines[stage] = create_engine("torch", module=StageModule(model, stage), input_names=list(ins),
                                       output_names=list(outs), device=device, cuda_graphs=cuda_graphs)
    return engines


__all__ = ["check_io", "close_engines", "open_engines"]

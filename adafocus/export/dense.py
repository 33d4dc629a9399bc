"""``add_dense``: put a dense baseline into a bundle as ``dense.onnx``, so benchmarks can compare against it.

The dense baseline (:mod:`adafocus.models.dense`) is the same local encoder run on every candidate frame,
whole (``frame_size`` pixels), features pooled over time, one linear head (X3D: X3D-L on the clip of all
candidates, its own head): ``dense.onnx`` takes the
normalised candidate frames ``frames [B, N, 3, S, S]`` the runtime already decodes and preprocesses for the
adaptive model, and returns ``logits [B, C]``. It is an optional stage: the runtime never needs it, and
``adafocus bench`` measures it in the same run as the adaptive stages.

Sources: a dense checkpoint trained by ``adafocus train --dense`` (accuracy comparable), or none, which
builds a random-weight baseline of the bundle's config (timing only; recorded as such in the manifest, and
the benchmark prints no accuracy for it). The manifest gets ``stages['dense']``, ``costs.dense`` (GFLOPs per
video) and ``verification['dense']`` (source: the checkpoint's file name and ``weights_sha256``, or
``random-init``; ONNX-vs-PyTorch error). Needs the ``export`` extra (torch).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from adafocus.bundle import Manifest, StageInfo, load_bundle, update_manifest
from adafocus.errors import AdaFocusError, BundleError, CheckpointError
from adafocus.export.onnx_export import DEFAULT_OPSET, ExportError, export_stage, io_specs, simplify
from adafocus.models.config import ModelConfig
from adafocus.models.dense import DenseBaseline, DenseX3D, build_dense, dense_gflops, load_dense

DENSE_FILE = "dense.onnx"
TRACE_BATCH = 1  # traced at 1, checked at 2 (a batch baked into the graph shows up)
CHECK_BATCH = 2
CHECK_RTOL = {"fp32": 1e-4, "fp16": 2e-2}  # max abs error / max |reference| of the logits


class DenseStage(nn.Module):
    """The baseline as an exportable stage: ``frames`` -> ``logits`` (float32 I/O, weights in ``dtype``)."""

    stage = "dense"
    input_names = ("frames",)
    output_names = ("logits",)

    def __init__(self, model: DenseBaseline | DenseX3D, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.eval()

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(frames.to(self.dtype)).float(),)  # a tuple, like every stage (export_stage zips it)


def random_dense(cfg: ModelConfig, seed: int = 0) -> DenseBaseline | DenseX3D:
    """A random-weight baseline of ``cfg`` whose BatchNorm statistics come from its own activations on random
    frames (fresh statistics shrink a random ResNet's activations towards denormals, which run slower on
    some CPUs and would bias a timing)."""
    torch.manual_seed(seed)
    model = build_dense(cfg)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    g = torch.Generator().manual_seed(seed)
    s = cfg.frame_size
    with torch.no_grad():
        model.train()
        model(torch.randn(1, 2, 3, s, s, generator=g))  # statistics over 2 x S x S positions per channel
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def dense_engine(checkpoint: str | Path, manifest: Manifest, device: str = "cpu", cuda_graphs: bool = True,
                 bundle: str = ""):
    """A trained dense baseline (``adafocus train --dense``) as a ``torch`` engine on ``device``:
    ``frames [B, N, 3, S, S] -> logits [B, C]``, the same I/O as ``dense.onnx``. It is what the benchmark's
    torch engine compares against; CheckpointError when it does not fit the bundle (``bundle``: its path, for
    the message), or is not the baseline whose weights digest ``add_dense`` recorded."""
    from adafocus.engines.registry import create_engine

    model = load_dense(checkpoint)
    check_dense_source(model, checkpoint, manifest, bundle)
    return create_engine("torch", module=DenseStage(model), input_names=list(DenseStage.input_names),
                         output_names=list(DenseStage.output_names), device=device, cuda_graphs=cuda_graphs)


def check_dense_source(model: DenseBaseline | DenseX3D, checkpoint: str | Path, manifest: Manifest,
                       bundle: str = "") -> None:
    """A dense checkpoint for the bundle's torch rows: when ``add_dense`` recorded the weights digest of the
    bundle's dense baseline, the checkpoint must be that one; otherwise (random or older baselines, or none)
    it must at least fit the bundle's frames and classes. One-line CheckpointError if not."""
    from adafocus.models.checkpoint import check_source

    record = manifest.verification.get("dense") if isinstance(manifest.verification, dict) else None
    if isinstance(record, dict) and record.get("weights_sha256"):
        check_source(model, checkpoint, record, None, bundle, what="dense baseline")
    _check_compatible(model.cfg, manifest, str(checkpoint))


def _check_compatible(cfg: ModelConfig, manifest: Manifest, source: str) -> None:
    """The baseline must read the frames the bundle's preprocessing makes and predict the same classes."""
    p = manifest.preprocessing
    problems = []
    if cfg.frame_size != p.frame_size:
        problems.append(f"frame size {cfg.frame_size} != {p.frame_size}")
    if cfg.candidates != p.candidates:
        problems.append(f"{cfg.candidates} frames per video != {p.candidates} candidates")
    if cfg.resize_size != p.resize_size or list(cfg.mean) != list(p.mean) or list(cfg.std) != list(p.std):
        problems.append("other resize/normalisation")
    if cfg.num_classes != len(manifest.labels):
        problems.append(f"{cfg.num_classes} classes != {len(manifest.labels)}")
    elif cfg.labels and list(cfg.labels) != list(manifest.labels):
        problems.append("other class names or order")
    if problems:
        raise CheckpointError(f"{source} does not fit the bundle: {'; '.join(problems)}")


def _check_onnx(stage: DenseStage, path: Path, cfg: ModelConfig, precision: str, seed: int) -> dict:
    """Run dense.onnx in onnxruntime at another batch than traced against PyTorch; ExportError if off."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(seed + 1)
    s = cfg.frame_size
    frames = torch.randn(CHECK_BATCH, cfg.candidates, 3, s, s, generator=g)
    with torch.no_grad():
        ref = stage(frames)[0].numpy()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"frames": frames.numpy()})[0]
    err = float(np.abs(got - ref).max())
    scale = float(np.abs(ref).max()) or 1.0
    rel = err / scale
    if rel > CHECK_RTOL[precision]:
        raise ExportError(f"{path.name}: onnxruntime differs from PyTorch by {rel:.2g} of the logits' range "
                          f"(tolerance {CHECK_RTOL[precision]:g})")
    return {"max_abs": err, "max_rel": rel, "same_labels": bool((got.argmax(1) == ref.argmax(1)).all())}


def add_dense(bundle_dir: str | Path, checkpoint: str | Path | None = None, *, opset: int | None = None,
              precision: str | None = None, simplify_graph: bool = True, seed: int = 0,
              log: Callable[[str], None] | None = print) -> Manifest:
    """Export a dense baseline into ``bundle_dir`` as ``dense.onnx`` and record it in the manifest.

    Args:
        bundle_dir: an exported bundle (verified before it is changed).
        checkpoint: dense baseline checkpoint (``adafocus train --dense``); None: random weights of the
            bundle's config (for timing; the manifest says so and no accuracy is reported for it).
        opset, precision: default to the bundle's (``fp16`` exports half weights, float32 I/O).
        simplify_graph: run onnxslim when installed.
        seed: random weights and check inputs.
        log: one line per step (None: silent).

    Returns the updated manifest. A dense stage already in the bundle is replaced.
    """
    say = log or (lambda _line: None)
    t0 = time.perf_counter()
    bundle = load_bundle(bundle_dir, verify=True)
    m = bundle.manifest
    opset = opset or m.opset or DEFAULT_OPSET
    precision = precision or m.precision
    if precision not in CHECK_RTOL:
        raise AdaFocusError(f"unknown precision {precision!r} for the dense baseline; choose fp32 or fp16")
    if checkpoint is not None:
        from adafocus.export.exporter import file_name
        from adafocus.models.checkpoint import weights_sha256

        model = load_dense(checkpoint)
        _check_compatible(model.cfg, m, str(checkpoint))
        # the file name and a weights digest, never the path (no machine paths in a bundle)
        source, digest = file_name(str(checkpoint)), weights_sha256(model)
        training = _training_record(checkpoint)
    else:
        try:
            cfg = ModelConfig.from_dict(m.config)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{bundle.path}: the manifest's model config cannot be rebuilt ({exc})") from exc
        model = random_dense(cfg, seed)
        source, training, digest = "random-init", None, None
    cfg = model.cfg
    try:
        gflops = dense_gflops(model)
    except Exception as exc:  # noqa: BLE001 - e.g. a local architecture the baseline cannot run whole frames on
        raise ExportError(f"cannot run the dense baseline of this model ({type(exc).__name__}: {exc})") from exc
    stage = DenseStage(copy.deepcopy(model).half() if precision == "fp16" else model,
                       torch.float16 if precision == "fp16" else torch.float32)
    s = cfg.frame_size
    frames = torch.randn(TRACE_BATCH, cfg.candidates, 3, s, s, generator=torch.Generator().manual_seed(seed))
    tmp = bundle.path / f".{DENSE_FILE}.tmp"
    try:
        t = time.perf_counter()
        export_stage(stage, (frames,), tmp, opset)
        if simplify_graph:
            simplify(tmp)
        say(f"{'export dense':<16} {time.perf_counter() - t:6.1f}s  {bundle.path / DENSE_FILE}  "
            f"({tmp.stat().st_size / 1e6:.1f} MB)  {source}, {gflops:.4g} GFLOPs per video")
        t = time.perf_counter()
        check = _check_onnx(stage, tmp, cfg, precision, seed)
        say(f"{'verify dense':<16} {time.perf_counter() - t:6.1f}s  max rel err {check['max_rel']:.2g}")
        ins, outs = io_specs(tmp)

        def record(manifest: Manifest) -> None:  # dense.onnx installed by update_manifest, under its lock
            manifest.stages["dense"] = StageInfo(DENSE_FILE, ins, outs, gflops)
            if hasattr(manifest.costs, "dense"):
                manifest.costs.dense = gflops
            manifest.verification["dense"] = {"source": source, "random_init": checkpoint is None,
                                              "precision": precision, "frames": cfg.candidates,
                                              "training": training, **check}
            if digest is not None:
                manifest.verification["dense"]["weights_sha256"] = digest

        manifest = update_manifest(bundle.path, record, install={DENSE_FILE: tmp})
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    say(f"{'dense':<16} {time.perf_counter() - t0:6.1f}s  {bundle.path}  (GFLOPs dense {gflops:.4g} vs adaptive "
        f"{m.costs.exits[-1]:.4g} at the last exit)")
    return manifest


def _training_record(checkpoint: str | Path) -> dict | None:
    """Accuracy and cost the training loop stored in the checkpoint (for the report), if any."""
    from adafocus.models.checkpoint import read

    record = read(checkpoint).get("training")
    if not isinstance(record, dict):
        return None
    keep = ("val_accuracy", "test_accuracy", "gflops", "epochs")
    return {k: record[k] for k in keep if k in record}


__all__ = ["DENSE_FILE", "DenseStage", "add_dense", "check_dense_source", "random_dense"]

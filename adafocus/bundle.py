"""The bundle: a directory of per-stage ONNX files (+ TensorRT engines) and the ``manifest.json`` that
describes them. It is the only thing the runtime needs, so this module imports neither torch nor onnx.

Layout::

    bundle/
      manifest.json     this module's Manifest, as JSON
      global.onnx       glance frames -> feature maps, vectors, exit-0 logits, context
      policy.onnx       feature maps, vectors -> per-candidate box actions, temporal weights
      backbone.onnx     patches [B, 3, P, P] (TSM: clips [B, K, 3, P, P]) -> features, any B (a chunk of steps)
      head.onnx         features (+ classifier state, context, step) -> step logits (+ new state)
      dense.onnx        optional: a dense baseline (not built by the exporter)
      *.engine          optional: TensorRT engines, one per stage, recorded under ``engines``

Every file is listed in ``manifest.files`` with its sha256 and size; :func:`load_bundle` refuses a bundle
whose files differ from what was recorded. Tools that add files (calibration, engine builds) go through
:func:`update_manifest`, which re-verifies, lets them edit the manifest, and recomputes the checksums.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from adafocus.errors import BundleError
from adafocus.schema import SchemaError, read_record
from adafocus.schema import describe as describe_value

try:
    import fcntl
except ImportError:  # Windows: no flock, bundles are not locked there (see lock_bundle)
    fcntl = None

FORMAT = "adafocus-bundle"
FORMAT_VERSION = 2  # 2: the local stage split into backbone (patches -> features) + head (one classifier step)
MANIFEST_NAME = "manifest.json"
STAGES = ("global", "policy", "backbone", "head")  # every bundle has these, run in this order
OPTIONAL_STAGES = ("dense",)  # a dense baseline may be added later; never required
BATCH = "batch"  # the only symbolic dimension in any stage's inputs and outputs


# ------------------------------------------------------------------------------------------- records
class _Record:
    """JSON round trip of a dataclass: typed reading (adafocus.schema) names the key path of a bad value."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, path: str = ""):
        return read_record(cls, d, path or cls.__name__.lower())


@dataclass
class TensorInfo(_Record):
    """One named input or output of a stage: ``shape`` holds ints and at most the symbol ``"batch"``."""

    name: str
    shape: list[int | str]
    dtype: str  # numpy dtype name: "float32", "int64", ...

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(str(s) for s in self.shape)}]"


@dataclass
class StageInfo(_Record):
    """One stage's file, I/O and cost (GFLOPs = multiply-adds of one call at batch 1)."""

    file: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    gflops: float

    def to_dict(self) -> dict:
        return {"file": self.file, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs], "gflops": self.gflops}

    def io_mismatch(self, inputs, outputs) -> str | None:
        """How an engine's real I/O (``TensorSpec``-like: name, shape, dtype) differs from this record, or
        None. Unknown dims (None shapes, as the torch engine reports) are not compared."""
        for kind, recorded, real in (("input", self.inputs, inputs), ("output", self.outputs, outputs)):
            found = {t.name: t for t in real}
            for t in recorded:
                spec = found.get(t.name)
                if spec is None:
                    return f"{kind} {t.name!r} is missing (the file has {', '.join(found) or 'none'})"
                if spec.shape is None:  # an engine that knows names only (torch): nothing more to compare
                    continue
                if np_dtype_name(spec.dtype) != t.dtype:
                    return f"{kind} {t.name!r} is {np_dtype_name(spec.dtype)}, the manifest says {t.dtype}"
                fixed = [d if isinstance(d, int) and d >= 0 else BATCH for d in spec.shape]
                if fixed != list(t.shape):
                    return f"{kind} {t.name!r} has shape {fixed}, the manifest says {list(t.shape)}"
        return None


@dataclass
class Preprocessing(_Record):
    """How decoded frames become the tensors the engines take, and which frames the host picks.

    Frames: resize the shorter side to ``resize_size``, centre-crop ``frame_size``, scale to [0, 1],
    normalise with ``mean``/``std`` (RGB order when ``rgb``), layout ``[3, S, S]``. ``num_segments`` TSN
    segment-centre frames are sampled; the glance sees ``glance_positions`` of them (None: the glance frames
    are their own ``num_glance`` TSN segments of the video, as in the TSM family), resized to
    ``glance_size`` inside global.onnx. The K focus frames are drawn from the ``candidates`` by
    ``focus_positions(weights, candidates, num_focus, clamp=focus_clamp)``; each patch is a
    ``crop_boxes(actions, frame_size, crop_min, crop_max)`` box resampled to ``patch_size`` on the host.
    """

    resize_size: int
    frame_size: int
    glance_size: int
    mean: list[float]
    std: list[float]
    rgb: bool
    num_segments: int
    num_glance: int
    glance_positions: list[int] | None
    candidates: int
    num_focus: int
    focus_clamp: bool
    patch_size: int
    crop_min: float
    crop_max: float
    patches_per_step: int


@dataclass
class Costs(_Record):
    """GFLOPs (multiply-adds) of one video: ``exits[k]`` is the cumulative cost of exiting at step k."""

    glance: float
    policy: float
    step: float
    exits: list[float]
    patches_per_step: int
    parts: dict[str, float] = field(default_factory=dict)
    dense: float | None = None  # the dense baseline per video, once dense.onnx was added


@dataclass
class ExitPolicy(_Record):
    """Early-exit rule: exit at step k when ``criterion(logits_k) >= table[k]``.

    ``thresholds`` maps a table name (one per budget, written by calibration) to its per-step thresholds;
    it is empty until the bundle is calibrated, and then the runtime runs every step. ``by_precision`` holds
    the tables of the bundle's other precisions (``"int8"`` -> the same kind of table), solved on their own
    scores: quantization moves the confidences, so the fp32 thresholds would exit an INT8 model later.
    """

    criterion: str = "max_logit"
    thresholds: dict[str, Any] = field(default_factory=dict)
    by_precision: dict[str, dict[str, Any]] = field(default_factory=dict)

    def table(self, precision: str | None = None) -> dict[str, Any]:
        """The thresholds table of ``precision`` (its own when calibrated, else the bundle's)."""
        return self.by_precision.get(precision or "", None) or self.thresholds


@dataclass
class FileEntry(_Record):
    """sha256 (hex) and size in bytes of one bundle file."""

    sha256: str
    size: int


@dataclass
class EngineRecord(_Record):
    """TensorRT engines of one build: they only load on the same TensorRT version and compute capability.

    ``files`` maps a stage name to its engine file (its checksum is in ``Manifest.files``); ``batch`` is
    the optimisation profile ``{"min", "opt", "max"}``.
    """

    tensorrt_version: str
    compute_capability: str
    device: str
    precision: str
    files: dict[str, str]
    batch: dict[str, int] = field(default_factory=dict)
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # builder details (workspace, strongly typed, ...)


# ------------------------------------------------------------------------------------------ manifest
@dataclass
class Manifest:
    """Everything the runtime needs to know about a bundle; serialised as ``manifest.json``.

    ``config`` is ``ModelConfig.to_dict()`` (labels included); ``precisions`` lists stage files of other
    precisions added later (``"int8"`` -> stage -> file; ``precision`` is the one of ``stages``);
    ``verification`` is what the exporter measured (per-stage errors, end-to-end decisions); ``training``
    is copied from the checkpoint.
    """

    producer: dict[str, str]
    created: str
    preset: str | None
    family: str
    config: dict[str, Any]
    labels: list[str]
    preprocessing: Preprocessing
    stages: dict[str, StageInfo]
    costs: Costs
    exit: ExitPolicy
    opset: int
    precision: str
    files: dict[str, FileEntry] = field(default_factory=dict)
    engines: dict[str, EngineRecord] = field(default_factory=dict)
    precisions: dict[str, dict[str, str]] = field(default_factory=dict)  # e.g. "int8" -> stage -> file
    verification: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] | None = None
    # where the stages came from: {"checkpoint": file name (never a directory), "weights_sha256": digest of
    # the float weights}; the torch engine refuses a checkpoint whose digest differs
    source: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "format_version": self.format_version,
            "producer": dict(self.producer),
            "created": self.created,
            "preset": self.preset,
            "family": self.family,
            "config": self.config,
            "labels": list(self.labels),
            "preprocessing": self.preprocessing.to_dict(),
            "stages": {k: v.to_dict() for k, v in self.stages.items()},
            "costs": self.costs.to_dict(),
            "exit": self.exit.to_dict(),
            "opset": self.opset,
            "precision": self.precision,
            "files": {k: v.to_dict() for k, v in sorted(self.files.items())},
            "engines": {k: v.to_dict() for k, v in self.engines.items()},
            "precisions": {k: dict(v) for k, v in self.precisions.items()},
            "verification": self.verification,
            "training": self.training,
            "source": dict(self.source),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        """Parse a manifest, refusing other formats and other format versions with a clear message."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            found = d.get("format") if isinstance(d, dict) else None
            raise BundleError(f"not an adafocus bundle manifest (format {found!r}, expected {FORMAT!r})")
        version = d.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise BundleError(f"bundle manifest has no valid format_version ({version!r})")
        if version > FORMAT_VERSION:
            raise BundleError(f"bundle format version {version} is newer than this adafocus supports "
                              f"({FORMAT_VERSION}): upgrade adafocus")
        if version < FORMAT_VERSION:
            hint = " or split its local stage with `adafocus migrate BUNDLE` (exact)" if version == 1 else ""
            raise BundleError(f"bundle format version {version} is older than this adafocus supports "
                              f"({FORMAT_VERSION}): re-export it with adafocus-export{hint}")
        try:
            m = read_record(cls, d, "")
            check_manifest(m)
        except SchemaError as exc:
            raise BundleError(f"bad bundle manifest: {exc}") from None  # read_manifest adds the file
        return m

    def referenced_files(self) -> list[str]:
        """Every file the manifest points at: stage files, other precisions' stage files, engine files and
        the ``files`` table."""
        names = [s.file for s in self.stages.values()]
        names += [f for files in self.precisions.values() for f in files.values()]
        names += [f for rec in self.engines.values() for f in rec.files.values()]
        names += list(self.files)
        return sorted(set(names))

    def num_exits(self) -> int:
        return len(self.costs.exits)


FAMILIES = ("base", "tsm", "x3d")  # model families the runtime knows
MAX_DECODED_BYTES = 2**30  # decoded RGB frames of one video (upstream's presets: 9.4 MB)
PRECISIONS = ("fp32", "fp16")  # precisions of a bundle's own stage files


def check_manifest(m: Manifest) -> None:
    """Values that type-check but cannot work together (a crop larger than the frame, exits that do not
    match the steps, a threshold table of the wrong length, ...): SchemaError naming the key path.

    Every manifest that passes this and whose files match their checksums runs (tests/test_manifest.py)."""
    from adafocus.runtime.exits import CRITERIA

    def need(ok: bool, path: str, what: str) -> None:
        if not ok:
            raise SchemaError(f"{path} {what}")

    need(m.family in FAMILIES, "family", f"must be one of {', '.join(FAMILIES)}, found {m.family!r}")
    need(m.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}, found {m.precision!r}")
    need(len(m.labels) >= 1, "labels", "must name at least one class")
    p = m.preprocessing
    for key in ("resize_size", "frame_size", "glance_size", "num_segments", "num_glance", "candidates",
                "num_focus", "patch_size", "patches_per_step"):
        need(getattr(p, key) >= 1, f"preprocessing.{key}", f"must be at least 1, found {getattr(p, key)}")
    need(p.frame_size <= p.resize_size, "preprocessing.frame_size",
         f"({p.frame_size}) must not exceed preprocessing.resize_size ({p.resize_size})")
    frames = p.num_segments if p.glance_positions is not None else p.num_glance + p.candidates
    decoded = frames * p.resize_size ** 2 * 3  # bytes of one video's decoded frames (square video)
    need(decoded <= MAX_DECODED_BYTES, "preprocessing.resize_size", f"({p.resize_size}) with {frames} frames "
         f"sampled: one video would decode to {decoded / 2**30:.3g} GiB, more than {MAX_DECODED_BYTES // 2**30} "
         "GiB (frames x resize_size^2 x 3 bytes)")
    need(len(p.mean) == 3 and len(p.std) == 3, "preprocessing.mean/std", "must hold 3 values each (R, G, B)")
    need(all(v > 0 for v in p.std), "preprocessing.std", "must be positive")
    need(0 < p.crop_min <= p.crop_max <= p.frame_size, "preprocessing.crop_min/crop_max",
         f"must satisfy 0 < crop_min <= crop_max <= frame_size, found {p.crop_min:g}, {p.crop_max:g}")
    need(p.num_focus <= p.candidates, "preprocessing.num_focus", f"({p.num_focus}) must not exceed "
         f"preprocessing.candidates ({p.candidates})")
    if p.glance_positions is not None:
        need(len(p.glance_positions) == p.num_glance, "preprocessing.glance_positions",
             f"must hold num_glance ({p.num_glance}) positions, found {len(p.glance_positions)}")
        need(all(0 <= i < p.candidates for i in p.glance_positions), "preprocessing.glance_positions",
             f"must lie in [0, candidates = {p.candidates})")
        need(p.candidates == p.num_segments, "preprocessing.candidates", "must equal num_segments when the "
             "glance frames are candidates (glance_positions given)")
    for stage in STAGES:
        need(stage in m.stages, f"stages.{stage}", "is missing")
    for name, st in m.stages.items():
        _safe_name(st.file)
        need(st.gflops >= 0, f"stages.{name}.gflops", "must not be negative")
        for kind in ("inputs", "outputs"):
            tensors = getattr(st, kind)
            need(len(tensors) >= 1, f"stages.{name}.{kind}", "must list at least one tensor")
            for i, t in enumerate(tensors):
                dims_ok = all(d == BATCH if isinstance(d, str) else d >= 1 for d in t.shape)
                need(dims_ok, f"stages.{name}.{kind}[{i}].shape", f"must hold positive sizes or {BATCH!r}, "
                     f"found {t.shape}")
    _check_stage_io(m)
    c = m.costs
    need(len(c.exits) >= 2, "costs.exits", f"must list the cost of every exit (at least 2), found {len(c.exits)}")
    rising = all(b >= a for a, b in zip(c.exits, c.exits[1:], strict=False))
    need(all(v >= 0 for v in c.exits) and rising, "costs.exits",
         "must be non-negative and non-decreasing (cumulative GFLOPs at exit 0, 1, ...)")
    steps = p.num_focus if m.family == "base" else 1
    need(len(c.exits) == steps + 1, "costs.exits", f"must hold {steps + 1} exits for the {m.family} family with "
         f"{p.num_focus} focus frames, found {len(c.exits)}")
    need(c.dense is None or c.dense > 0, "costs.dense", "must be positive")
    need(m.exit.criterion in CRITERIA, "exit.criterion", f"must be one of {', '.join(CRITERIA)}, found "
         f"{m.exit.criterion!r}")
    tables = {"exit.thresholds": m.exit.thresholds,
              **{f"exit.by_precision.{k}": v for k, v in m.exit.by_precision.items()}}
    for path, table in tables.items():
        for key, entry in table.items():
            _check_threshold_entry(entry, f"{path}.{key}", len(c.exits))
    for prec, files in m.precisions.items():
        for stage, file in files.items():
            need(stage in m.stages, f"precisions.{prec}.{stage}", f"is not a stage of the bundle "
                 f"({', '.join(m.stages)})")
            _safe_name(file)
    for name, entry in m.files.items():
        _safe_name(name)
        need(len(entry.sha256) == 64 and all(ch in "0123456789abcdef" for ch in entry.sha256),
             f"files.{name}.sha256", "must be 64 lower-case hex digits")
        need(entry.size >= 0, f"files.{name}.size", "must not be negative")


def _check_stage_io(m: Manifest) -> None:
    """The stages' recorded I/O agrees with the preprocessing and the labels (the engines' real I/O is
    checked against these records when the engines are created)."""
    p, classes = m.preprocessing, len(m.labels)

    def tensor(stage: str, kind: str, index: int) -> TensorInfo:
        tensors = getattr(m.stages[stage], kind)
        if index >= len(tensors):
            raise SchemaError(f"stages.{stage}.{kind} must list at least {index + 1} tensors")
        return tensors[index]

    def expect(stage: str, kind: str, index: int, dims: slice, want: list[int], meaning: str) -> None:
        t = tensor(stage, kind, index)
        if t.shape[dims] != want:
            raise SchemaError(f"stages.{stage}.{kind}[{index}].shape {t.shape} does not match {meaning} {want}")

    frames = [p.num_glance, 3, p.frame_size, p.frame_size]
    expect("global", "inputs", 0, slice(1, None), frames, "preprocessing (num_glance, 3, frame_size, frame_size)")
    for stage in ("global", "head"):
        logits = next((i for i, t in enumerate(m.stages[stage].outputs) if t.name == "logits"), None)
        if logits is None:
            raise SchemaError(f"stages.{stage}.outputs has no 'logits' tensor")
        expect(stage, "outputs", logits, slice(-1, None), [classes], "the number of labels")
    expect("backbone", "inputs", 0, slice(-3, None), [3, p.patch_size, p.patch_size],
           "preprocessing (3, patch_size, patch_size)")
    # the head's inputs by name (the runtime feeds them so): features as the backbone makes them, and the
    # base family's running state as wide as the glance context it is concatenated with
    head = {t.name: t for t in m.stages["head"].inputs}
    want = ("features", "state", "context", "step") if m.family == "base" else ("features", "context")
    missing = [n for n in want if n not in head]
    if missing:
        raise SchemaError(f"stages.head.inputs lacks {', '.join(missing)} (the {m.family} family's head takes "
                          f"{', '.join(want)})")
    feats = next((t for t in m.stages["backbone"].outputs if t.name == "features"), None)
    if feats is None or feats.shape[1:] != head["features"].shape[1:]:
        raise SchemaError("stages.backbone.outputs must hold 'features' shaped as stages.head's 'features' input")
    if m.family == "base" and (len(head["state"].shape) != 2 or head["state"].shape != head["context"].shape):
        raise SchemaError(f"stages.head.inputs 'state' {head['state'].shape} must be [batch, D] like 'context' "
                          f"{head['context'].shape}")


def _check_threshold_entry(entry: Any, path: str, exits: int) -> None:
    from adafocus.schema import check

    if not isinstance(entry, dict):
        raise SchemaError(f"{path} must be an object, found {describe_value(entry)}")
    for key, tp in (("budget_gflops", float), ("thresholds", list[float | None])):
        if key not in entry:
            raise SchemaError(f"{path}.{key} is missing")
        entry[key] = check(entry[key], tp, f"{path}.{key}")
    if "max_gflops" in entry:
        entry["max_gflops"] = check(entry["max_gflops"], float, f"{path}.max_gflops")
    if len(entry["thresholds"]) != exits:
        raise SchemaError(f"{path}.thresholds must hold one value per exit ({exits}), found "
                          f"{len(entry['thresholds'])}")
    if not entry["budget_gflops"] > 0:
        raise SchemaError(f"{path}.budget_gflops must be positive")


def np_dtype_name(dtype: Any) -> str:
    """'float32' for numpy dtypes, dtype classes and names alike."""
    import numpy as np

    return np.dtype(dtype).name


def now_iso() -> str:
    """UTC timestamp for ``created`` fields."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -------------------------------------------------------------------------------------------- bundle
@dataclass
class Bundle:
    """A loaded bundle: its directory and manifest."""

    path: Path
    manifest: Manifest

    def file(self, name: str) -> Path:
        """Absolute path of a bundle file, refusing names that leave the bundle directory."""
        return self.path / _safe_name(name)

    def stage_path(self, stage: str) -> Path:
        if stage not in self.manifest.stages:
            known = ", ".join(self.manifest.stages)
            raise BundleError(f"bundle {self.path} has no stage {stage!r} (has: {known})")
        return self.file(self.manifest.stages[stage].file)

    def has_stage(self, stage: str) -> bool:
        return stage in self.manifest.stages

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    def describe(self) -> str:
        """A human-readable summary: model, preprocessing, stage I/O and GFLOPs, exits, engines, checks."""
        m, p = self.manifest, self.manifest.preprocessing
        lines = [f"bundle     {self.path} ({m.format} v{m.format_version}, {len(m.files)} files with sha256)",
                 f"model      preset {m.preset or '-'} ({m.family}), {len(m.labels)} classes, {m.precision}, "
                 f"opset {m.opset}; made by {m.producer.get('name', '?')} {m.producer.get('version', '?')} "
                 f"on {m.created}",
                 f"frames     resize {p.resize_size} -> centre crop {p.frame_size}, {'RGB' if p.rgb else 'BGR'}, "
                 f"mean {p.mean}, std {p.std}; {p.num_segments} frames sampled",
                 "glance     " + (f"{p.num_glance} frames at positions {p.glance_positions}"
                                  if p.glance_positions is not None else f"{p.num_glance} frames (own segments)")
                 + f", seen at {p.glance_size} px",
                 f"focus      {p.num_focus} of {p.candidates} candidates, {p.patches_per_step} patch(es) of "
                 f"{p.patch_size} px per step from {p.crop_min:g}..{p.crop_max:g}-px boxes",
                 "stages"]
        for name, st in m.stages.items():
            size = m.files[st.file].size if st.file in m.files else 0
            lines.append(f"  {name:<7} {st.file:<12} {st.gflops:9.4f} GFLOPs  {size / 1e6:7.1f} MB")
            lines += [f"    in   {t}" for t in st.inputs] + [f"    out  {t}" for t in st.outputs]
        exits = ", ".join(f"{c:.3g}" for c in m.costs.exits)
        lines.append(f"costs      GFLOPs per video at exit 0..{len(m.costs.exits) - 1}: {exits}")
        tables = ", ".join(m.exit.thresholds) or "none (not calibrated: every video runs every step)"
        lines.append(f"exits      criterion {m.exit.criterion}; threshold tables: {tables}")
        for name, files in m.precisions.items():
            lines.append(f"precision  {name}: " + ", ".join(f"{st} {f}" for st, f in files.items()))
        if m.engines:
            for key, rec in m.engines.items():
                lines.append(f"engines    {key}: TensorRT {rec.tensorrt_version}, sm {rec.compute_capability} "
                             f"({rec.device}), {rec.precision}, batch {rec.batch}")
        else:
            lines.append("engines    none (adafocus build-engines BUNDLE builds TensorRT engines)")
        v = m.verification
        if v.get("skipped"):
            lines.append("verified   no (exported with --no-verify)")
        elif "passed" in v:  # a free-form record (dict[str, Any]): read what has the exporter's shape
            checks = [c for c in v.get("stages", []) if isinstance(c, dict)] if isinstance(v.get("stages"), list) \
                else []
            rels = [c.get("max_rel") for c in checks]
            worst = max((float(r) for r in rels if isinstance(r, (int, float)) and not isinstance(r, bool)),
                        default=0.0)
            runs = v.get("videos") if isinstance(v.get("videos"), list) else []
            exits_at = [x.get("exit_onnx") if isinstance(x, dict) else None for x in runs]
            lines.append(f"verified   {'passed' if v['passed'] else 'FAILED'} ({v.get('precision')}): max rel err "
                         f"{worst:.2g} over {len(checks)} outputs; {len(exits_at)} videos exiting at {exits_at}")
        if m.training:
            lines.append(f"training   {json.dumps(m.training)}")
        return "\n".join(lines)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.manifest.preprocessing


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checksum_files(bundle_dir: str | Path, names) -> dict[str, FileEntry]:
    """sha256 + size of each named file in ``bundle_dir``; a missing file is a BundleError."""
    bundle_dir = Path(bundle_dir)
    out = {}
    for name in sorted(set(names)):
        path = bundle_dir / _safe_name(name)
        if not path.is_file():
            raise BundleError(f"bundle file {name} is missing from {bundle_dir}")
        out[name] = FileEntry(sha256_file(path), path.stat().st_size)
    return out


def read_manifest(bundle_dir: str | Path) -> Manifest:
    """Parse ``manifest.json`` of a bundle directory (or the manifest file itself), without checking files."""
    path = Path(bundle_dir)
    if path.is_dir():
        path = path / MANIFEST_NAME
    elif not path.exists():
        raise BundleError(f"bundle not found: {bundle_dir}")
    if not path.is_file():
        raise BundleError(f"{path.parent} is not a bundle: {MANIFEST_NAME} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise BundleError(f"{path} is not a bundle manifest: its JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise BundleError(f"{path} is not valid JSON ({_one_line(exc)})") from None
    try:
        _check_json(data)
        return Manifest.from_dict(data)
    except BundleError as exc:
        text = str(exc)
        if text.startswith("bad bundle manifest: "):
            text = f"bad bundle manifest {path}: " + text[len("bad bundle manifest: "):]
        raise BundleError(text) from None


def verify_files(bundle_dir: str | Path, manifest: Manifest) -> None:
    """Check every referenced file against its recorded sha256 and size; BundleError names the first bad one."""
    bundle_dir = Path(bundle_dir)
    for name in manifest.referenced_files():
        path = bundle_dir / _safe_name(name)
        entry = manifest.files.get(name)
        if entry is None:
            raise BundleError(f"bundle file {name} has no checksum in the manifest")
        if not path.is_file():
            raise BundleError(f"bundle file {name} is missing from {bundle_dir}")
        size = path.stat().st_size
        if size != entry.size:
            raise BundleError(f"bundle file {name} has {size} bytes, the manifest says {entry.size}: "
                              "it was truncated or changed after export")
        if sha256_file(path) != entry.sha256:
            raise BundleError(f"bundle file {name} does not match its sha256 checksum: it was changed after "
                              "export (re-export the bundle)")


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle directory; with ``verify`` every file is checked against the manifest's checksums.

    Verifying holds the bundle's shared lock (:func:`lock_bundle`) from reading the manifest to the last
    checksum, so an update (which installs files and writes the manifest under the exclusive lock) is seen
    whole or not at all. A caller that opens the files later and must get the verified ones holds the shared
    lock itself around both (as ``Pipeline.from_bundle`` does)."""
    bundle_dir = _bundle_dir(path)
    if not bundle_dir.exists():
        raise BundleError(f"bundle not found: {path}")
    if not verify:  # one file, replaced atomically by write_manifest: nothing to hold still
        return Bundle(bundle_dir, read_manifest(bundle_dir))
    with lock_bundle(bundle_dir):
        manifest = read_manifest(bundle_dir)
        verify_files(bundle_dir, manifest)
    return Bundle(bundle_dir, manifest)


# ------------------------------------------------------------------------------------------- locking
# A bundle is locked with flock(2) on its directory itself (an O_RDONLY descriptor of it): no lock file is
# created, so nothing appears in the bundle (listings, copies, wheels stay as they were), and read-only
# bundles (the demo inside site-packages, a read-only mount) lock like any other: flock needs no write
# access. Shared: readers that verify; exclusive: update_manifest, from reading the manifest to writing it.
# Where the directory cannot be opened or flock fails (no fcntl on Windows; NFS, where flock becomes a POSIX
# lock that a read-only descriptor cannot take exclusively) the bundle is used unlocked, as before.
_held = threading.local()  # .locks: realpath of a bundle directory -> "shared" | "exclusive" (this thread)


def _held_locks() -> dict[str, str]:
    if not hasattr(_held, "locks"):
        _held.locks = {}
    return _held.locks


def _bundle_dir(path: str | os.PathLike) -> Path:
    """The directory of a bundle given as its directory or its manifest file."""
    bundle_dir = Path(path)
    if bundle_dir.name == MANIFEST_NAME and bundle_dir.is_file():
        bundle_dir = bundle_dir.parent
    return bundle_dir


def _lock_fd(bundle_dir: Path, exclusive: bool) -> int | None:
    """An open descriptor of ``bundle_dir`` holding its flock, or None where it cannot be locked."""
    if fcntl is None:  # Windows has no flock (msvcrt's locks are mandatory byte ranges of files): unlocked
        return None
    try:
        fd = os.open(bundle_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # missing (load_bundle says so), not a directory or not readable: nothing to lock
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)  # waits for a conflicting holder
    except OSError:  # a file system without flock on directories: unlocked
        os.close(fd)
        return None
    except BaseException:  # KeyboardInterrupt while waiting
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def lock_bundle(path: str | os.PathLike, exclusive: bool = False) -> Iterator[None]:
    """Hold a bundle's lock: shared (the default; readers: verify files, then open them) or ``exclusive``
    (:func:`update_manifest`: install files, write the manifest). Waits while another process or thread
    holds a conflicting lock; the lock is released when the block ends (or its process dies).

    Within one thread the lock nests: a shared hold inside a shared or exclusive one is a no-op (so
    ``load_bundle`` works inside an update's callback), and an exclusive one inside any hold of the same
    bundle is a BundleError, not a deadlock (an update inside another update would be overwritten by it).
    A bundle that cannot be locked (see above) is used unlocked."""
    bundle_dir = _bundle_dir(path)
    key = os.path.realpath(bundle_dir)
    held = _held_locks()
    if key in held:
        if exclusive:
            raise BundleError(f"cannot update bundle {bundle_dir} while this thread holds its "
                              f"{held[key]} lock (an update_manifest or a read of the same bundle is in "
                              "progress around this call): the outer one would overwrite this update")
        yield  # a read inside this thread's own read or update: already covered
        return
    fd = _lock_fd(bundle_dir, exclusive)
    held[key] = "exclusive" if exclusive else "shared"
    try:
        yield
    finally:
        del held[key]
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)  # also for forked children sharing the descriptor
            os.close(fd)


def write_manifest(bundle_dir: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (temp file in the same directory, fsync, rename, fsync of the
    directory). The new file keeps the old one's permission bits; a first manifest gets 0o666 less the
    umask, as any new file. (Not a lock: :func:`update_manifest` is the way to change a bundle's manifest.)"""
    bundle_dir = Path(bundle_dir)
    target = bundle_dir / MANIFEST_NAME
    text = dumps(manifest.to_dict()) + "\n"
    try:
        mode: int | None = os.stat(target).st_mode & 0o7777
    except FileNotFoundError:
        mode = None
    # not mkstemp: its 0600 would survive the rename; O_EXCL with 0o666 lets the umask apply as for any file
    for _ in range(100):
        tmp = str(bundle_dir / f".{MANIFEST_NAME}.{os.urandom(6).hex()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name for {target}")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if mode is not None and hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(bundle_dir)
    return target


def _fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable. Best effort: where a directory cannot be opened or fsynced
    (Windows, some file systems) there is nothing more to do, and the rename has happened (the new
    manifest is what readers see): failing now would only tell the caller it had not."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def dumps(obj: Any, indent: int = 2, _level: int = 0) -> str:
    """JSON with objects indented and lists of scalars (shapes, means, thresholds) kept on one line."""
    pad, inner = " " * (indent * _level), " " * (indent * (_level + 1))
    flat = json.dumps(obj)
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    if len(flat) <= 100 and not any(isinstance(v, dict) for v in children):
        return flat  # short records (a tensor's name/shape/dtype, a file's checksum) on one line
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {dumps(v, indent, _level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        items = [f"{inner}{dumps(v, indent, _level + 1)}" for v in obj]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return flat


def update_manifest(bundle_dir: str | Path, fn: Callable[[Manifest], Manifest | None],
                    verify: bool = True, install: Mapping[str, str | os.PathLike] | None = None) -> Manifest:
    """Edit a bundle's manifest and recompute the checksums of every file it references.

    The bundle is verified first (so that an edit never blesses a tampered file), then ``fn`` edits the
    manifest in place or returns a new one. Files that ``fn`` adds (a new engine, an int8 stage, an entry
    ``files[name]`` with any value) are hashed; a file listed in ``files`` that no longer exists is an error.

    ``install`` maps bundle file names to files (temporary ones, best in the bundle directory) that are moved
    into the bundle after the verification, before ``fn``: all or nothing, a file they replace is kept aside
    until the new manifest is written and put back if anything fails, the new ones are then removed.

    All of it (read, verify, install, ``fn``, hash, write) holds the bundle's exclusive lock
    (:func:`lock_bundle`): readers that verify wait rather than see new files under the old manifest, and two
    updates run one after the other, the second editing what the first wrote. So ``fn`` should be quick:
    build files before, install them here.
    """
    with lock_bundle(bundle_dir, exclusive=True):
        bundle = load_bundle(bundle_dir, verify=verify)
        with _installing(bundle.path, dict(install or {})):
            manifest = fn(bundle.manifest) or bundle.manifest
            manifest.files = checksum_files(bundle.path, manifest.referenced_files())
            try:
                check_manifest(manifest)  # a tool's edit never leaves a manifest that load_bundle would refuse
            except SchemaError as exc:
                raise BundleError(f"refusing to write an invalid manifest to {bundle.path}: {exc}") from None
            write_manifest(bundle.path, manifest)  # the commit: nothing after it can fail
    return manifest


@contextlib.contextmanager
def _installing(bundle_dir: Path, files: dict[str, str | os.PathLike]) -> Iterator[None]:
    """Move ``files`` (bundle name -> source) into ``bundle_dir`` for the block; the files they replace wait
    in a hidden directory of the bundle. If the block raises, the new files are removed and the old ones put
    back (one that cannot be is left in ``.adafocus-old.*``, and the error says where); else the old ones
    are deleted. A file takes the permission bits of the one it replaces, a new one those of the manifest
    (less execute): producers write through mkstemp, whose 0600 would hide the file from other users."""
    if not files:
        yield
        return
    for name, src in files.items():
        if _safe_name(name) == MANIFEST_NAME:
            raise BundleError(f"cannot install a file named {MANIFEST_NAME}: the manifest is written, not installed")
        if not Path(src).is_file():
            raise BundleError(f"cannot install {name} into {bundle_dir}: {src} is not a file")
    aside: Path | None = Path(tempfile.mkdtemp(prefix=".adafocus-old.", dir=bundle_dir))
    installed: list[Path] = []
    kept: list[tuple[Path, Path]] = []  # (bundle file, its old version in aside)
    try:
        for i, (name, src) in enumerate(files.items()):
            target = bundle_dir / name
            like = target if target.is_file() else bundle_dir / MANIFEST_NAME
            with contextlib.suppress(OSError):
                mode = os.stat(like).st_mode & (0o7777 if like == target else 0o666)
                os.chmod(src, mode)
            if os.path.lexists(target):
                os.replace(target, aside / str(i))
                kept.append((target, aside / str(i)))
            installed.append(target)
            _move_into(Path(src), target)
        yield
    except BaseException as exc:
        for target in installed:
            with contextlib.suppress(OSError):
                target.unlink(missing_ok=True)
        lost = []
        for target, old in kept:
            try:
                os.replace(old, target)
            except OSError:
                lost.append(f"{old} (the old {target.name})")
        if lost:
            aside = None  # keep what could not be put back
            raise BundleError(f"an update of {bundle_dir} failed ({type(exc).__name__}: {exc}) and "
                              f"{', '.join(lost)} could not be put back: move it back by hand") from exc
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def _move_into(src: Path, target: Path) -> None:
    """Rename ``src`` to ``target`` (its data synced first); across file systems, copy then rename."""
    with contextlib.suppress(OSError), open(src, "rb") as f:
        os.fsync(f.fileno())
    try:
        os.replace(src, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out)
            out.flush()
            os.fsync(out.fileno())
        shutil.copymode(src, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    src.unlink()


# ------------------------------------------------------------------------------------------- helpers
MAX_JSON_DEPTH = 32  # a manifest nests 6 levels; free-form records (verification, training) a few more


def _check_json(data: Any) -> None:
    """Refuse parsed JSON that later code cannot handle whatever the schema says: nesting deeper than
    MAX_JSON_DEPTH (recursive copies and dumps of free-form records would overflow the stack) and strings or
    keys holding lone surrogates (JSON's ``\\udc80`` escapes; they cannot be printed or written as UTF-8)."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BundleError(f"bad bundle manifest: {where} nests more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(node, dict):
            items = list(node.items())
        elif isinstance(node, list):
            items = list(enumerate(node))
        else:
            items = []
            _check_text(node, where)
        for key, value in items:
            _check_text(key, where)
            path = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else str(key)
            stack.append((value, path, depth + 1))


def _check_text(value: Any, where: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            shown = value.encode("utf-8", "backslashreplace").decode("ascii", "replace")
            raise BundleError(f"bad bundle manifest: {where or 'the manifest'} holds a string that is not valid "
                              f"Unicode (a lone surrogate): '{shown[:60]}'") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _safe_name(name: str) -> str:
    """A bundle file name: relative, inside the bundle (no absolute paths, no '..')."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name:
        raise BundleError(f"bad bundle file name {name!r}: must be a relative path inside the bundle")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise BundleError(f"bad bundle file name {name!r}: holds control characters")
    return name


__all__ = [
    "BATCH", "FORMAT", "FORMAT_VERSION", "MANIFEST_NAME", "OPTIONAL_STAGES", "STAGES",
    "Bundle", "Costs", "EngineRecord", "ExitPolicy", "FileEntry", "Manifest", "Preprocessing", "StageInfo",
    "TensorInfo", "checksum_files", "dumps", "load_bundle", "lock_bundle", "now_iso", "read_manifest", "sha256_file",
    "update_manifest", "verify_files", "write_manifest",
]

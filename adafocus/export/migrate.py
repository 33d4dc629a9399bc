"""``adafocus migrate BUNDLE``: a format-1 bundle (one ``local.onnx``: local encoder + classifier step) into
format 2 (``backbone.onnx`` + ``head.onnx``), exactly: the two new graphs are the old graph's own nodes, cut
at the local encoder's feature vector, and the migration checks on random inputs that the pair gives the
old graph's outputs before it replaces anything.

Base family only. A format-1 TSM bundle's local graph holds the features as ``[B*K, C]`` where format 2
passes ``[B, K, C]``; re-export those from the checkpoint (``adafocus-export``). TensorRT engines of the old
local stage are dropped (rebuild them with ``adafocus build-engines``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from adafocus.bundle import (
    MANIFEST_NAME,
    Manifest,
    _installing,
    _safe_name,
    checksum_files,
    lock_bundle,
    sha256_file,
    write_manifest,
)
from adafocus.errors import BundleError, require

FEATURES = "features"
Log = Callable[[str], None]


def migrate_bundle(bundle_dir: str | Path, *, check_inputs: int = 8, seed: int = 0, log: Log | None = print) -> Path:
    """Rewrite a format-1 bundle in place as format 2 (atomically: the new files and manifest are made in a
    temporary directory, checked, then moved in). Returns the bundle directory."""
    onnx = require("onnx", "export", "splitting local.onnx")
    say = log or (lambda _line: None)
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not a bundle: {MANIFEST_NAME} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc})") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version == 2:
        say(f"{bundle_dir}: already bundle format 2, nothing to do")
        return bundle_dir
    if version != 1 or "local" not in data.get("stages", {}):
        raise BundleError(f"{path}: not a format-1 bundle with a local stage (format_version {version!r})")
    if data.get("family") != "base":
        raise BundleError(f"{path}: only base-family bundles migrate exactly; re-export this {data.get('family')} "
                          "bundle with adafocus-export from its checkpoint")
    _verify_format1(bundle_dir, data)
    local = data["stages"].pop("local")
    work = Path(tempfile.mkdtemp(prefix=".migrate.", dir=bundle_dir))
    try:
        files = {"local": local["file"], **{f"{p}:local": f["local"] for p, f in data.get("precisions", {}).items()
                                           if "local" in f and f["local"] != local["file"]}}
        split_names: dict[str, tuple[str, str]] = {}
        for key, name in files.items():
            try:
                model = onnx.load(str(bundle_dir / name))
            except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends: not an ONNX file
                raise BundleError(f"{bundle_dir / name}: not a readable ONNX file ({type(exc).__name__})") from None
            backbone, head = split_local(model)
            stem = name[:-len(".onnx")] if name.endswith(".onnx") else name
            names = (stem.replace("local", "backbone", 1), stem.replace("local", "head", 1))
            if names[0] == stem:
                names = (f"backbone.{stem}", f"head.{stem}")
            b_name, h_name = f"{names[0]}.onnx", f"{names[1]}.onnx"
            onnx.save(backbone, str(work / b_name))
            onnx.save(head, str(work / h_name))
            worst = check_split(bundle_dir / name, work / b_name, work / h_name, check_inputs, seed,
                                steps=len(data["costs"]["exits"]) - 1)
            say(f"{'split ' + name:<24} -> {b_name} + {h_name}  (max |diff| {worst:.3g} on {check_inputs} random "
                "inputs)")
            split_names[key] = (b_name, h_name)
        b_name, h_name = split_names["local"]
        parts = data["costs"].get("parts", {})
        backbone_gflops = float(parts.get("local encoder (per patch)", local["gflops"]))
        feat = _features_info(work / b_name)
        data["stages"] = {"global": data["stages"]["global"], "policy": data["stages"]["policy"],
                          "backbone": {"file": b_name, "inputs": [local["inputs"][0]], "outputs": [feat],
                                       "gflops": backbone_gflops},
                          "head": {"file": h_name, "inputs": [feat] + local["inputs"][1:],
                                   "outputs": local["outputs"], "gflops": float(local["gflops"]) - backbone_gflops},
                          **{k: v for k, v in data["stages"].items() if k not in ("global", "policy")}}
        for prec, stage_files in data.get("precisions", {}).items():
            if "local" in stage_files:
                old = stage_files.pop("local")
                pair = (b_name, h_name) if old == local["file"] else split_names[f"{prec}:local"]
                stage_files["backbone"], stage_files["head"] = pair
        dropped = list(data.get("engines", {}))
        data["engines"] = {}
        data["format_version"] = 2  # costs and thresholds stay: the same steps cost and decide the same
        manifest = Manifest.from_dict({**data, "files": {}})
        new_files = {n: work / n for pair in split_names.values() for n in pair}
        # readers see the old bundle or the new, whole; a failure before the manifest is written puts back
        # any file the split replaced
        with lock_bundle(bundle_dir, exclusive=True), _installing(bundle_dir, new_files):
            manifest.files = checksum_files(bundle_dir, manifest.referenced_files())
            write_manifest(bundle_dir, manifest)
        for name in files.values():
            (bundle_dir / name).unlink(missing_ok=True)
        say(f"{'migrated':<24} {bundle_dir} to bundle format 2" + (f"; TensorRT engines dropped ({', '.join(dropped)}):"
                                                                  " rebuild with adafocus build-engines"
                                                                  if dropped else ""))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a damaged format-1 manifest or graph
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"{path}: cannot migrate this bundle ({type(exc).__name__}: {exc}); re-export it with "
                          "adafocus-export") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return bundle_dir


def _verify_format1(bundle_dir: Path, data: dict) -> None:
    """Every file a format-1 manifest lists matches its recorded sha256 (a migration re-hashes them, so it
    must not bless a changed file)."""
    try:
        entries = {name: (e["sha256"], int(e["size"])) for name, e in data["files"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise BundleError(f"{bundle_dir}: the format-1 manifest has no valid files table; re-export the bundle") \
            from None
    for name, (digest, size) in entries.items():
        path = bundle_dir / _safe_name(name)
        if not path.is_file() or path.stat().st_size != size or sha256_file(path) != digest:
            raise BundleError(f"bundle file {name} does not match the checksum its manifest recorded: it was "
                              "changed or truncated; not migrated (re-export the bundle)")


def split_local(model):
    """(backbone, head) ModelProtos of a format-1 base ``local.onnx``: cut at the tensor that the local MLP's
    first Gemm/MatMul reads (the encoder's pooled feature vector), renamed ``features``."""
    import onnx
    from onnx import utils

    g = model.graph
    cut = None
    for node in g.node:
        if node.op_type in ("Gemm", "MatMul") and any("local_mlp" in i for i in node.input[1:]):
            cut = node.input[0]
            break
    if cut is None:
        raise BundleError("local.onnx: cannot find the local MLP (a Gemm reading 'local_mlp' weights) to cut at; "
                          "re-export the bundle with adafocus-export")
    inferred = onnx.shape_inference.infer_shapes(model)
    extractor = utils.Extractor(inferred)
    backbone = extractor.extract_model([g.input[0].name], [cut])
    head = extractor.extract_model([cut] + [i.name for i in g.input[1:]], [o.name for o in g.output])
    for part in (backbone, head):
        _rename(part, cut, FEATURES)
        for value in list(part.graph.input) + list(part.graph.output):
            dims = value.type.tensor_type.shape.dim
            if dims:
                dims[0].ClearField("dim_value")
                dims[0].dim_param = "batch"
        del part.opset_import[:]
        part.opset_import.extend(model.opset_import)
        part.ir_version = model.ir_version
    return backbone, head


def check_split(local: Path, backbone: Path, head: Path, count: int, seed: int, steps: int = 1) -> float:
    """Largest absolute difference between the old local graph and backbone -> head on random inputs;
    BundleError when it is not within float rounding (1e-5 of the outputs' range)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in (local, backbone, head)]
    rng = np.random.default_rng(seed)
    worst = 0.0
    old, first, second = sessions
    for i in range(count):
        feeds = {}
        for value in old.get_inputs():
            shape = [3 if not isinstance(d, int) else d for d in value.shape]
            if "int" in value.type:
                feeds[value.name] = np.full(shape, i % steps, np.int64)
            else:
                feeds[value.name] = np.abs(rng.standard_normal(shape)).astype(np.float32)
        want = old.run(None, feeds)
        names = [v.name for v in old.get_inputs()]
        feat = first.run(None, {names[0]: feeds[names[0]]})[0]
        got = second.run(None, {FEATURES: feat, **{n: feeds[n] for n in names[1:]}})
        for w, g in zip(want, got, strict=True):
            diff = float(np.abs(w.astype(np.float64) - g).max())
            scale = max(1.0, float(np.abs(w).max()))
            if not diff <= 1e-5 * scale:
                raise BundleError(f"{local.name}: backbone + head differ from it by {diff:.3g}; not migrated "
                                  "(re-export the bundle)")
            worst = max(worst, diff)
    return worst


def _rename(model, old: str, new: str) -> None:
    for node in model.graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if value.name == old:
            value.name = new


def _features_info(backbone: Path) -> dict:
    from adafocus.export.onnx_export import io_specs

    _, outs = io_specs(backbone)
    return outs[0].to_dict()


__all__ = ["check_split", "migrate_bundle", "split_local"]

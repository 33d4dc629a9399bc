"""TensorRT readiness check for an exported ONNX stage; runs anywhere (needs onnx, not TensorRT or a GPU).

    >>> report = check_readiness("bundle/local.onnx")
    >>> print(report.format()); report.ok

What it checks, each finding an issue with a severity (``error`` makes ``ok`` False):

- every ``ai.onnx`` op is one the TensorRT 10.x ONNX parser supports: the support matrix is data
  (``trt_onnx_ops.json``, from onnx-tensorrt's ``docs/operators.md``, source recorded in the file);
  ops of other domains need plugins; the opset lies in the parser's documented range;
- ``GridSample`` stays 4-D (TensorRT has no 5-D/volumetric GridSample);
- Conv and pooling ops have the spatial ranks the parser takes (``spatial_dims`` in the op list: Conv 1-3, so
  X3D's Conv3d passes and is noted, grouped or not; pooling 2-3);
- ``Resize`` uses a mode, coordinate transformation and aspect policy TensorRT implements, without antialias;
- no dynamic dim except the batch (first) dim on the graph inputs and outputs;
- ``axes`` inputs that the parser needs as initializers (Slice, Squeeze, Reduce*, ...) are constant;
- Q/DQ nodes: counted and noted (explicit INT8: the engine must be built strongly typed, without
  ``fp16``); zero points must be 0 and the quantized type signed INT8 (not onnxruntime's default UINT8).
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from adafocus.errors import require

_OPS_FILE = "trt_onnx_ops.json"
_DEFAULT_DOMAINS = ("", "ai.onnx")
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_SEVERITY_ORDER = {"error": 0, "warning": 1, "note": 2}


@functools.cache
def trt_ops_table() -> dict[str, Any]:
    """The parser support matrix shipped with adafocus (``export/trt_onnx_ops.json``)."""
    text = resources.files("adafocus.export").joinpath(_OPS_FILE).read_text(encoding="utf-8")
    return json.loads(text)


@dataclass(frozen=True)
class ReadinessIssue:
    """One finding. ``code`` is stable (for tests and tools); ``message`` is for people."""

    severity: str  # "error" | "warning" | "note"
    code: str
    message: str
    node: str | None = None  # the first node it concerns
    count: int = 1  # how many nodes share this finding (reported once)


@dataclass
class ReadinessReport:
    """Result of ``check_readiness``: ``ok`` is True when nothing would stop a TensorRT build."""

    path: str
    opset: int | None
    issues: list[ReadinessIssue] = field(default_factory=list)
    op_histogram: dict[str, int] = field(default_factory=dict)
    qdq_nodes: int = 0
    inputs: dict[str, list[int | str | None]] = field(default_factory=dict)
    outputs: dict[str, list[int | str | None]] = field(default_factory=dict)
    ops_source: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> list[ReadinessIssue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[ReadinessIssue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def needs_strongly_typed(self) -> bool:
        """Q/DQ graphs are built strongly typed (and without the FP16 builder flag)."""
        return self.qdq_nodes > 0

    def codes(self, severity: str | None = None) -> set[str]:
        """Issue codes, optionally of one severity (handy in tests and scripts)."""
        return {i.code for i in self.issues if severity is None or i.severity == severity}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        out["needs_strongly_typed"] = self.needs_strongly_typed
        return out

    def format(self) -> str:
        """A short human-readable report: verdict, I/O, op histogram, then one line per issue."""
        name = Path(self.path).name
        verdict = "ready" if self.ok else f"NOT READY ({len(self.errors)} error{'s' * (len(self.errors) != 1)})"
        lines = [f"TensorRT readiness of {name}: {verdict}"]
        if self.warnings:
            lines[0] += f", {len(self.warnings)} warning{'s' * (len(self.warnings) != 1)}"
        lines.append(f"  opset {self.opset}; op list: {self.ops_source}")

        def io(d: dict[str, list]) -> str:
            return "; ".join(f"{k} [{', '.join(str(x) for x in v)}]" for k, v in d.items()) or "-"

        lines.append(f"  inputs:  {io(self.inputs)}")
        lines.append(f"  outputs: {io(self.outputs)}")
        ops = sorted(self.op_histogram.items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append(f"  {sum(self.op_histogram.values())} nodes: " + ", ".join(f"{k} x{v}" for k, v in ops))
        for issue in sorted(self.issues, key=lambda i: _SEVERITY_ORDER[i.severity]):
            where = f" [{issue.node}{f' and {issue.count - 1} more' if issue.count > 1 else ''}]" if issue.node else ""
            lines.append(f"  {issue.severity:<7} {issue.code:<20} {issue.message}{where}")
        return "\n".join(lines)


def _dims(value_info: Any) -> list[int | str | None] | None:
    """Shape of a ValueInfoProto: ints, dim names, None for unknown dims; None if the rank is unknown."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in t.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _walk(graph: Any):
    """Every node of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            subgraphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
            for g in subgraphs:
                yield from _walk(g)


def _constant_names(graph: Any) -> set[str]:
    names = {init.name for init in graph.initializer}
    names.update(out for node in _walk(graph) if node.op_type == "Constant" for out in node.output)
    return names


def check_readiness(model: str | os.PathLike | Any) -> ReadinessReport:
    """Check one ONNX file (or a loaded ``onnx.ModelProto``) against TensorRT 10's ONNX parser.

    Needs the ``onnx`` package (``pip install 'adafocus[export]'``). Weights are not loaded.
    """
    onnx = require("onnx", "export", "the TensorRT readiness check")
    if isinstance(model, (str, os.PathLike)):
        path = str(model)
        proto = onnx.load(path, load_external_data=False)
    else:
        path, proto = "<model>", model
    table = trt_ops_table()
    ops: dict[str, dict[str, Any]] = table["operators"]
    src = table["source"]
    found: dict[tuple[str, str, str], ReadinessIssue] = {}  # one entry per finding, counting its nodes

    def add(severity: str, code: str, message: str, node: Any = None) -> None:
        label = None
        if node is not None:
            label = node.name or f"{node.op_type} -> {node.output[0] if node.output else '?'}"
        key = (severity, code, message)
        if key in found:
            found[key] = replace(found[key], count=found[key].count + 1)
        else:
            found[key] = ReadinessIssue(severity, code, message, label)

    # --------------------------------------------------------------------------------- opset
    opset = next((o.version for o in proto.opset_import if o.domain in _DEFAULT_DOMAINS), None)
    lo, hi = table["opset_min"], table["opset_max"]
    if opset is None:
        add("error", "opset", "the model imports no ai.onnx opset")
    elif opset < lo:
        add("error", "opset", f"opset {opset} is older than the parser's minimum {lo}: re-export with opset >= 17")
    elif opset > hi:
        add("warning", "opset", f"opset {opset} is newer than the range documented for this op list ({lo}..{hi}); "
                                "recent TensorRT 10.x parsers accept it, older ones (e.g. JetPack 6's 10.3) may not")

    # ------------------------------------------------------------------------ shapes + I/O dims
    graph = proto.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(proto).graph
    except Exception as exc:  # a model with external weights or custom ops can defeat inference
        add("warning", "shape-inference", f"ONNX shape inference failed ({exc}); rank checks are partial")
        inferred = graph
    shapes: dict[str, list | None] = {}
    for vi in list(inferred.input) + list(inferred.value_info) + list(inferred.output):
        shapes[vi.name] = _dims(vi)
    for init in graph.initializer:
        shapes[init.name] = [int(d) for d in init.dims]

    initializer_names = {init.name for init in graph.initializer}
    report_inputs, report_outputs = {}, {}
    for kind, values, target in (("input", graph.input, report_inputs), ("output", graph.output, report_outputs)):
        for vi in values:
            if vi.name in initializer_names:  # IR < 4 lists weights as inputs
                continue
            dims = _dims(vi)
            target[vi.name] = dims if dims is not None else []
            if dims is None:
                add("error", "unknown-rank", f"{kind} {vi.name!r} has no shape: export with static shapes")
                continue
            for axis, d in enumerate(dims):
                if axis > 0 and not isinstance(d, int):
                    add("error", "dynamic-dim",
                        f"{kind} {vi.name!r} dim {axis} is dynamic ({d!r}) in {dims}: only the batch (first) dim "
                        "may be dynamic; export with fixed frame/patch sizes")

    # ---------------------------------------------------------------------------------- nodes
    constants = _constant_names(graph)
    histogram: Counter[str] = Counter()
    noted: set[str] = set()
    qdq = 0
    for node in _walk(graph):
        domain = node.domain or ""
        if domain not in _DEFAULT_DOMAINS:
            histogram[f"{domain}::{node.op_type}"] += 1
            add("error", "custom-op",
                f"{domain}::{node.op_type} is not an ai.onnx op: TensorRT needs a plugin for it "
                "(onnxruntime fusions such as com.microsoft ops come from optimised graphs: export the plain graph)",
                node)
            continue
        op = node.op_type
        histogram[op] += 1
        entry = ops.get(op)
        if entry is None:
            add("error", "unknown-op", f"{op} is not in TensorRT's ONNX parser op list ({src['ref']})", node)
            continue
        if not entry["supported"]:
            add("error", "unsupported-op", f"{op} is not supported by TensorRT's ONNX parser ({src['ref']})", node)
            continue
        if op == "GridSample":
            rank = len(shapes.get(node.input[0]) or []) or None
            if rank is None:
                add("warning", "gridsample-rank", "GridSample input rank unknown: TensorRT takes 4-D only", node)
            elif rank != 4:
                add("error", "gridsample-rank",
                    f"GridSample on a {rank}-D input: TensorRT supports 4-D (N, C, H, W) only; "
                    "fold the extra dim into the batch", node)
        elif op in _QDQ:
            qdq += 1
            _check_qdq(node, graph, add)
        elif op == "Resize":
            _check_resize(node, add)
        if "spatial_dims" in entry:
            _check_spatial_rank(node, entry["spatial_dims"], shapes, add)
        restriction = entry.get("restrictions", "")
        if "axes" in restriction and ("initializer" in restriction or "constant" in restriction):
            _check_constant_axes(onnx, node, opset, constants, add)
        elif restriction and op not in noted and op not in ("GridSample", "Resize", *_QDQ):
            noted.add(op)
            add("note", "restriction", f"{op}: {restriction}")
    if qdq:
        add("note", "qdq",
            f"{qdq} Q/DQ nodes (explicit INT8): build strongly typed, without fp16 "
            "(build_engine does this with strongly_typed='auto')")

    return ReadinessReport(
        path=path,
        opset=opset,
        issues=list(found.values()),
        op_histogram=dict(sorted(histogram.items())),
        qdq_nodes=qdq,
        inputs=report_inputs,
        outputs=report_outputs,
        ops_source=f"{src['repository']} {src['path']} @ {src['ref']}",
    )


def _check_spatial_rank(node: Any, allowed: list[int], shapes: dict[str, list | None], add: Any) -> None:
    """Conv / pooling: TensorRT takes the spatial ranks of the op list's ``spatial_dims`` (Conv 1-3, pooling
    2-3). 3-D convolutions (X3D's Conv3d, its channel-wise 3x3x3 ones grouped) are noted: they parse to
    ``addConvolutionNd``; their speed, in INT8 above all, is for a benchmark on the target GPU to tell."""
    rank = len(shapes.get(node.input[0]) or []) or None
    op = node.op_type
    if rank is None:
        add("warning", "spatial-rank", f"{op} input rank unknown: TensorRT takes {_dims_text(allowed)} only", node)
        return
    spatial = rank - 2
    if spatial not in allowed:
        add("error", "spatial-rank", f"{op} on a {rank}-D input ({spatial} spatial dims): TensorRT's parser takes "
                                     f"{_dims_text(allowed)} only", node)
    elif op == "Conv" and spatial == 3:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        kind = "grouped (channel-wise when group = channels) 3-D convolution" if group > 1 else "3-D convolution"
        add("note", "conv3d", f"{kind}: supported (addConvolutionNd, {', '.join(_CONV_TYPES)}; INT8 through Q/DQ); "
                              "measure its tactics on the target GPU", node)


_CONV_TYPES = ("FP32", "FP16", "BF16")
# Resize attributes TensorRT's parser takes (trt_onnx_ops.json, Resize restrictions), with ONNX's defaults
_RESIZE_OK = {"mode": ("nearest", ("nearest", "linear")),
              "coordinate_transformation_mode": ("half_pixel", ("half_pixel", "pytorch_half_pixel",
                                                                "tf_half_pixel_for_nn", "asymmetric", "align_corners")),
              "keep_aspect_ratio_policy": ("stretch", ("stretch",))}


def _check_resize(node: Any, add: Any) -> None:
    """Resize (the X3D glance's 224 -> 160 bilinear): modes TensorRT implements, and no antialiasing."""
    attrs = {a.name: a for a in node.attribute}
    for name, (default, allowed) in _RESIZE_OK.items():
        value = attrs[name].s.decode() if name in attrs else default
        if value not in allowed:
            add("error", "resize-mode", f"Resize {name}={value!r}: TensorRT supports {', '.join(allowed)}", node)
    if "antialias" in attrs and attrs["antialias"].i:
        add("error", "resize-antialias", "Resize with antialias=1: TensorRT does not antialias; resize without it "
                                         "(upstream's glance resize has none)", node)


def _dims_text(allowed: list[int]) -> str:
    return " or ".join(f"{d}-D" for d in allowed)


def _check_constant_axes(onnx: Any, node: Any, opset: int | None, constants: set[str], add: Any) -> None:
    """The parser needs ``axes`` as an initializer/constant for Slice, Squeeze, Reduce*, Pad, ..."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset or 1, "")
    except Exception:
        return
    names = [p.name for p in schema.inputs]
    if "axes" not in names:
        return  # axes is an attribute in this opset: constant by construction
    index = names.index("axes")
    if index < len(node.input) and node.input[index] and node.input[index] not in constants:
        add("error", "non-constant-axes",
            f"{node.op_type}'s axes input {node.input[index]!r} is computed at run time: TensorRT needs it "
            "as a constant (fold constants, e.g. with onnxslim)", node)


def _check_qdq(node: Any, graph: Any, add: Any) -> None:
    """TensorRT takes symmetric (zero point 0), signed INT8 (or FP8/INT4) quantization only."""
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    if len(node.input) < 3 or not node.input[2]:
        if node.op_type == "QuantizeLinear" and not any(a.name == "output_dtype" for a in node.attribute):
            add("warning", "qdq-type", "QuantizeLinear without a zero point quantizes to UINT8 (ONNX default); "
                                       "TensorRT needs INT8: give an int8 zero point of 0", node)
        return
    zp = inits.get(node.input[2])
    if zp is None:
        return  # computed or a Constant node: the parser will say
    if zp.data_type == TensorProto.UINT8:
        add("error", "qdq-type",
            "UINT8 quantization (onnxruntime's default activation type): TensorRT needs signed INT8; "
            "quantize with activation_type=QInt8, weight_type=QInt8 and symmetric activations", node)
    elif zp.data_type == TensorProto.INT8 and numpy_helper.to_array(zp).any():
        add("error", "qdq-zero-point",
            "non-zero zero point (asymmetric quantization): TensorRT needs zero points of 0; "
            "quantize with symmetric activations and weights", node)

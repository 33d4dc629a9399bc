"""One stage -> one ONNX file: the legacy TorchScript exporter, dynamic batch only, optional onnxslim pass.

Why the legacy exporter (``dynamo=False``): the stages hold no control flow (that stays on the host), the
TorchScript tracer is fast and dependable for conv nets, and its output is plain opset-17 ONNX that
TensorRT's parser takes. Only the batch dimension is symbolic (``"batch"``); every other dimension is fixed
by the config, which is what lets TensorRT build one optimisation profile per stage.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from adafocus.bundle import BATCH, TensorInfo
from adafocus.errors import AdaFocusError

if TYPE_CHECKING:  # torch only when exporting: io_specs/check_static serve torch-free tools too
    import torch

    from adafocus.export.stages import StageModule

DEFAULT_OPSET = 17
MIN_OPSET = 16  # GridSample (used by nothing inside the stages today, but kept possible) and stable Resize


class ExportError(AdaFocusError):
    """A stage cannot be exported, or its graph breaks the bundle's rules (e.g. a dynamic non-batch dim)."""


def export_stage(stage: StageModule, inputs: tuple[torch.Tensor, ...], path: str | Path,
                 opset: int = DEFAULT_OPSET) -> Path:
    """Trace ``stage`` on ``inputs`` and write ``path`` (batch dimension of every I/O symbolic)."""
    import torch

    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: the bundle needs opset >= {MIN_OPSET}")
    path = Path(path)
    names = list(stage.input_names) + list(stage.output_names)
    stage.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python scalars and the legacy exporter
        outputs = stage(*inputs)
        try:
            torch.onnx.export(
                stage, tuple(inputs), str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
                input_names=list(stage.input_names), output_names=list(stage.output_names),
                dynamic_axes={n: {0: BATCH} for n in names},
            )
        except Exception as exc:  # noqa: BLE001 - the tracer raises many types; its message holds a graph dump
            raise ExportError(f"cannot export the {stage.stage} stage to ONNX opset {opset}: "
                              f"{type(exc).__name__}: {_last_line(exc)}") from exc
    shapes = {n: list(t.shape) for n, t in zip(names, list(inputs) + list(outputs), strict=True)}
    _pin_shapes(path, shapes)
    check_static(path)
    return path


def simplify(path: str | Path) -> bool:
    """Simplify ``path`` in place with onnxslim when it is installed; True if it ran.

    onnxslim folds constants and removes identity/no-op nodes; the I/O names and shapes are kept (checked
    again by :func:`check_static`, and the caller verifies the numbers again).
    """
    try:
        import onnxslim
    except ImportError:
        return False
    path = Path(path)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slim = onnxslim.slim(onnx.load(str(path)))
    if slim is None:
        raise ExportError(f"onnxslim returned nothing for {path.name}")
    onnx.save(slim, str(path))
    check_static(path)
    return True


def io_specs(path_or_model: str | Path | onnx.ModelProto) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Inputs and outputs of an ONNX graph as manifest records (shape: ints and ``"batch"``)."""
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model),
                                                                                       load_external_data=False)
    g = model.graph
    initializers = {i.name for i in g.initializer}
    return ([_info(v) for v in g.input if v.name not in initializers], [_info(v) for v in g.output])


def check_static(path: str | Path) -> None:
    """Refuse a graph whose I/O has a symbolic dimension other than the leading batch."""
    inputs, outputs = io_specs(path)
    for t in inputs + outputs:
        bad = [i for i, d in enumerate(t.shape) if isinstance(d, str) and (i != 0 or d != BATCH)]
        if bad or not t.shape or t.shape[0] != BATCH:
            raise ExportError(f"{Path(path).name}: {t} must have a dynamic batch dimension first and "
                              "every other dimension fixed")


def _pin_shapes(path: Path, shapes: dict[str, list[int]]) -> None:
    """Declare every I/O dimension but the batch as the fixed size it had when traced.

    The tracer records ``view(b, t, *x.shape[1:])`` as shape arithmetic, so some output dims come out
    symbolic although the config fixes them; the interface states them, TensorRT and onnxslim fold the rest.
    """
    model = onnx.load(str(path))
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name not in shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        want = shapes[value.name]
        if len(dims) != len(want):
            raise ExportError(f"{path.name}: {value.name} has rank {len(dims)} in the graph, {len(want)} traced")
        for i, (d, size) in enumerate(zip(dims, want, strict=True)):
            if i == 0:
                d.dim_param = BATCH
            else:
                d.dim_value = int(size)
    onnx.save(model, str(path))


def _last_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _info(value: onnx.ValueInfoProto) -> TensorInfo:
    tt = value.type.tensor_type
    shape: list[int | str] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            shape.append(int(d.dim_value))
        else:
            shape.append(d.dim_param or "?")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
    return TensorInfo(value.name, shape, dtype)


__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "ExportError", "check_static", "export_stage", "io_specs", "simplify"]

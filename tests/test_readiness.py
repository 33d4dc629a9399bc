"""TensorRT readiness check: clean graphs pass; dynamic spatial dims, 5-D GridSample, unsupported or
custom ops, run-time axes and TensorRT-incompatible Q/DQ are flagged."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from adafocus.export.readiness import check_readiness, trt_ops_table


class CropAndClassify(torch.nn.Module):
    """GridSample crop (4-D) + conv + linear: the ops of a local-encoder stage, in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, frames: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        patch = torch.nn.functional.grid_sample(frames, grid, align_corners=False)
        return self.fc(self.conv(patch).relu().mean(dim=(2, 3)))


def export(module, args, path, names_in, dynamic_axes, opset=17):
    torch.onnx.export(module.eval(), args, str(path), input_names=names_in, output_names=["y"],
                      dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)
    return path


def single_node_model(op, inputs, outputs, opset, **attrs):
    node = helper.make_node(op, [i.name for i in inputs], [o.name for o in outputs], **attrs)
    graph = helper.make_graph([node], "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


@pytest.fixture(scope="module")
def clean_onnx(tmp_path_factory):
    args = (torch.randn(2, 3, 16, 16), torch.rand(2, 8, 8, 2) * 2 - 1)
    dyn = {"frames": {0: "batch"}, "grid": {0: "batch"}, "y": {0: "batch"}}
    return export(CropAndClassify(), args, tmp_path_factory.mktemp("r") / "clean.onnx", ["frames", "grid"], dyn)


def test_ops_table_records_its_source():
    table = trt_ops_table()
    assert table["source"]["repository"] == "onnx/onnx-tensorrt"
    assert table["source"]["path"] == "docs/operators.md"
    assert "10." in table["source"]["ref"]
    ops = table["operators"]
    assert ops["GridSample"]["supported"] and "4D" in ops["GridSample"]["restrictions"]
    assert ops["Conv"]["supported"] and not ops["Unique"]["supported"] and not ops["AffineGrid"]["supported"]
    assert len(ops) > 150


def test_clean_model_passes(clean_onnx):
    report = check_readiness(clean_onnx)
    assert report.ok, report.format()
    assert report.codes("error") == set() and report.codes("warning") == set()
    assert report.opset == 17
    assert report.inputs == {"frames": ["batch", 3, 16, 16], "grid": ["batch", 8, 8, 2]}
    assert report.op_histogram["GridSample"] == 1 and report.op_histogram["Conv"] == 1
    assert report.qdq_nodes == 0 and not report.needs_strongly_typed
    text = report.format()
    assert "clean.onnx: ready" in text and "GridSample x1" in text
    assert report.to_dict()["ok"] is True


def test_dynamic_spatial_dim_is_flagged(tmp_path):
    args = (torch.randn(2, 3, 16, 16), torch.rand(2, 8, 8, 2) * 2 - 1)
    dyn = {"frames": {0: "batch", 2: "height"}, "grid": {0: "batch"}, "y": {0: "batch"}}
    path = export(CropAndClassify(), args, tmp_path / "dyn.onnx", ["frames", "grid"], dyn)
    report = check_readiness(path)
    assert not report.ok
    [issue] = report.errors
    assert issue.code == "dynamic-dim" and "'frames' dim 2" in issue.message and "height" in issue.message
    assert "NOT READY (1 error)" in report.format()


def test_5d_gridsample_opset20_is_flagged():
    model = single_node_model("GridSample", [vi("x", [1, 2, 4, 4, 4]), vi("grid", [1, 2, 2, 2, 3])],
                              [vi("y", [1, 2, 2, 2, 2])], opset=20)
    onnx.checker.check_model(model)
    report = check_readiness(model)
    assert report.codes("error") == {"gridsample-rank"}
    assert "5-D" in report.errors[0].message


def test_unsupported_unknown_and_custom_ops_are_flagged():
    unique = single_node_model("Unique", [vi("x", [6])], [vi("y", [None])], opset=17)
    assert check_readiness(unique).codes("error") == {"unsupported-op"}

    node = helper.make_node("FusedConv", ["x"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "g", [vi("x", [1, 3, 4, 4])], [vi("y", [1, 3, 4, 4])])
    custom = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                     helper.make_opsetid("com.microsoft", 1)])
    report = check_readiness(custom)
    assert report.codes("error") == {"custom-op"}
    assert report.op_histogram == {"com.microsoft::FusedConv": 1}


def test_old_opset_is_an_error_new_opset_a_warning():
    old = single_node_model("Relu", [vi("x", [1, 4])], [vi("y", [1, 4])], opset=8)
    assert "opset" in check_readiness(old).codes("error")
    new = single_node_model("Relu", [vi("x", [1, 4])], [vi("y", [1, 4])], opset=21)
    report = check_readiness(new)
    assert report.ok and "opset" in report.codes("warning")


def test_runtime_axes_are_flagged():
    # Squeeze (opset 13+) takes axes as an input; TensorRT's parser needs it constant.
    model = single_node_model("Squeeze", [vi("x", [1, 4, 1]), vi("axes", [1], TensorProto.INT64)],
                              [vi("y", [1, 4])], opset=17)
    assert check_readiness(model).codes("error") == {"non-constant-axes"}
    model.graph.input.pop()
    model.graph.initializer.append(helper.make_tensor("axes", TensorProto.INT64, [1], [2]))
    assert check_readiness(model).ok


def _quantized(tmp_path, clean_onnx, name, **kwargs):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.items = iter([{"frames": rng.standard_normal((1, 3, 16, 16), dtype=np.float32),
                                "grid": rng.uniform(-1, 1, (1, 8, 8, 2)).astype(np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self.items, None)

    out = tmp_path / name
    quantize_static(str(clean_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                    **kwargs)
    return out


def test_int8_symmetric_qdq_is_noted(tmp_path, clean_onnx):
    from onnxruntime.quantization import QuantType

    path = _quantized(tmp_path, clean_onnx, "int8.onnx", activation_type=QuantType.QInt8,
                      weight_type=QuantType.QInt8, extra_options={"ActivationSymmetric": True})
    report = check_readiness(path)
    assert report.ok, report.format()
    assert report.qdq_nodes >= 2 and report.needs_strongly_typed
    assert "qdq" in report.codes("note")
    assert "Q/DQ nodes (explicit INT8): build strongly typed" in report.format()


def test_uint8_asymmetric_qdq_is_flagged(tmp_path, clean_onnx):
    from onnxruntime.quantization import QuantType

    path = _quantized(tmp_path, clean_onnx, "uint8.onnx", activation_type=QuantType.QUInt8,
                      weight_type=QuantType.QInt8)
    report = check_readiness(path)
    assert not report.ok
    assert "qdq-type" in report.codes("error")

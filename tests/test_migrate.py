"""Format-1 bundles (one local.onnx): refused with the way out named, and migrated exactly by `adafocus migrate`.

The format-1 fixture is made from the shipped (format-2) demo bundle by joining its backbone and head back
into one local graph, as the exporter of format 1 wrote it (encoder, then the classifier step)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")

from adafocus.bundle import MANIFEST_NAME, checksum_files, load_bundle  # noqa: E402
from adafocus.cli import main  # noqa: E402
from adafocus.demo.shipped import bundle_path, sample_videos  # noqa: E402
from adafocus.errors import BundleError  # noqa: E402
from adafocus.runtime.pipeline import Pipeline  # noqa: E402


def _format1(dst: Path) -> Path:
    """A format-1 copy of the demo bundle: local.onnx = backbone + head, the manifest of version 1."""
    src = bundle_path()
    shutil.copytree(src, dst)
    backbone, head = onnx.load(str(dst / "backbone.onnx")), onnx.load(str(dst / "head.onnx"))
    # one graph of both (their names come from one graph: the demo bundle was itself split from one)
    graph = onnx.helper.make_graph(
        list(backbone.graph.node) + list(head.graph.node), "local",
        [backbone.graph.input[0]] + [i for i in head.graph.input if i.name != "features"], list(head.graph.output),
        list(backbone.graph.initializer) + list(head.graph.initializer))
    local = onnx.helper.make_model(graph, opset_imports=list(backbone.opset_import))
    local.ir_version = backbone.ir_version
    onnx.save(local, str(dst / "local.onnx"))
    (dst / "backbone.onnx").unlink()
    (dst / "head.onnx").unlink()
    data = json.loads((dst / MANIFEST_NAME).read_text())
    b, h = data["stages"].pop("backbone"), data["stages"].pop("head")
    data["stages"] = {"global": data["stages"]["global"], "policy": data["stages"]["policy"],
                      "local": {"file": "local.onnx", "inputs": b["inputs"] + h["inputs"][1:],
                                "outputs": h["outputs"], "gflops": b["gflops"] + h["gflops"]},
                      "dense": data["stages"]["dense"]}
    data["format_version"] = 1
    names = ["global.onnx", "policy.onnx", "local.onnx", "dense.onnx"]
    data["files"] = {k: v.to_dict() for k, v in checksum_files(dst, names).items()}
    (dst / MANIFEST_NAME).write_text(json.dumps(data))
    return dst


def test_format1_is_refused_naming_migrate(tmp_path, capsys):
    old = _format1(tmp_path / "old")
    with pytest.raises(BundleError, match="format version 1 is older.*adafocus migrate BUNDLE"):
        load_bundle(old)
    with pytest.raises(SystemExit) as exc:
        main(["inspect", str(old)])
    assert exc.value.code == 1 and "adafocus migrate" in capsys.readouterr().err


def test_migrate_is_exact_and_keeps_the_decisions(tmp_path, capsys):
    old = _format1(tmp_path / "old")
    with pytest.raises(SystemExit) as exc:
        main(["migrate", str(old)])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "max |diff| 0 on 8 random inputs" in out, out
    assert sorted(p.name for p in old.iterdir()) == sorted(p.name for p in bundle_path().iterdir())
    new = load_bundle(old).manifest
    ref = load_bundle(bundle_path()).manifest
    assert new.stages["backbone"].to_dict() == ref.stages["backbone"].to_dict()
    assert new.stages["head"].to_dict() == ref.stages["head"].to_dict()
    assert new.exit.thresholds == ref.exit.thresholds and new.costs == ref.costs
    with Pipeline.from_bundle(old, threads=1) as a, Pipeline.from_bundle(bundle_path(), threads=1) as b:
        for video in sample_videos():
            ra, rb = a(video), b(video)
            assert (ra.label, ra.exit_step, ra.score, ra.patches) == (rb.label, rb.exit_step, rb.score, rb.patches)
    # a second run has nothing to do
    with pytest.raises(SystemExit) as exc:
        main(["migrate", str(old)])
    assert exc.value.code == 0 and "already bundle format 2" in capsys.readouterr().out


def test_migrate_refuses_what_it_cannot_do_exactly(tmp_path, capsys):
    old = _format1(tmp_path / "old")
    data = json.loads((old / MANIFEST_NAME).read_text())
    (old / MANIFEST_NAME).write_text(json.dumps({**data, "family": "tsm"}))
    before = sorted(p.name for p in old.iterdir())
    with pytest.raises(SystemExit) as exc:
        main(["migrate", str(old)])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "re-export this tsm bundle" in err and err.count("\n") == 1
    assert sorted(p.name for p in old.iterdir()) == before  # nothing written


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "global.onnx").write_bytes(b"changed" + (d / "global.onnx").read_bytes()[7:]),
     "global.onnx does not match the checksum"),
    (lambda d: d.joinpath(MANIFEST_NAME).write_text(json.dumps(
        {k: v for k, v in json.loads(d.joinpath(MANIFEST_NAME).read_text()).items() if k != "costs"})),
     "cannot migrate this bundle (KeyError"),
])
def test_a_damaged_format1_bundle_is_one_line_and_left_alone(tmp_path, capsys, damage, message):
    old = _format1(tmp_path / "old")
    damage(old)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(SystemExit) as exc:
        main(["migrate", str(old)])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and message in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before

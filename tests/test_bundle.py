"""The bundle format (adafocus.bundle): manifest round trip, version checks, checksums, atomic updates.

These tests build small bundles by hand (a few bytes per "ONNX" file): the format does not depend on what
the files hold. Exported bundles are tested in test_export.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adafocus.bundle import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Costs,
    ExitPolicy,
    Manifest,
    Preprocessing,
    StageInfo,
    TensorInfo,
    checksum_files,
    dumps,
    load_bundle,
    read_manifest,
    update_manifest,
    write_manifest,
)
from adafocus.errors import BundleError

REPO = Path(__file__).resolve().parents[1]


def _manifest() -> Manifest:
    t = TensorInfo
    stages = {
        "global": StageInfo("global.onnx", [t("frames", ["batch", 8, 3, 64, 64], "float32")],
                            [t("logits", ["batch", 5], "float32")], 0.5),
        "policy": StageInfo("policy.onnx", [t("fmap", ["batch", 8, 16, 2, 2], "float32")],
                            [t("actions", ["batch", 16, 4], "float32")], 0.01),
        "backbone": StageInfo("backbone.onnx", [t("patch", ["batch", 3, 32, 32], "float32")],
                              [t("features", ["batch", 16], "float32")], 0.15),
        "head": StageInfo("head.onnx", [t("features", ["batch", 16], "float32"), t("state", ["batch", 8], "float32"),
                                        t("context", ["batch", 8], "float32"), t("step", ["batch"], "int64")],
                          [t("logits", ["batch", 5], "float32")], 0.05),
    }
    pre = Preprocessing(resize_size=64, frame_size=64, glance_size=64, mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2],
                        rgb=True, num_segments=16, num_glance=8, glance_positions=list(range(1, 16, 2)),
                        candidates=16, num_focus=4, focus_clamp=True, patch_size=32, crop_min=16.0, crop_max=64.0,
                        patches_per_step=1)
    return Manifest(producer={"name": "adafocus", "version": "test"}, created="2025-01-01T00:00:00Z", preset="x",
                    family="base", config={"num_classes": 5}, labels=[f"c{i}" for i in range(5)], preprocessing=pre,
                    stages=stages, costs=Costs(0.5, 0.01, 0.2, [0.5, 0.71, 0.91, 1.11, 1.31], 1),
                    exit=ExitPolicy(), opset=17, precision="fp32", training={"kind": "test"})


@pytest.fixture()
def bundle_dir(tmp_path: Path) -> Path:
    """A valid hand-made bundle with four small stage files."""
    d = tmp_path / "b"
    d.mkdir()
    m = _manifest()
    for i, st in enumerate(m.stages.values()):
        (d / st.file).write_bytes(bytes(range(i, i + 200)))
    m.files = checksum_files(d, m.referenced_files())
    write_manifest(d, m)
    return d


def _edit_json(d: Path, fn) -> None:
    data = json.loads((d / MANIFEST_NAME).read_text())
    fn(data)
    (d / MANIFEST_NAME).write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------ manifest
def test_manifest_round_trip(bundle_dir):
    m = _manifest()
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))).to_dict() == m.to_dict()
    assert json.loads(dumps(m.to_dict())) == m.to_dict()
    b = load_bundle(bundle_dir)
    assert b.manifest.stages["head"].inputs[3] == TensorInfo("step", ["batch"], "int64")
    assert b.manifest.training == {"kind": "test"} and b.manifest.exit.thresholds == {}
    assert b.stage_path("policy") == bundle_dir / "policy.onnx"
    assert not b.has_stage("dense")
    assert "global.onnx" in b.describe() and "not calibrated" in b.describe()


@pytest.mark.parametrize("version, words", [(FORMAT_VERSION + 1, "newer"), (FORMAT_VERSION - 1, "older")])
def test_other_format_versions_are_refused(bundle_dir, version, words):
    _edit_json(bundle_dir, lambda d: d.update(format_version=version))
    with pytest.raises(BundleError, match=f"format version {version} is {words}"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(format="something-else"), "not an adafocus bundle"),
    (lambda d: d["stages"].pop("policy"), "stages.policy is missing"),
    (lambda d: d["costs"].update(surprise=1), "unknown key costs.surprise"),
    (lambda d: d.pop("labels"), "bad bundle manifest .*manifest.json: labels is missing"),
    (lambda d: d["files"].update({"../escape.onnx": {"sha256": "0", "size": 1}}), "bad bundle file name"),
])
def test_malformed_manifests_are_refused(bundle_dir, edit, match):
    _edit_json(bundle_dir, edit)
    with pytest.raises(BundleError, match=match):
        load_bundle(bundle_dir)


def test_missing_bundle_manifest_or_json(tmp_path, bundle_dir):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(tmp_path)
    (bundle_dir / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_dir)


# ------------------------------------------------------------------------------------------ checksums
def test_changed_byte_is_refused_naming_the_file(bundle_dir):
    path = bundle_dir / "backbone.onnx"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="backbone.onnx does not match its sha256"):
        load_bundle(bundle_dir)
    assert load_bundle(bundle_dir, verify=False).manifest.preset == "x"  # verify=False only reads


def test_truncated_and_missing_files_are_refused(bundle_dir):
    path = bundle_dir / "global.onnx"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(BundleError, match="global.onnx has 199 bytes"):
        load_bundle(bundle_dir)
    path.unlink()
    with pytest.raises(BundleError, match="global.onnx is missing"):
        load_bundle(bundle_dir)


def test_update_manifest_adds_files_and_rehashes(bundle_dir):
    (bundle_dir / "backbone.int8.onnx").write_bytes(b"int8 graph")
    (bundle_dir / "dense.onnx").write_bytes(b"dense graph")

    def add(m: Manifest) -> None:
        table = [None, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0][:m.num_exits()]
        m.exit.thresholds["budget-1.0"] = {"budget_gflops": 1.0, "thresholds": table}
        m.precisions["int8"] = {"global": "global.onnx", "policy": "policy.onnx", "backbone": "backbone.int8.onnx",
                                "head": "head.onnx"}
        m.stages["dense"] = StageInfo("dense.onnx", m.stages["global"].inputs, m.stages["global"].outputs, 4.0)
        m.costs.dense = 4.0

    m = update_manifest(bundle_dir, add)
    assert m.files["backbone.int8.onnx"].size == len(b"int8 graph")
    b = load_bundle(bundle_dir)  # verifies the new files too
    assert b.has_stage("dense") and b.manifest.exit.thresholds["budget-1.0"]["thresholds"][1] == 3.5
    assert b.manifest.precisions["int8"]["backbone"] == "backbone.int8.onnx" and b.manifest.costs.dense == 4.0
    assert "int8: global global.onnx" in b.describe()
    assert sorted(p.name for p in bundle_dir.iterdir()) == sorted(
        ["global.onnx", "policy.onnx", "backbone.onnx", "head.onnx", "backbone.int8.onnx", "dense.onnx", MANIFEST_NAME])
    # a file changed behind the manifest's back is not blessed by the next update
    (bundle_dir / "dense.onnx").write_bytes(b"changed")
    with pytest.raises(BundleError, match="dense.onnx"):
        update_manifest(bundle_dir, lambda m: None)


def test_write_manifest_is_atomic(bundle_dir):
    m = read_manifest(bundle_dir)
    m.preset = "renamed"
    write_manifest(bundle_dir, m)
    assert read_manifest(bundle_dir).preset == "renamed"
    assert not [p for p in bundle_dir.iterdir() if p.name.startswith(".")]


def test_bundle_module_does_not_import_torch():
    code = "import sys, adafocus.bundle; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0

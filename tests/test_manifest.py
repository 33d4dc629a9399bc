"""Manifest validation as a user meets it: a bad value is one line naming the key path, the type expected
and what was found (inspect, run and every other command read bundles through load_bundle), an unknown
key gets a "did you mean", and every manifest that load_bundle accepts also runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adafocus.bundle import MANIFEST_NAME, load_bundle
from adafocus.cli import main, run_main
from adafocus.demo.shipped import bundle_path, sample_videos
from adafocus.errors import AdaFocusError, BundleError
from adafocus.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A copy of the shipped demo bundle without its dense baseline (not needed here)."""
    dst = tmp_path_factory.mktemp("manifest") / "bundle"
    shutil.copytree(bundle_path(), dst)
    return dst


@pytest.fixture()
def bundle(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "b"))


def _edit(bundle: Path, fn) -> None:
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    fn(data)
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))


def _one_error_line(capsys, argv, entry=main) -> str:
    with pytest.raises(SystemExit) as exc:
        entry(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "internal error" not in err
    return lines[0]


CASES = [
    (lambda d: d["preprocessing"].update(patch_size="64"),
     "preprocessing.patch_size must be an integer, found the string '64'"),
    (lambda d: d["costs"].update(exits="0.04,0.06"),
     "costs.exits must be a list of numbers, found the string '0.04,0.06'"),
    (lambda d: d["preprocessing"].update(patch_sise=d["preprocessing"].pop("patch_size")),
     "unknown key preprocessing.patch_sise (did you mean 'patch_size'?)"),
    (lambda d: d["preprocessing"].update(rgb="yes"), "preprocessing.rgb must be true or false, found the string"),
    (lambda d: d["preprocessing"].update(glance_positions=[1, 3]), "preprocessing.glance_positions must hold"),
    (lambda d: d["stages"]["backbone"]["inputs"][0].update(shape=["batch", 3, "64", 64]),
     "stages.backbone.inputs[0].shape must hold positive sizes or 'batch'"),
    (lambda d: d["exit"]["thresholds"]["0.0562"].update(thresholds=[1.0, 2.0]),
     "exit.thresholds.0.0562.thresholds must hold one value per exit (9), found 2"),
    (lambda d: d["exit"].update(criterion="max_logits"), "exit.criterion must be one of max_logit, neg_entropy"),
    (lambda d: d["costs"].update(exits=[0.1, 0.05] + [0.2] * 7), "costs.exits must be non-negative and "
                                                               "non-decreasing"),
    (lambda d: d["preprocessing"].update(frame_size=160), "preprocessing.frame_size (160) must not exceed"),
    (lambda d: d["preprocessing"].update(patch_size=65), "does not match preprocessing (3, patch_size, patch_size)"),
    (lambda d: d.update(labels=d["labels"][:-1]), "does not match the number of labels"),
    (lambda d: d.update(sources={}), "unknown key sources (did you mean 'source'?)"),
    (lambda d: d["stages"]["head"]["inputs"][1].update(shape=["batch", 128]),
     "stages.head.inputs 'state' ['batch', 128] must be [batch, D] like 'context'"),
    (lambda d: d["stages"]["head"].update(inputs=d["stages"]["head"]["inputs"][:1]),
     "stages.head.inputs lacks state, context, step"),
    (lambda d: d["stages"]["backbone"]["outputs"][0].update(name="feats"),
     "stages.backbone.outputs must hold 'features'"),
]


@pytest.mark.parametrize("edit, message", CASES)
def test_bad_manifest_is_one_line_for_inspect_and_run(bundle, capsys, edit, message):
    _edit(bundle, edit)
    before = (bundle / MANIFEST_NAME).read_bytes()
    line = _one_error_line(capsys, ["inspect", str(bundle), "--no-readiness"])
    assert message in line and str(bundle / MANIFEST_NAME) in line, line
    assert _one_error_line(capsys, [str(sample_videos()[0]), "--model", str(bundle)], run_main) == line
    assert (bundle / MANIFEST_NAME).read_bytes() == before  # nothing rewrote the bad manifest


def test_manifest_that_is_not_an_object(bundle, capsys):
    (bundle / MANIFEST_NAME).write_text("[1, 2]")
    assert "not an adafocus bundle manifest" in _one_error_line(capsys, ["inspect", str(bundle)])
    (bundle / MANIFEST_NAME).write_text('{"format": "adafocus-bundle", "format_version": true}')
    assert "no valid format_version" in _one_error_line(capsys, ["inspect", str(bundle)])


# Edits that keep the manifest valid: load_bundle must accept them and the runtime must then run the video
# (or fail with a typed error, never another exception).
ACCEPTED = [
    lambda d: d["exit"].update(thresholds={}),
    lambda d: d["exit"]["thresholds"]["0.0562"].update(thresholds=[None] * 9),
    lambda d: d["exit"]["thresholds"]["0.0562"].update(thresholds=[-1e30] * 9),
    lambda d: d["exit"].update(criterion="neg_entropy"),
    lambda d: d.update(labels=[f"class {i}" for i in range(10)]),
    lambda d: d["preprocessing"].update(crop_min=1.0, crop_max=128.0),
    lambda d: d["preprocessing"].update(crop_min=96.0, crop_max=96.0),
    lambda d: d["preprocessing"].update(mean=[0, 0, 0], std=[1e-3, 1e3, 1]),
    lambda d: d["preprocessing"].update(rgb=False),
    lambda d: d["preprocessing"].update(glance_positions=[0] * 8),
    lambda d: d["preprocessing"].update(glance_positions=list(range(15, 7, -1))),
    lambda d: d["preprocessing"].update(resize_size=4096),
    lambda d: d["preprocessing"].update(focus_clamp=False),
    lambda d: d["costs"].update(exits=[0.0] * 9, dense=None),
    lambda d: d["costs"].update(exits=[1e9] * 9),
    lambda d: d.update(training=None, verification={}, source={}, preset=None),
]


@pytest.mark.parametrize("edit", ACCEPTED)
def test_every_accepted_manifest_runs(bundle, edit):
    _edit(bundle, edit)
    load_bundle(bundle)  # accepted
    try:
        with Pipeline.from_bundle(bundle, threads=1) as pipe:
            res = pipe(sample_videos()[0], budget=None)
    except AdaFocusError:
        return  # refused with a typed, one-line error: acceptable
    assert res.label in pipe.labels and 0 <= res.exit_step < len(pipe.exits)


def test_engine_io_differing_from_the_manifest_is_refused(bundle):
    """The manifest is not checksummed: records that disagree with the (checksummed) ONNX files are caught
    when the engines are created, naming the stage and tensor."""
    def narrower(d):  # consistent in the manifest (state as wide as context), not what head.onnx takes
        for t in d["stages"]["head"]["inputs"]:
            if t["name"] in ("state", "context"):
                t["shape"] = ["batch", 128]

    _edit(bundle, narrower)
    with pytest.raises(BundleError, match="head.onnx.*input '(state|context)' has shape"):
        Pipeline.from_bundle(bundle, threads=1)

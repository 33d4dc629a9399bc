"""One engine-set factory (adafocus.runtime.engine_set.open_engines) and one exit rule (adafocus.runtime.exits)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from bundles import one_torch_thread

from adafocus.bundle import STAGES, load_bundle
from adafocus.errors import BundleError, EngineError
from adafocus.runtime.engine_set import open_engines
from adafocus.runtime.exits import first_exit, passes, threshold


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-weight tiny bundle (+ a copy with a random dense baseline) and its checkpoint."""
    from adafocus.export.dense import add_dense
    from adafocus.export.exporter import export_bundle
    from adafocus.models import build_model, save
    from adafocus.models.checkpoint import set_batchnorm_statistics
    from adafocus.models.presets import preset_config

    d = tmp_path_factory.mktemp("engine_set")
    with one_torch_thread():
        torch.manual_seed(0)
        model = set_batchnorm_statistics(build_model(preset_config("tiny")))
        ckpt = save(model, d / "tiny.pt", preset="tiny")
        export_bundle(ckpt, d / "bundle", verify=False, simplify_graphs=False, log=None)
        shutil.copytree(d / "bundle", d / "dense")
        add_dense(d / "dense", simplify_graph=False, log=None)
    return {"bundle": d / "bundle", "dense": d / "dense", "ckpt": ckpt, "dir": d}


@pytest.fixture
def created(monkeypatch):
    """Every engine create_engine makes, in order (to check the factory closes them on a failure)."""
    import adafocus.engines.registry as registry

    made = []
    real = registry.create_engine

    def recording(*args, **kwargs):
        engine = real(*args, **kwargs)
        made.append(engine)
        return engine

    monkeypatch.setattr(registry, "create_engine", recording)
    return made


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


# ------------------------------------------------------------------------------------------ the factory
def test_opens_the_four_stages(tiny):
    bundle = load_bundle(tiny["bundle"])
    name, engines = open_engines(bundle, "auto", "cpu", threads=1)
    try:
        assert name == "ort" and tuple(engines) == STAGES == ("global", "policy", "backbone", "head")
        for stage, eng in engines.items():
            assert eng.is_active
            assert eng.input_names == [t.name for t in bundle.manifest.stages[stage].inputs]
        s = bundle.manifest.preprocessing
        frames = np.zeros((1, len(s.glance_positions), 3, s.frame_size, s.frame_size), np.float32)
        out = engines["global"].run({"frames": frames})
        assert np.asarray(out["logits"]).shape == (1, len(bundle.manifest.labels))
    finally:
        for eng in engines.values():
            eng.close()


def test_a_bundle_directory_and_a_subset(tiny):
    name, engines = open_engines(tiny["bundle"], "ort", stages=("policy",))
    assert name == "ort" and list(engines) == ["policy"]
    engines["policy"].close()


def test_unknown_precision_is_one_line_bundle_error(tiny, created):
    bundle = load_bundle(tiny["bundle"])
    with pytest.raises(BundleError) as exc:
        open_engines(bundle, "ort", precision="int8")
    text = _one_line(exc)
    assert "has no int8 files" in text and "has: fp32" in text and "calibrate int8" in text
    assert created == []  # nothing opened before the precision was checked
    with pytest.raises(BundleError, match="has no int4 files"):
        open_engines(bundle, "torch", precision="int4", checkpoint=tiny["ckpt"])  # checked before the engine


def test_dense_stage_opens_alone(tiny):
    bundle = load_bundle(tiny["dense"])
    name, engines = open_engines(bundle, "ort", "cpu", stages=("dense",), threads=1)
    try:
        assert name == "ort" and list(engines) == ["dense"]
        p = bundle.manifest.preprocessing
        frames = np.zeros((2, p.candidates, 3, p.frame_size, p.frame_size), np.float32)
        assert np.asarray(engines["dense"].run({"frames": frames})["logits"]).shape == (2, len(bundle.labels))
    finally:
        engines["dense"].close()
    with pytest.raises(BundleError) as exc:  # a bundle without the dense baseline
        open_engines(tiny["bundle"], "ort", stages=("dense",))
    assert "has no stage 'dense'" in _one_line(exc)


def test_torch_engine_builds_the_stages_from_the_checkpoint(tiny):
    from adafocus.errors import CheckpointError
    from adafocus.models import build_model, save
    from adafocus.models.presets import preset_config

    bundle = load_bundle(tiny["bundle"])
    with one_torch_thread():
        name, engines = open_engines(bundle, "torch", checkpoint=tiny["ckpt"])
        try:
            assert name == "torch" and tuple(engines) == STAGES
        finally:
            for eng in engines.values():
                eng.close()
        with pytest.raises(EngineError, match="needs the PyTorch checkpoint"):
            open_engines(bundle, "torch")
        torch.manual_seed(5)
        other = save(build_model(preset_config("tiny")), tiny["dir"] / "other.pt", preset="tiny")
        with pytest.raises(CheckpointError):  # another model's weights: refused before any stage is built
            open_engines(bundle, "torch", checkpoint=other)


def test_torch_dense_from_the_dense_checkpoint(tiny):
    from adafocus.models import save
    from adafocus.models.config import ModelConfig
    from adafocus.models.dense import DenseBaseline

    bundle = load_bundle(tiny["dense"])
    with one_torch_thread():
        torch.manual_seed(2)
        cfg = ModelConfig.from_dict(bundle.manifest.config)
        dense = save(DenseBaseline(cfg).eval(), tiny["dir"] / "dense.pt", extra={"model": "dense"})
        for b in (bundle, load_bundle(tiny["bundle"])):  # with and without dense.onnx in the bundle
            name, engines = open_engines(b, "torch", stages=("dense",), checkpoint=dense)
            assert name == "torch" and list(engines) == ["dense"]
            engines["dense"].close()
    with pytest.raises(EngineError, match="dense stage on its own"):
        open_engines(bundle, "torch", stages=("global", "dense"), checkpoint=dense)
    with pytest.raises(EngineError, match="dense baseline's checkpoint"):
        open_engines(bundle, "torch", stages=("dense",))


def test_failure_in_the_second_stage_closes_the_first(tiny, tmp_path, created):
    work = tmp_path / "bundle"
    shutil.copytree(tiny["bundle"], work)
    bundle = load_bundle(work, verify=False)
    bundle.stage_path("policy").write_bytes(b"not an onnx file")
    with pytest.raises(EngineError):
        open_engines(bundle, "ort", threads=1)
    assert len(created) == 1 and not created[0].is_active  # global was opened, then closed


def test_missing_file_closes_what_was_opened(tiny, created):
    bundle = load_bundle(tiny["bundle"])
    with pytest.raises(EngineError):
        open_engines(bundle, "ort", threads=1, files={"head": "no-such-head.onnx"})
    assert len(created) == 3 and not any(e.is_active for e in created)
    with pytest.raises(EngineError, match="stages that are not opened"):
        open_engines(bundle, "ort", stages=("global",), files={"backbone": "backbone.onnx"})


def test_files_replace_stage_files(tiny, tmp_path):
    moved = tmp_path / "elsewhere.onnx"
    shutil.copy(tiny["bundle"] / "backbone.onnx", moved)
    _, engines = open_engines(load_bundle(tiny["bundle"]), "ort", stages=("backbone",), files={"backbone": moved})
    engines["backbone"].close()
    with pytest.raises(EngineError, match="use an ort engine"):
        open_engines(tiny["bundle"], "torch", files={"backbone": moved}, checkpoint=tiny["ckpt"])


def test_io_that_differs_from_the_manifest_closes_everything(tiny, created):
    bundle = load_bundle(tiny["bundle"])
    bundle.manifest.stages["head"].outputs[0].name = "renamed"
    with pytest.raises(BundleError) as exc:
        open_engines(bundle, "ort", threads=1)
    text = _one_line(exc)
    assert "stage head (head.onnx) does not match its manifest record" in text and "'renamed'" in text
    assert len(created) == 4 and not any(e.is_active for e in created)


# ------------------------------------------------------------------------------------------ the exit rule
def test_exit_rule_none_and_short_tables():
    assert not passes(None, 0, 1e30)  # no table: never exits on confidence
    assert not passes([None, 1.0], 0, 1e30)  # a None entry never exits
    assert not passes([1.0], 1, 1e30) and not passes([], 0, 1e30)  # a short table: steps past it never exit
    assert threshold([None, 2], 1) == 2.0 and threshold([None, 2], 0) is None and threshold((1.0,), 5) is None
    assert passes(np.array([0.5, 1.5]), 1, 2.0)  # numpy tables too


def test_exit_rule_equality_exits():
    assert passes([1.0], 0, 1.0) and passes([1.0], 0, np.float32(1.0))
    assert not passes([1.0], 0, np.nextafter(1.0, 0.0))
    assert not passes([1.0], 0, float("nan"))


def test_first_exit_is_the_same_rule_and_the_last_step_ends():
    assert first_exit([[0.0, 0.0, 0.0]], [None, None, None]).tolist() == [2]  # the last step always ends
    assert first_exit([[0.0, 0.0, 0.0]], []).tolist() == [2]
    assert first_exit([[0.0, 5.0, 9.0]], [1.0]).tolist() == [2]  # short table: steps 1.. never exit early
    assert first_exit([[1.0, 5.0, 9.0]], [1.0, 0.0]).tolist() == [0]  # equality exits
    assert first_exit([[np.inf, 0.0]], [None, None]).tolist() == [1]  # None never exits, whatever the score
    assert first_exit([0.2, 3.0, 0.1], [0.5, 3.0, 0.0]).tolist() == [1]  # one video as [E]
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(200, 5)).astype(float)  # many ties with the thresholds
    for _ in range(20):
        table = [None if rng.random() < 0.3 else float(rng.integers(0, 4)) for _ in range(rng.integers(0, 6))]
        got = first_exit(scores, table)
        want = [next((k for k in range(4) if passes(table, k, row[k])), 4) for row in scores]
        assert got.tolist() == want


def test_reference_models_use_the_rule(tiny):
    """The PyTorch reference stops at the first step whose score reaches its threshold (equality too)."""
    from adafocus.models import load

    model = load(tiny["ckpt"])
    c = model.cfg
    torch.manual_seed(3)
    frames = torch.randn(c.num_segments, 3, c.frame_size, c.frame_size)
    with one_torch_thread():
        steps = list(model.stepwise(frames))
        assert len(steps) == c.num_focus + 1
        scores = [s.score for s in steps]
        table = [None, None, scores[2]]  # exactly step 2's score
        assert [s.step for s in model.stepwise(frames, table)] == [0, 1, 2]
        assert len(list(model.stepwise(frames, [None, None, np.nextafter(scores[2], np.inf)]))) > 3 \
            or c.num_focus == 2
        assert len(list(model.stepwise(frames, [scores[0]]))) == 1

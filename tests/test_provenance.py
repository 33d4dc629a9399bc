"""Where a bundle came from: the exporter records the checkpoint's file name and weights digest (never a path),
and the torch engine (run, bench, Pipeline.from_bundle) refuses a checkpoint that is not the bundle's."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path, PureWindowsPath

import pytest
import torch
import videos
from bundles import one_torch_thread

from adafocus.bundle import load_bundle, update_manifest
from adafocus.cli import main
from adafocus.errors import CheckpointError
from adafocus.models import build_model, save
from adafocus.models.checkpoint import load, set_batchnorm_statistics, weights_sha256
from adafocus.models.presets import preset_config
from adafocus.runtime.pipeline import Pipeline

SHIPPED = Path(__file__).resolve().parents[1] / "adafocus" / "demo" / "assets" / "bundle"


def _tiny(seed: int, **changes):
    torch.manual_seed(seed)
    return set_batchnorm_statistics(build_model(preset_config("tiny").replace(**changes)), seed)


def _dense(cfg, seed: int, path: Path) -> Path:
    from adafocus.models.dense import DenseBaseline

    torch.manual_seed(seed)
    return save(DenseBaseline(cfg).eval(), path, extra={"model": "dense"})


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Two tiny checkpoints of the same preset (other weights), one with other class names, and a bundle of
    the first, exported from its absolute path; its training record names absolute directories (as
    `adafocus train` writes them)."""
    from adafocus.export.exporter import export_bundle

    d = tmp_path_factory.mktemp("provenance").resolve()
    model = _tiny(0)
    training = {"kind": "test", "data": str(d / "data"), "options": {"init_local": str(d / "dense.pt")},
                "notes": [str(d / "elsewhere" / "x.npz")]}
    a = save(model, d / "a.pt", preset="tiny", extra={"training": training})
    b = save(_tiny(1), d / "b.pt", preset="tiny")
    labels = save(_tiny(0, labels=[f"kind-{i}" for i in range(10)]), d / "labels.pt", preset="tiny")
    export_bundle(a, d / "bundle", verify=False, simplify_graphs=False, log=None)
    clip = videos.write_video(d / "clip.mp4", videos.moving_frames(20, 96, 128))
    return {"dir": d, "model": model, "a": a, "b": b, "labels": labels, "bundle": d / "bundle", "clip": clip}


@pytest.fixture(scope="module")
def with_dense(made):
    """A copy of the bundle with a trained-style dense baseline added from an absolute path (dense_a.pt), and
    another dense checkpoint of the same config (dense_b.pt)."""
    from adafocus.export.dense import add_dense
    from adafocus.models.config import ModelConfig

    d = made["dir"] / "dense"
    shutil.copytree(made["bundle"], d / "bundle")
    cfg = ModelConfig.from_dict(load_bundle(d / "bundle").manifest.config)
    good, other = _dense(cfg, 0, d / "dense_a.pt"), _dense(cfg, 1, d / "dense_b.pt")
    add_dense(d / "bundle", good, simplify_graph=False, log=None)
    return d / "bundle", good, other


@pytest.fixture(scope="module")
def digestless(made):
    """The bundle as older exporters wrote it (and as the shipped demo is): no weights digest."""
    copy = made["dir"] / "old_bundle"
    shutil.copytree(made["bundle"], copy)

    def strip(m):
        m.source = {}
        return m

    update_manifest(copy, strip)
    return copy


# ----------------------------------------------------------------------------------------------- digest
def test_weights_digest_is_deterministic_and_about_the_float_weights(made):
    model = made["model"]
    want = weights_sha256(model)
    assert re.fullmatch(r"[0-9a-f]{64}", want)
    assert weights_sha256(load(made["a"])) == want  # saved and loaded again
    state = model.state_dict()
    assert weights_sha256(dict(reversed(list(state.items())))) == want  # key order does not matter
    counters = {k: (v + 7 if k.endswith("num_batches_tracked") else v) for k, v in state.items()}
    assert weights_sha256(counters) == want  # integer counters do not change what the model computes
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    nudged = dict(state)
    nudged[name] = state[name].clone()
    nudged[name].view(-1)[0] += 1e-6
    assert weights_sha256(nudged) != want
    reshaped = dict(state)
    reshaped[name] = state[name].reshape(-1)  # same bytes, other shape
    assert weights_sha256(reshaped) != want
    assert weights_sha256(load(made["b"])) != want


def test_export_records_file_name_and_digest(made):
    m = load_bundle(made["bundle"]).manifest
    assert m.source == {"checkpoint": "a.pt", "weights_sha256": weights_sha256(made["model"])}
    # the training record keeps its content, but directories only by their last component
    assert m.training["data"] == "data" and m.training["options"]["init_local"] == "dense.pt"
    assert m.training["notes"] == ["x.npz"] and m.training["kind"] == "test"


# ------------------------------------------------------------------------------------------ torch engine
def test_torch_engine_runs_the_bundles_checkpoint(made):
    with Pipeline.from_bundle(made["bundle"], engine="torch", checkpoint=made["a"]) as pipe:
        result = pipe(made["clip"])
    assert result.label in pipe.labels


def test_torch_engine_refuses_other_weights(made):
    with pytest.raises(CheckpointError) as exc:
        Pipeline.from_bundle(made["bundle"], engine="torch", checkpoint=made["b"])
    text = str(exc.value)
    assert "\n" not in text and str(made["b"]) in text and str(made["bundle"]) in text and "a.pt" in text
    assert "not the model checkpoint" in text and "exported from" in text


def _cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([*map(str, args)])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_cli_run_refuses_other_weights_in_one_line(made, capsys):
    code, out, err = _cli(capsys, "run", made["clip"], "--model", made["bundle"], "--engine", "torch",
                          "--checkpoint", made["b"])
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ")
    assert "b.pt" in err and "exported from" in err and "Traceback" not in err
    code, out, err = _cli(capsys, "run", made["clip"], "--model", made["bundle"], "--engine", "torch",
                          "--checkpoint", made["a"], "--json")
    assert code == 0 and json.loads(out.strip().splitlines()[0])["label"]


def test_digestless_bundle_checks_the_config(made, digestless):
    with pytest.raises(CheckpointError, match=r"model config differs in labels") as exc:
        Pipeline.from_bundle(digestless, engine="torch", checkpoint=made["labels"])
    assert "\n" not in str(exc.value) and "labels.pt" in str(exc.value)
    # without a digest only the config can be checked: a checkpoint of the same config is accepted
    with Pipeline.from_bundle(digestless, engine="torch", checkpoint=made["b"]) as pipe:
        assert pipe(made["clip"]).label in pipe.labels


def test_cli_digestless_bundle_names_the_differing_key(made, digestless, capsys):
    code, out, err = _cli(capsys, "run", made["clip"], "--model", digestless, "--engine", "torch",
                          "--checkpoint", made["labels"])
    assert code == 1 and err.count("\n") == 1 and "labels" in err


# ------------------------------------------------------------------------------------------------ bench
def test_bench_refuses_other_checkpoints_before_measuring(made, with_dense, tmp_path, capsys):
    from adafocus.bench.runner import BenchConfig, run_benchmark
    from adafocus.export.dense import check_dense_source, dense_engine
    from adafocus.models.dense import load_dense

    bundle, good, other = with_dense
    m = load_bundle(bundle).manifest
    record = m.verification["dense"]
    assert record["source"] == "dense_a.pt" and record["weights_sha256"] == weights_sha256(load_dense(good))

    with pytest.raises(CheckpointError, match="not the dense baseline checkpoint") as exc:
        check_dense_source(load_dense(other), other, m, str(bundle))
    assert "\n" not in str(exc.value) and "dense_b.pt" in str(exc.value) and "dense_a.pt" in str(exc.value)
    with pytest.raises(CheckpointError, match="not the dense baseline checkpoint"):
        dense_engine(other, m)
    dense_engine(good, m).close()

    common = dict(engines=["torch"], budgets=["full"], warmup_s=0, repeats=1, threads=1, dense_checkpoint=good)
    with pytest.raises(CheckpointError, match="not the model checkpoint"):
        run_benchmark(BenchConfig(bundle, [str(made["clip"])], checkpoint=made["b"], **common), log=None)
    with pytest.raises(CheckpointError, match="not the dense baseline checkpoint"):
        run_benchmark(BenchConfig(bundle, [str(made["clip"])], checkpoint=made["a"],
                                  **{**common, "dense_checkpoint": other}), log=None)
    code, out, err = _cli(capsys, "bench", made["clip"], "--model", bundle, "-e", "torch", "--budgets", "full",
                          "--warmup", "0", "--repeats", "1", "--checkpoint", made["b"], "--dense-checkpoint", good,
                          "--json", tmp_path / "r.json")
    assert code == 1 and err.count("\n") == 1 and "b.pt" in err and not (tmp_path / "r.json").exists()


# ------------------------------------------------------------------------------------- no machine paths
def _strings(value, where=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k, f"{where}.{k}<key>")
            yield from _strings(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{where}[{i}]")
    elif isinstance(value, str):
        yield where, value


def _absolute(text: str) -> bool:
    return text.startswith(("/", "\\", "~/")) or PureWindowsPath(text).is_absolute() or Path(text).is_absolute()


def _machine_paths(manifest: Path, *dirs: Path) -> list[str]:
    """Every string of the manifest JSON that is an absolute path or names one of ``dirs`` (the machine's
    temporary directories), walked over the raw JSON so that no field is missed."""
    marks = {str(d) for d in dirs} | {d.name for d in dirs}
    found = []
    for where, text in _strings(json.loads(manifest.read_text())):
        if _absolute(text) or any(mark in text for mark in marks) or re.search(r"\.\w+\.\w{6,}\.tmp", text):
            found.append(f"{where}: {text}")
    return found


def test_exported_bundle_records_no_machine_paths(made, with_dense):
    """Forced: the checkpoint's training record names absolute directories, the model was exported and the
    dense baseline added from absolute paths in a pytest temporary directory, and the bundle was built in a
    temporary directory and moved: none of it may reach the manifest."""
    from adafocus.export.exporter import machine_paths

    bundle, good, _ = with_dense
    assert made["a"].is_absolute() and good.is_absolute()
    for manifest in (made["bundle"] / "manifest.json", bundle / "manifest.json"):
        text = manifest.read_text()
        assert str(made["dir"]) not in text and made["dir"].name not in text  # the raw text too
        assert _machine_paths(manifest, made["dir"]) == []
        assert machine_paths(json.loads(text)) == []  # what demo-build checks before shipping
    m = load_bundle(bundle).manifest
    assert m.source["checkpoint"] == "a.pt" and m.verification["dense"]["source"] == "dense_a.pt"


def test_machine_path_scan_catches_paths(made, tmp_path):
    """The scan itself finds what it is for (so the test above cannot pass by looking at nothing)."""
    from adafocus.export.exporter import machine_paths

    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps({"verification": {"dense": {"source": "/tmp/v2/dense.pt"}},
                               "training": {"data": "C:\\data\\set", "ok": "data"},
                               "engines": {"k": {"extra": {"global": {"timing_cache": str(tmp_path / "t.cache")}}}}}))
    assert len(_machine_paths(bad, tmp_path)) == 3
    assert len(machine_paths(json.loads(bad.read_text()))) == 3


def test_shipped_demo_bundle_records_no_machine_paths():
    assert _machine_paths(SHIPPED / "manifest.json") == []
    m = load_bundle(SHIPPED).manifest
    assert m.verification["dense"]["source"] == "dense.pt"
    assert "weights_sha256" not in m.source  # its checkpoints are not in the repository: the config check applies


@pytest.mark.slow
def test_demo_build_ships_no_machine_paths(tmp_path):
    """demo-build end to end on a random tiny model and a small data set, all given by absolute paths."""
    from adafocus.demo.build import build_demo
    from adafocus.demo.data import CLASSES, generate
    from adafocus.export.exporter import machine_paths
    from adafocus.models.config import ModelConfig

    tmp_path = tmp_path.resolve()
    model = _tiny(0, labels=list(CLASSES))
    data = tmp_path / "data"
    generate(data, videos=20, seed=3)
    training = {"data": str(data), "options": {"init_local": str(tmp_path / "dense.pt")}}
    ckpt = save(model, tmp_path / "demo.pt", preset="tiny", extra={"training": training})
    dense = _dense(ModelConfig.from_dict(model.cfg.to_dict()), 0, tmp_path / "dense.pt")
    built = build_demo(ckpt, data, tmp_path / "assets", dense_checkpoint=dense, budgets=[0.08], samples=2,
                       log=lambda _line: None)
    manifest = built.bundle / "manifest.json"
    assert _machine_paths(manifest, tmp_path) == [] and machine_paths(json.loads(manifest.read_text())) == []
    m = load_bundle(built.bundle).manifest
    assert m.source == {"checkpoint": "demo.pt", "weights_sha256": weights_sha256(model)}
    assert m.verification["dense"]["source"] == "dense.pt" and m.training["data"] == "data"

"""adafocus bench: dense export into a bundle, report schema, unavailable engines, batched = one at a time."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import videos
from bundles import one_torch_thread

from adafocus.bench.batched import BatchedRunner
from adafocus.bench.env import environment, format_environment
from adafocus.bench.report import ROW_KEYS, check_report, load_json, print_report, save_json
from adafocus.bench.runner import STAGE_ORDER, BenchConfig, batch_sizes, budget_gflops, run_benchmark
from adafocus.bundle import load_bundle
from adafocus.cli import main
from adafocus.errors import AdaFocusError, BudgetError, CheckpointError, DataError, VideoError
from adafocus.runtime.budget import Budget
from adafocus.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A random-weight tiny bundle with a random-weight dense baseline."""
    from adafocus.export.dense import add_dense
    from adafocus.export.exporter import export_bundle
    from adafocus.models import build_model, save
    from adafocus.models.checkpoint import set_batchnorm_statistics
    from adafocus.models.presets import preset_config

    with one_torch_thread():
        torch.manual_seed(0)
        d = tmp_path_factory.mktemp("bench")
        model = set_batchnorm_statistics(build_model(preset_config("tiny")))
        ckpt = save(model, d / "tiny.pt", preset="tiny")
        export_bundle(ckpt, d / "bundle", verify=False, simplify_graphs=False, log=None)
        add_dense(d / "bundle", simplify_graph=False, log=None)
    return d / "bundle"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return [str(videos.write_video(d / f"clip{i}.mp4", videos.moving_frames(24 + 4 * i, 96, 128, seed=i)))
            for i in range(5)]


# ------------------------------------------------------------------------------------------- dense
def test_add_dense_records_the_dense_stage(bundle):
    from adafocus.models.flops import count_flops

    b = load_bundle(bundle, verify=True)  # checksums cover dense.onnx
    m = b.manifest
    dense = m.stages["dense"]
    assert dense.file == "dense.onnx" and "dense.onnx" in m.files
    assert [t.shape for t in dense.inputs] == [["batch", 16, 3, 128, 128]]
    assert [t.shape for t in dense.outputs] == [["batch", 10]]
    # the same count as the FLOPs report's dense baseline (which leaves out the tiny linear head)
    with one_torch_thread():
        reference = count_flops("tiny").dense
    assert dense.gflops == pytest.approx(reference, rel=1e-3)
    assert m.costs.dense == dense.gflops  # what '30%' budgets are a share of, in the runtime too
    assert m.verification["dense"]["random_init"] is True and m.verification["dense"]["max_rel"] < 1e-4
    assert budget_gflops(m, "50%") == pytest.approx(0.5 * dense.gflops)
    with Pipeline.from_bundle(bundle) as pipe:  # the optional stage does not disturb the runtime
        assert set(pipe.engines) == {"global", "policy", "backbone", "head"}
        assert pipe.budget("50%").gflops == pytest.approx(0.5 * dense.gflops)


def test_add_dense_from_checkpoint_and_refusals(bundle, tmp_path):
    from adafocus.export.dense import add_dense
    from adafocus.models import save
    from adafocus.models.config import ModelConfig
    from adafocus.models.dense import DenseBaseline

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    cfg = ModelConfig.from_dict(load_bundle(copy).manifest.config)
    torch.manual_seed(1)
    wrong = save(DenseBaseline(cfg.replace(frame_size=96, resize_size=96)), tmp_path / "wrong.pt",
                 extra={"model": "dense"})
    with pytest.raises(CheckpointError, match="frame size 96"):
        add_dense(copy, wrong, log=None)
    adaptive = tmp_path / "adaptive.pt"
    torch.save({"format": "adafocus", "format_version": 1, "config": cfg.to_dict(), "state_dict": {}}, adaptive)
    with pytest.raises(CheckpointError, match="not a dense baseline"):
        add_dense(copy, adaptive, log=None)
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in bundle.iterdir())  # nothing left

    with one_torch_thread():
        good = save(DenseBaseline(cfg).eval(), tmp_path / "dense.pt", extra={"model": "dense"})
        m = add_dense(copy, good, simplify_graph=False, log=None)
    # the file name and a weights digest, never the path (no machine paths in a bundle)
    assert m.verification["dense"]["source"] == "dense.pt" and m.verification["dense"]["random_init"] is False
    assert len(m.verification["dense"]["weights_sha256"]) == 64
    load_bundle(copy, verify=True)


# ----------------------------------------------------------------------------------------- reports
def test_report_schema_unavailable_engine_and_speedups(bundle, clips, tmp_path):
    labels = {clips[0]: "class_0", clips[1]: "class_1"}
    config = BenchConfig(bundle, clips[:2], labels=labels, engines=["ort", "tensorrt"], budgets=["0.06", "full"],
                         warmup_s=0, repeats=2, threads=1)
    report = run_benchmark(config, log=None)
    check_report(report)
    rows = {(r["engine"], r["model"], r["budget"]): r for r in report["results"]}
    trt = rows[("tensorrt", "adafocus", None)]
    assert trt["status"] == "unavailable" and "CUDA" in trt["reason"]  # reported, and the rest ran
    dense = rows[("ort", "dense", None)]
    assert dense["status"] == "ok" and dense["accuracy"] is None  # random weights: no accuracy
    assert dense["stages"]["dense"]["n"] == 4
    for budget in ("0.06", "full"):
        r = rows[("ort", "adafocus", budget)]
        assert r["status"] == "ok" and r["samples"] == 4 and set(r) >= set(ROW_KEYS)
        assert {"decode", "glance", "policy", "crop", "local", "local_step", "overhead", "model", "total"} \
            <= set(r["stages"]) <= set(STAGE_ORDER)
        for st in r["stages"].values():
            assert st["p50"] <= st["p90"] <= st["p99"]
        # the parts add up to the total (orchestration is the remainder, never negative)
        parts = sum(r["stages"][k]["mean"] for k in ("decode", "preprocess", "upload", "glance", "policy", "crop",
                                                      "local", "overhead"))
        assert parts == pytest.approx(r["stages"]["total"]["mean"], rel=1e-3)
        assert r["ms_model"] == pytest.approx(r["ms_e2e"] - r["stages"]["decode"]["mean"], rel=1e-3)
        assert r["speedup_model"] == pytest.approx(dense["ms_model"] / r["ms_model"], rel=1e-2)
        assert r["gflops_ratio"] == pytest.approx(dense["gflops"] / r["gflops"], rel=1e-2)
        assert r["accuracy"] in (0.0, 0.5, 1.0)
        assert r["peak_rss_mb"] > 0
    assert rows[("ort", "adafocus", "0.06")]["gflops"] <= 0.06 < rows[("ort", "adafocus", "full")]["gflops"]
    env = report["environment"]
    assert env["onnxruntime"]["version"] and env["cpu"] and env["jetson"] is not None
    path = save_json(report, tmp_path / "r.json")
    assert load_json(path) == json.loads(json.dumps(report))
    out = io.StringIO()
    from rich.console import Console

    print_report(report, Console(file=out, width=200))
    text = out.getvalue()
    assert "tensorrt fp32 adafocus: unavailable" in text and "orchestration" in text and "adafocus@0.06" in text


def test_torch_engine_rows_with_a_dense_checkpoint(bundle, clips, tmp_path):
    """The torch engine (the CUDA fallback without onnxruntime-gpu) gets its dense row from --dense-checkpoint."""
    from adafocus.models import save
    from adafocus.models.config import ModelConfig
    from adafocus.models.dense import DenseBaseline

    cfg = ModelConfig.from_dict(load_bundle(bundle).manifest.config)
    with one_torch_thread():
        torch.manual_seed(2)
        dense = save(DenseBaseline(cfg).eval(), tmp_path / "dense.pt", extra={"model": "dense"})
        common = dict(engines=["torch"], budgets=["full"], warmup_s=0, repeats=1, threads=1,
                      checkpoint=bundle.parent / "tiny.pt")
        report = run_benchmark(BenchConfig(bundle, clips[:2], dense_checkpoint=dense, **common), log=None)
        without = run_benchmark(BenchConfig(bundle, clips[:1], **common), log=None)
    check_report(report)
    rows = {r["model"]: r for r in report["results"]}
    assert rows["dense"]["status"] == "ok" and rows["dense"]["stages"]["dense"]["n"] == 2
    assert rows["adafocus"]["status"] == "ok" and rows["adafocus"]["speedup_model"] > 0
    assert report["settings"]["dense_checkpoint"] == str(dense)
    skipped = {r["model"]: r for r in without["results"]}["dense"]
    assert skipped["status"] == "skipped" and "--dense-checkpoint" in skipped["reason"]


def test_bad_reports_and_budgets_are_refused(bundle, clips, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "adafocus-bench", "results": [{"engine": "ort"}]}))
    with pytest.raises(AdaFocusError, match="lacks"):
        load_json(bad)
    with pytest.raises(BudgetError, match="below the glance cost"):  # before anything is measured
        run_benchmark(BenchConfig(bundle, clips[:1], budgets=["1%"], warmup_s=0, repeats=1), log=None)
    assert batch_sizes(6) == [1, 2, 4, 6] and batch_sizes(1) == [1]
    with pytest.raises(DataError, match="labels not among the bundle's 10 classes: cyan-checker"):
        run_benchmark(BenchConfig(bundle, clips[:1], labels={clips[0]: "cyan-checker"}), log=None)
    text = tmp_path / "not_a_video.mp4"
    text.write_text("no video here\n" * 10)
    with pytest.raises(VideoError, match="cannot benchmark 1 of 2 videos"):
        run_benchmark(BenchConfig(bundle, [clips[0], str(text)], warmup_s=0, repeats=1), log=None)


# ----------------------------------------------------------------------------------------- batched
def _spread_thresholds(pipe, paths) -> tuple:
    """Thresholds halfway between the videos' scores at each step, so that they exit at different steps
    and no score sits on a threshold (batched float rounding must not flip a decision)."""
    scores = np.array([[s["confidence"] for s in pipe(p).steps] for p in paths])
    out: list[float | None] = [None]
    for k in range(1, scores.shape[1]):
        s = np.sort(scores[:, k])
        j = (k % (len(s) - 1))
        out.append(float((s[j] + s[j + 1]) / 2))
    return tuple(out)


def test_batched_gives_the_same_predictions_as_one_at_a_time(bundle, clips):
    with Pipeline.from_bundle(bundle, threads=1) as pipe:
        full = pipe.budget(None)
        budgets = [Budget(full.gflops, full.max_steps, _spread_thresholds(pipe, clips)), pipe.budget("0.075")]
        for budget in budgets:
            ref = {p: pipe(p, budget) for p in clips}
            index = {p: pipe.decode(p).indices for p in clips}
            for size in (1, 3, 8):
                runner = BatchedRunner(pipe, batch=size)
                got = dict(runner.run(clips, budget))
                assert set(got) == set(clips)
                for p in clips:
                    r, g = ref[p], got[p]
                    assert (g.label, g.exit_step, g.exit_reason) == (r.label, r.exit_step, r.exit_reason), p
                    assert g.score == pytest.approx(r.score, abs=1e-4)
                    assert g.gflops == r.gflops
                    # the same focus frames, in the same order (base family: candidates are the decoded frames)
                    seen = [int(index[p][k]) for k in g.positions[:g.exit_step]]
                    assert seen == [pt.frame for pt in r.patches], p
                assert runner.stats.videos == len(clips)
                if size > 1:
                    assert runner.stats.mean_batch("head") > 1  # several videos per engine call
                    assert runner.stats.mean_batch("global") == 1  # on the CPU the glance runs one by one
            exits = {r.exit_step for r in ref.values()}
            if budget.thresholds is not None:
                assert len(exits) > 1, exits  # the thresholds really spread the videos over several steps
            else:
                assert exits == {budget.max_steps} and all(r.exit_reason == "budget" for r in ref.values())


def test_batched_reports_a_bad_video_and_goes_on(bundle, clips, tmp_path):
    text = tmp_path / "not_a_video.mp4"
    text.write_text("no video here\n" * 10)
    with Pipeline.from_bundle(bundle, threads=1) as pipe:
        got = dict(BatchedRunner(pipe, batch=2).run([clips[0], str(text), clips[1]]))
    assert isinstance(got[str(text)], AdaFocusError)
    assert not isinstance(got[clips[0]], Exception) and not isinstance(got[clips[1]], Exception)


# --------------------------------------------------------------------------------------------- CLI
def test_cli_bench_with_labels_and_throughput(bundle, clips, tmp_path, capsys):
    csv = tmp_path / "labels.csv"
    csv.write_text("video,label\n" + "".join(f"{p},class_{i}\n" for i, p in enumerate(clips[:2])))
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--model", str(bundle), "--labels", str(csv), "-e", "ort,tensorrt", "--budgets", "full",
              "--warmup", "0", "--repeats", "1", "--batch", "2", "--threads", "1", "--json", str(out)])
    stdout, _ = capsys.readouterr()
    assert exc.value.code == 0
    assert "ms/video e2e" in stdout and f"saved {out}" in stdout
    report = load_json(out)
    assert report["settings"]["videos"] == 2 and report["settings"]["labels"] == 2
    tp = {(t["model"], t["batch"]) for t in report["throughput"]}
    assert tp == {("adafocus", 1), ("adafocus", 2), ("dense", 1), ("dense", 2)}
    assert all(t["videos_per_s"] > 0 for t in report["throughput"])


def test_cli_add_dense_error_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["add-dense", str(tmp_path / "nowhere")])
    _, err = capsys.readouterr()
    assert exc.value.code == 1 and err.strip().count("\n") == 0 and "bundle not found" in err


# ------------------------------------------------------------------------------------- environment
def test_environment_block_has_every_key():
    env = environment(threads=1)
    for key in ("cpu", "cpus_usable", "threads", "gpu", "gpu_driver", "cuda", "tensorrt", "onnxruntime", "jetson"):
        assert key in env and env[key] not in (None, "")
    if shutil.which("nvidia-smi") is None:
        assert env["gpu"] == "unknown" and env["gpu_driver"] == "unknown"
    if shutil.which("nvpmodel") is None:
        assert env["jetson"] == "unknown" or env["jetson"]["power_mode"] == "unknown"
    text = format_environment(env)
    assert "onnxruntime" in text and "jetson" in text


def test_bench_does_not_import_torch():
    code = ("import sys, adafocus.bench, adafocus.bench.runner, adafocus.bench.batched, adafocus.bench.report, "
            "adafocus.bench.env; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
def test_gpu_bench_and_batched(request):
    """On a CUDA machine: ort-cuda with GPU crops; batched decisions = one at a time; the GPU is named."""
    from adafocus.engines.registry import available_engines

    reason = available_engines("cuda").get("ort-cuda")
    if reason is not None:
        pytest.skip(f"ort-cuda cannot run here: {reason}")
    pytest.importorskip("cupy", reason="GPU crops need cupy (pip install 'adafocus[gpu]')")
    bundle, clips = request.getfixturevalue("bundle"), request.getfixturevalue("clips")  # after the skip checks
    with Pipeline.from_bundle(bundle, engine="ort-cuda", device="cuda") as pipe:
        budget = pipe.budget("0.075")
        ref = {p: pipe(p, budget) for p in clips}
        got = dict(BatchedRunner(pipe, batch=3).run(clips, budget))
        for p in clips:
            assert (got[p].label, got[p].exit_step) == (ref[p].label, ref[p].exit_step)
    report = run_benchmark(BenchConfig(bundle, clips[:2], engines=["ort-cuda"], device="cuda", budgets=["full"],
                                       warmup_s=0, repeats=1, batch=2), log=None)
    rows = {r["model"]: r for r in report["results"]}
    assert rows["adafocus"]["status"] == "ok" and rows["dense"]["status"] == "ok"
    assert report["environment"]["gpu"] != "unknown"


@pytest.mark.gpu
def test_gpu_torch_engine_with_gpu_crops(request, tmp_path):
    """On a CUDA machine without onnxruntime-gpu: the torch engine on cuda, the patches cropped on the GPU (cupy)
    and read in place through DLPack, decides as the torch engine on the CPU; batched = one at a time; the
    bench measures it against the dense checkpoint on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch")
    pytest.importorskip("cupy", reason="GPU crops need cupy (pip install 'adafocus[gpu]')")
    from adafocus.models import save
    from adafocus.models.config import ModelConfig
    from adafocus.models.dense import DenseBaseline

    bundle, clips = request.getfixturevalue("bundle"), request.getfixturevalue("clips")
    ckpt = bundle.parent / "tiny.pt"
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # compare in full fp32
    try:
        with Pipeline.from_bundle(bundle, engine="torch", device="cpu", checkpoint=ckpt) as cpu, \
                Pipeline.from_bundle(bundle, engine="torch", device="cuda", checkpoint=ckpt) as gpu:
            budget = cpu.budget("0.075")
            ref = {p: gpu(p, budget) for p in clips}
            for p in clips:
                a, b = cpu(p, budget), ref[p]
                assert (b.label, b.exit_step, b.frames_used) == (a.label, a.exit_step, a.frames_used)
                np.testing.assert_allclose([q.box_model for q in b.patches], [q.box_model for q in a.patches],
                                           atol=1e-2)
                assert b.score == pytest.approx(a.score, abs=1e-4)
                assert b.timings_ms["upload"] > 0 and (b.exit_step == 0 or b.timings_ms["crop"] > 0)
            got = dict(BatchedRunner(gpu, batch=3).run(clips, budget))
            for p in clips:
                assert (got[p].label, got[p].exit_step) == (ref[p].label, ref[p].exit_step)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    cfg = ModelConfig.from_dict(load_bundle(bundle).manifest.config)
    dense = save(DenseBaseline(cfg).eval(), tmp_path / "dense.pt", extra={"model": "dense"})
    report = run_benchmark(BenchConfig(bundle, clips[:2], engines=["torch"], device="cuda", budgets=["full"],
                                       warmup_s=0, repeats=1, batch=2, checkpoint=ckpt, dense_checkpoint=dense),
                           log=None)
    rows = {r["model"]: r for r in report["results"]}
    assert rows["adafocus"]["status"] == "ok" and rows["dense"]["status"] == "ok"
    assert {r["batch"] for r in report["throughput"]} == {1, 2}
    assert report["environment"]["gpu"] != "unknown"


def test_every_precision_of_the_bundle_gets_rows(bundle, clips, tmp_path):
    """A bundle with int8 stage files (here: copies of the fp32 ones) is measured at both precisions, or the
    int8 rows say why not; the dense baseline stays the fp32 file and is labelled so."""
    import inspect

    from adafocus.bundle import update_manifest

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    for stage in ("global", "backbone"):
        shutil.copy(copy / f"{stage}.onnx", copy / f"{stage}.int8.onnx")
    update_manifest(copy, lambda m: m.precisions.update(int8={"global": "global.int8.onnx",
                                                              "backbone": "backbone.int8.onnx"}))
    report = run_benchmark(BenchConfig(copy, clips[:1], engines=["ort"], budgets=["full"], warmup_s=0, repeats=1,
                                       threads=1), log=None)
    rows = [(r["precision"], r["model"], r["status"]) for r in report["results"]]
    assert ("fp32", "adafocus", "ok") in rows and ("fp32", "dense", "ok") in rows
    if "precision" in inspect.signature(Pipeline.from_bundle).parameters:
        assert ("int8", "adafocus", "ok") in rows
        dense8 = next(r for r in report["results"] if r["precision"] == "int8" and r["model"] == "dense")
        assert dense8["dense_precision"] == "fp32"
    else:
        assert ("int8", "adafocus", "skipped") in rows

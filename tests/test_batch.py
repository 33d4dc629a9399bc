"""adafocus batch: corpus lists, in-process and Ray Data runs over real demo videos, error rows, resume, actor loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import scale_helpers

from adafocus.cli import main
from adafocus.demo.shipped import bundle_path
from adafocus.errors import AdaFocusError, ConfigError, DataError
from adafocus.scale.batch import BatchConfig, _watched, run_batch
from adafocus.scale.corpus import read_corpus
from adafocus.scale.output import read_rows
from adafocus.scale.rows import FAULT_ENV, RunnerOptions


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(corpus.csv, its rows, the reference (label, exit step) per decodable path)."""
    root = tmp_path_factory.mktemp("corpus")
    path, rows = scale_helpers.demo_corpus(root)
    return path, rows, scale_helpers.reference([r["video"] for r in rows])


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    """One local Ray (2 CPUs) for this module; its workers see FAULT_ENV pointing at a flag file that exists, so
    no worker dies unless a test removes the file."""
    pytest.importorskip("ray")
    flag = tmp_path_factory.mktemp("fault") / "flag"
    flag.write_text("disarmed")
    before = os.environ.get(FAULT_ENV)
    ray = scale_helpers.start_ray({FAULT_ENV: str(flag)})
    yield flag
    ray.shutdown()
    if before is None:
        os.environ.pop(FAULT_ENV, None)
    else:
        os.environ[FAULT_ENV] = before


def _config(corpus_csv, out, **kw) -> BatchConfig:
    runner = RunnerOptions(bundle=str(bundle_path()), threads=1, batch=kw.pop("batch", 4))
    return BatchConfig(source=str(corpus_csv), out=str(out), runner=runner, **kw)


def _check_rows(out, rows, ref):
    got = {r["id"]: r for r in read_rows(out)}
    assert sorted(got) == sorted(r["id"] for r in rows)  # one row per input video, none twice
    assert len(read_rows(out)) == len(rows)
    for r in rows:
        row = got[r["id"]]
        if r["id"] in ("corrupt", "missing"):
            assert row["status"] == "error" and row["label"] is None
            assert ("no such file" in row["error"]) if r["id"] == "missing" else row["error"]
            continue
        assert row["status"] == "ok", row["error"]
        assert (row["label"], row["exit_step"]) == ref[r["video"]], r["id"]
        assert row["truth"] == r["label"] and row["correct"] == (row["label"] == r["label"])
    return got


# --------------------------------------------------------------------------------------------- corpus
def test_corpus_lists(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "list.jsonl").write_text('{"path": "a.mp4", "label": "red"}\n\n{"id": "u", "video": "http://h/v.mp4"}\n')
    items = read_corpus(tmp_path / "list.jsonl")
    assert [(i.id, i.path, i.truth) for i in items] == [(str(tmp_path / "a.mp4"), str(tmp_path / "a.mp4"), "red"),
                                                        ("u", "http://h/v.mp4", None)]
    assert [i.path for i in read_corpus(tmp_path)] == [str(tmp_path / "a.mp4")]  # a directory: its videos
    (tmp_path / "dup.csv").write_text("id,path\nx,a.mp4\nx,b.mp4\n")
    with pytest.raises(DataError, match="'x' is listed twice"):
        read_corpus(tmp_path / "dup.csv")
    (tmp_path / "bad.jsonl").write_text('{"path": "a.mp4"}\n[1]\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object"):
        read_corpus(tmp_path / "bad.jsonl")
    (tmp_path / "nocol.csv").write_text("file,label\na.mp4,red\n")
    with pytest.raises(DataError, match="'video' or 'path' column"):
        read_corpus(tmp_path / "nocol.csv")


def test_stalled_job_stops_with_an_error():
    release = threading.Event()

    def stuck():
        yield [{"id": "a"}]
        release.wait(30)  # a pool waiting on an actor that never comes back

    batches = _watched(stuck(), timeout=0.3)
    assert next(batches) == [{"id": "a"}]
    with pytest.raises(AdaFocusError, match="no batch finished for 0.3 s"):
        next(batches)
    release.set()


# ----------------------------------------------------------------------------------------- in-process
def test_in_process_rows_errors_resume(corpus, tmp_path):
    csv_path, rows, ref = corpus
    out = tmp_path / "out"
    summary = run_batch(_config(csv_path, out, ray="off", fmt="jsonl", task_size=5))
    got = _check_rows(out, rows, ref)
    assert (summary.backend, summary.processed, summary.failed, summary.skipped) == ("in-process", len(rows), 2, 0)
    ok = [r for r in got.values() if r["status"] == "ok"]
    assert summary.accuracy == sum(r["correct"] for r in ok) / len(ok) and summary.labelled == len(ok)
    assert summary.mean_gflops == pytest.approx(sum(r["gflops"] for r in ok) / len(ok))
    assert json.loads((out / "summary.json").read_text())["rows"] == len(rows)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    again = run_batch(_config(csv_path, out, ray="off", fmt="jsonl"))
    assert (again.processed, again.skipped, again.rows) == (0, len(rows), len(rows))
    # a part lost (e.g. a run killed before it wrote it): the next run does just its videos
    parts = sorted(out.glob("part-*.jsonl"))
    lost = [json.loads(line)["id"] for line in parts[0].read_text().splitlines()]
    parts[0].unlink()
    third = run_batch(_config(csv_path, out, ray="off", fmt="parquet"))
    assert third.processed == len(lost) and third.skipped == len(rows) - len(lost)
    _check_rows(out, rows, ref)  # parquet and jsonl parts read together


def test_cli_in_process(corpus, tmp_path, capsys):
    csv_path, rows, _ = corpus
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["batch", str(csv_path), "--out", str(out), "--ray", "off", "--json", "--budget", "0.1"])
    printed, err = capsys.readouterr()
    assert exc.value.code == 0, err
    summary = json.loads(printed)
    assert summary["processed"] == len(rows) and summary["errors"] == 2
    assert all(r["budget_gflops"] <= 0.1 for r in read_rows(out) if r["status"] == "ok")
    for args, message in ((["--format", "xml"], "error: --format must be one of parquet, jsonl, got 'xml'"),
                          (["--actors", "0"], "error: --actors must be >= 1, got 0"),
                          (["--budget", "0.001"], "error: budget 0.001 GFLOPs is below the glance cost")):
        with pytest.raises(SystemExit) as exc:
            main(["batch", str(csv_path), "--out", str(tmp_path / "o2"), "--ray", "off", *args])
        assert exc.value.code == 1
        assert capsys.readouterr().err.startswith(message)
    with pytest.raises(SystemExit) as exc:
        main(["batch", str(tmp_path / "nothing"), "--out", str(tmp_path / "o3"), "--ray", "off"])
    assert exc.value.code == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'nothing'}: no such file or directory\n"
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_base_install_does_not_import_ray():
    code = ("import sys, adafocus.cli, adafocus.scale.batch, adafocus.scale.serve\n"
            "bad = [m for m in ('ray', 'pyarrow', 'torch') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------ ray
@pytest.mark.slow
def test_ray_two_actors_same_rows_then_resume(corpus, ray_instance, tmp_path):
    csv_path, rows, ref = corpus
    out = tmp_path / "out"
    summary = run_batch(_config(csv_path, out, ray="auto", actors=2, task_size=4))
    _check_rows(out, rows, ref)
    assert (summary.backend, summary.processed, summary.failed) == ("ray (2 actors)", len(rows), 2)
    assert all(p.endswith(".parquet") for p in summary.parts)
    again = run_batch(_config(csv_path, out, ray="auto", actors=2))
    assert (again.processed, again.skipped) == (0, len(rows))


@pytest.mark.slow
def test_ray_actor_killed_mid_run_loses_no_video(corpus, ray_instance, tmp_path):
    csv_path, rows, ref = corpus
    ray_instance.unlink()  # armed: the first worker to take a batch creates the flag and dies
    out = tmp_path / "out"
    summary = run_batch(_config(csv_path, out, ray="auto", actors=2, task_size=4, fmt="jsonl"))
    dead = ray_instance.read_text()
    assert dead.split(":")[-1].isdigit()  # a worker did die (its host:pid is in the flag)
    got = _check_rows(out, rows, ref)
    assert dead not in {r["worker"] for r in got.values()}  # its batch was redone by a live actor
    assert summary.processed == len(rows)


@pytest.mark.slow
def test_ray_refuses_more_actors_than_cpus(corpus, ray_instance, tmp_path):
    csv_path, _, _ = corpus
    with pytest.raises(ConfigError, match="3 actors need 3 CPUs but the Ray cluster has 2"):
        run_batch(_config(csv_path, tmp_path / "out", ray="auto", actors=3))
    assert not list((tmp_path / "out").glob("part-*"))


def test_ray_off_needs_no_ray_path(corpus, tmp_path):
    """--ray off writes the same rows without touching Ray at all (what an install without the extra runs)."""
    csv_path, rows, ref = corpus
    code = ("import sys, json\n"
            "from adafocus.scale.batch import BatchConfig, run_batch\n"
            "from adafocus.scale.rows import RunnerOptions\n"
            f"s = run_batch(BatchConfig(source={str(csv_path)!r}, out={str(tmp_path / 'o')!r}, ray='off', fmt='jsonl',"
            f" runner=RunnerOptions(bundle={str(bundle_path())!r})))\n"
            "assert 'ray' not in sys.modules and 'pyarrow' not in sys.modules\n"
            "print(s.processed)")
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert done.stdout.strip() == str(len(rows))
    _check_rows(tmp_path / "o", rows, ref)
    assert Path(tmp_path / "o" / "summary.json").is_file()


def test_urls_are_downloaded(corpus, tmp_path):
    """http(s) entries of a list are fetched from a real HTTP server on 127.0.0.1; a 404 is that video's error row."""
    import functools
    import http.server

    csv_path, rows, ref = corpus
    video = Path(rows[0]["video"])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(video.parent))
    handler.log_message = lambda *a: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        listing = tmp_path / "urls.jsonl"
        listing.write_text(json.dumps({"id": "web", "video": f"{base}/{video.name}"}) + "\n"
                           + json.dumps({"id": "gone", "video": f"{base}/gone.mp4"}) + "\n")
        run_batch(_config(listing, tmp_path / "out", ray="off", fmt="jsonl"))
        httpd.shutdown()
    got = {r["id"]: r for r in read_rows(tmp_path / "out")}
    assert (got["web"]["label"], got["web"]["exit_step"]) == ref[str(video)]
    assert got["gone"]["status"] == "error" and got["gone"]["error"].startswith(f"{base}/gone.mp4: cannot download")


@pytest.mark.slow
def test_ray_worker_error_is_one_line(ray_instance, tmp_path):
    """A bundle changed after export passes the driver's manifest check; the actors refuse it when they verify the
    checksums, and the job stops with that one line and writes nothing."""
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_path(), bundle)
    data = bytearray((bundle / "head.onnx").read_bytes())
    data[-1] ^= 1
    (bundle / "head.onnx").write_bytes(bytes(data))
    config = BatchConfig(source=str(sample_videos_dir()), out=str(tmp_path / "out"), ray="auto",
                         runner=RunnerOptions(bundle=str(bundle), threads=1))
    with pytest.raises(AdaFocusError, match=r"^the Ray job failed: bundle file head.onnx does not match its sha256"):
        run_batch(config)
    assert not (tmp_path / "out").exists()


def sample_videos_dir() -> Path:
    from adafocus.demo.shipped import sample_videos

    return sample_videos()[0].parent


def test_interrupted_run_keeps_its_rows(corpus, tmp_path):
    csv_path, rows, ref = corpus
    out = tmp_path / "out"

    def interrupt(done, total):
        if done >= 5:
            raise KeyboardInterrupt  # Ctrl-C after the first 5 rows

    with pytest.raises(KeyboardInterrupt):
        run_batch(_config(csv_path, out, ray="off", fmt="jsonl", task_size=5), progress=interrupt)
    assert len(read_rows(out)) == 5
    again = run_batch(_config(csv_path, out, ray="off", fmt="jsonl"))
    assert (again.processed, again.skipped) == (len(rows) - 5, 5)
    _check_rows(out, rows, ref)

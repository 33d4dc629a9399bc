"""Concurrency: processes that load and run a bundle while ``adafocus calibrate thresholds`` rewrites its
manifest see the old or the new manifest, never a torn one, never a checksum error.

Two runner processes loop ``load_bundle`` + ``Pipeline.from_bundle`` + one video on a copy of the demo
bundle, recording the threshold-table keys of every manifest they read (and any error) to a JSON-lines file.
A third process runs ``adafocus calibrate thresholds`` on it three times in a row, each with other
``--budgets`` (so every manifest it writes has its own key set). Overlap is forced, not timed: the calibrator
starts only once both runners finished an iteration (so they read the original manifest), and the runners
stop only at a stop file made after the calibrator's last run, reading the bundle once more after they saw
it (so they read the final manifest). Everything is bounded: the runners give up after
``RUNNER_DEADLINE_S``, every wait has a timeout, a process that outlives it is killed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

RUNNERS = 2
BUDGETS = ("0.06,0.08", "0.065,0.09", "0.07,0.1")  # one calibration each; keys differ from the demo's
RUNNER_DEADLINE_S = 240  # a runner stops by itself after this, whatever happens
WAIT_S = 120  # the longest the test waits for one step (runner ready, calibration, runner exit)

RUNNER = r"""
import json, os, sys, time, traceback
bundle, video, workdir, name, deadline_s = sys.argv[1:6]
from adafocus.bundle import load_bundle
from adafocus.runtime.pipeline import Pipeline

stop, ready = os.path.join(workdir, "stop"), os.path.join(workdir, name + ".ready")
deadline = time.monotonic() + float(deadline_s)
with open(os.path.join(workdir, name + ".jsonl"), "w") as log:
    while time.monotonic() < deadline:
        rec = {"stopping": os.path.exists(stop)}  # seen before this iteration reads anything
        try:
            rec["keys"] = sorted(load_bundle(bundle).manifest.exit.thresholds)
            with Pipeline.from_bundle(bundle, threads=1) as pipe:
                rec["pipe_keys"] = sorted(pipe.manifest.exit.thresholds)
                res = pipe(video, budget="0.1")
                rec["label"], rec["exit_step"] = res.label, res.exit_step
        except BaseException as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["traceback"] = traceback.format_exc(limit=6)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if not os.path.exists(ready):
            open(ready, "w").close()
        if rec["stopping"]:
            break
"""


def _wait_for(paths: list[Path], procs: list[subprocess.Popen], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead, f"a runner exited early: {dead}"
        assert time.monotonic() < end, f"runners not ready after {timeout}s"
        time.sleep(0.05)


def _keys(bundle: Path) -> tuple[str, ...]:
    from adafocus.bundle import read_manifest

    return tuple(sorted(read_manifest(bundle).exit.thresholds))


@pytest.mark.slow
def test_runners_see_old_or_new_manifest_while_calibrating(tmp_path):
    from adafocus.demo.data import generate
    from adafocus.demo.shipped import bundle_path, sample_videos

    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_path(), bundle)
    data = tmp_path / "data"
    generate(data, videos=24, seed=7)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    manifests = [_keys(bundle)]  # every manifest the bundle had, in order (the parent reads between writes)

    runners = []
    for i in range(RUNNERS):  # stderr to a file: a pipe nobody reads could fill up and block a runner
        with open(work / f"runner{i}.err", "w") as err:
            runners.append(subprocess.Popen([sys.executable, "-c", RUNNER, str(bundle), str(sample_videos()[0]),
                                             str(work), f"runner{i}", str(RUNNER_DEADLINE_S)],
                                            env=env, stdout=subprocess.DEVNULL, stderr=err))
    try:
        _wait_for([work / f"runner{i}.ready" for i in range(RUNNERS)], runners, WAIT_S)
        for budgets in BUDGETS:
            cal = subprocess.run([sys.executable, "-m", "adafocus", "calibrate", "thresholds", str(bundle),
                                  "--data", str(data), "--budgets", budgets, "--max-videos", "4",
                                  "--heldout-split", "none", "--threads", "1", "--json"],
                                 env=env, capture_output=True, text=True, timeout=WAIT_S)
            assert cal.returncode == 0, cal.stderr[-2000:]
            manifests.append(_keys(bundle))
        (work / "stop").touch()
        for i, proc in enumerate(runners):
            assert proc.wait(timeout=WAIT_S) == 0, (work / f"runner{i}.err").read_text()[-2000:]
    finally:
        for proc in runners:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    assert len(set(manifests)) == len(manifests), f"each calibration wrote its own table: {manifests}"
    old, new = manifests[0], manifests[-1]
    for i in range(RUNNERS):
        records = [json.loads(line) for line in (work / f"runner{i}.jsonl").read_text().splitlines()]
        errors = [r for r in records if "error" in r]
        assert not errors, f"runner{i}: {len(errors)} of {len(records)} iterations failed; first:\n" \
                           f"{errors[0]['traceback']}"
        seen = [tuple(r["keys"]) for r in records] + [tuple(r["pipe_keys"]) for r in records]
        assert set(seen) <= set(manifests), f"runner{i} read a manifest the bundle never had"
        assert tuple(records[0]["keys"]) == old, "the first read is before the calibrator started"
        final = [r for r in records if r["stopping"]]
        assert len(final) == 1 and tuple(final[0]["keys"]) == tuple(final[0]["pipe_keys"]) == new, \
            f"runner{i}: its last read is after the calibrator finished"
        print(f"runner{i}: {len(records)} iterations, manifests seen "
              f"{sorted({manifests.index(k) for k in seen})} of 0..{len(manifests) - 1}")

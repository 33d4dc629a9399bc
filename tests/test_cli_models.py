"""CLI: presets, init, flops, and the one-line error contract; the runtime never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from adafocus.cli import app, main


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_presets_lists_every_family(capsys):
    code, out, _ = run_cli(capsys, "presets")
    assert code == 0
    names = [line.split()[0] for line in out.strip().splitlines()]
    assert {"tiny", "base-p96", "base-p128", "base-p160", "base-p192", "tsm-p128-8x16"} <= set(names)


def test_init_then_flops_json(tmp_path, capsys):
    code, out, err = run_cli(capsys, "init", "--preset", "tiny", "--out", str(tmp_path / "m.pt"), "--seed", "3")
    assert code == 0, err
    assert (tmp_path / "m.pt").stat().st_size > 1000
    code, out, _ = run_cli(capsys, "flops", "--preset", "base-p128", "--json")
    report = json.loads(out)
    assert len(report["exits"]) == 17 and abs(report["exits"][-1] - 27.230) / 27.230 < 0.01


def test_unknown_preset_is_one_line(capsys):
    code, out, err = run_cli(capsys, "flops", "--preset", "base-p129")
    assert code == 1
    assert err.count("\n") == 1 and "did you mean" in err and err.startswith("error: unknown preset")


def test_runtime_does_not_import_torch():
    code = "import adafocus.runtime, adafocus.runtime.sampling, adafocus.runtime.exits, sys; " \
           "assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_app_has_the_documented_commands():
    names = {c.name for c in app.registered_commands}
    assert {"presets", "init", "flops"} <= names

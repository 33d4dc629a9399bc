"""The README's commands stay true: the first one runs the bundled demo; .ci/run is the second one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    first, second = _readme_commands()[:2]
    assert first.endswith("adafocus-run") and "pip install" in first
    ci = (ROOT / ".ci" / "run").read_text()
    assert second in ci, ".ci/run must run exactly the README's test command"


def test_bundled_demo_runs_without_arguments_and_without_torch():
    """What `adafocus-run` does on a fresh install: the shipped bundle on the shipped sample videos."""
    from adafocus.demo.shipped import bundle_path, sample_videos

    videos = sample_videos()
    assert 2 <= len(videos) <= 5 and bundle_path().is_dir()
    code = ("import sys\nfrom adafocus.cli import run_main\n"
            "try:\n    run_main(['--json'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [Path(r["video"]).name for r in rows] == [v.name for v in videos]
    for r in rows:
        assert r["gflops"] <= r["budget_gflops"] + 1e-12
        assert r["label"] in json.loads((bundle_path() / "manifest.json").read_text())["labels"]


def test_package_data_is_small():
    from adafocus.demo.shipped import ASSETS

    size = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert size < 10e6, f"package data is {size / 1e6:.1f} MB"

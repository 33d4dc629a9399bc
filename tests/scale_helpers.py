"""Helpers of the scale-out tests: one local Ray per test module, a small labelled corpus, reference results."""

from __future__ import annotations

import csv
import os
from pathlib import Path

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


def start_ray(extra_env: dict[str, str] | None = None):
    """A local Ray with 2 CPUs for one test module (the environment set first reaches its workers)."""
    import ray

    os.environ.update({**RAY_ENV, **(extra_env or {})})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    return ray


def demo_corpus(root: Path, videos: int = 30, seed: int = 11) -> tuple[Path, list[dict]]:
    """A demo data set's train split as a batch list (``id,video,label``) with two extra rows: a corrupt video
    (a real mp4 cut to its first 600 bytes) and a missing file. Returns the CSV and its rows."""
    from adafocus.dataset import load_split
    from adafocus.demo.data import generate

    generate(root / "data", videos=videos, seed=seed)
    listed = load_split(root / "data", "train")
    rows = [{"id": f"v{i:03d}", "video": str(v.path), "label": v.label} for i, v in enumerate(listed)]
    corrupt = root / "corrupt.mp4"
    corrupt.write_bytes(Path(listed[0].path).read_bytes()[:600])
    rows += [{"id": "corrupt", "video": str(corrupt), "label": listed[0].label},
             {"id": "missing", "video": str(root / "missing.mp4"), "label": listed[0].label}]
    path = root / "corpus.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "video", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path, rows


def reference(paths: list[str], budget=None) -> dict[str, tuple[str, int]]:
    """(label, exit step) per path from the Pipeline run in this process, one video at a time (what
    ``adafocus-run`` prints), for the videos that decode."""
    from adafocus.demo.shipped import bundle_path
    from adafocus.runtime.pipeline import Pipeline

    with Pipeline.from_bundle(bundle_path()) as pipe:
        return {p: (r.label, r.exit_step) for p, r in pipe.run_many(paths, budget) if not isinstance(r, Exception)}

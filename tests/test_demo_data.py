"""The procedural demo data set and the labels-CSV reader."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from videos import read_all_frames

from adafocus.dataset import class_names, label_indices, load_split, read_labels_csv
from adafocus.demo.data import CLASSES, TINTS, DemoDataConfig, generate, render_video, split_counts
from adafocus.errors import DataError

SMALL = {"frames": 8, "size": 64, "target_size": (14, 18), "decoys": (1, 2), "shapes": (2, 4)}


def _decode(path):
    return np.stack(read_all_frames(path))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "data"
    return generate(root, videos=20, seed=3, **SMALL)


def test_layout_csv_and_videos(small_set):
    root = small_set.root
    assert small_set.counts == {"train": 14, "val": 3, "test": 3}
    assert class_names(root) == list(CLASSES)
    for split, n in small_set.counts.items():
        with open(root / f"{split}.csv", newline="") as fh:
            rows = list(csv.reader(fh))
        assert rows[0] == ["video", "label"]
        assert len(rows) == n + 1
        videos = load_split(root, split)
        assert all(v.label in CLASSES for v in videos)
        frames = _decode(videos[0].path)  # a real mp4 OpenCV can decode
        assert frames.shape == (8, 64, 64, 3)
    # the 14 training videos cycle through the classes: balanced to within one
    counts = np.bincount(label_indices(load_split(root, "train"), list(CLASSES)), minlength=len(CLASSES))
    assert counts.max() - counts.min() <= 1


def test_same_seed_same_videos_other_seed_differs(small_set, tmp_path):
    again = generate(tmp_path / "again", videos=20, seed=3, **SMALL)
    other = generate(tmp_path / "other", videos=20, seed=4, **SMALL)
    a, b, c = (load_split(r.root, "val") for r in (small_set, again, other))
    assert [v.label for v in a] == [v.label for v in b]
    for va, vb in zip(a, b, strict=True):
        np.testing.assert_array_equal(_decode(va.path), _decode(vb.path))
    assert any(not np.array_equal(_decode(va.path), _decode(vc.path)) for va, vc in zip(a, c, strict=True))


def test_texture_is_invisible_at_half_resolution_and_visible_at_full():
    """Every texture, drawn with the same random stream: identical after a 2x2 box shrink (what the glance
    gets), different at full resolution (what a patch gets); the tint shows at both."""
    textures = ("checker", "hbricks", "hstripes", "vbricks", "vstripes")
    cfg = DemoDataConfig(lit_fraction=(1.0, 1.0), classes=tuple(f"red-{t}" for t in textures) + ("cyan-checker",))
    videos = [render_video(cfg, i, np.random.default_rng(7)) for i in range(len(cfg.classes))]

    def shrink(x):
        x = x.astype(np.int32)
        return x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]

    for other in videos[1:5]:
        assert not np.array_equal(videos[0], other)
        np.testing.assert_array_equal(shrink(videos[0]), shrink(other))
    assert not np.array_equal(shrink(videos[0]), shrink(videos[5]))  # red vs cyan


def test_lit_window_only():
    """Outside the lit window the texture is gone: two classes of one tint have equal frames there."""
    cfg = DemoDataConfig(frames=16, lit_fraction=(0.3, 0.3))
    a, b = (render_video(cfg, CLASSES.index(name), np.random.default_rng(1)) for name in ("red-hstripes",
                                                                                          "red-vstripes"))
    same = [np.array_equal(x, y) for x, y in zip(a, b, strict=True)]
    assert sum(same) == 16 - round(0.3 * 16)


def test_targets_file_matches_the_frames(small_set):
    targets = np.load(small_set.root / "val_targets.npz")
    assert targets["boxes"].shape == (3, 8, 4) and targets["lit"].shape == (3, 8)
    assert targets["lit"].any(axis=1).all()  # every video has lit frames
    video = load_split(small_set.root, "val")[0]
    frames = _decode(video.path)
    tint = np.array(TINTS[video.label.split("-")[0]])[::-1]  # BGR
    for t in np.flatnonzero(targets["lit"][0]):
        y, x, h, w = targets["boxes"][0, t]
        border = frames[t, y, x:x + w].astype(int)  # the top border row is the tint (up to mp4 loss)
        assert np.abs(border - tint).mean() < 40


def test_bad_class_name():
    with pytest.raises(DataError, match="not <tint>-<texture>"):
        DemoDataConfig(classes=("blue-stripes",)).validate()


def test_refuses_non_empty_directory_unless_overwrite(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("hi")
    with pytest.raises(DataError, match="not empty"):
        generate(tmp_path / "x", videos=3, **SMALL)
    res = generate(tmp_path / "x", videos=3, overwrite=True, **SMALL)
    assert not (tmp_path / "x" / "keep.txt").exists()
    assert res.counts == {"train": 1, "val": 1, "test": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_split_counts():
    assert split_counts(1500, (0.7, 0.15, 0.15)) == {"train": 1050, "val": 225, "test": 225}
    assert split_counts(3, (0.7, 0.15, 0.15)) == {"train": 1, "val": 1, "test": 1}


# ------------------------------------------------------------------------------------------ labels CSV
def test_labels_csv_errors(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("path,class\na.mp4,x\n")
    with pytest.raises(DataError, match="'video' and 'label'"):
        read_labels_csv(bad_header)
    missing = tmp_path / "missing.csv"
    missing.write_text("video,label\nnope.mp4,x\n")
    with pytest.raises(DataError, match="missing.csv:2: video not found"):
        read_labels_csv(missing)
    with pytest.raises(DataError, match="not found"):
        read_labels_csv(tmp_path / "none.csv")
    ok = tmp_path / "train.csv"
    ok.write_text("video,label,extra\na.mp4,zebra,1\na.mp4,ant,2\n")
    rows = read_labels_csv(ok)
    assert rows[0].path == tmp_path / "a.mp4" and rows[0].label == "zebra"
    assert class_names(tmp_path) == ["ant", "zebra"]  # sorted without labels.txt
    (tmp_path / "labels.txt").write_text("zebra\nant\n")
    assert class_names(tmp_path) == ["zebra", "ant"]
    with pytest.raises(DataError, match="not among"):
        label_indices(rows, ["zebra"])
    with pytest.raises(DataError, match=r"no val.csv .*found: bad.csv"):
        load_split(tmp_path, "val")

"""CPU training: the loss falls, the same seed reproduces the run, checkpoints load, the CLI works."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adafocus.demo.data import CLASSES, generate
from adafocus.errors import AdaFocusError
from adafocus.models.checkpoint import load, read
from adafocus.models.dense import DenseBaseline, load_dense
from adafocus.models.presets import preset_config
from adafocus.models.uniadafocus import UniAdaFocus
from adafocus.training import TrainOptions, train
from adafocus.training.data import load_clips, read_frames, to_input
from adafocus.training.losses import adafocus_loss, forward_train, mc_sample_logits

# a model and data set 4x smaller than the tiny preset's, so that a few epochs take seconds
SMALL_MODEL = {"frame_size": 64, "resize_size": 64, "glance_size": 32, "patch_size": 32, "crop_min": 16,
               "crop_max": 48}
SMALL_DATA = {"frames": 16, "size": 64, "target_size": (14, 18), "decoys": (1, 2), "shapes": (2, 4)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "data"
    generate(root, videos=40, seed=0, split=(0.6, 0.2, 0.2), **SMALL_DATA)
    return root


def _options(**kw) -> TrainOptions:
    base = {"epochs": 6, "batch_size": 8, "lr": 3e-3, "warmup_epochs": 0.5, "mc_samples": 8, "eval_every": 3,
            "threads": 2, "seed": 1, "config": SMALL_MODEL}
    return TrainOptions(**{**base, **kw})


def test_train_loss_falls_and_same_seed_reproduces(data, tmp_path):
    logs: list[str] = []
    first = train(data, tmp_path / "a.pt", _options(), log=logs.append, progress=False)
    losses = [h["loss"] for h in first.history]
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses
    assert len(first.val_accuracy) == len(first.test_accuracy) == 9  # exit 0 + 8 focus steps
    assert any(line.startswith("epoch   6/6") for line in logs)

    second = train(data, tmp_path / "b.pt", _options(), log=logs.append, progress=False)
    assert [h["loss"] for h in second.history] == losses
    assert second.val_accuracy == first.val_accuracy and second.test_accuracy == first.test_accuracy

    # the checkpoint loads into the reference model, carries the labels and how it was trained
    model = load(tmp_path / "a.pt")
    assert model.cfg.labels == list(CLASSES) and model.cfg.frame_size == 64
    record = read(tmp_path / "a.pt")["training"]
    assert record["options"]["seed"] == 1 and record["videos"] == {"train": 24, "val": 8, "test": 8}
    assert record["test_accuracy"] == first.test_accuracy
    assert record["best_epoch"] in (3, 4, 5, 6)


def test_dense_baseline_trains_and_loads(data, tmp_path):
    res = train(data, tmp_path / "dense.pt", _options(dense=True, epochs=2, eval_every=1), log=lambda s: None,
                progress=False)
    assert res.kind == "dense" and len(res.test_accuracy) == 1
    model = load_dense(tmp_path / "dense.pt")
    assert isinstance(model, DenseBaseline)
    # every one of the 16 candidate frames at 64 px through the local encoder: far above one 32 px patch a step
    adaptive = load(_trained_adaptive(data, tmp_path))
    from adafocus.models.flops import count_model_flops

    assert res.gflops[0] > 3 * count_model_flops(adaptive).exits[-1]

    # the adaptive model can start its local encoder from the dense baseline's (the demo does)
    logs: list[str] = []
    warm = tmp_path / "warm.pt"
    train(data, warm, _options(epochs=1, eval_every=1, max_videos=8, init_local=str(tmp_path / "dense.pt"),
                               lr=1e-9, warmup_epochs=0), log=logs.append, progress=False)
    assert any("local encoder initialised from" in line for line in logs)
    started = load(warm).local_CNN.state_dict()
    dense_conv = model.local_CNN.state_dict()["conv1.weight"]
    assert torch.allclose(started["conv1.weight"], dense_conv, atol=1e-6)
    with pytest.raises(AdaFocusError, match="local_CNN does not match"):
        train(data, tmp_path / "bad.pt", _options(epochs=1, max_videos=8, init_local=str(tmp_path / "dense.pt"),
                                                  config={**SMALL_MODEL, "local_width": 8}),
              log=lambda s: None, progress=False)


def _trained_adaptive(data, tmp_path):
    out = tmp_path / "one.pt"
    train(data, out, _options(epochs=1, eval_every=1, max_videos=8), log=lambda s: None, progress=False)
    return out


# ------------------------------------------------------------------------------------------ pieces
def test_clips_match_decoded_frames(data):
    from adafocus.dataset import class_names, load_split

    videos = load_split(data, "val")[:2]
    cfg = preset_config("tiny").replace(**SMALL_MODEL, num_classes=10)
    clips = load_clips(videos, class_names(data), cfg)
    assert clips.frames.shape == (2, 16, 64, 64, 3) and clips.frames.dtype == np.uint8
    np.testing.assert_array_equal(clips.frames[0], read_frames(videos[0].path, 16))
    x = to_input(clips.frames, cfg)
    assert x.shape == (2, 16, 3, 64, 64)
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    expected = (torch.from_numpy(clips.frames[1, 3]).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(x[1, 3], expected, rtol=0, atol=0)


def test_training_forward_shapes_and_stop_gradient():
    torch.manual_seed(0)
    cfg = preset_config("tiny").replace(**SMALL_MODEL)
    model = UniAdaFocus(cfg).train()
    rng = np.random.default_rng(0)
    out = forward_train(model, torch.randn(4, 16, 3, 64, 64), rng, mc_samples=4)
    c, tg, k = cfg.num_classes, cfg.num_glance, cfg.num_focus
    assert [x.shape for x in out.step_logits] == [(4, tg + k, c)] * 2
    assert out.global_logits.shape == (4, tg, c) and out.temporal_logits.shape == (4, c)
    assert out.positions.shape == (4, k) and (np.diff(out.positions, axis=1) > 0).all()
    parts = adafocus_loss(out, torch.tensor([0, 1, 2, 3]))
    # only the auxiliary and norm terms reach the spatial policy (patches are cut with detached actions)
    policy = list(model.spatial_policy.parameters())
    grads = torch.autograd.grad(parts["steps"] + parts["local"], policy, allow_unused=True)
    assert all(g is None for g in grads)
    grads = torch.autograd.grad(parts["spatial"], policy, allow_unused=True, retain_graph=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_mc_sample_logits_without_drops_is_the_weighted_mean():
    logits = torch.randn(2, 6, 3)
    w = torch.softmax(torch.randn(2, 6), dim=1)
    out = mc_sample_logits(logits, w, rounds=1, samples=4)
    torch.testing.assert_close(out, (logits * w[..., None]).sum(1))


# -------------------------------------------------------------------------------------------- CLI
def test_cli_demo_data_and_train(tmp_path):
    from adafocus.cli import _run, app

    root = tmp_path / "d"
    assert _run(app, ["demo-data", str(root), "--videos", "12", "--seed", "5", "--frames", "16"]) == 0
    assert (root / "train.csv").is_file() and (root / "labels.txt").is_file()
    assert _run(app, ["demo-data", str(root), "--videos", "12"]) == 1  # not empty, no --overwrite
    out = tmp_path / "m.pt"
    assert _run(app, ["train", "--preset", "tiny", "--data", str(root), "--out", str(out), "--epochs", "1",
                      "--batch-size", "4", "--max-videos", "4", "--no-progress"]) == 0
    assert read(out)["training"]["videos"] == {"train": 4, "val": 2, "test": 2}

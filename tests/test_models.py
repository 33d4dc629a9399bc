"""The PyTorch reference: presets, stage shapes, determinism, FLOPs against upstream's tables."""

from __future__ import annotations

import pytest
import torch

from adafocus.models import build_model
from adafocus.models.flops import count_flops
from adafocus.models.presets import list_presets, preset_config

BASE_PRESETS = [p.name for p in list_presets() if p.config.family == "base" and p.name != "tiny"]


def _frames(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, cfg.num_segments * 3, cfg.frame_size, cfg.frame_size, generator=g)


def test_tiny_forward_shapes_and_stepwise_match():
    torch.manual_seed(0)
    cfg = preset_config("tiny")
    model = build_model(cfg).eval()
    x = _frames(cfg)
    out = model(x)
    assert out.shape == (1, cfg.num_focus + 1, cfg.num_classes)
    steps = list(model.stepwise(x.view(cfg.num_segments, 3, cfg.frame_size, cfg.frame_size)))
    assert [s.step for s in steps] == list(range(cfg.num_focus + 1))
    for s in steps:
        torch.testing.assert_close(torch.from_numpy(s.logits), out[0, s.step], rtol=1e-5, atol=1e-5)
    positions = [s.position for s in steps[1:]]
    assert positions == sorted(set(positions)), "focus frames come out strictly increasing"
    assert all(0 <= p < cfg.num_segments for p in positions)


def test_stepwise_is_deterministic_and_exits_early():
    torch.manual_seed(1)
    cfg = preset_config("tiny")
    model = build_model(cfg).eval()
    frames = _frames(cfg, 3).view(cfg.num_segments, 3, cfg.frame_size, cfg.frame_size)
    a = list(model.stepwise(frames))
    b = list(model.stepwise(frames))
    assert [s.position for s in a] == [s.position for s in b]
    assert all((x.logits == y.logits).all() for x, y in zip(a, b, strict=True))
    # a threshold equal to step 3's score makes the video stop there (or earlier)
    thresholds = [float("inf")] * 3 + [a[3].score] + [float("inf")] * (cfg.num_focus - 3)
    c = list(model.stepwise(frames, thresholds=thresholds))
    assert c[-1].step <= 3 and len(c) == c[-1].step + 1


def test_batch_forward_equals_single_videos():
    torch.manual_seed(2)
    cfg = preset_config("tiny")
    model = build_model(cfg).eval()
    x = torch.cat([_frames(cfg, 10), _frames(cfg, 11)])
    both = model(x)
    torch.testing.assert_close(both[1:], model(x[1:]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", BASE_PRESETS)
@pytest.mark.slow
def test_base_presets_forward(name):
    torch.manual_seed(0)
    cfg = preset_config(name)
    model = build_model(cfg).eval()
    out = model(_frames(cfg))
    assert out.shape == (1, 17, 200) and torch.isfinite(out).all()


# upstream get_flops tables (shared/UNIADAFOCUS.md section 7): exit 0 and the full model
UPSTREAM = {"base-p96": (4.889, 17.888), "base-p128": (4.889, 27.230), "base-p160": (4.889, 39.241)}
UPSTREAM_P128 = [4.889, 7.060, 8.405, 9.750, 11.094, 12.439, 13.784, 15.128, 16.473, 17.818, 19.162, 20.507,
                 21.851, 23.196, 24.541, 25.885, 27.230]


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_flops_match_upstream_tables(name):
    report = count_flops(name)
    first, last = UPSTREAM[name]
    assert report.exits[0] == pytest.approx(first, rel=0.01)
    assert report.exits[-1] == pytest.approx(last, rel=0.01)
    assert len(report.exits) == 17


def test_flops_every_exit_p128():
    report = count_flops("base-p128")
    for ours, theirs in zip(report.exits, UPSTREAM_P128, strict=True):
        assert ours == pytest.approx(theirs, rel=0.01)
    # the parts upstream lists: MobileNetV2 per frame, ResNet-50 at 128, the two policy heads
    assert report.parts["glance encoder (per frame)"] == pytest.approx(0.299511, rel=0.001)
    assert report.parts["local encoder (per patch)"] == pytest.approx(1.334602, rel=0.001)
    assert report.parts["spatial policy"] == pytest.approx(0.822485, rel=0.001)
    assert report.parts["temporal policy"] == pytest.approx(0.004130, rel=0.001)


def test_tiny_is_a_few_mflops_a_step():
    report = count_flops("tiny")
    assert 0.001 < report.step < 0.02
    assert report.exits == sorted(report.exits)


# upstream TSM table (shared/UNIADAFOCUS.md section 7): exit 0 = 2.400 for all; full model per preset
UPSTREAM_TSM = {"tsm-p96-8x8": 8.82, "tsm-p96-8x12": 11.83, "tsm-p128-8x12": 18.84, "tsm-p128-8x16": 24.18}


@pytest.mark.parametrize("name", sorted(UPSTREAM_TSM))
def test_tsm_flops_match_upstream_tables(name):
    report = count_flops(name)
    assert len(report.exits) == 2
    assert report.exits[0] == pytest.approx(2.400, rel=0.01)
    assert report.exits[1] == pytest.approx(UPSTREAM_TSM[name], rel=0.01)

"""Uni-AdaFocus-TSM reference model: stages, stepwise == forward, the shift, and official-format weights.

The official-format check builds, in this file, an independent reconstruction of upstream's evaluation
arithmetic (TSN wrappers, slice-assignment shift, ``affine_grid`` crop, torch frame sampler without the
clamp), saves its weights under upstream's key names (``module.`` prefix, ``.net.``) and checks that our model
loads them strictly and gives the same logits at both exits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from bundles import one_torch_thread

from adafocus.models.backbones import TemporalShift, temporal_shift
from adafocus.models.config import ModelConfig
from adafocus.models.presets import preset_config
from adafocus.models.tsm import TSMStep, UniAdaFocusTSM
from adafocus.models.uniadafocus import build_model
from adafocus.runtime.sampling import focus_positions

# Reduced config: upstream's structure and arithmetic at a small cost (64-px frames seen whole by the glance,
# crop boxes 24..64 px resampled to 32-px patches, MobileNetV2-0.25 and ResNet-50 with an 8-channel stem);
# 8 glance + 8 focus of 24 candidates.
S = 64
SMALL = dict(family="tsm", num_classes=5, frame_size=S, resize_size=S, glance_size=S, num_segments=24,
             num_glance=8, num_focus=8, patch_size=32, crop_min=24, crop_max=S, glance_width=0.25,
             glance_last_channel=64, local_width=8, stn_hidden_dim=16, temporal_hidden_dim=8, dropout=0.5,
             fc_dropout=0.5)


def small_cfg(**changes) -> ModelConfig:
    return ModelConfig(**{**SMALL, **changes})


def inputs(cfg: ModelConfig, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = cfg.frame_size
    return (torch.randn(batch, cfg.num_glance * 3, s, s, generator=g),
            torch.randn(batch, cfg.candidates * 3, s, s, generator=g))


# ------------------------------------------------------------------ independent reference (upstream eval)
def ref_shift(x: torch.Tensor, n_segment: int, fold_div: int) -> torch.Tensor:
    """TSM shift as upstream writes it: zeros + three slice assignments."""
    nt, c, h, w = x.shape
    x = x.view(nt // n_segment, n_segment, c, h, w)
    fold = c // fold_div
    out = torch.zeros_like(x)
    out[:, :-1, :fold] = x[:, 1:, :fold]
    out[:, 1:, fold:2 * fold] = x[:, :-1, fold:2 * fold]
    out[:, :, 2 * fold:] = x[:, :, 2 * fold:]
    return out.view(nt, c, h, w)


class RefShift(nn.Module):
    def __init__(self, net, n_segment, fold_div):
        super().__init__()
        self.net, self.n_segment, self.fold_div = net, n_segment, fold_div

    def forward(self, x):
        return self.net(ref_shift(x, self.n_segment, self.fold_div))


def _cbr(inp, oup, k, s, groups=1, relu=True):
    layers = [nn.Conv2d(inp, oup, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(oup)]
    return layers + ([nn.ReLU6(inplace=True)] if relu else [])


class RefIR(nn.Module):
    def __init__(self, inp, oup, stride, t):
        super().__init__()
        hid = int(inp * t)
        self.res = stride == 1 and inp == oup
        layers = [] if t == 1 else _cbr(inp, hid, 1, 1)
        self.conv = nn.Sequential(*layers, *_cbr(hid, hid, 3, stride, groups=hid), *_cbr(hid, oup, 1, 1, relu=False))

    def forward(self, x):
        return x + self.conv(x) if self.res else self.conv(x)


class RefMobileNetV2(nn.Module):
    """tonylins layout, upstream's ceil-based make_divisible, ImageNet head replaced by Dropout."""

    def __init__(self, width, last, n_segment):
        super().__init__()
        feats, inp = [nn.Sequential(*_cbr(3, 32, 3, 2))], 32
        for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                           (6, 160, 3, 2), (6, 320, 1, 1)]:
            out = int(math.ceil(c * width / 8) * 8) if t > 1 else c
            for i in range(n):
                feats.append(RefIR(inp, out, s if i == 0 else 1, t))
                inp = out
        feats.append(nn.Sequential(*_cbr(inp, last, 1, 1)))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Dropout(0.5)
        for m in self.features:
            if isinstance(m, RefIR) and m.res and len(m.conv) == 8:
                m.conv[0] = RefShift(m.conv[0], n_segment, 8)

    def forward(self, x):
        f = self.features(x)
        return self.classifier(f.mean(3).mean(2)), f


class RefBottleneck(nn.Module):
    def __init__(self, inp, planes, stride, down):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inp, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.downsample = down

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + idt)


class RefResNet50(nn.Module):
    """torchvision ResNet-50 layout with TSM 'blockres' (shift on every conv1), fc replaced by Dropout."""

    def __init__(self, width, n_segment):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)
        inp = width
        for li, (n, stride) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, 2), strict=True)):
            planes, blocks = width * 2 ** li, []
            for i in range(n):
                s = stride if i == 0 else 1
                down = None
                if i == 0 and (s != 1 or inp != planes * 4):
                    down = nn.Sequential(nn.Conv2d(inp, planes * 4, 1, s, bias=False), nn.BatchNorm2d(planes * 4))
                blk = RefBottleneck(inp, planes, s, down)
                blk.conv1 = RefShift(blk.conv1, n_segment, 8)
                blocks.append(blk)
                inp = planes * 4
            setattr(self, f"layer{li + 1}", nn.Sequential(*blocks))
        self.fc = nn.Dropout(0.5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class RefTSN(nn.Module):
    def __init__(self, base, dim, n_segment, c):
        super().__init__()
        self.base_model, self.n = base, n_segment
        self.new_fc, self.new_new_fc = nn.Linear(dim, c), nn.Linear(dim, c)

    def forward(self, x, glance=False):
        x = x.view(-1, 3, *x.shape[-2:])
        if glance:
            feat, fmap = self.base_model(x)
        else:
            feat = self.base_model(x)
        final = self.new_fc(feat).view(-1, self.n, self.new_fc.out_features).mean(dim=1, keepdim=True)
        reg = self.new_new_fc(feat).view(-1, self.n, self.new_fc.out_features).mean(dim=1, keepdim=True)
        if glance:
            return final.squeeze(1), reg.squeeze(1), fmap.reshape(-1, self.n * fmap.shape[1], *fmap.shape[2:]), feat
        return final.squeeze(1), reg.squeeze(1)


class RefSpatial(nn.Module):
    def __init__(self, dim, hid, t, h):
        super().__init__()
        self.dim, self.t = dim, t
        self.encoder = nn.Sequential(
            nn.Conv3d(dim, hid, 1, bias=False), nn.BatchNorm3d(hid), nn.ReLU(),
            nn.Conv3d(hid, hid, 3, padding=1, bias=False), nn.BatchNorm3d(hid), nn.ReLU(),
            nn.Conv3d(hid, hid, 3, padding=1, bias=False), nn.BatchNorm3d(hid), nn.ReLU(),
            nn.Conv3d(hid, 4, (t, h, h), bias=False), nn.Sigmoid())

    def forward(self, fmaps):  # [B, T*C, H, W]
        b, _, h, w = fmaps.shape
        return self.encoder(fmaps.reshape(b, self.t, self.dim, h, w).permute(0, 2, 1, 3, 4)).reshape(b, 4)


class RefTemporal(nn.Module):
    def __init__(self, dim, hid, t):
        super().__init__()
        self.dim, self.t = dim, t
        self.Tconv = nn.Sequential(
            nn.Conv2d(dim, hid, (3, 1), padding=(1, 0), bias=False), nn.BatchNorm2d(hid), nn.ReLU(),
            nn.Conv2d(hid, hid, (3, 1), padding=(1, 0), bias=False), nn.BatchNorm2d(hid), nn.ReLU(),
            nn.Conv2d(hid, 1, 1, bias=False))

    def forward(self, feat):  # [B*T, C]
        x = feat.reshape(-1, self.t, self.dim).permute(0, 2, 1).unsqueeze(-1)
        return torch.softmax(self.Tconv(x).flatten(1), dim=1)


def ref_sample(weights, n, tg, k):
    """Upstream TSM ``policy_sample_indices`` at eval (no clamp), in torch, without the batch offset."""
    b = weights.shape[0]
    cdf = torch.cat([torch.zeros(b, 1), weights.cumsum(dim=1)], dim=1)
    cdf[:, -1] = 1.0
    y = ((torch.arange(k).float() + 0.5) / k).repeat(b, 1)
    j = (cdf.unsqueeze(2) >= y.unsqueeze(1)).max(dim=1)[1] - 1
    x1, x2 = j / tg, (j + 1) / tg
    y1, y2 = cdf.gather(1, j), cdf.gather(1, j + 1)
    idx = torch.floor((x2 * (y - y1) - x1 * (y - y2)) / (y2 - y1) * n).long()
    for i in range(1, k):
        idx[:, i] = torch.where(idx[:, i] > idx[:, i - 1], idx[:, i], idx[:, i - 1] + 1)
    lim = (n - k + torch.arange(k)).unsqueeze(0)
    return torch.where(idx > lim, lim, idx)


def ref_crop(frames, action, size, p, cmin, cmax):
    """Upstream's ``get_patch_grid_scalexy`` (affine_grid + grid_sample defaults), crop side cmin..cmax."""
    b = action.shape[0]
    scale = action[:, 2:4] * (cmax - cmin) / p + cmin / p
    corner = action[:, :2] * (size - p * scale)
    x1, x2 = corner[:, 1], corner[:, 1] + p * scale[:, 1]
    y1, y2 = corner[:, 0], corner[:, 0] + p * scale[:, 0]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = p * scale[:, 1] / size, p * scale[:, 0] / size
    theta[:, 0, 2], theta[:, 1, 2] = -1 + (x1 + x2) / size, -1 + (y1 + y2) / size
    grid = F.affine_grid(theta, [b, 3, p, p], align_corners=False)
    return F.grid_sample(frames, grid, align_corners=False)


class RefTSM(nn.Module):
    """Upstream's eval forward, reconstructed: returns (exit 0, final) logits and the focus indices."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        c, tg, k = cfg.num_classes, cfg.num_glance, cfg.num_focus
        last = cfg.glance_last_channel
        self.global_CNN = RefTSN(RefMobileNetV2(cfg.glance_width, last, tg), last, tg, c)
        self.local_CNN = RefTSN(RefResNet50(cfg.local_width, k), cfg.local_width * 32, k, c)
        self.aux_fc = nn.Linear(last, c)
        self.spatial_policy = RefSpatial(last, cfg.stn_hidden_dim, tg, cfg.feature_size)
        self.temporal_policy = RefTemporal(last, cfg.temporal_hidden_dim, tg)

    def forward(self, glance_x, cand_x):
        cfg, s = self.cfg, glance_x.shape[-1]
        g_final, g_avg, fmaps, feat = self.global_CNN(glance_x, glance=True)
        weights = self.temporal_policy(feat)
        idx = ref_sample(weights, cfg.candidates, cfg.num_glance, cfg.num_focus)
        flat = idx + torch.arange(idx.shape[0]).unsqueeze(1) * cfg.candidates
        focus = cand_x.view(-1, 3, s, s)[flat.view(-1)].view(-1, cfg.num_focus * 3, s, s)
        action = self.spatial_policy(fmaps)
        patches = ref_crop(focus, action, s, cfg.patch_size, cfg.crop_min, cfg.crop_max)
        l_final, _ = self.local_CNN(patches)
        return g_avg, g_final + l_final, idx, action


def randomise(model: nn.Module, glance_x, cand_x, seed: int = 0) -> None:
    """Non-trivial weights: BN statistics from one batch, random BN affines and heads."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(glance_x, cand_x)
    model.eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------------ tests
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These convs are tiny: on a busy small machine a second intra-op thread costs more than it gains
    (measured here: 13 s for this file with one thread, 43 s with two under load)."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def small_model() -> UniAdaFocusTSM:
    torch.manual_seed(0)
    cfg = small_cfg()
    model = build_model(cfg)
    randomise(model, *inputs(cfg, 2, seed=1))
    return model


def test_forward_shapes_and_stages(small_model):
    cfg = small_model.cfg
    glance_x, cand_x = inputs(cfg, 2)
    out = small_model(glance_x, cand_x)
    assert out.shape == (2, 2, cfg.num_classes) and torch.isfinite(out).all()
    frames = glance_x.view(2, cfg.num_glance, 3, S, S)
    with torch.no_grad():
        fmap, vec, logits0, context = small_model.glance(frames)
        assert fmap.shape == (2, cfg.num_glance, 64, 2, 2) and vec.shape == (2, cfg.num_glance, 64)
        assert logits0.shape == context.shape == (2, cfg.num_classes)
        actions, weights = small_model.policy(fmap, vec)
        assert actions.shape == (2, 1, 4) and weights.shape == (2, cfg.num_glance)
        pos, acts = small_model.select(actions, weights)
        assert pos.shape == (2, cfg.num_focus) and acts.shape == (2, cfg.num_focus, 4)
        assert (np.diff(pos, axis=1) > 0).all() and pos.min() >= 0 and pos.max() < cfg.candidates
        np.testing.assert_array_equal(acts, np.repeat(actions.numpy(), cfg.num_focus, axis=1))
    torch.testing.assert_close(out[:, 0], logits0)


def test_stepwise_matches_forward_and_is_deterministic(small_model):
    cfg = small_model.cfg
    glance_x, cand_x = inputs(cfg, 2, seed=3)
    out = small_model(glance_x, cand_x)
    torch.testing.assert_close(small_model(glance_x, cand_x), out, rtol=0, atol=0)
    g1, c1 = glance_x[1].view(-1, 3, S, S), cand_x[1].view(-1, 3, S, S)
    steps = list(small_model.stepwise(g1, c1))
    assert [s.step for s in steps] == [0, 1] and all(isinstance(s, TSMStep) for s in steps)
    single = small_model(glance_x[1:], cand_x[1:])[0]
    for s in steps:
        np.testing.assert_allclose(s.logits, single[s.step].numpy(), rtol=1e-6, atol=1e-6)
        assert s.score == pytest.approx(float(single[s.step].max()), rel=1e-6)
        # batched: float32 noise in the box (~1e-7) moves the bilinear samples of random-noise frames, which
        # this randomly initialised ResNet amplifies to ~1e-4 of the logits
        assert rel_err(torch.as_tensor(s.logits), out[1, s.step]) < 1e-3
    pos, _ = small_model.select(*small_model.policy(*small_model.glance(glance_x.view(2, -1, 3, S, S))[:2]))
    np.testing.assert_array_equal(steps[1].positions, pos[1])
    assert steps[1].action.shape == (4,)
    # exit after the glance: a threshold at or below the step-0 score stops there
    score0 = steps[0].score
    assert [s.step for s in small_model.stepwise(g1, c1, thresholds=[score0, None])] == [0]
    assert [s.step for s in small_model.stepwise(g1, c1, thresholds=[score0 + 1e-3, None])] == [0, 1]
    assert [s.step for s in small_model.stepwise(g1, c1, max_steps=0)] == [0]


@pytest.mark.parametrize("fold_div", [2, 3, 8])
def test_shift_by_concat_equals_slice_assignment(fold_div):
    x = torch.randn(3 * 5, 17, 4, 3)
    torch.testing.assert_close(temporal_shift(x, 5, fold_div), ref_shift(x, 5, fold_div), rtol=0, atol=0)
    mod = TemporalShift(nn.Identity(), n_segment=5, fold_div=fold_div)
    torch.testing.assert_close(mod(x), ref_shift(x, 5, fold_div), rtol=0, atol=0)


def test_focus_positions_without_clamp_match_upstream_sampler():
    rng = np.random.default_rng(0)
    for tg, k in ((8, 8), (8, 12), (8, 16), (4, 3)):
        logits = rng.normal(size=(64, tg)) * rng.choice([0.1, 2.0, 8.0], size=(64, 1))
        w = torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=1)
        want = ref_sample(w, 3 * k, tg, k).numpy()
        got = focus_positions(w.numpy(), 3 * k, k, clamp=False)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, focus_positions(w.numpy(), 3 * k, k, clamp=True))


def test_official_format_state_dict_reproduces_upstream_arithmetic():
    cfg = small_cfg()
    glance_x, cand_x = inputs(cfg, 2, seed=5)
    torch.manual_seed(1)
    ref = RefTSM(cfg)
    randomise(ref, *inputs(cfg, 2, seed=6), seed=2)
    official = {f"module.{k}": v for k, v in ref.state_dict().items()}
    assert any(".conv1.net.weight" in k for k in official) and any(".conv.0.net.weight" in k for k in official)

    model = build_model(cfg)
    mapping = UniAdaFocusTSM.official_key_map(official)
    model.load_state_dict({mapping[k]: v for k, v in official.items()}, strict=True)
    model.eval()

    with torch.no_grad():
        want0, want1, want_idx, want_action = ref(glance_x, cand_x)
        # the inputs must exercise the policy: boxes off-centre, non-uniform frame choice
        assert (want_action - 0.5).abs().max() > 0.05
        got = model(glance_x, cand_x)
        fmap, vec, _, _ = model.glance(glance_x.view(2, cfg.num_glance, 3, S, S))
        actions, weights = model.policy(fmap, vec)
        assert float((weights.max(dim=1).values / weights.min(dim=1).values).min()) > 1.5
        pos, _ = model.select(actions, weights)
    np.testing.assert_array_equal(pos, want_idx.numpy())
    assert rel_err(actions[:, 0], want_action) < 1e-5
    assert rel_err(got[:, 0], want0) < 1e-4
    assert rel_err(got[:, 1], want1) < 1e-4


def test_full_presets_build_with_official_key_layout():
    cfg = preset_config("tsm-p128-8x12")
    model = build_model(cfg)
    assert isinstance(model, UniAdaFocusTSM)
    sd = model.state_dict()
    shifted_mbv2 = sorted(int(k.split(".")[3]) for k in sd if k.endswith("conv.0.net.weight"))
    assert shifted_mbv2 == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]  # residual blocks with an expansion
    assert sum(k.endswith("conv1.net.weight") for k in sd) == 16  # every ResNet-50 bottleneck
    assert not any(k.startswith(("global_CNN.base_model.classifier", "local_CNN.base_model.fc")) for k in sd)
    assert sd["spatial_policy.encoder.9.weight"].shape == (4, 128, 8, 7, 7)  # one box per video
    assert sd["global_CNN.new_fc.weight"].shape == (174, 1280)
    assert sd["local_CNN.new_new_fc.weight"].shape == (174, 2048)
    params = sum(p.numel() for p in model.parameters())
    assert 28.0e6 < params < 29.2e6  # ~28.6 M at 174 classes

"""Uni-AdaFocus-X3D reference: official key layout, official-format checkpoints, multi-view, stepwise, FLOPs.

The official side is rebuilt HERE from shared/X3D.md with plain torch ops on a state dict, not from adafocus's
modules: the key names and shapes are generated from the spec's tables, the X3D forward is functional
(``F.conv3d`` / ``F.batch_norm`` / ``F.avg_pool3d`` with the fixed head kernel), the glance resize is written
the upstream way, the ``affine_grid`` crop and the torch sampler (no clamp) are tests/test_tsm.py's rebuilds of
the same upstream functions, views are folded crop-major into the batch and averaged afterwards. An
official-format file (``module.`` keys, ``epoch``, ``arch``, ``optimizer``, ``best_prec1``, ``scaler``) with
random weights and BatchNorm statistics taken (and perturbed) from a calibration batch must load strictly into
the preset and give the same logits at both exits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bundles import one_torch_thread
from test_tsm import ref_crop, ref_sample  # upstream's TSM/X3D sampler (no clamp) and crop, rebuilt there

from adafocus.errors import CheckpointError, ConfigError
from adafocus.models import build_model, load
from adafocus.models.checkpoint import set_batchnorm_statistics
from adafocus.models.config import ModelConfig
from adafocus.models.flops import count_flops
from adafocus.models.presets import preset_config
from adafocus.models.x3d import UniAdaFocusX3D

# ------------------------------------------------------------------ the spec's tables (shared/X3D.md §3, §4)
# stem width, stage widths out / inner, blocks per stage, SE widths, lin_5 width
X3D_S = dict(stem=24, outs=(24, 48, 96, 192), inners=(54, 108, 216, 432), blocks=(3, 5, 11, 7), se=(8, 8, 16, 32),
             c5=2048)
X3D_L = dict(X3D_S, blocks=(5, 10, 25, 15))
# the x3d-tiny preset's X3D by the same rules: DIM_C1 8, width 1, depth 0.5, bottleneck 2.25, DIM_C5 64
X3D_TINY = dict(stem=8, outs=(8, 16, 32, 64), inners=(18, 36, 72, 144), blocks=(1, 1, 3, 2), se=(8, 8, 8, 16), c5=64)
ARCHS = {"x3d-p128-16x32": (X3D_S, X3D_L), "x3d-tiny": (X3D_TINY, X3D_TINY)}


def _bn_keys(shapes: dict, name: str, c: int) -> None:
    for t in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{name}.{t}"] = (c,)
    shapes[f"{name}.num_batches_tracked"] = ()


def x3d_shapes(prefix: str, a: dict, classes: int) -> dict[str, tuple]:
    """SlowFast X3D state-dict keys and shapes, from the spec (§3)."""
    s: dict[str, tuple] = {}
    p = f"{prefix}.s1.pathway0_stem"
    s[f"{p}.conv_xy.weight"] = (a["stem"], 3, 1, 3, 3)
    s[f"{p}.conv.weight"] = (a["stem"], 1, 5, 1, 1)
    _bn_keys(s, f"{p}.bn", a["stem"])
    cin = a["stem"]
    for stage, (out, inner, n, r) in enumerate(zip(a["outs"], a["inners"], a["blocks"], a["se"], strict=True)):
        for i in range(n):
            b = f"{prefix}.s{stage + 2}.pathway0_res{i}"
            if i == 0:
                s[f"{b}.branch1.weight"] = (out, cin, 1, 1, 1)
                _bn_keys(s, f"{b}.branch1_bn", out)
            s[f"{b}.branch2.a.weight"] = (inner, cin if i == 0 else out, 1, 1, 1)
            _bn_keys(s, f"{b}.branch2.a_bn", inner)
            s[f"{b}.branch2.b.weight"] = (inner, 1, 3, 3, 3)
            _bn_keys(s, f"{b}.branch2.b_bn", inner)
            if i % 2 == 0:
                s[f"{b}.branch2.se.fc1.weight"], s[f"{b}.branch2.se.fc1.bias"] = (r, inner, 1, 1, 1), (r,)
                s[f"{b}.branch2.se.fc2.weight"], s[f"{b}.branch2.se.fc2.bias"] = (inner, r, 1, 1, 1), (inner,)
            s[f"{b}.branch2.c.weight"] = (out, inner, 1, 1, 1)
            _bn_keys(s, f"{b}.branch2.c_bn", out)
        cin = out
    inner, c5 = a["inners"][-1], a["c5"]
    s[f"{prefix}.head.conv_5.weight"] = (inner, cin, 1, 1, 1)
    _bn_keys(s, f"{prefix}.head.conv_5_bn", inner)
    s[f"{prefix}.head.lin_5.weight"] = (c5, inner, 1, 1, 1)
    s[f"{prefix}.head.projection.weight"], s[f"{prefix}.head.projection.bias"] = (classes, c5), (classes,)
    return s


def official_shapes(preset: str, cfg: ModelConfig) -> dict[str, tuple]:
    """Every key of upstream's AdaFocus (X3D) state dict (§4), without ``module.``."""
    g, loc = ARCHS[preset]
    c, gd, h, ht = cfg.num_classes, g["inners"][-1], cfg.stn_hidden_dim, cfg.temporal_hidden_dim
    s = {**x3d_shapes("global_CNN", g, c), **x3d_shapes("local_CNN", loc, c)}
    for name, a in (("global_CNN_head", g), ("local_CNN_head", loc)):
        s[f"{name}.0.weight"] = (a["c5"], a["inners"][-1])
        s[f"{name}.3.weight"], s[f"{name}.3.bias"] = (c, a["c5"]), (c,)
    s["aux_head.0.weight"], s["aux_head.0.bias"] = (c, gd), (c,)
    fs = cfg.glance_size // 32
    sp = "spatial_policy.encoder"
    s[f"{sp}.0.weight"], s[f"{sp}.3.weight"], s[f"{sp}.6.weight"] = (h, gd, 1, 1, 1), (h, h, 3, 3, 3), (h, h, 3, 3, 3)
    s[f"{sp}.9.weight"] = (4, h, cfg.num_glance, fs, fs)
    for i in (1, 4, 7):
        _bn_keys(s, f"{sp}.{i}", h)
    tp = "temporal_policy.Tconv"
    s[f"{tp}.0.weight"], s[f"{tp}.3.weight"], s[f"{tp}.6.weight"] = (ht, gd, 3, 1), (ht, ht, 3, 1), (1, ht, 1, 1)
    for i in (1, 4):
        _bn_keys(s, f"{tp}.{i}", ht)
    return s


def random_state(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """He-scaled conv/linear weights, small biases, BN affines around 1 / 0; statistics are set by calibration."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(1000)
        elif k.endswith("running_mean"):
            sd[k] = torch.zeros(shape)
        elif k.endswith("running_var"):
            sd[k] = torch.ones(shape)
        elif k.endswith(".bias"):
            sd[k] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # BN weight
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            sd[k] = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
    # sharper policies: frame weights far from uniform and boxes off-centre, so the sampler and crop are exercised
    sd["temporal_policy.Tconv.6.weight"] *= 4.0
    sd["spatial_policy.encoder.9.weight"] *= 3.0
    return sd


# ------------------------------------------------------------------ upstream's evaluation, rebuilt functionally
class Official:
    """Upstream's eval forward (``uni_adafocus_X3D_exit.py`` over SlowFast's X3D) on a state dict.

    ``calibrate``: BatchNorm layers store their batch statistics (perturbed, so running stats are not the batch's
    own) into the state dict before normalising with them: non-trivial, well-scaled BN statistics."""

    def __init__(self, sd: dict[str, torch.Tensor], cfg: ModelConfig, preset: str, seed: int = 0):
        self.sd, self.cfg, self.archs = sd, cfg, ARCHS[preset]
        self.calibrate = False
        self.g = torch.Generator().manual_seed(seed)

    def bn(self, x, key):
        sd = self.sd
        if self.calibrate:
            dims = [d for d in range(x.dim()) if d != 1]
            mean, var = x.mean(dims), x.var(dims, unbiased=False)
            sd[f"{key}.running_mean"] = mean + 0.1 * var.sqrt() * torch.randn(mean.shape, generator=self.g)
            sd[f"{key}.running_var"] = var * (0.7 + 0.6 * torch.rand(var.shape, generator=self.g)) + 1e-3
        return F.batch_norm(x, sd[f"{key}.running_mean"], sd[f"{key}.running_var"], sd[f"{key}.weight"],
                            sd[f"{key}.bias"], False, 0.0, 1e-5)

    def x3d(self, p: str, a: dict, x: torch.Tensor, size: int):
        """-> (head logits [N, C], conv_5 maps [N, C5, T, h, w], their spatial mean [N, C5, T])."""
        sd = self.sd
        stem = a["stem"]
        x = F.conv3d(x, sd[f"{p}.s1.pathway0_stem.conv_xy.weight"], stride=(1, 2, 2), padding=(0, 1, 1))
        x = F.conv3d(x, sd[f"{p}.s1.pathway0_stem.conv.weight"], padding=(2, 0, 0), groups=stem)
        x = F.relu(self.bn(x, f"{p}.s1.pathway0_stem.bn"))
        for stage, (inner, n) in enumerate(zip(a["inners"], a["blocks"], strict=True)):
            for i in range(n):
                b = f"{p}.s{stage + 2}.pathway0_res{i}.branch"
                stride = 2 if i == 0 else 1
                y = F.relu(self.bn(F.conv3d(x, sd[f"{b}2.a.weight"]), f"{b}2.a_bn"))
                y = self.bn(F.conv3d(y, sd[f"{b}2.b.weight"], stride=(1, stride, stride), padding=1, groups=inner),
                            f"{b}2.b_bn")
                if i % 2 == 0:  # SE before the Swish
                    w = F.adaptive_avg_pool3d(y, 1)
                    w = F.relu(F.conv3d(w, sd[f"{b}2.se.fc1.weight"], sd[f"{b}2.se.fc1.bias"]))
                    y = y * torch.sigmoid(F.conv3d(w, sd[f"{b}2.se.fc2.weight"], sd[f"{b}2.se.fc2.bias"]))
                y = y * torch.sigmoid(y)
                y = self.bn(F.conv3d(y, sd[f"{b}2.c.weight"]), f"{b}2.c_bn")
                short = self.bn(F.conv3d(x, sd[f"{b}1.weight"], stride=(1, 2, 2)), f"{b}1_bn") if i == 0 else x
                x = F.relu(short + y)
        maps = F.relu(self.bn(F.conv3d(x, sd[f"{p}.head.conv_5.weight"]), f"{p}.head.conv_5_bn"))
        k = math.ceil(size / 32)
        pooled = F.avg_pool3d(maps, (maps.shape[2], k, k), stride=1)  # upstream's fixed AvgPool3d kernel
        h = F.relu(F.conv3d(pooled, sd[f"{p}.head.lin_5.weight"])).permute(0, 2, 3, 4, 1)
        logits = F.linear(h, sd[f"{p}.head.projection.weight"], sd[f"{p}.head.projection.bias"])
        return logits.reshape(logits.shape[0], -1), maps, maps.mean([3, 4])

    def mlp(self, name, x):
        sd = self.sd
        return F.linear(F.relu(F.linear(x, sd[f"{name}.0.weight"])), sd[f"{name}.3.weight"], sd[f"{name}.3.bias"])

    def spatial(self, maps):  # [N, Tg*C, h, w] -> [N, 4]
        sd, tg = self.sd, self.cfg.num_glance
        n, tc, h, w = maps.shape
        x = maps.reshape(n, tg, tc // tg, h, w).permute(0, 2, 1, 3, 4)
        e = "spatial_policy.encoder"
        x = F.relu(self.bn(F.conv3d(x, sd[f"{e}.0.weight"]), f"{e}.1"))
        x = F.relu(self.bn(F.conv3d(x, sd[f"{e}.3.weight"], padding=1), f"{e}.4"))
        x = F.relu(self.bn(F.conv3d(x, sd[f"{e}.6.weight"], padding=1), f"{e}.7"))
        return torch.sigmoid(F.conv3d(x, sd[f"{e}.9.weight"])).reshape(n, 4)

    def temporal(self, feat):  # [N*Tg, C] -> softmax [N, Tg]
        sd, tg = self.sd, self.cfg.num_glance
        x = feat.reshape(-1, tg, feat.shape[1]).permute(0, 2, 1).unsqueeze(-1)
        t = "temporal_policy.Tconv"
        x = F.relu(self.bn(F.conv2d(x, sd[f"{t}.0.weight"], padding=(1, 0)), f"{t}.1"))
        x = F.relu(self.bn(F.conv2d(x, sd[f"{t}.3.weight"], padding=(1, 0)), f"{t}.4"))
        return torch.softmax(F.conv2d(x, sd[f"{t}.6.weight"]).flatten(1), dim=1)

    @torch.no_grad()
    def __call__(self, images_glance, images_input, views: int = 1):
        """[B, V*Tg*3, S, S], [B, V*N*3, S, S] -> exits [B, 2, C] averaged over views, focus indices, action."""
        c = self.cfg
        s, g, tg, k, n = images_glance.shape[-1], c.glance_size, c.num_glance, c.num_focus, c.candidates
        images_glance = images_glance.reshape(-1, tg * 3, s, s)  # views folded into the batch, crop-major
        images_input = images_input.reshape(-1, n * 3, s, s)
        x = F.interpolate(images_glance, (g, g), mode="bilinear", align_corners=False)
        x = x.view(-1, tg, 3, g, g).permute(0, 2, 1, 3, 4)
        gs, ls = self.archs
        g_final, g_maps, g_feat = self.x3d("global_CNN", gs, x, g)
        fs = g_maps.shape[-1]
        g_maps = g_maps.permute(0, 2, 1, 3, 4).reshape(-1, tg * g_maps.shape[1], fs, fs)
        g_feat = g_feat.permute(0, 2, 1).reshape(-1, g_feat.shape[1])
        g_avg = self.mlp("global_CNN_head", g_feat).view(-1, tg, c.num_classes).mean(1)
        weights = self.temporal(g_feat)
        local_idx = ref_sample(weights, n, tg, k)  # upstream's sampler without the clamp (test_tsm's rebuild)
        idx = local_idx + torch.arange(local_idx.shape[0]).unsqueeze(1) * n
        focus = images_input.reshape(-1, 3, s, s)[idx.view(-1)].view(-1, k * 3, s, s)
        action = self.spatial(g_maps)
        patches = ref_crop(focus, action, s, c.patch_size, c.crop_min, c.crop_max)  # affine_grid + grid_sample
        local = patches.view(-1, k, 3, c.patch_size, c.patch_size).permute(0, 2, 1, 3, 4)
        l_final, _, _ = self.x3d("local_CNN", ls, local, c.patch_size)
        exit0 = g_avg.reshape(-1, views, c.num_classes).mean(1)
        exit1 = (g_final + l_final).reshape(-1, views, c.num_classes).mean(1)
        return torch.stack([exit0, exit1], dim=1), local_idx, action, weights


def inputs(cfg: ModelConfig, batch: int, views: int = 1, seed: int = 0):
    """Upstream's input layout [B, V*T*3, S, S] of smooth random frames (a coarse random grid upsampled).

    Not white noise: our crop grid and ``affine_grid`` place samples ~1e-6 px apart (float rounding), and white
    noise, the steepest image there is, turns that into 5e-4 of a pixel value (measured), which the random
    X3D-L amplifies past 1e-4 of the logits; no real frame is that steep (see adafocus.export.verify)."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.frame_size

    def frames(n):
        coarse = torch.randn(batch, n * 3, s // 8, s // 8, generator=g)
        return F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)

    return frames(views * cfg.num_glance), frames(views * cfg.candidates)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """An official-format checkpoint file of x3d-tiny (random weights, calibrated + perturbed BN statistics)."""
    cfg = preset_config("x3d-tiny")
    sd = random_state(official_shapes("x3d-tiny", cfg), seed=1)
    ref = Official(sd, cfg, "x3d-tiny", seed=2)
    ref.calibrate = True
    ref(*inputs(cfg, 3, views=1, seed=9))
    ref.calibrate = False
    path = tmp_path_factory.mktemp("official") / "kinetics400_tiny_16and32.pth.tar"
    momentum = {k: torch.zeros_like(v) for k, v in sd.items() if v.is_floating_point()}
    torch.save({"epoch": 50, "arch": "x3d", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "optimizer": {"state": {0: {"momentum_buffer": momentum["aux_head.0.weight"]}},
                              "param_groups": [{"lr": 0.005, "momentum": 0.9, "params": [0]}]},
                "best_prec1": 75.3, "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 12}}, path)
    return path, ref


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return set_batchnorm_statistics(build_model(preset_config("x3d-tiny")))


# ------------------------------------------------------------------------------------------------ tests
def test_full_preset_has_the_official_key_set_and_sizes():
    cfg = preset_config("x3d-p128-16x32")
    with torch.device("meta"):
        model = build_model(cfg)
    assert isinstance(model, UniAdaFocusX3D)
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = official_shapes("x3d-p128-16x32", cfg)
    assert sorted(set(have) ^ set(want)) == []
    assert {k for k in want if have[k] != want[k]} == set()
    assert len(have) == 1754
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters())
              for name in ("global_CNN", "local_CNN", "global_CNN_head", "aux_head", "spatial_policy",
                           "temporal_policy")}
    assert counts == {"global_CNN": 3_794_322, "local_CNN": 6_153_432, "global_CNN_head": 1_704_336,
                      "aux_head": 173_200, "spatial_policy": 1_145_600, "temporal_policy": 95_552}
    assert sum(p.numel() for p in model.parameters()) == 14_770_778


@pytest.mark.parametrize("views", [1, 3])
def test_official_checkpoint_reproduces_upstream_arithmetic(official, views):
    path, ref = official
    model = load(path, preset="x3d-tiny")
    cfg = model.cfg
    assert cfg.num_classes == 5 and not model.training
    glance_x, cand_x = inputs(cfg, 2, views=views, seed=5 + views)
    want, want_idx, want_action, weights = ref(glance_x, cand_x, views=views)
    # the inputs exercise the policy: boxes off-centre, frame weights far from uniform
    assert float((want_action - 0.5).abs().max()) > 0.05
    assert float((weights.max(dim=1).values / weights.min(dim=1).values).min()) > 1.5
    got = model(glance_x, cand_x, views=views)
    assert got.shape == (2, 2, cfg.num_classes)
    for k in (0, 1):
        assert rel_err(got[:, k], want[:, k]) < 1e-4
        assert torch.equal(got[:, k].argmax(dim=1), want[:, k].argmax(dim=1))
    # per view: the same focus frames and box as upstream
    s = cfg.frame_size
    frames = glance_x.reshape(2 * views, cfg.num_glance, 3, s, s)
    with torch.no_grad():
        actions, w = model.policy(*model.glance(frames)[:2])
        pos, _ = model.select(actions, w)
    np.testing.assert_array_equal(pos, want_idx.numpy())
    assert rel_err(actions[:, 0], want_action) < 1e-5


def test_views_average_the_per_view_logits(tiny_model):
    cfg = tiny_model.cfg
    glance_x, cand_x = inputs(cfg, 2, views=3, seed=11)
    out = tiny_model(glance_x, cand_x, views=3)
    per_view = tiny_model(glance_x.reshape(6, -1, cfg.frame_size, cfg.frame_size),
                          cand_x.reshape(6, -1, cfg.frame_size, cfg.frame_size))
    torch.testing.assert_close(out, per_view.view(2, 3, 2, -1).mean(dim=1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(per_view[0], per_view[1])  # the views differ, so the average is not trivial


@pytest.mark.parametrize("views", [1, 3])
def test_stepwise_matches_forward(tiny_model, views):
    cfg = tiny_model.cfg
    s = cfg.frame_size
    glance_x, cand_x = inputs(cfg, 1, views=views, seed=20 + views)
    full = tiny_model(glance_x, cand_x, views=views)[0]
    shape_g = (cfg.num_glance, 3, s, s) if views == 1 else (views, cfg.num_glance, 3, s, s)
    shape_c = (cfg.candidates, 3, s, s) if views == 1 else (views, cfg.candidates, 3, s, s)
    g, c = glance_x.view(shape_g), cand_x.view(shape_c)
    steps = list(tiny_model.stepwise(g, c))
    assert [st.step for st in steps] == [0, 1]
    for st in steps:
        np.testing.assert_allclose(st.logits, full[st.step].numpy(), rtol=1e-5, atol=1e-6)
    assert steps[1].positions.shape == ((cfg.num_focus,) if views == 1 else (views, cfg.num_focus))
    assert steps[1].action.shape == ((4,) if views == 1 else (views, 4))
    assert np.all(np.diff(steps[1].positions, axis=-1) > 0)
    score0 = steps[0].score
    assert [st.step for st in tiny_model.stepwise(g, c, thresholds=[score0, None])] == [0]
    assert [st.step for st in tiny_model.stepwise(g, c, thresholds=[score0 + 1e-3, None])] == [0, 1]
    assert [st.step for st in tiny_model.stepwise(g, c, max_steps=0)] == [0]


def test_exit0_mlp_head_equals_per_frame_average(tiny_model):
    """The exit-0 head's last Linear runs once on the frame-averaged hidden layer: upstream's per-frame logits,
    averaged, are the same numbers."""
    cfg = tiny_model.cfg
    frames = torch.randn(2, cfg.num_glance, 3, cfg.frame_size, cfg.frame_size)
    with torch.no_grad():
        _, vec, logits, _ = tiny_model.glance(frames)
        per_frame = tiny_model.global_CNN_head(vec).mean(dim=1)
    torch.testing.assert_close(logits, per_frame, rtol=1e-5, atol=1e-6)


def test_mismatched_checkpoint_is_one_readable_report(official, tmp_path):
    path, _ = official
    ckpt = torch.load(path, weights_only=True)
    sd = ckpt["state_dict"]
    sd.pop("module.local_CNN.s5.pathway0_res1.branch2.c_bn.weight")
    sd["module.local_CNN.s5.pathway0_res1.branch2.se.fc1.weight"] = torch.zeros(8, 144, 1, 1, 1)  # SE on an odd block
    sd["module.global_CNN.head.lin_5.weight"] = torch.zeros(64, 144)  # squeezed like the MLP head: wrong
    bad = tmp_path / "bad.pth.tar"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError) as exc:
        load(bad, preset="x3d-tiny")
    text = str(exc.value)
    assert "missing (1): local_CNN.s5.pathway0_res1.branch2.c_bn.weight" in text
    assert "unexpected (1): local_CNN.s5.pathway0_res1.branch2.se.fc1.weight" in text
    assert "global_CNN.head.lin_5.weight: checkpoint (64, 144) vs model (64, 144, 1, 1, 1)" in text
    with pytest.raises(CheckpointError, match="pass --preset"):
        load(path)


def test_x3d_config_is_checked():
    with pytest.raises(ConfigError, match="x3d family builds"):
        preset_config("x3d-tiny").replace(local_arch="resnet50")
    cfg = preset_config("x3d-p128-16x32")
    assert (cfg.candidates, cfg.num_exits, cfg.patches_per_step, cfg.feature_size) == (96, 2, 32, 5)


@pytest.mark.slow
def test_flops_match_upstream_table():
    """Upstream (ops/early_exit_unifocus_X3D.py): X3D-S 2.415453 (exit 0), + X3D-L 5.984521 + policies
    0.377743 = 8.778 (exit 1). Ours also counts the exit-0 MLP head (0.0150), so exit 0 sits 0.6% above."""
    r = count_flops("x3d-p128-16x32")
    assert len(r.exits) == 2
    assert r.exits[0] == pytest.approx(2.415453, rel=0.01)
    assert r.exits[1] == pytest.approx(8.778, rel=0.01)
    encoder_s = r.parts["glance encoder (per frame)"] * 16
    assert encoder_s == pytest.approx(2.415453, rel=1e-4)  # X3D-S with its own head, as upstream counts it
    assert r.parts["local encoder (per patch)"] * 32 + r.parts["local classifier (per step)"] == pytest.approx(
        5.984521, rel=1e-4)
    assert r.policy == pytest.approx(0.376218 + 0.001525, rel=1e-4)


def test_dense_baseline_is_x3d_l_on_every_candidate():
    """The dense cost (extrapolated from 1 and 2 frames) equals X3D-L run on all N candidates in one clip."""
    from adafocus.models.flops import MacCounter

    cfg = preset_config("x3d-tiny")
    model = build_model(cfg).eval()
    with torch.no_grad(), MacCounter(model.local_CNN) as count:
        model.local_CNN(torch.randn(1, 3, cfg.candidates, cfg.frame_size, cfg.frame_size))
    assert count_flops("x3d-tiny").dense == pytest.approx(count.total() / 1e9, rel=1e-12)


def test_build_model_makes_every_family():
    """``adafocus.models.build_model`` is the one factory (uniadafocus's), x3d included."""
    from adafocus.models import uniadafocus

    assert build_model is uniadafocus.build_model
    assert isinstance(uniadafocus.build_model(preset_config("x3d-tiny")), UniAdaFocusX3D)

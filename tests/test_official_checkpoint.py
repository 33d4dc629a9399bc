"""An official-format checkpoint loads and reproduces the official model's logits at every exit.

The "official" side is rebuilt here, independently of adafocus's own code paths, from the arithmetic described
in shared/UNIADAFOCUS.md: affine_grid crops, the torch inverse-CDF sampler with its Python loop, F.interpolate
of the actions, and the PoolingClassifier's 32 step logits written into a zeros tensor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adafocus.errors import CheckpointError
from adafocus.models import build_model, load
from adafocus.models.presets import preset_config


def _official_crop(frames, actions, p, w=224):
    n = actions.shape[0]
    scale = actions[:, 2:4] * (224 - 96) / p + 96 / p
    corner = actions[:, :2] * (w - p * scale)
    x1, x2 = corner[:, 1], corner[:, 1] + p * scale[:, 1]
    y1, y2 = corner[:, 0], corner[:, 0] + p * scale[:, 0]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = p * scale[:, 1] / w, p * scale[:, 0] / w
    theta[:, 0, 2], theta[:, 1, 2] = -1 + (x1 + x2) / w, -1 + (y1 + y2) / w
    grid = F.affine_grid(theta, [n, 3, p, p], align_corners=False)
    return F.grid_sample(frames, grid, align_corners=False)


def _official_sampler(weights, n, tg, k):
    b = weights.shape[0]
    cdf = torch.cat([torch.zeros(b, 1), weights.cumsum(1)], 1)
    cdf[:, -1] = 1.0
    t = ((torch.arange(k).float() + 0.5) / k).repeat(b, 1)
    first = (cdf.unsqueeze(2) >= t.unsqueeze(1)).max(dim=1)[1].clamp(1, tg) - 1
    y1, y2 = cdf.gather(1, first), cdf.gather(1, first + 1)
    x1, x2 = first / tg, (first + 1) / tg
    q = (x2 * (t - y1) - x1 * (t - y2)) / (y2 - y1)
    idx = torch.floor(q * n).long()
    for i in range(1, k):
        idx[:, i] = torch.where(idx[:, i] > idx[:, i - 1], idx[:, i], idx[:, i - 1] + 1)
    lim = (n - k + torch.arange(k)).unsqueeze(0)
    idx = torch.where(idx > lim, lim, idx)
    return idx + torch.arange(b).unsqueeze(1) * n


def _official_forward(m, x, cfg):
    """Upstream's eval forward over our modules' parameters, arithmetic written the upstream way."""
    b, n, tg, k, p = x.shape[0], cfg.num_segments, cfg.num_glance, cfg.num_focus, cfg.patch_size
    images = x.view(-1, 3, 224, 224)
    gidx = (torch.arange(n)[1:: n // tg].repeat(b, 1) + torch.arange(b).unsqueeze(1) * n).view(-1)
    fmap = m.global_CNN.features(images[gidx])
    gvec = fmap.mean(3).mean(2)
    feats = fmap.reshape(b, tg, *fmap.shape[1:]).permute(0, 2, 1, 3, 4)
    act = m.spatial_policy.encoder(feats).flatten(2).permute(0, 2, 1).reshape(-1, tg, 4).permute(0, 2, 1)
    act = F.interpolate(act, n, mode="linear", align_corners=False).permute(0, 2, 1).reshape(-1, 4)
    tin = gvec.reshape(-1, tg, gvec.shape[1]).permute(0, 2, 1).unsqueeze(-1)
    weights = torch.softmax(m.temporal_policy.Tconv(tin).flatten(1) / cfg.temperature, dim=1)
    fidx = _official_sampler(weights, n, tg, k).view(-1)
    patches = _official_crop(images[fidx], act[fidx], p)
    lvec = m.local_CNN.layer4(m.local_CNN.layer3(m.local_CNN.layer2(m.local_CNN.layer1(
        m.local_CNN.maxpool(m.local_CNN.relu(m.local_CNN.bn1(m.local_CNN.conv1(patches)))))))).mean(dim=(2, 3))
    c = m.classifier
    z1 = c.global_mlp(gvec).view(b, tg, -1)
    z2 = c.local_mlp(lvec).view(b, k, -1)
    logits = torch.zeros(b, tg + k, cfg.num_classes)
    cur1 = z1[:, 0]
    for i in range(tg):
        if i:
            cur1 = torch.max(z1[:, i], cur1)
        logits[:, i] = c.global_classifiers[i](cur1)
    cur2 = z2[:, 0]
    for i in range(k):
        if i:
            cur2 = torch.max(z2[:, i], cur2)
        logits[:, tg + i] = c.local_classifiers[i](torch.cat([cur2, cur1], 1))
    return logits[:, tg - 1:]  # exits: glance classifier 15, then local steps 1..16


def _randomise(model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith(("running_var", "bn1.weight", "bn2.weight", "bn3.weight")) or (
                    ".1.weight" in name and t.dim() == 1):  # variances and BN scales: positive, near 1
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    torch.manual_seed(3)
    cfg = preset_config("base-p96", num_classes=7)
    src = build_model(cfg).eval()
    _randomise(src)
    sd = {"module." + k: v for k, v in src.state_dict().items()}
    # the unused ImageNet heads and the training state that official files carry
    sd["module.global_CNN.classifier.weight"] = torch.randn(1000, 1280)
    sd["module.global_CNN.classifier.bias"] = torch.zeros(1000)
    sd["module.local_CNN.fc.weight"] = torch.randn(1000, 2048)
    sd["module.local_CNN.fc.bias"] = torch.zeros(1000)
    path = tmp_path_factory.mktemp("official") / "actnet_p96.pth.tar"
    torch.save({"epoch": 50, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}, "best_acc1": 0.5},
               path)
    return path, src, cfg


def test_official_key_set(official_ckpt):
    path, src, _ = official_ckpt
    keys = set(torch.load(path, map_location="cpu")["state_dict"])
    prefixes = {k.split(".")[1] for k in keys}
    assert prefixes == {"global_CNN", "global_CNN_fc", "aux_fc", "local_CNN", "local_CNN_fc", "spatial_policy",
                        "temporal_policy", "classifier"}
    assert {f"module.spatial_policy.encoder.{i}.weight" for i in (0, 1, 3, 4, 6, 7, 9)} <= keys
    assert {f"module.temporal_policy.Tconv.{i}.weight" for i in (0, 1, 3, 4, 6)} <= keys
    assert "module.classifier.local_classifiers.15.1.weight" in keys
    assert "module.global_CNN.features.18.0.weight" in keys  # tonylins: features 0..18
    assert "module.local_CNN.layer4.2.conv3.weight" in keys
    # torchvision ResNet-50 has 318 non-fc tensors; tonylins MobileNetV2 312 in `features`
    assert sum(k.startswith("module.local_CNN.") and ".fc." not in k for k in keys) == 318
    assert sum(k.startswith("module.global_CNN.features.") for k in keys) == 312


def test_official_checkpoint_reproduces_every_exit(official_ckpt):
    path, src, cfg = official_ckpt
    model = load(path, preset="base-p96")
    assert model.cfg.num_classes == 7  # read from the weights
    x = torch.randn(2, cfg.num_segments * 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model(x)
        theirs = _official_forward(src, x, cfg)
    assert ours.shape == theirs.shape == (2, 17, 7)
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= 1e-4 * scale


def test_official_checkpoint_needs_a_preset(official_ckpt):
    with pytest.raises(CheckpointError, match="--preset"):
        load(official_ckpt[0])


def test_official_checkpoint_for_another_preset_is_refused(official_ckpt):
    with pytest.raises(CheckpointError, match="does not fit preset 'tiny'"):
        load(official_ckpt[0], preset="tiny")

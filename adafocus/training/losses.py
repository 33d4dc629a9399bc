"""Uni-AdaFocus's one-stage training objective, computed with the reference model's stage modules.

What upstream's base training step does (``models/uni_adafocus.py`` + ``main.py``; paraphrased here, see
shared/UNIADAFOCUS.md sections 3, 5, 6 and 11):

- glance frames: one random frame in each block of N/Tg candidates (evaluation takes a fixed one);
- the spatial policy sees **detached** glance feature maps; its actions are interpolated from the Tg glance
  frames to the N candidates; the patches are cut with **detached** actions, so the classification losses
  never reach the policy. The policy learns from the auxiliary term only: the glance feature map is cropped
  at the policy's boxes (same relative geometry, ``P // 32`` samples a side), averaged, classified by
  ``aux_fc``; plus ``norm_ratio * mean((scale - 1)^2)``;
- the temporal policy sees the glance vectors (not detached upstream) and learns through a Monte-Carlo
  term: the per-frame glance logits averaged with its weights after dropping 0 .. Tg//3 - 1 frames drawn
  from the weights, classified against the label;
- focus frames: inverse-CDF sampling at stratified random quantiles ``(i + U) / K``;
- two branches share the glance: patches at the policy's boxes, and patches at random centres with a box
  of exactly P pixels ("diversity augmentation");
- loss = 1/2 * sum over branches of [CE over every step's logits (Tg glance steps + K focus steps) +
  per-frame glance CE + per-patch local CE + temporal-MC CE + spatial-aux CE] + norm term.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from adafocus.models.ops import crop_patches, interpolate_actions
from adafocus.models.uniadafocus import UniAdaFocus
from adafocus.runtime.sampling import focus_positions


@dataclass
class TrainOutputs:
    """Everything the loss needs from one training forward of B videos."""

    step_logits: list[torch.Tensor]  # per branch: [B, Tg + K, C], every exit of the step-wise classifier
    local_logits: list[torch.Tensor]  # per branch: [B, K, C], local_CNN_fc on each patch
    global_logits: torch.Tensor  # [B, Tg, C], global_CNN_fc on each glance frame
    temporal_logits: torch.Tensor  # [B, C], Monte-Carlo weighted glance logits
    spatial_logits: torch.Tensor  # [B, C], aux_fc on the feature-map crops
    actions: torch.Tensor  # [B, Tg, 4], spatial policy output (with gradient)
    weights: torch.Tensor  # [B, Tg], temporal policy output
    positions: np.ndarray  # [B, K], focus positions drawn


def glance_positions_train(batch: int, num_segments: int, num_glance: int, rng: np.random.Generator) -> np.ndarray:
    """One uniformly random candidate in each of the Tg blocks of N/Tg candidates: ``[B, Tg]``."""
    stride = num_segments // num_glance
    return rng.integers(0, stride, (batch, num_glance)) + np.arange(num_glance) * stride


def mc_sample_logits(logits: torch.Tensor, weights: torch.Tensor, rounds: int, samples: int) -> torch.Tensor:
    """Upstream's Monte-Carlo temporal head: ``logits`` ``[B, T, C]``, ``weights`` ``[B, T]`` -> ``[B, C]``.

    Round i (0 .. rounds-1) drops i frames drawn from the weights without replacement, then averages the
    logits with the remaining weights (normaliser detached, as upstream); rounds and samples are averaged.
    Two guards that upstream lacks: once the softmax has put (almost) all weight on a few frames, dropping
    them leaves a normaliser of ~0 (inf/NaN logits, then NaN everywhere), and float32 zeros leave fewer
    than i frames to draw. The normaliser is floored at 1e-6 and the draw sees weights floored at 1e-12.
    """
    b, t, c = logits.shape
    w = weights.unsqueeze(1).expand(b, samples, t).reshape(b * samples, t)
    x = logits.unsqueeze(1).expand(b, samples, t, c).reshape(b * samples, t, c)
    total = torch.zeros(b * samples, c, dtype=logits.dtype)
    for i in range(max(1, rounds)):
        kept = w
        if i > 0:
            drop = torch.multinomial(w.detach().clamp_min(1e-12), i, replacement=False)
            kept = w * torch.ones_like(w).scatter(1, drop, 0.0)
        total = total + (x * kept.unsqueeze(-1)).sum(1) / kept.sum(1, keepdim=True).detach().clamp_min(1e-6)
    return (total / max(1, rounds)).view(b, samples, c).mean(1)


def forward_train(model: UniAdaFocus, frames: torch.Tensor, rng: np.random.Generator,
                  mc_samples: int = 128) -> TrainOutputs:
    """The training forward of B videos: candidate frames ``[B, N, 3, S, S]`` (normalised)."""
    cfg = model.cfg
    b, n = frames.shape[:2]
    tg, k, c = cfg.num_glance, cfg.num_focus, cfg.num_classes
    rows = torch.arange(b)[:, None]

    # glance
    gpos = glance_positions_train(b, n, tg, rng)
    fmap, vec = model.global_CNN.get_featmap(model.glance_input(frames[rows, torch.as_tensor(gpos)]))
    global_logits = model.global_CNN_fc(vec).view(b, tg, c)
    fmap = fmap.view(b, tg, *fmap.shape[1:])
    vec = vec.view(b, tg, -1)

    # policy: spatial on detached maps, temporal on the glance vectors
    act = model.spatial_policy(fmap.detach())  # [B, Tg, 4]
    actions = interpolate_actions(act, n)  # [B, N, 4]
    weights = model.temporal_policy(vec)  # [B, Tg]
    temporal_logits = mc_sample_logits(global_logits, weights, tg // 3, mc_samples)

    # auxiliary spatial term: crop the feature map at the policy's boxes (box geometry relative to the frame)
    h = fmap.shape[-1]
    scale = h / cfg.frame_size
    aux = crop_patches(fmap.detach().flatten(0, 1), act.reshape(-1, 4), max(1, cfg.patch_size // 32),
                       cfg.crop_min * scale, cfg.crop_max * scale)
    spatial_logits = model.aux_fc(aux.view(b, tg, *aux.shape[1:]).mean(dim=(1, 3, 4)))

    # focus frames at stratified random quantiles, then two branches of patches
    quantiles = (np.arange(k) + rng.random((b, k))) / k
    pos = focus_positions(weights.detach().cpu().numpy(), n, k, quantiles=quantiles)
    pos_t = torch.as_tensor(pos)
    focus = frames[rows, pos_t].flatten(0, 1)  # [B*K, 3, S, S]
    policy_actions = actions[rows, pos_t].detach().reshape(-1, 4)
    random_actions = torch.as_tensor(rng.random((b * k, 4)), dtype=frames.dtype)
    span = cfg.crop_max - cfg.crop_min
    random_actions[:, 2:] = float(np.clip((cfg.patch_size - cfg.crop_min) / span, 0, 1)) if span > 0 else 0.0
    patches = model.crop(focus.repeat(2, 1, 1, 1), torch.cat([policy_actions, random_actions]))
    feat = model.local_CNN.get_featvec(patches).view(2, b, k, -1)
    local_logits = model.local_CNN_fc(feat).unbind(0)

    # step-wise classifier: Tg glance exits, then K focus exits per branch
    pooled = model.classifier.global_pool(vec)  # [B, Tg, D], running max
    glance_steps = model.classifier.glance_logits(pooled)
    step_logits = []
    for branch in range(2):
        z2 = model.classifier.local_mlp(feat[branch].flatten(0, 1)).view(b, k, -1)
        z2 = torch.cummax(z2, dim=1).values
        local_steps = torch.stack([head(torch.cat([z2[:, j], pooled[:, -1]], dim=1))
                                   for j, head in enumerate(model.classifier.local_classifiers)], dim=1)
        step_logits.append(torch.cat([glance_steps, local_steps], dim=1))
    return TrainOutputs(step_logits, list(local_logits), global_logits, temporal_logits, spatial_logits,
                        act, weights, pos)


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``[B, ..., C]`` logits against one label per video, averaged over everything."""
    per = logits.shape[1:-1].numel() if logits.dim() > 2 else 1
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.repeat_interleave(per))


def adafocus_loss(out: TrainOutputs, target: torch.Tensor, norm_ratio: float = 1.0) -> dict[str, torch.Tensor]:
    """Upstream's loss; returns the total (``'loss'``) and its parts (summed over both branches)."""
    parts = {"steps": 0.0, "global": 0.0, "local": 0.0, "temporal": 0.0, "spatial": 0.0}
    for branch in range(2):
        parts["steps"] = parts["steps"] + _ce(out.step_logits[branch], target)
        parts["global"] = parts["global"] + _ce(out.global_logits, target)
        parts["local"] = parts["local"] + _ce(out.local_logits[branch], target)
        parts["temporal"] = parts["temporal"] + _ce(out.temporal_logits, target)
        parts["spatial"] = parts["spatial"] + _ce(out.spatial_logits, target)
    norm = ((out.actions[..., 2:4] - 1.0) ** 2).mean()
    loss = sum(parts.values()) / 2 + norm_ratio * norm
    return {"loss": loss, **parts, "norm": norm}


def dense_loss(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    loss = F.cross_entropy(logits, target)
    return {"loss": loss}

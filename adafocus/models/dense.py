"""The dense baseline: the local encoder on every candidate frame, whole, at full resolution.

It answers "what does adaptive focus save?": the same ResNet the adaptive model runs on its patches, run on
all N frames of ``frame_size`` pixels, per-frame features max-pooled over time (the adaptive classifier's
pooling) and one linear head.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from adafocus.models.backbones import ResNet
from adafocus.models.config import ModelConfig

KIND = "dense"  # value of a checkpoint's 'model' key


class DenseBaseline(nn.Module):
    """Frames ``[B, T, 3, S, S]`` (normalised) -> logits ``[B, C]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.local_CNN = ResNet(cfg.local_arch, cfg.local_width)
        self.fc = nn.Sequential(nn.Dropout(cfg.fc_dropout), nn.Linear(self.local_CNN.feature_dim, cfg.num_classes))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        b, t = frames.shape[:2]
        feat = self.local_CNN.get_featvec(frames.flatten(0, 1)).view(b, t, -1)
        return self.fc(feat.amax(dim=1))


@torch.no_grad()
def dense_gflops(model: DenseBaseline) -> float:
    """Multiply-add GFLOPs of one video of N candidate frames (same convention as adafocus.models.flops)."""
    from adafocus.models.flops import G, MacCounter

    was_training = model.training
    model.eval()
    cfg = model.cfg
    with MacCounter(model) as count:
        model(torch.zeros(1, cfg.num_segments, 3, cfg.frame_size, cfg.frame_size))
    model.train(was_training)
    return count.total() / G


def load_dense(path) -> DenseBaseline:
    """A dense baseline saved by ``adafocus train --dense``, in eval mode."""
    from adafocus.errors import CheckpointError
    from adafocus.models.checkpoint import load_strict, read

    ckpt = read(path)
    if ckpt.get("model") != KIND:
        raise CheckpointError(f"{path} is not a dense baseline checkpoint (no model='{KIND}')")
    model = DenseBaseline(ModelConfig.from_dict(ckpt["config"]))
    load_strict(model, ckpt["state_dict"], f"dense baseline {path}")
    return model.eval()

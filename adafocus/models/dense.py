"""The dense baseline: the local encoder on every candidate frame, whole, at full resolution.

It answers "what does adaptive focus save?": the same ResNet the adaptive model runs on its patches, run on
all N frames of ``frame_size`` pixels, per-frame features max-pooled over time (the adaptive classifier's
pooling) and one linear head (:class:`DenseBaseline`, base and TSM families).

The X3D family's (:class:`DenseX3D`) is X3D-L, its local encoder, on all N candidates at ``frame_size`` as
ONE clip with X3D's own head: X3D is a clip model (its convs mix neighbouring frames), so the frame-by-frame
pooling of the ResNet baseline would not be the network it is; a clip of all N candidates whole is what the
adaptive model's K patches of P pixels are cut from (54.97 GFLOPs for ``x3d-p128-16x32``, 96 frames at 224,
against 8.78 for the adaptive model at its last exit). :func:`build_dense` picks the class for a config.
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


class DenseX3D(nn.Module):
    """X3D family: frames ``[B, N, 3, S, S]`` (normalised) -> logits ``[B, C]`` of X3D-L on the clip of all N
    (``local_CNN``: the adaptive model's local encoder, the same parameter names)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from adafocus.models.x3d import X3D, X3D_ARCHS

        self.cfg = cfg
        self.local_CNN = X3D(X3D_ARCHS[cfg.local_arch], cfg.num_classes)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.local_CNN(frames.transpose(1, 2))


def build_dense(cfg: ModelConfig) -> DenseBaseline | DenseX3D:
    """The dense baseline of a config's family."""
    return DenseX3D(cfg) if cfg.family == "x3d" else DenseBaseline(cfg)


@torch.no_grad()
def dense_gflops(model: DenseBaseline | DenseX3D) -> float:
    """Multiply-add GFLOPs of one video of N candidate frames (same convention as adafocus.models.flops),
    counted on a meta-device build of the model's config: shapes only (X3D-L on 96 frames of 224 would be
    ~55 GFLOPs of CPU convolutions)."""
    from adafocus.models.flops import G, MacCounter

    cfg = model.cfg
    with torch.device("meta"):
        skeleton = build_dense(cfg).eval()
        with MacCounter(skeleton) as count:
            skeleton(torch.zeros(1, cfg.num_segments, 3, cfg.frame_size, cfg.frame_size))
    return count.total() / G


def load_dense(path) -> DenseBaseline | DenseX3D:
    """A dense baseline saved by ``adafocus train --dense``, in eval mode."""
    from adafocus.errors import CheckpointError
    from adafocus.models.checkpoint import load_strict, read

    ckpt = read(path)
    if ckpt.get("model") != KIND:
        raise CheckpointError(f"{path} is not a dense baseline checkpoint (no model='{KIND}')")
    model = build_dense(ModelConfig.from_dict(ckpt["config"]))
    load_strict(model, ckpt["state_dict"], f"dense baseline {path}")
    return model.eval()

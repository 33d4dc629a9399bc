"""The policy network pi: a 3-D conv spatial head (patch boxes) and a temporal conv head (frame weights).

Attribute names and Sequential indices follow upstream (``spatial_policy.encoder.{0,1,3,4,6,7,9}``,
``temporal_policy.Tconv.{0,1,3,4,6}``) so that official checkpoints load.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class SpatialPolicy(nn.Module):
    """Feature maps ``[B, Tg, C, h, w]`` -> actions ``[B, Tg_out, 4]`` in (0, 1): centre y, x, h/w scale.

    ``time_kernel`` is 1 for the base family (one box per glance frame) and Tg for TSM (one per video).
    """

    def __init__(self, in_dim: int, hidden_dim: int, feature_size: int, time_kernel: int = 1):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv3d(in_dim, hidden_dim, 1, bias=False),
            nn.BatchNorm3d(hidden_dim),
            nn.ReLU(),
            nn.Conv3d(hidden_dim, hidden_dim, 3, padding=1, bias=False),
            nn.BatchNorm3d(hidden_dim),
            nn.ReLU(),
            nn.Conv3d(hidden_dim, hidden_dim, 3, padding=1, bias=False),
            nn.BatchNorm3d(hidden_dim),
            nn.ReLU(),
            nn.Conv3d(hidden_dim, 4, (time_kernel, feature_size, feature_size), bias=False),
            nn.Sigmoid(),
        )

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = self.encoder(fmap.permute(0, 2, 1, 3, 4))  # [B, 4, T', 1, 1]
        return x.flatten(2).permute(0, 2, 1)


class TemporalPolicy(nn.Module):
    """Pooled glance features ``[B, Tg, C]`` -> softmax weights ``[B, Tg]`` over the glance frames."""

    def __init__(self, in_dim: int, hidden_dim: int, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature
        self.Tconv = nn.Sequential(
            nn.Conv2d(in_dim, hidden_dim, (3, 1), padding=(1, 0), bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(),
            nn.Conv2d(hidden_dim, hidden_dim, (3, 1), padding=(1, 0), bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(),
            nn.Conv2d(hidden_dim, 1, 1, bias=False),
        )

    def scores(self, vec: torch.Tensor) -> torch.Tensor:
        return self.Tconv(vec.permute(0, 2, 1).unsqueeze(-1)).flatten(1)

    def forward(self, vec: torch.Tensor) -> torch.Tensor:
        """Weights used to sample frames: softmax(scores / temperature) (upstream's ``weights_T``)."""
        return torch.softmax(self.scores(vec) / self.temperature, dim=1)

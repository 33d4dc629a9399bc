"""The base family's PoolingClassifier: running-max pooled MLP features, one linear head per step.

Exit 0 (after the glance) is ``global_classifiers[Tg-1](max_t z1_t)``; exit k (after the k-th patch) is
``local_classifiers[k-1](cat[max_{j<=k} z2_j, max_t z1_t])``. Attribute names follow upstream.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class MultiLayerPerceptron(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_dim, out_dim), nn.BatchNorm1d(out_dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PoolingClassifier(nn.Module):
    def __init__(self, global_dim: int, local_dim: int, num_glance: int, num_focus: int, num_classes: int,
                 mlp_dim: int = 4096, dropout: float = 0.2):
        super().__init__()
        self.mlp_dim = mlp_dim
        self.global_mlp = MultiLayerPerceptron(global_dim, mlp_dim)
        self.local_mlp = MultiLayerPerceptron(local_dim, mlp_dim)
        self.global_classifiers = nn.ModuleList(
            nn.Sequential(nn.Dropout(dropout), nn.Linear(mlp_dim, num_classes)) for _ in range(num_glance))
        self.local_classifiers = nn.ModuleList(
            nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * mlp_dim, num_classes)) for _ in range(num_focus))

    # ---------------------------------------------------------------------------------------------------
    def global_pool(self, vec: torch.Tensor) -> torch.Tensor:
        """Glance vectors ``[B, Tg, Cg]`` -> running-max pooled MLP features after every glance frame."""
        b, t, c = vec.shape
        z1 = self.global_mlp(vec.reshape(b * t, c)).view(b, t, -1)
        return torch.cummax(z1, dim=1).values

    def glance_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits of glance step t from ``pooled[:, t]`` for every t: ``[B, Tg, C]``."""
        return torch.stack([head(pooled[:, t]) for t, head in enumerate(self.global_classifiers)], dim=1)

    def exit0_logits(self, zg: torch.Tensor) -> torch.Tensor:
        return self.global_classifiers[-1](zg)

    def local_step(self, feat: torch.Tensor, state: torch.Tensor, zg: torch.Tensor, step: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """One focus step: local vector ``[B, Cl]``, running max ``state`` ``[B, D]`` (zeros before the
        first step: the MLP ends in ReLU), pooled glance ``zg`` ``[B, D]``, 0-based ``step`` ``[B]`` int64.

        The per-step heads are stacked and gathered by ``step``, so that one graph serves every step.
        """
        state = torch.maximum(self.local_mlp(feat), state)
        weight = torch.stack([h[1].weight for h in self.local_classifiers])  # [K, C, 2D]
        bias = torch.stack([h[1].bias for h in self.local_classifiers])  # [K, C]
        z = torch.cat([state, zg], dim=1)
        logits = torch.bmm(weight[step], z.unsqueeze(-1)).squeeze(-1) + bias[step]
        return logits, state

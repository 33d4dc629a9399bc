"""Export-safe tensor ops of the reference model: the patch crop and the policy-action interpolation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_grid(actions: torch.Tensor, frame_size: int, patch_size: int, crop_min: float, crop_max: float
              ) -> torch.Tensor:
    """Sampling grid ``[N, P, P, 2]`` (x, y in [-1, 1]) for the boxes given by ``actions`` ``[N, 4]``.

    Written as explicit arithmetic (``affine_grid`` does not export). It equals upstream's
    ``affine_grid(theta)`` with align_corners=False: sample j of a box [x0, x0 + w] lies at pixel-edge
    coordinate x0 + (j + 0.5) * w / P.
    """
    side = crop_min + (crop_max - crop_min) * actions[:, 2:4]  # (h, w) in pixels
    corner = actions[:, 0:2] * (frame_size - side)  # (y0, x0)
    steps = (torch.arange(patch_size, dtype=actions.dtype, device=actions.device) + 0.5) / patch_size
    ys = corner[:, 0:1] + steps[None, :] * side[:, 0:1]  # [N, P]
    xs = corner[:, 1:2] + steps[None, :] * side[:, 1:2]
    gy = (2.0 * ys / frame_size - 1.0)[:, :, None].expand(-1, -1, patch_size)
    gx = (2.0 * xs / frame_size - 1.0)[:, None, :].expand(-1, patch_size, -1)
    return torch.stack([gx, gy], dim=-1)


def crop_patches(frames: torch.Tensor, actions: torch.Tensor, patch_size: int, crop_min: float,
                 crop_max: float) -> torch.Tensor:
    """Bilinear patches ``[N, C, P, P]`` from frames ``[N, C, S, S]``: zero padding, align_corners=False."""
    grid = crop_grid(actions, frames.shape[-1], patch_size, crop_min, crop_max)
    return F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def interpolate_actions(actions: torch.Tensor, length: int) -> torch.Tensor:
    """Per-glance-frame actions ``[B, Tg, 4]`` -> per-candidate ``[B, N, 4]`` (linear, align_corners=False)."""
    if actions.shape[1] == length:
        return actions
    out = F.interpolate(actions.permute(0, 2, 1), size=length, mode="linear", align_corners=False)
    return out.permute(0, 2, 1)

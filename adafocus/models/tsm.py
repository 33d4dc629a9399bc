"""Uni-AdaFocus-TSM (Something-Something / Jester): the 2-exit family, with the base model's stage API.

Upstream (``archs/uni_adafocus_tsm.py``) wraps both encoders in TSN: a backbone with temporal shift, the
ImageNet head replaced by Dropout, and two linear heads whose per-frame logits are averaged over time:
``new_fc`` (trained on detached features: the "final" logit) and ``new_new_fc`` (the auxiliary one).

- exit 0 (glance only): ``global_CNN.new_new_fc`` averaged over the Tg glance frames (upstream's
  ``global_avg_logit``, which its early-exit script stacks first);
- exit 1 (full model): ``global_CNN.new_fc`` averaged over the glance frames **plus** ``local_CNN.new_fc``
  averaged over the K patches (raw logits summed).

The glance frames and the 3K focus candidates are sampled from the video separately (two TSN segmentings).
The spatial policy sees all Tg feature maps at once and gives ONE box per video, cut from every focus frame;
the temporal policy weighs the Tg pooled glance vectors, and K of the 3K candidates are drawn from it by the
inverse-CDF rule (:func:`adafocus.runtime.sampling.focus_positions` with ``clamp=False``). Training-only
branches (Monte-Carlo temporal head, ``aux_fc`` on the feature map, random patches) are not run here;
``aux_fc`` is kept so that official checkpoints load strictly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from adafocus.models.backbones import MobileNetV2, ResNet, add_mobilenet_shift, add_resnet_shift
from adafocus.models.config import ModelConfig
from adafocus.models.ops import crop_patches
from adafocus.models.policy import SpatialPolicy, TemporalPolicy
from adafocus.models.uniadafocus import Step
from adafocus.runtime.exits import confidence, passes
from adafocus.runtime.sampling import focus_positions


@dataclass
class TSMStep(Step):
    """A :class:`Step` of the TSM family; step 1 sees K frames at once, so it carries all their positions."""

    positions: np.ndarray | None = None  # [K] candidate positions of the focus frames (step 1 only)


class TSN(nn.Module):
    """TSN wrapper with upstream's attribute names: ``base_model`` + ``new_fc`` / ``new_new_fc``, avg consensus.

    ``base_model`` is a MobileNetV2 or ResNet with the temporal shift inserted for ``num_segments`` frames.
    """

    def __init__(self, base_model: nn.Module, feature_dim: int, num_segments: int, num_classes: int,
                 dropout: float):
        super().__init__()
        self.base_model = base_model
        self.num_segments = num_segments
        self.dropout = nn.Dropout(dropout)  # upstream: the backbone's ImageNet head, replaced by Dropout
        self.new_fc = nn.Linear(feature_dim, num_classes)
        self.new_new_fc = nn.Linear(feature_dim, num_classes)
        for fc in (self.new_fc, self.new_new_fc):  # upstream's init (std 0.001)
            nn.init.normal_(fc.weight, 0, 0.001)
            nn.init.zeros_(fc.bias)

    def heads(self, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features ``[B*T, D]`` -> (``new_fc`` logits, ``new_new_fc`` logits), each averaged over T."""
        vec = self.dropout(vec)
        final = self.new_fc(vec)
        reg = self.new_new_fc(vec)
        return (final.view(-1, self.num_segments, final.shape[-1]).mean(dim=1),
                reg.view(-1, self.num_segments, reg.shape[-1]).mean(dim=1))


class UniAdaFocusTSM(nn.Module):
    """TSM family: TSM-MobileNetV2 glance, one-box spatial policy + temporal policy, TSM-ResNet local, 2 exits.

    Stage API (as :class:`adafocus.models.uniadafocus.UniAdaFocus`, so the exporter and runtime treat both
    families alike): :meth:`glance`, :meth:`policy`, :meth:`local`; host helpers :meth:`select`, :meth:`crop`;
    :meth:`stepwise` for one video and :meth:`forward` on upstream's evaluation inputs.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family != "tsm":
            raise ValueError(f"UniAdaFocusTSM builds the tsm family; use build_model() for {cfg.family!r}")
        self.cfg = cfg
        c = cfg.num_classes
        mbv2 = MobileNetV2(cfg.glance_width, cfg.glance_last_channel)
        add_mobilenet_shift(mbv2, cfg.num_glance, cfg.shift_div)
        gdim = mbv2.last_channel
        self.global_CNN = TSN(mbv2, gdim, cfg.num_glance, c, cfg.dropout)
        resnet = ResNet(cfg.local_arch, cfg.local_width)
        add_resnet_shift(resnet, cfg.num_focus, cfg.shift_div)
        ldim = resnet.feature_dim
        self.local_CNN = TSN(resnet, ldim, cfg.num_focus, c, cfg.dropout)
        self.aux_fc = nn.Linear(gdim, c)  # training-only auxiliary head; kept for strict loading
        self.spatial_policy = SpatialPolicy(gdim, cfg.stn_hidden_dim, cfg.feature_size, time_kernel=cfg.num_glance)
        self.temporal_policy = TemporalPolicy(gdim, cfg.temporal_hidden_dim, cfg.temperature)
        self.global_dim, self.local_dim = gdim, ldim

    @staticmethod
    def official_key_map(keys: Iterable[str]) -> dict[str, str]:
        """Official checkpoint key -> key of this model, for the keys that load.

        Only the DDP/DataParallel ``module.`` prefix differs: the shifted convs are wrapped as ``.net`` here
        too, and upstream's ImageNet heads are Dropout modules (no keys) in both.
        """
        return {k: k[len("module."):] if k.startswith("module.") else k for k in keys}

    # ------------------------------------------------------------------------------------------ stages
    def glance_input(self, frames: torch.Tensor) -> torch.Tensor:
        """Glance frames ``[B, Tg, 3, S, S]`` -> encoder input ``[B*Tg, 3, g, g]`` (bilinear if g < S).

        Upstream's TSM glance sees the full frame (g == S); a smaller ``glance_size`` is our option."""
        x = frames.flatten(0, 1)
        if self.cfg.glance_size != x.shape[-1]:
            x = F.interpolate(x, size=(self.cfg.glance_size,) * 2, mode="bilinear", align_corners=False)
        return x

    def glance(self, frames: torch.Tensor):
        """``[B, Tg, 3, S, S]`` -> fmap ``[B, Tg, Cg, h, w]``, vec ``[B, Tg, Cg]``, exit-0 logits ``[B, C]``
        (``new_new_fc``), context ``[B, C]`` (the ``new_fc`` glance logits the final prediction adds)."""
        b, t = frames.shape[:2]
        fmap, vec = self.global_CNN.base_model.get_featmap(self.glance_input(frames))
        final, reg = self.global_CNN.heads(vec)
        return fmap.view(b, t, *fmap.shape[1:]), vec.view(b, t, -1), reg, final

    def policy(self, fmap: torch.Tensor, vec: torch.Tensor):
        """-> actions ``[B, 1, 4]`` (one box per video), temporal weights ``[B, Tg]``."""
        return self.spatial_policy(fmap), self.temporal_policy(vec)

    def backbone(self, patches: torch.Tensor) -> torch.Tensor:
        """The local encoder on a clip: all K patches ``[B, K, 3, P, P]`` (the shift mixes them) -> feature
        vectors ``[B, K, Cl]``."""
        b, k = patches.shape[:2]
        return self.local_CNN.base_model.get_featvec(patches.flatten(0, 1)).view(b, k, -1)

    def head(self, features: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Clip features ``[B, K, Cl]`` + glance context -> final logits ``[B, C]``."""
        return self.local_CNN.heads(features.flatten(0, 1))[0] + context

    def local(self, patches: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """All K patches ``[B, K, 3, P, P]`` (the shift mixes them) + glance context -> final logits ``[B, C]``."""
        return self.head(self.backbone(patches), context)

    # ------------------------------------------------------------------------------ host-side helpers
    def select(self, actions: torch.Tensor, weights: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Focus positions ``[B, K]`` among the 3K candidates (temporal order) and actions ``[B, K, 4]``
        (the video's one box, repeated), as numpy."""
        c = self.cfg
        pos = focus_positions(weights.detach().cpu().numpy(), c.candidates, c.num_focus, clamp=False)
        acts = actions.detach().cpu().numpy()[:, :1]
        return pos, np.repeat(acts, c.num_focus, axis=1)

    def crop(self, frames: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Patches ``[N, 3, P, P]`` from frames ``[N, 3, S, S]`` and actions ``[N, 4]``."""
        c = self.cfg
        return crop_patches(frames, actions, c.patch_size, c.crop_min, c.crop_max)

    def _local_from_candidates(self, candidates: torch.Tensor, pos: np.ndarray, acts: np.ndarray,
                               context: torch.Tensor) -> torch.Tensor:
        b, k = pos.shape
        rows = torch.arange(b)[:, None]
        frames = candidates[rows, torch.as_tensor(pos)].flatten(0, 1)  # [B*K, 3, S, S]
        patches = self.crop(frames, torch.as_tensor(acts).flatten(0, 1))
        return self.local(patches.view(b, k, *patches.shape[1:]), context)

    # ---------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def stepwise(self, glance_frames: torch.Tensor, candidate_frames: torch.Tensor, thresholds=None,
                 criterion: str = "max_logit", max_steps: int | None = None) -> Iterator[TSMStep]:
        """Two-exit inference of ONE video: glance frames ``[Tg, 3, S, S]``, candidates ``[3K, 3, S, S]``.

        Yields step 0 (glance only) and, unless its score reaches ``thresholds[0]`` or ``max_steps == 0``,
        step 1 (the full model: all K patches at once).
        """
        fmap, vec, logits, context = self.glance(glance_frames.unsqueeze(0))
        step0 = self._step(0, logits, criterion)
        yield step0
        if max_steps == 0 or passes(thresholds, 0, step0.score):
            return
        actions, weights = self.policy(fmap, vec)
        pos, acts = self.select(actions, weights)
        logits = self._local_from_candidates(candidate_frames.unsqueeze(0), pos, acts, context)
        yield self._step(1, logits, criterion, action=acts[0, 0], positions=pos[0])

    @staticmethod
    def _step(k: int, logits: torch.Tensor, criterion: str, action=None, positions=None) -> TSMStep:
        arr = logits[0].detach().cpu().numpy()
        return TSMStep(k, arr, float(confidence(arr, criterion)), None, action, positions)

    @torch.no_grad()
    def forward(self, glance_x: torch.Tensor, candidates_x: torch.Tensor) -> torch.Tensor:
        """Upstream's evaluation inputs ``[B, Tg*3, S, S]`` and ``[B, 3K*3, S, S]`` (normalised) -> logits at
        both exits ``[B, 2, C]``: glance-only, then the full model."""
        c = self.cfg
        b, s = glance_x.shape[0], glance_x.shape[-1]
        glance_frames = glance_x.view(b, c.num_glance, 3, s, s)
        candidates = candidates_x.view(b, c.candidates, 3, s, s)
        fmap, vec, logits0, context = self.glance(glance_frames)
        actions, weights = self.policy(fmap, vec)
        pos, acts = self.select(actions, weights)
        logits1 = self._local_from_candidates(candidates, pos, acts, context)
        return torch.stack([logits0, logits1], dim=1)

"""The Uni-AdaFocus reference model (base family) as separate stages composed by one module.

Stages, which are also the exported engines:

- ``glance``: the global encoder f_G on the Tg glance frames -> feature maps, pooled vectors, the exit-0
  logits and the pooled glance context the classifier carries to every later step;
- ``policy``: spatial boxes for every candidate frame and temporal weights over the glance frames;
- ``local``: one focus step: the local encoder f_L on one patch + the classifier's running-max state.

Between them, on the host: the deterministic inverse-CDF choice of focus frames
(:func:`adafocus.runtime.sampling.focus_positions`) and the crop. Training-only branches (the Monte-Carlo
temporal head, random patches) are not part of inference.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from adafocus.errors import ConfigError
from adafocus.models.backbones import MobileNetV2, ResNet
from adafocus.models.classifier import PoolingClassifier
from adafocus.models.config import ModelConfig
from adafocus.models.ops import crop_patches, interpolate_actions
from adafocus.models.policy import SpatialPolicy, TemporalPolicy
from adafocus.runtime.exits import confidence, passes
from adafocus.runtime.sampling import focus_positions, glance_positions


@dataclass
class Step:
    """One exit of the step-wise inference of one video."""

    step: int  # 0 = after the glance, k = after the k-th focus patch
    logits: np.ndarray  # [C]
    score: float  # exit criterion of the logits
    position: int | None = None  # candidate position of the focus frame (None for step 0)
    action: np.ndarray | None = None  # [4] policy action of the patch


class UniAdaFocus(nn.Module):
    """Base family: MobileNetV2 glance, 3-D conv + temporal policy, ResNet local, pooling classifier."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family != "base":
            raise ValueError(f"UniAdaFocus builds the base family; use build_model() for {cfg.family!r}")
        self.cfg = cfg
        c = cfg.num_classes
        self.global_CNN = MobileNetV2(cfg.glance_width, cfg.glance_last_channel)
        gdim = self.global_CNN.last_channel
        self.global_CNN_fc = nn.Sequential(nn.Dropout(cfg.fc_dropout), nn.Linear(gdim, c))
        self.aux_fc = nn.Linear(gdim, c)
        self.local_CNN = ResNet(cfg.local_arch, cfg.local_width)
        ldim = self.local_CNN.feature_dim
        self.local_CNN_fc = nn.Sequential(nn.Dropout(cfg.fc_dropout), nn.Linear(ldim, c))
        self.spatial_policy = SpatialPolicy(gdim, cfg.stn_hidden_dim, cfg.feature_size, time_kernel=1)
        self.temporal_policy = TemporalPolicy(gdim, cfg.temporal_hidden_dim, cfg.temperature)
        self.classifier = PoolingClassifier(gdim, ldim, cfg.num_glance, cfg.num_focus, c, cfg.mlp_dim,
                                            cfg.dropout)
        self.global_dim, self.local_dim = gdim, ldim

    # ------------------------------------------------------------------------------------------ stages
    def glance_input(self, frames: torch.Tensor) -> torch.Tensor:
        """Glance frames ``[B, Tg, 3, S, S]`` -> encoder input ``[B*Tg, 3, g, g]`` (bilinear if g < S)."""
        x = frames.flatten(0, 1)
        if self.cfg.glance_size != x.shape[-1]:
            x = F.interpolate(x, size=(self.cfg.glance_size,) * 2, mode="bilinear", align_corners=False)
        return x

    def glance(self, frames: torch.Tensor):
        """``[B, Tg, 3, S, S]`` -> fmap ``[B, Tg, Cg, h, w]``, vec ``[B, Tg, Cg]``, exit-0 logits ``[B, C]``,
        context ``[B, D]`` (max over the glance frames of the global MLP features)."""
        b, t = frames.shape[:2]
        fmap, vec = self.global_CNN.get_featmap(self.glance_input(frames))
        fmap = fmap.view(b, t, *fmap.shape[1:])
        vec = vec.view(b, t, -1)
        # the running max after the last glance frame (global_pool(vec)[:, -1]) without cummax, which has
        # no ONNX export
        context = self.classifier.global_mlp(vec.flatten(0, 1)).view(b, t, -1).amax(dim=1)
        return fmap, vec, self.classifier.exit0_logits(context), context

    def policy(self, fmap: torch.Tensor, vec: torch.Tensor):
        """-> actions ``[B, N, 4]`` for every candidate frame, temporal weights ``[B, Tg]``."""
        actions = interpolate_actions(self.spatial_policy(fmap), self.cfg.candidates)
        return actions, self.temporal_policy(vec)

    def backbone(self, patch: torch.Tensor) -> torch.Tensor:
        """The local encoder: patches ``[B, 3, P, P]`` (any B: one video's chunk of steps, or many videos')
        -> feature vectors ``[B, Cl]``."""
        return self.local_CNN.get_featvec(patch)

    def head(self, features: torch.Tensor, state: torch.Tensor, context: torch.Tensor, step: torch.Tensor):
        """One classifier step: features ``[B, Cl]``, running-max ``state`` ``[B, D]``, glance ``context``,
        0-based ``step`` ``[B]`` -> logits ``[B, C]``, new state ``[B, D]``."""
        return self.classifier.local_step(features, state, context, step)

    def local(self, patch: torch.Tensor, state: torch.Tensor, context: torch.Tensor, step: torch.Tensor):
        """One focus step: patch ``[B, 3, P, P]`` -> logits ``[B, C]``, new running-max state ``[B, D]``."""
        return self.head(self.backbone(patch), state, context, step)

    def initial_state(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.classifier.mlp_dim)

    # ------------------------------------------------------------------------------ host-side helpers
    def select(self, actions: torch.Tensor, weights: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Focus positions ``[B, K]`` (temporal order) and their actions ``[B, K, 4]`` (numpy)."""
        pos = focus_positions(weights.detach().cpu().numpy(), self.cfg.candidates, self.cfg.num_focus)
        acts = np.take_along_axis(actions.detach().cpu().numpy(), pos[:, :, None], axis=1)
        return pos, acts

    def crop(self, frames: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        return crop_patches(frames, actions, c.patch_size, c.crop_min, c.crop_max)

    # ---------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def stepwise(self, frames: torch.Tensor, thresholds=None, criterion: str = "max_logit",
                 max_steps: int | None = None) -> Iterator[Step]:
        """Step-wise inference of ONE video: candidate frames ``[N, 3, S, S]`` (normalised).

        Yields the exit-0 step, then one step per focus patch, and stops after the first step whose score
        reaches ``thresholds[step]`` (none: run all K), or after ``max_steps`` focus steps.
        """
        c = self.cfg
        frames = frames.unsqueeze(0)
        gpos = torch.as_tensor(glance_positions(c.num_segments, c.num_glance))
        fmap, vec, logits, context = self.glance(frames[:, gpos])
        yield from self._emit(0, logits, thresholds, criterion)
        if self._done:
            return
        actions, weights = self.policy(fmap, vec)
        pos, acts = self.select(actions, weights)
        state = self.initial_state(1)
        steps = c.num_focus if max_steps is None else min(max_steps, c.num_focus)
        for k in range(steps):
            frame = frames[:, int(pos[0, k])]
            patch = self.crop(frame, torch.as_tensor(acts[:, k]))
            logits, state = self.local(patch, state, context, torch.tensor([k]))
            yield from self._emit(k + 1, logits, thresholds, criterion, int(pos[0, k]), acts[0, k])
            if self._done:
                return

    def _emit(self, k, logits, thresholds, criterion, position=None, action=None):
        arr = logits[0].detach().cpu().numpy()
        score = float(confidence(arr, criterion))
        self._done = passes(thresholds, k, score)
        yield Step(k, arr, score, position, action)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upstream's evaluation input ``[B, N*3, S, S]`` (normalised) -> logits at every exit ``[B, K+1, C]``.

        Exit 0 is the glance-only prediction; the last is the full model's (upstream's ``last_out``).
        """
        c = self.cfg
        b = x.shape[0]
        frames = x.view(b, c.num_segments, 3, x.shape[-2], x.shape[-1])
        gpos = torch.as_tensor(glance_positions(c.num_segments, c.num_glance))
        fmap, vec, logits0, context = self.glance(frames[:, gpos])
        actions, weights = self.policy(fmap, vec)
        pos, acts = self.select(actions, weights)
        state = self.initial_state(b)
        out = [logits0]
        rows = torch.arange(b)
        for k in range(c.num_focus):
            frame = frames[rows, torch.as_tensor(pos[:, k])]
            patch = self.crop(frame, torch.as_tensor(acts[:, k]))
            logits, state = self.local(patch, state, context, torch.full((b,), k, dtype=torch.long))
            out.append(logits)
        return torch.stack(out, dim=1)


def build_model(cfg: ModelConfig) -> nn.Module:
    """The reference model for a config's family (base, tsm, x3d)."""
    if cfg.family == "base":
        return UniAdaFocus(cfg)
    if cfg.family == "tsm":
        from adafocus.models.tsm import UniAdaFocusTSM

        return UniAdaFocusTSM(cfg)
    if cfg.family == "x3d":
        from adafocus.models.x3d import UniAdaFocusX3D

        return UniAdaFocusX3D(cfg)
    raise ConfigError(f"unknown model family {cfg.family!r}")

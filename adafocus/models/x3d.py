"""Uni-AdaFocus-X3D (Kinetics-400): X3D-S glance, X3D-L local encoder, two exits, with the TSM family's stage API.

Upstream (``Uni-AdaFocus-X3D .../archs/uni_adafocus_X3D_exit.py`` over SlowFast's X3D builder; shared/X3D.md):

- **glance**: the Tg glance frames (their own TSN segments of the video) resized bilinearly to ``glance_size``
  (160) and run as one clip through X3D-S. Its conv_5 maps ``[B, 432, Tg, 5, 5]`` feed the spatial policy; their
  spatial means ``[B, Tg, 432]`` the temporal policy and ``global_CNN_head`` (a per-frame MLP whose logits,
  averaged over the frames, are **exit 0**). X3D-S's own head (pool, ``lin_5``, ``projection``) gives the glance
  logits that the full model adds (the ``context``);
- **policy**: one box per video from all Tg maps (the last conv's kernel is ``(Tg, 5, 5)``), frame weights from
  the temporal conv head; K focus frames of the ``num_segments`` candidates by the inverse-CDF rule without the
  clamp (:func:`adafocus.runtime.sampling.focus_positions`);
- **local**: the K patches as one clip through X3D-L; **exit 1** = X3D-L's own head logits + the glance context.

``local_CNN_head`` (upstream's ``local_avg_logit``) and ``aux_head`` feed no exit; they are built so that the
official checkpoint loads strictly, and not run. Views (upstream's 3-crop test) are folded into the batch, each
with its own policy, frames and box; the logits are averaged over views per exit (:meth:`UniAdaFocusX3D.forward`,
:meth:`UniAdaFocusX3D.stepwise`).

Export-safe as written: Swish is ``x * sigmoid(x)`` (not pytorchvideo's autograd Function), the heads' fixed
AvgPool3d is the global mean it equals at every input size (the kernel is ``[T, ceil(S/32), ceil(S/32)]``, the
map's own size), and no op is in place.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from adafocus.models.config import ModelConfig
from adafocus.models.policy import SpatialPolicy, TemporalPolicy
from adafocus.models.tsm import TSMStep, UniAdaFocusTSM
from adafocus.runtime.exits import confidence, passes


@dataclass(frozen=True)
class X3DSpec:
    """X3D's expansion factors (SlowFast's ``cfg.X3D``); channel-wise 3x3x3 convs, no res2 scaling, no BN on lin_5."""

    width: float  # gamma_w: WIDTH_FACTOR
    depth: float  # gamma_d: DEPTH_FACTOR; stage depths ceil(depth * (1, 2, 5, 3))
    bottleneck: float  # gamma_b: BOTTLENECK_FACTOR; inner width of a block = int(bottleneck * out)
    dim_c1: int = 12  # DIM_C1
    dim_c5: int = 2048  # DIM_C5: the head's lin_5 width


X3D_ARCHS: dict[str, X3DSpec] = {
    "x3d_s": X3DSpec(2.0, 2.2, 2.25),  # configs/X3D_S.yaml: 3, 5, 11, 7 blocks
    "x3d_l": X3DSpec(2.0, 5.0, 2.25),  # configs/X3D_L.yaml: 5, 10, 25, 15 blocks
    "x3d_tiny": X3DSpec(1.0, 0.5, 2.25, dim_c1=8, dim_c5=64),  # tests: 1, 1, 3, 2 blocks, 8..64 channels
}
BN_EPS = 1e-5  # SlowFast's default (1e-3 changes the official model's logits by ~0.9 relative)


def round_width(width: float, multiplier: float, min_width: int = 1, divisor: int = 1) -> int:
    """SlowFast's channel rounding: ``width * multiplier`` to the nearest multiple of ``divisor`` (at least
    ``min_width``), one ``divisor`` more when rounding lost over 10%."""
    scaled = width * multiplier
    out = max(min_width, int(scaled + divisor / 2) // divisor * divisor)
    return int(out + divisor if out < 0.9 * scaled else out)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _bn(channels: int) -> nn.BatchNorm3d:
    return nn.BatchNorm3d(channels, eps=BN_EPS, momentum=0.1)


def _conv(cin: int, cout: int, kernel, stride=1, padding=0, groups: int = 1, bias: bool = False) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=bias)


class X3DStem(nn.Module):
    """``conv_xy`` (1x3x3, stride (1,2,2)), ``conv`` (5x1x1 depthwise over time), ``bn``, ReLU. No max-pool."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv_xy = _conv(cin, cout, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.conv = _conv(cout, cout, (5, 1, 1), padding=(2, 0, 0), groups=cout)
        self.bn = _bn(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(self.conv_xy(x))))


class SqueezeExcite(nn.Module):
    """SE: global mean over T, H, W -> ``fc1`` (1x1x1 conv, bias) -> ReLU -> ``fc2`` -> sigmoid, scales channels."""

    def __init__(self, channels: int, ratio: float = 1 / 16):
        super().__init__()
        hidden = round_width(channels, ratio, min_width=8, divisor=8)
        self.fc1 = _conv(channels, hidden, 1, bias=True)
        self.fc2 = _conv(hidden, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3, 4), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class X3DTransform(nn.Module):
    """``branch2``: ``a`` 1x1x1 + BN + ReLU, ``b`` channel-wise 3x3x3 (spatial stride) + BN, SE on even blocks,
    Swish, ``c`` 1x1x1 + BN. SE comes before the Swish, as upstream's module order runs it."""

    def __init__(self, cin: int, cout: int, inner: int, stride: int, block_index: int):
        super().__init__()
        self.a = _conv(cin, inner, 1)
        self.a_bn = _bn(inner)
        self.b = _conv(inner, inner, 3, stride=(1, stride, stride), padding=1, groups=inner)
        self.b_bn = _bn(inner)
        self.se = SqueezeExcite(inner) if block_index % 2 == 0 else None
        self.c = _conv(inner, cout, 1)
        self.c_bn = _bn(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.a_bn(self.a(x)))
        x = self.b_bn(self.b(x))
        if self.se is not None:
            x = self.se(x)
        return self.c_bn(self.c(swish(x)))


class X3DBlock(nn.Module):
    """ReLU(shortcut + branch2); the shortcut is ``branch1`` (1x1x1, stride) + ``branch1_bn`` when the shape
    changes (block 0 of every stage), the identity otherwise."""

    def __init__(self, cin: int, cout: int, inner: int, stride: int, block_index: int):
        super().__init__()
        self.project = cin != cout or stride != 1
        if self.project:
            self.branch1 = _conv(cin, cout, 1, stride=(1, stride, stride))
            self.branch1_bn = _bn(cout)
        self.branch2 = X3DTransform(cin, cout, inner, stride, block_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.branch1_bn(self.branch1(x)) if self.project else x
        return F.relu(shortcut + self.branch2(x))


class Pathway(nn.Module):
    """SlowFast's one-pathway container: children named ``pathway0_stem`` / ``pathway0_res{i}``, run in order."""

    def __init__(self, name: str, modules: list[nn.Module]):
        super().__init__()
        for i, module in enumerate(modules):
            self.add_module(f"pathway0_{name}" if name == "stem" else f"pathway0_{name}{i}", module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.children():
            x = module(x)
        return x


class X3DHead(nn.Module):
    """``conv_5`` (1x1x1) + ``conv_5_bn`` + ReLU: the feature maps; their global mean -> ``lin_5`` (1x1x1 conv,
    no bias, no BN) -> ReLU -> ``projection``: the logits (no softmax: upstream reads the raw projection)."""

    def __init__(self, cin: int, inner: int, width: int, num_classes: int):
        super().__init__()
        self.conv_5 = _conv(cin, inner, 1)
        self.conv_5_bn = _bn(inner)
        self.lin_5 = _conv(inner, width, 1)
        self.projection = nn.Linear(width, num_classes)

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv_5_bn(self.conv_5(x)))

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled maps ``[B, inner]`` -> logits ``[B, C]`` (dropout is training-only)."""
        hidden = F.relu(self.lin_5(pooled[:, :, None, None, None])).flatten(1)
        return self.projection(hidden)


class X3D(nn.Module):
    """SlowFast's X3D with its parameter names (``s1.pathway0_stem``, ``s2..s5.pathway0_res{i}``, ``head``).

    No temporal stride anywhere; each stage halves H and W. Input ``[B, 3, T, H, W]``.
    """

    def __init__(self, spec: X3DSpec, num_classes: int):
        super().__init__()
        stem = round_width(spec.dim_c1, spec.width)
        self.s1 = Pathway("stem", [X3DStem(3, stem)])
        basis = [spec.dim_c1]  # res2 is not scaled (SCALE_RES2 False); each later stage doubles, rounded to 8
        for _ in range(3):
            basis.append(round_width(basis[-1], 2.0, divisor=8))
        cin = stem
        for stage, (repeats, base) in enumerate(zip((1, 2, 5, 3), basis, strict=True)):
            cout = round_width(base, spec.width)
            inner = int(spec.bottleneck * cout)
            blocks = [X3DBlock(cin if i == 0 else cout, cout, inner, 2 if i == 0 else 1, i)
                      for i in range(int(math.ceil(spec.depth * repeats)))]
            self.add_module(f"s{stage + 2}", Pathway("res", blocks))
            cin = cout
        self.head = X3DHead(cin, inner, spec.dim_c5, num_classes)
        self.feature_dim, self.final_dim = inner, spec.dim_c5

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Clip ``[B, 3, T, H, W]`` -> conv_5 maps ``[B, inner, T, H/32, W/32]`` (after BN and ReLU)."""
        return self.head.maps(self.s5(self.s4(self.s3(self.s2(self.s1(x))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.classify(self.feature_maps(x).mean(dim=(2, 3, 4)))


def mlp_head(feature_dim: int, final_dim: int, num_classes: int, dropout: float) -> nn.Sequential:
    """``global_CNN_head`` / ``local_CNN_head``: Linear (no bias) + ReLU + Dropout + Linear (keys 0 and 3)."""
    return nn.Sequential(nn.Linear(feature_dim, final_dim, bias=False), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(final_dim, num_classes))


class UniAdaFocusX3D(nn.Module):
    """X3D family: X3D-S glance, one-box spatial policy + temporal policy, X3D-L local, 2 exits.

    Stage API as :class:`adafocus.models.tsm.UniAdaFocusTSM` (whose host-side helpers ``select``, ``crop`` and
    the candidates-to-logits path it shares): :meth:`glance`, :meth:`policy`, :meth:`backbone`, :meth:`head`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family != "x3d":
            raise ValueError(f"UniAdaFocusX3D builds the x3d family; use build_model() for {cfg.family!r}")
        self.cfg = cfg
        c = cfg.num_classes
        self.global_CNN = X3D(X3D_ARCHS[cfg.glance_arch], c)
        gdim, gfinal = self.global_CNN.feature_dim, self.global_CNN.final_dim
        self.global_CNN_head = mlp_head(gdim, gfinal, c, cfg.dropout)
        self.local_CNN = X3D(X3D_ARCHS[cfg.local_arch], c)
        ldim, lfinal = self.local_CNN.feature_dim, self.local_CNN.final_dim
        self.local_CNN_head = mlp_head(ldim, lfinal, c, cfg.dropout)  # upstream's local_avg_logit: no exit uses it
        self.aux_head = nn.Sequential(nn.Linear(gdim, c))  # training-only auxiliary head; kept for strict loading
        self.spatial_policy = SpatialPolicy(gdim, cfg.stn_hidden_dim, cfg.feature_size, time_kernel=cfg.num_glance)
        self.temporal_policy = TemporalPolicy(gdim, cfg.temporal_hidden_dim, cfg.temperature)
        self.global_dim, self.local_dim = gdim, ldim

    official_key_map = staticmethod(UniAdaFocusTSM.official_key_map)  # only ``module.`` differs

    # ------------------------------------------------------------------------------------------ stages
    def glance_input(self, frames: torch.Tensor) -> torch.Tensor:
        """Glance frames ``[B, Tg, 3, S, S]`` -> X3D-S clip ``[B, 3, Tg, g, g]`` (bilinear, align_corners False,
        no antialias, as upstream's ``F.interpolate`` of the stacked frames)."""
        b, t = frames.shape[:2]
        x = frames.flatten(0, 1)
        g = self.cfg.glance_size
        if g != x.shape[-1]:
            x = F.interpolate(x, size=(g, g), mode="bilinear", align_corners=False)
        return x.view(b, t, 3, g, g).transpose(1, 2)

    def glance(self, frames: torch.Tensor):
        """``[B, Tg, 3, S, S]`` -> fmap ``[B, Tg, Cg, h, w]``, vec ``[B, Tg, Cg]``, exit-0 logits ``[B, C]`` (the
        per-frame MLP head averaged over frames), context ``[B, C]`` (X3D-S's own head: the glance's share of
        exit 1)."""
        maps = self.global_CNN.feature_maps(self.glance_input(frames))  # [B, Cg, Tg, h, w]
        context = self.global_CNN.head.classify(maps.mean(dim=(2, 3, 4)))
        vec = maps.mean(dim=(3, 4)).transpose(1, 2)  # [B, Tg, Cg]
        # upstream averages the per-frame logits; the last Linear commutes with that mean, so it runs once on
        # the averaged hidden layer instead of Tg times (the same logits up to float rounding, 0.6% fewer MACs)
        head = self.global_CNN_head
        logits = head[3](head[2](head[1](head[0](vec))).mean(dim=1))
        return maps.transpose(1, 2), vec, logits, context

    def policy(self, fmap: torch.Tensor, vec: torch.Tensor):
        """-> actions ``[B, 1, 4]`` (one box per video), temporal weights ``[B, Tg]``."""
        return self.spatial_policy(fmap), self.temporal_policy(vec)

    def backbone(self, patches: torch.Tensor) -> torch.Tensor:
        """X3D-L on the clip of K patches ``[B, K, 3, P, P]`` -> its pooled conv_5 features ``[B, Cl]``."""
        return self.local_CNN.feature_maps(patches.transpose(1, 2)).mean(dim=(2, 3, 4))

    def head(self, features: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Pooled clip features ``[B, Cl]`` + glance context -> exit-1 logits ``[B, C]`` (X3D-L head + X3D-S head)."""
        return self.local_CNN.head.classify(features) + context

    def local(self, patches: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """All K patches ``[B, K, 3, P, P]`` + glance context -> exit-1 logits ``[B, C]``."""
        return self.head(self.backbone(patches), context)

    # ------------------------------------------------------------------------------ host-side helpers
    select = UniAdaFocusTSM.select  # focus positions [B, K] (no clamp) + the one box repeated [B, K, 4]
    crop = UniAdaFocusTSM.crop
    _local_from_candidates = UniAdaFocusTSM._local_from_candidates

    # ---------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def stepwise(self, glance_frames: torch.Tensor, candidate_frames: torch.Tensor, thresholds=None,
                 criterion: str = "max_logit", max_steps: int | None = None) -> Iterator[TSMStep]:
        """Two-exit inference of ONE video: glance frames ``[Tg, 3, S, S]`` and candidates ``[N, 3, S, S]``, or
        ``[V, Tg, ...]`` / ``[V, N, ...]`` for V views (each view its own policy, frames and box; the exit
        decision reads the logits averaged over views, as upstream's multi-view evaluation).

        Yields step 0 and, unless its score reaches ``thresholds[0]`` or ``max_steps == 0``, step 1. With one
        view a step's ``positions`` are ``[K]`` and its ``action`` ``[4]``; with V views ``[V, K]`` and ``[V, 4]``.
        """
        single = glance_frames.dim() == 4
        glance = glance_frames.unsqueeze(0) if single else glance_frames
        candidates = candidate_frames.unsqueeze(0) if single else candidate_frames
        fmap, vec, logits, context = self.glance(glance)
        step0 = self._step(0, logits, criterion)
        yield step0
        if max_steps == 0 or passes(thresholds, 0, step0.score):
            return
        pos, acts = self.select(*self.policy(fmap, vec))
        logits = self._local_from_candidates(candidates, pos, acts, context)
        yield self._step(1, logits, criterion, acts[0, 0] if single else acts[:, 0], pos[0] if single else pos)

    @staticmethod
    def _step(k: int, logits: torch.Tensor, criterion: str, action=None, positions=None) -> TSMStep:
        arr = logits.mean(dim=0).detach().cpu().numpy()  # over views (one row: that view's logits)
        return TSMStep(k, arr, float(confidence(arr, criterion)), None, action, positions)

    @torch.no_grad()
    def forward(self, glance_x: torch.Tensor, candidates_x: torch.Tensor, views: int = 1) -> torch.Tensor:
        """Upstream's evaluation inputs ``[B, V*Tg*3, S, S]`` and ``[B, V*N*3, S, S]`` (normalised; V views
        stacked crop-major along channels, as its 3-crop loader does) -> logits at both exits ``[B, 2, C]``,
        averaged over the V views: glance-only, then the full model."""
        c = self.cfg
        b, s = glance_x.shape[0], glance_x.shape[-1]
        glance = glance_x.reshape(b * views, c.num_glance, 3, s, s)
        candidates = candidates_x.reshape(b * views, c.candidates, 3, s, s)
        fmap, vec, logits0, context = self.glance(glance)
        pos, acts = self.select(*self.policy(fmap, vec))
        logits1 = self._local_from_candidates(candidates, pos, acts, context)
        out = torch.stack([logits0, logits1], dim=1)  # [B*V, 2, C]
        return out.view(b, views, 2, -1).mean(dim=1)

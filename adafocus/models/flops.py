"""Multiply-add counts (the papers' "GFLOPs") per stage and per exit, counted on the real modules.

A forward hook on every Conv/Linear records its multiply-adds while each stage runs on one video (on the meta
device: shapes only, the counts do not depend on the weights); the batched
per-step head of the classifier (a gather + matmul, not an nn.Linear call) is counted from its weights.
Bias adds, BatchNorm and activations are not counted, as in upstream's tables; nor are pooling means, the
glance resize, X3D's squeeze-excitation scaling (its two 1x1x1 convs are) or the crop.

X3D (``x3d-p128-16x32``): upstream's ``ops/early_exit_unifocus_X3D.py`` charges exit 0 with X3D-S alone, its own
head included (2.415453), and leaves the exit-0 MLP head out ("No classifier"); here the MLP head that exit 0
reads is counted too (0.0150 GFLOPs, its last Linear once on the frame-averaged hidden layer), so exit 0 is
2.4304 (+0.62%) and exit 1 8.7926 against upstream's 8.778 (+0.17%).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from adafocus.models import build_model
from adafocus.models.config import ModelConfig
from adafocus.models.presets import preset_config
from adafocus.runtime.sampling import glance_positions

G = 1e9


@dataclass
class FlopsReport:
    """GFLOPs (multiply-adds) of one video. ``exits[k]`` is the cumulative cost when exiting at step k."""

    preset: str | None
    family: str
    glance: float  # global encoder on all glance frames + what exit 0 needs
    policy: float  # spatial + temporal policy, paid once the first focus step runs
    step: float  # one focus step (local encoder + classifier step)
    exits: list[float]
    patches_per_step: int
    parts: dict[str, float] = field(default_factory=dict)  # finer breakdown
    dense: float = 0.0  # dense baseline: the local encoder on every candidate frame, whole frames

    def to_dict(self) -> dict:
        return asdict(self)

    def cost(self, steps: int) -> float:
        """GFLOPs of a video that runs ``steps`` focus steps."""
        return self.exits[steps]

    def format(self) -> str:
        lines = [f"{self.preset or 'model'} ({self.family}), GFLOPs = multiply-adds per video"]
        for key, value in self.parts.items():
            lines.append(f"  {key:<28} {value:10.4f}")
        lines.append(f"  {'glance (exit 0)':<28} {self.glance:10.4f}")
        lines.append(f"  {'policy':<28} {self.policy:10.4f}")
        lines.append(f"  {'one focus step':<28} {self.step:10.4f}")
        lines.append(f"  {'dense baseline':<28} {self.dense:10.4f}")
        lines.append("  cumulative at exit: " + ", ".join(f"{k}: {v:.3f}" for k, v in enumerate(self.exits)))
        return "\n".join(lines)


def _layer_macs(module: nn.Module, inputs, output) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        per_out = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return int(output.numel() * per_out)
    if isinstance(module, nn.Linear):
        return int(output.numel() * module.in_features)
    return 0


class MacCounter:
    """Context manager: multiply-adds of every Conv/Linear under ``root``, keyed by module name."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.macs: dict[str, int] = defaultdict(int)
        self._handles = []

    def __enter__(self) -> MacCounter:
        for name, mod in self.root.named_modules():
            if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
                self._handles.append(mod.register_forward_hook(
                    lambda m, i, o, name=name: self.macs.__setitem__(name, self.macs[name] + _layer_macs(m, i, o))))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def total(self, prefix: str = "") -> int:
        return sum(v for k, v in self.macs.items() if k.startswith(prefix))


def count_model_flops(model: nn.Module, preset: str | None = None) -> FlopsReport:
    """Count the stages of ``model`` (its architecture: the counts do not depend on the weights)."""
    return count_config_flops(model.cfg, preset)


@torch.no_grad()
def count_config_flops(cfg: ModelConfig, preset: str | None = None) -> FlopsReport:
    """Count the stages of the model ``cfg`` builds on one video, on the meta device: the same modules and
    shapes, no arithmetic (a full X3D preset counts in ~2 s instead of ~30 s of CPU convolutions)."""
    with torch.device("meta"):
        return _count(build_model(cfg).eval(), preset)


def _count(model: nn.Module, preset: str | None) -> FlopsReport:
    cfg: ModelConfig = model.cfg
    s = cfg.frame_size
    frames = torch.randn(1, cfg.num_glance, 3, s, s)
    with MacCounter(model) as glance_count:
        fmap, vec, _, context = model.glance(frames)
    with MacCounter(model) as policy_count:
        model.policy(fmap, vec)
    parts: dict[str, float] = {
        "glance encoder (per frame)": glance_count.total("global_CNN.") / cfg.num_glance / G,
        "glance classifier": (glance_count.total() - glance_count.total("global_CNN.")) / G,
        "spatial policy": policy_count.total("spatial_policy.") / G,
        "temporal policy": policy_count.total("temporal_policy.") / G,
    }
    p = cfg.patch_size
    if cfg.family == "base":
        with MacCounter(model) as local_count:
            model.local(torch.randn(1, 3, p, p), model.initial_state(1), context, torch.zeros(1, dtype=torch.long))
        head = model.classifier.local_classifiers[0][1]
        head_macs = head.in_features * head.out_features  # the gathered per-step head
        encoder = local_count.total("local_CNN.")
        parts["local encoder (per patch)"] = encoder / G
        parts["local classifier (per step)"] = (local_count.total() - encoder + head_macs) / G
        step = (local_count.total() + head_macs) / G
    else:  # tsm, x3d: one step on the clip of K patches; the backbone and head stages counted apart
        k = cfg.num_focus
        with MacCounter(model) as backbone_count:
            features = model.backbone(torch.randn(1, k, 3, p, p))
        with MacCounter(model) as head_count:
            model.head(features, context)
        parts["local encoder (per patch)"] = backbone_count.total() / k / G
        parts["local classifier (per step)"] = head_count.total() / G
        step = (backbone_count.total() + head_count.total()) / G
    glance = glance_count.total() / G
    policy = policy_count.total() / G
    n_steps = cfg.num_exits - 1
    exits = [glance] + [glance + policy + i * step for i in range(1, n_steps + 1)]
    # dense baseline: the local backbone on whole frames (TSM: a clip of K frames, since it shifts across them)
    if cfg.family == "x3d":
        per_frame, dense_macs = _x3d_dense_macs(model.local_CNN, s, cfg.candidates)
    else:
        backbone = getattr(model.local_CNN, "base_model", model.local_CNN)
        clip = 1 if cfg.family == "base" else cfg.num_focus
        with MacCounter(backbone) as dense_count:
            backbone(torch.randn(clip, 3, s, s))
        per_frame = dense_count.total() / clip
        dense_macs = per_frame * cfg.candidates
    dense = dense_macs / G
    parts["dense baseline (per frame)"] = per_frame / G
    return FlopsReport(preset, cfg.family, glance, policy, step, exits, cfg.patches_per_step, parts, dense)


def _x3d_dense_macs(x3d: nn.Module, size: int, frames: int) -> tuple[float, float]:
    """X3D-L (with its head) on all ``frames`` candidates at ``size``: per-frame MACs and the clip's total.

    No X3D conv strides or shrinks time, so the cost is exactly a * T + b (b: the SE convs and the head, which
    run on pooled maps, once a clip); it is measured at T = 1 and 2 instead of running a 96-frame clip."""
    counts = []
    for t in (1, 2):
        with MacCounter(x3d) as count:
            x3d(torch.randn(1, 3, t, size, size))
        counts.append(count.total())
    per_frame = counts[1] - counts[0]
    return per_frame, counts[0] + per_frame * (frames - 1)


def count_flops(preset: str, num_classes: int | None = None) -> FlopsReport:
    """FLOPs of a preset."""
    return count_config_flops(preset_config(preset, num_classes), preset)


__all__ = ["FlopsReport", "MacCounter", "count_config_flops", "count_flops", "count_model_flops", "glance_positions"]

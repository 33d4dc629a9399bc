"""The exported stages as nn.Modules with named inputs and outputs, for every model family (base, tsm, x3d).

Each stage is one method of the reference model (``glance``, ``policy``, ``backbone``, ``head``) wrapped so that:

- its inputs and outputs have the names the runtime feeds and reads (:data:`SIGNATURES`);
- with ``dtype=torch.float16`` the weights are half, the float inputs are cast to half on entry and the
  float outputs back to float32 on exit, so an fp16 bundle keeps float32 I/O (the runtime never deals with
  half arrays; the two casts per stage cost next to nothing);
- it is in eval mode (the legacy exporter restores a wrapper's train flag *recursively* after export, so a
  wrapper left in train mode would switch the reference model to train mode too).

The host-side steps between stages (focus-frame choice, crop) are not here: they are the runtime's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn

from adafocus.errors import ConfigError

STAGE_METHODS = {"global": "glance", "policy": "policy", "backbone": "backbone", "head": "head"}

# (family, stage) -> (input names, output names); order = the method's arguments and return values
SIGNATURES: dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]] = {
    ("base", "global"): (("frames",), ("fmap", "vec", "logits", "context")),
    ("base", "policy"): (("fmap", "vec"), ("actions", "weights")),
    ("base", "backbone"): (("patch",), ("features",)),
    ("base", "head"): (("features", "state", "context", "step"), ("logits", "new_state")),
    ("tsm", "global"): (("frames",), ("fmap", "vec", "logits", "context")),
    ("tsm", "policy"): (("fmap", "vec"), ("actions", "weights")),
    ("tsm", "backbone"): (("patches",), ("features",)),
    ("tsm", "head"): (("features", "context"), ("logits",)),
    ("x3d", "global"): (("frames",), ("fmap", "vec", "logits", "context")),
    ("x3d", "policy"): (("fmap", "vec"), ("actions", "weights")),
    ("x3d", "backbone"): (("patches",), ("features",)),
    ("x3d", "head"): (("features", "context"), ("logits",)),
}


class StageModule(nn.Module):
    """One stage of ``model`` as a module: ``forward(*inputs)`` -> tuple of outputs (float32 floats)."""

    def __init__(self, model: nn.Module, stage: str, dtype: torch.dtype = torch.float32):
        super().__init__()
        family = model.cfg.family
        if (family, stage) not in SIGNATURES:
            raise ValueError(f"no stage {stage!r} for family {family!r}; known: {', '.join(STAGE_METHODS)}")
        self.model = model
        self.stage = stage
        self.dtype = dtype
        self.input_names, self.output_names = SIGNATURES[(family, stage)]
        self._method: Callable = getattr(model, STAGE_METHODS[stage])
        self.eval()

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = [x.to(self.dtype) if x.is_floating_point() else x for x in inputs]
        out = self._method(*args)
        out = out if isinstance(out, tuple) else (out,)
        return tuple(y.float() if y.is_floating_point() else y for y in out)


def build_stages(model: nn.Module, precision: str = "fp32") -> dict[str, StageModule]:
    """The four stages of ``model`` (eval). fp16 wraps a half-precision copy; ``model`` is left untouched."""
    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"precision must be fp32 or fp16, not {precision!r}")
    model.eval()
    if precision == "fp16":
        model = copy.deepcopy(model).half().eval()
    dtype = torch.float16 if precision == "fp16" else torch.float32
    return {stage: StageModule(model, stage, dtype) for stage in STAGE_METHODS}


@torch.no_grad()
def example_inputs(model: nn.Module, batch: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, ...]]:
    """Inputs of each stage at batch ``batch``, as the runtime would feed them.

    Frames are random normalised pixels; the policy gets the glance's real outputs for them and the local
    stage the glance's real context, a random patch and (base) a running-max state from one earlier step,
    with step indices spread over the K steps, so that every stage is checked on values of the right scale.
    """
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    s, p = cfg.frame_size, cfg.patch_size
    frames = torch.randn(batch, cfg.num_glance, 3, s, s, generator=g)
    fmap, vec, _, context = model.glance(frames)
    out: dict[str, tuple[torch.Tensor, ...]] = {"global": (frames,), "policy": (fmap, vec)}
    if cfg.family == "base":
        step = torch.arange(batch, dtype=torch.long) % cfg.num_focus
        warm = model.local(torch.randn(batch, 3, p, p, generator=g), model.initial_state(batch), context,
                           torch.zeros(batch, dtype=torch.long))[1]
        patch = torch.randn(batch, 3, p, p, generator=g)
        out["backbone"] = (patch,)
        out["head"] = (model.backbone(patch), warm, context, step)
    else:
        patches = torch.randn(batch, cfg.num_focus, 3, p, p, generator=g)
        out["backbone"] = (patches,)
        out["head"] = (model.backbone(patches), context)
    return out


__all__ = ["SIGNATURES", "STAGE_METHODS", "StageModule", "build_stages", "example_inputs"]

"""Checkpoints: adafocus's own format, and official Uni-AdaFocus checkpoints (given a preset).

Our format is a dict ``{'format': 'adafocus', 'format_version', 'preset', 'config', 'state_dict', ...}``.
Official checkpoints (``{'epoch', 'state_dict', 'optimizer', 'best_acc1'|'best_prec1', ...}``, the TSM and X3D
ones with ``arch`` and ``scaler`` too) were saved from DDP, so keys carry ``module.``; their unused ImageNet heads
are dropped (the X3D family has none: its X3D heads are the exit-1 logits). Everything else loads strictly, and a
mismatch is reported as one readable block of missing / unexpected / shape-mismatched keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from adafocus.errors import CheckpointError
from adafocus.models import build_model
from adafocus.models.config import ModelConfig
from adafocus.models.presets import get_preset, preset_config

FORMAT = "adafocus"
FORMAT_VERSION = 1
# ImageNet heads of the pretrained backbones: built upstream, never used by Uni-AdaFocus
IGNORED_PREFIXES = ("global_CNN.classifier.", "local_CNN.fc.")
# where the class count can be read in an official checkpoint, per family
CLASS_KEYS = ("classifier.local_classifiers.0.1.weight", "global_CNN_fc.1.weight", "global_CNN.new_fc.weight",
              "local_CNN.new_fc.weight", "aux_fc.weight", "global_CNN.head.projection.weight",
              "global_CNN_head.3.weight", "aux_head.0.weight")


def save(model: torch.nn.Module, path: str | Path, preset: str | None = None, extra: dict | None = None) -> Path:
    """Write ``model`` (config + state_dict) atomically; ``extra`` (e.g. 'training') is stored beside."""
    path = Path(path)
    # metadata as plain JSON types (a TorchVersion or numpy float would make weights_only loading refuse it)
    extra = json.loads(json.dumps(extra or {}, default=_plain))
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "preset": preset,
               "config": model.cfg.to_dict(), "state_dict": model.state_dict(), **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _plain(value):
    """JSON fallback for metadata values: numbers stay numbers, anything else becomes its text."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return str(value)


def read(path: str | Path) -> dict:
    """torch.load a checkpoint on the CPU (tensors and plain data only), as a dict, or a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        if "Unsupported global" in str(exc):
            found = str(exc).split("GLOBAL", 1)[-1].split(" was not", 1)[0].strip()
            raise CheckpointError(f"{path} holds Python objects besides tensors and plain data ({found}); "
                                  "adafocus does not unpickle those: re-save the weights") from exc
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint, truncated or "
                              f"corrupted ({type(exc).__name__})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
    return obj


def load(path: str | Path, preset: str | None = None, num_classes: int | None = None) -> torch.nn.Module:
    """Load a checkpoint into the reference model, in eval mode.

    adafocus checkpoints carry their config (``preset``, if given, must agree). Official checkpoints need
    ``preset`` (see ``adafocus presets``); their class count is read from the weights.
    """
    ckpt = read(path)
    if ckpt.get("format") == FORMAT:
        for key in ("config", "state_dict"):
            if not isinstance(ckpt.get(key), dict):
                raise CheckpointError(f"{path} is an adafocus checkpoint without a {key!r} dict (found "
                                      f"{type(ckpt.get(key)).__name__}): it is damaged, re-save it")
        cfg = ModelConfig.from_dict(ckpt["config"])
        if preset is not None:
            _check_preset(cfg, ckpt.get("preset"), preset, path)
        state = ckpt["state_dict"]
        where = f"adafocus checkpoint {Path(path).name}"
    else:
        if preset is None:
            raise CheckpointError(f"{path} is not an adafocus checkpoint; if it is an official Uni-AdaFocus "
                                  "checkpoint, pass --preset NAME (see `adafocus presets`)")
        state = official_state_dict(ckpt)
        n = num_classes or _infer_classes(state)
        cfg = preset_config(preset, n)
        where = f"preset {preset!r}"
    bad = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors: {', '.join(bad[:8])}")
    try:  # shapes first, on the meta device: a config that does not fit the weights allocates nothing
        with torch.device("meta"):
            skeleton = build_model(cfg)
    except (RuntimeError, ValueError, TypeError, ZeroDivisionError) as exc:
        raise CheckpointError(f"{path}: its model config does not build a model ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]})") from None
    check_fit(skeleton, state, where)
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)  # fits: checked on the skeleton above
    return model.eval()


def official_state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    """Weights of an official checkpoint: ``state_dict`` (or the dict itself), ``module.`` stripped, the
    unused ImageNet heads dropped."""
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("checkpoint has no state_dict of tensors")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = key[len("module."):] if key.startswith("module.") else key
        if key.startswith(IGNORED_PREFIXES):
            continue
        out[key] = value
    return out


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict(strict) with one readable block listing what does not fit."""
    check_fit(model, state, where)
    model.load_state_dict(state, strict=True)


def check_fit(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """CheckpointError listing the missing, unexpected and shape-mismatched keys of ``state`` for ``model``
    (which may live on the meta device)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        lines = [f"checkpoint does not fit {where}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... (+{len(keys) - 8} more)" if len(keys) > 8 else "")
                lines.append(f"  {title} ({len(keys)}): {shown}")
        raise CheckpointError("\n".join(lines))


def weights_sha256(weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) of a model's float weights: every floating-point tensor of its state_dict, in sorted key
    order, as name, dtype, shape and raw bytes. Integer buffers (BatchNorm's ``num_batches_tracked``) do not
    change what the model computes and are left out. The exporter records this digest in the bundle
    (``Manifest.source``) and the torch engine compares a checkpoint's against it."""
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        t = t.detach().to("cpu").contiguous().reshape(-1)
        head = f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(state[name].shape)}\0{t.numel()}\0"
        h.update(head.encode())
        h.update(t.view(torch.uint8).numpy())  # the tensor's buffer, not a copy of it
    return h.hexdigest()


def config_differences(have: Mapping, want: Mapping) -> list[str]:
    """Keys whose values differ between two ``ModelConfig.to_dict()`` dicts (compared as JSON, so tuples
    and lists are equal), in ``want``'s key order, then keys only ``have`` has."""
    a, b = _as_json(have), _as_json(want)
    keys = list(b) + [k for k in a if k not in b]
    return [k for k in keys if a.get(k) != b.get(k)]


def check_source(model: torch.nn.Module, checkpoint: str | Path, source: Mapping | None, config: Mapping | None,
                 bundle: str = "", what: str = "model") -> None:
    """Refuse ``model`` (loaded from ``checkpoint``) unless it is the one ``bundle`` was exported from.

    ``source``: what the bundle recorded (``{"checkpoint": file name, "weights_sha256": digest}``); with a
    digest, the weights must hash to it. Without one (older bundles), ``config`` (the manifest's model
    config, labels included; None: not checked) must equal the model's. One-line CheckpointError otherwise.
    """
    source = source or {}
    where = f"bundle {bundle}" if bundle else "the bundle"
    want = source.get("weights_sha256")
    if want:
        have = weights_sha256(model)
        if have != want:
            origin = source.get("checkpoint") or source.get("source")
            origin = f" ({origin}, weights sha256 {want[:12]})" if origin else f" (weights sha256 {want[:12]})"
            raise CheckpointError(f"{checkpoint} is not the {what} checkpoint {where} was exported from"
                                  f"{origin}: its weights hash to {have[:12]}")
        return
    if config is not None:
        diff = config_differences(model.cfg.to_dict(), config)
        if diff:
            shown = ", ".join(diff[:4]) + (f" (+{len(diff) - 4} more)" if len(diff) > 4 else "")
            raise CheckpointError(f"{checkpoint} is not the {what} checkpoint {where} was exported from: "
                                  f"its model config differs in {shown}")


def _as_json(d: Mapping) -> dict:
    return json.loads(json.dumps(dict(d), default=_plain))


def init_checkpoint(preset: str, out: str | Path, seed: int = 0, num_classes: int | None = None) -> Path:
    """A randomly initialised model of ``preset`` saved in adafocus's format (BatchNorm statistics set on
    random frames, see :func:`set_batchnorm_statistics`)."""
    torch.manual_seed(seed)
    model = build_model(preset_config(preset, num_classes))
    set_batchnorm_statistics(model, seed)
    return save(model, out, preset=preset, extra={"training": {"kind": "random-init", "seed": seed}})


@torch.no_grad()
def set_batchnorm_statistics(model: torch.nn.Module, seed: int = 0, batch: int = 2) -> torch.nn.Module:
    """Give a randomly initialised model the BatchNorm running statistics of its own activations on random
    frames. Fresh BatchNorm layers (mean 0, var 1) shrink a random network's activations layer by layer until
    the policy sees zeros and every box is the same; with matching statistics, a random-weight model makes
    varied, data-dependent decisions, which is what export checks and runtime tests need."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calls below
    model.train()
    s, p, k = cfg.frame_size, cfg.patch_size, cfg.num_focus
    frames = torch.randn(batch, cfg.num_glance, 3, s, s, generator=g)
    fmap, vec, _, context = model.glance(frames)
    model.policy(fmap, vec)
    if cfg.family == "base":
        patches = torch.randn(batch * 2, 3, p, p, generator=g)
        state = torch.zeros(batch * 2, cfg.mlp_dim)
        model.local(patches, state, context.repeat(2, 1), torch.zeros(batch * 2, dtype=torch.long))
    else:
        model.local(torch.randn(batch, k, 3, p, p, generator=g), context)
    for m, momentum in zip(bns, saved, strict=True):
        m.momentum = momentum
    return model.eval()


def _infer_classes(state: dict[str, torch.Tensor]) -> int:
    for key in CLASS_KEYS:
        if key in state:
            if state[key].ndim == 0:
                raise CheckpointError(f"checkpoint weight {key} is a scalar: cannot read the number of classes")
            return int(state[key].shape[0])
    raise CheckpointError("cannot infer the number of classes from the checkpoint; pass --num-classes")


def _check_preset(cfg: ModelConfig, saved: str | None, preset: str, path) -> None:
    if saved is not None and saved != preset:
        raise CheckpointError(f"{path} is a checkpoint for preset {saved!r}, not {preset!r}")
    want = get_preset(preset).config.to_dict()
    have = cfg.to_dict()
    diff = [k for k in want if k not in ("num_classes", "labels") and want[k] != have.get(k)]
    if diff:
        raise CheckpointError(f"{path} does not match preset {preset!r} (differs in {', '.join(diff)})")

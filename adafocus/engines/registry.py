"""Engine registry: names -> engine classes, availability, and ``'auto'`` resolution per device.

Built-in engines (the name says the backend and, where it matters, the execution provider):

============== ==================================================== ==========
name           what runs the graph                                   devices
============== ==================================================== ==========
ort            onnxruntime: CPU EP on cpu; best GPU EP on cuda       cpu, cuda
ort-cuda       onnxruntime CUDA execution provider                   cuda
ort-tensorrt   onnxruntime TensorRT execution provider (+ CUDA)      cuda
tensorrt       native TensorRT ``.engine`` files                     cuda
torch          a PyTorch ``nn.Module`` (the reference model's stage) cpu, cuda
============== ==================================================== ==========

``resolve_engine('auto', device)`` picks, in order: cuda: tensorrt > ort-tensorrt > ort-cuda > torch;
cpu: ort. Built-in modules are imported on first use, so importing this module costs nothing and never
imports torch (the torch engine imports torch only when it is created).
"""

from __future__ import annotations

import difflib
import importlib
import logging
from typing import Any

from adafocus.device import parse_device, require_device
from adafocus.engines.base import Engine
from adafocus.errors import EngineError

log = logging.getLogger(__name__)

_REGISTRY: dict[str, type[Engine]] = {}
_BUILTIN_MODULES = (
    "adafocus.engines.ort",
    "adafocus.engines.tensorrt",
    "adafocus.engines.torch_engine",
)
_builtins_loaded = False

# Preference order of 'auto' per device kind; the first available engine wins.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("tensorrt", "ort-tensorrt", "ort-cuda", "torch"),
    "cpu": ("ort",),
}


def register_engine(name: str):
    """Class decorator: make ``cls`` creatable as ``create_engine(name, ...)``.

    >>> @register_engine("my-backend")
    ... class MyEngine(Engine): ...
    """

    def decorator(cls: type[Engine]) -> type[Engine]:
        if not (isinstance(cls, type) and issubclass(cls, Engine)):
            raise TypeError(f"register_engine({name!r}) expects an Engine subclass, got {cls!r}")
        other = _REGISTRY.get(name)
        if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
            raise ValueError(f"engine name {name!r} is already taken by {other.__module__}.{other.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def engine_names() -> list[str]:
    """Every registered engine name, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_engine_class(name: str) -> type[Engine]:
    """The class registered as ``name``; EngineError with a suggestion for unknown names."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = sorted(_REGISTRY) + ["auto"]
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise EngineError(f"unknown engine {name!r}: {hint}known engines: {', '.join(known)}") from None


def available_engines(device: str = "cpu") -> dict[str, str | None]:
    """Every engine name -> None if it can run on ``device`` here, else the reason it cannot."""
    device = str(parse_device(device))
    _load_builtins()
    out: dict[str, str | None] = {}
    for name in sorted(_REGISTRY):
        try:
            out[name] = _REGISTRY[name].availability(device)
        except Exception as exc:  # an availability probe must never take the registry down
            out[name] = f"availability check failed: {exc}"
    return out


def resolve_engine(name: str = "auto", device: str = "cpu") -> str:
    """Turn ``name`` (or ``'auto'``) into a concrete engine name that can run on ``device`` here.

    ``'auto'`` takes the first available of ``AUTO_ORDER[device kind]`` and logs which it took and why
    the better ones were skipped. A concrete name is checked: EngineError if unknown or unavailable.
    ``device`` is parsed (ConfigError if malformed) and engines see its canonical form (``cpu``, ``cuda:N``).
    """
    dev = parse_device(device)
    kind, device = dev.kind, str(dev)
    if name != "auto":
        cls = get_engine_class(name)
        reason = cls.availability(device)
        if reason is not None:
            raise EngineError(f"engine {name!r} cannot run on {device}: {reason}")
        return name
    _load_builtins()
    skipped: list[str] = []
    for candidate in AUTO_ORDER[kind]:
        cls = _REGISTRY.get(candidate)
        if cls is None:
            continue
        reason = cls.availability(device)
        if reason is None:
            note = f" (skipped: {'; '.join(skipped)})" if skipped else ""
            log.info("engine auto -> %s on %s%s", candidate, device, note)
            return candidate
        skipped.append(f"{candidate}: {reason}")
    raise EngineError(f"no engine can run on {device}: " + "; ".join(skipped))


def create_engine(name: str, path: str | None = None, device: str = "cpu", **options: Any) -> Engine:
    """Create and activate an engine.

    ``name``: a registered name or ``'auto'`` (see ``resolve_engine``). ``path``: the model file
    (``.onnx`` for ort engines, ``.engine`` for tensorrt); the torch engine takes ``module=``,
    ``input_names=``, ``output_names=`` instead. ``options`` go to the engine class (see its docstring).
    ``device`` is parsed once here (ConfigError if malformed) and passed on in its canonical form; a CUDA
    device this machine does not have fails (EngineError) before any engine is picked.
    """
    device = str(require_device(device))
    concrete = resolve_engine(name, device)
    cls = _REGISTRY[concrete]
    if path is not None:
        options["path"] = path
    try:
        engine = cls(device=device, **options)
    except TypeError as exc:
        raise EngineError(f"engine {concrete!r}: bad options ({exc})") from exc
    return engine.activate()

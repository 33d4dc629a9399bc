"""Engines: one protocol (``Engine``) and a registry of backends that run one model stage each.

    >>> from adafocus.engines import create_engine, resolve_engine
    >>> engine = create_engine(resolve_engine("auto", "cpu"), "bundle/global.onnx", device="cpu")
    >>> outputs = engine.run({"frames": frames})            # dict name -> numpy array

Backends (``ort``, ``ort-cuda``, ``ort-tensorrt``, ``tensorrt``, ``torch``) load on first use; importing
this package imports neither torch nor TensorRT.
"""

from adafocus.engines.base import Engine, TensorSpec, cuda_device_count, cuda_device_info, parse_device
from adafocus.engines.registry import (
    AUTO_ORDER,
    available_engines,
    create_engine,
    engine_names,
    get_engine_class,
    register_engine,
    resolve_engine,
)
from adafocus.errors import EngineError

__all__ = [
    "AUTO_ORDER",
    "Engine",
    "EngineError",
    "TensorSpec",
    "available_engines",
    "create_engine",
    "cuda_device_count",
    "cuda_device_info",
    "engine_names",
    "get_engine_class",
    "parse_device",
    "register_engine",
    "resolve_engine",
]

"""Split export: a checkpoint -> per-stage ONNX files (+ TensorRT engines) and a manifest, verified.

    >>> from adafocus.export import export_bundle
    >>> result = export_bundle("model.pt", "model_bundle", precision="fp16")

Needs the ``export`` extra (torch, onnx). Submodules are imported lazily, so that the torch-free ones
(``readiness``) work on an edge install.
"""

from __future__ import annotations

_LAZY = {
    "export_bundle": "adafocus.export.exporter",
    "build_engines": "adafocus.export.exporter",
    "ExportResult": "adafocus.export.exporter",
    "ExportError": "adafocus.export.onnx_export",
    "VerificationError": "adafocus.export.verify",
    "verify_bundle": "adafocus.export.verify",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adafocus.export' has no attribute {name!r}")

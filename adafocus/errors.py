"""Typed user-facing errors. The CLI turns any of these into one line on stderr and exit code 1."""

from __future__ import annotations


class AdaFocusError(Exception):
    """Base class of every error a user can cause (bad file, bad argument, missing extra)."""


class CheckpointError(AdaFocusError):
    """A checkpoint cannot be read or does not fit the model."""


class BundleError(AdaFocusError):
    """An exported bundle is missing, incomplete, tampered with or of another version."""


class VideoError(AdaFocusError):
    """A video cannot be opened or decoded."""


class BudgetError(AdaFocusError):
    """A compute budget is malformed or too small."""


class EngineError(AdaFocusError):
    """An engine cannot be created or run."""


class ConfigError(AdaFocusError, ValueError):
    """A model config, preset, option or device string is invalid (also a ValueError, for callers that
    catch that)."""


class DataError(AdaFocusError):
    """A labelled data set (videos + labels CSV) is missing or malformed."""


class MissingDependency(AdaFocusError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, extra: str, purpose: str = ""):
    """Import an optional dependency lazily, or raise MissingDependency naming the pip extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        what = f" for {purpose}" if purpose else ""
        raise MissingDependency(
            f"'{module}' is needed{what} but is not installed: pip install 'adafocus[{extra}]'"
        ) from exc

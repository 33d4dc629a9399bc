"""PyTorch reference of Uni-AdaFocus: backbones, policy, classifier, presets, checkpoints, FLOPs.

Needs the ``export`` extra (torch). The runtime never imports this package.
"""

from adafocus.models import uniadafocus
from adafocus.models.config import ModelConfig
from adafocus.models.uniadafocus import UniAdaFocus

__all__ = ["ModelConfig", "UniAdaFocus", "build_model", "load", "save", "init_checkpoint"]


def build_model(cfg: ModelConfig):
    """The reference model for a config's family (base, tsm, x3d)."""
    if cfg.family == "x3d":
        from adafocus.models.x3d import UniAdaFocusX3D

        return UniAdaFocusX3D(cfg)
    return uniadafocus.build_model(cfg)


def __getattr__(name):  # checkpoint helpers, imported lazily
    if name in ("load", "save", "init_checkpoint"):
        from adafocus.models import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(name)

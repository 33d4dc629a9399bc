"""PyTorch reference of Uni-AdaFocus: backbones, policy, classifier, presets, checkpoints, FLOPs.

Needs the ``export`` extra (torch). The runtime never imports this package.
"""

from adafocus.models.config import ModelConfig
from adafocus.models.uniadafocus import UniAdaFocus, build_model

__all__ = ["ModelConfig", "UniAdaFocus", "build_model", "load", "save", "init_checkpoint"]


def __getattr__(name):  # checkpoint helpers, imported lazily
    if name in ("load", "save", "init_checkpoint"):
        from adafocus.models import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(name)

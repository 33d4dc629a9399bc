"""Named model configurations: upstream's published ones, and ``tiny`` for the demo and the tests."""

from __future__ import annotations

from dataclasses import dataclass

from adafocus.errors import AdaFocusError
from adafocus.models.config import ModelConfig


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: ModelConfig

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "config": self.config.to_dict()}


_PRESETS: dict[str, Preset] = {}


def register(name: str, description: str, config: ModelConfig) -> None:
    _PRESETS[name] = Preset(name, description, config)


for _p in (96, 128, 160, 192):
    register(f"base-p{_p}", f"Uni-AdaFocus (ActivityNet/FCVID/Mini-Kinetics): MobileNetV2 + ResNet-50, 48 "
             f"candidates, 16 glance + 16 focus, patch {_p}, 17 exits; 200 classes",
             ModelConfig(family="base", num_classes=200, patch_size=_p))

for _p, _k in ((96, 8), (96, 12), (128, 12), (128, 16)):
    register(f"tsm-p{_p}-8x{_k}", f"Uni-AdaFocus-TSM (Something-Something/Jester): TSM-MobileNetV2 + "
             f"TSM-ResNet-50, 8 glance + {_k} focus of {3 * _k} candidates, patch {_p}, 2 exits; 174 classes",
             ModelConfig(family="tsm", num_classes=174, num_segments=3 * _k, num_glance=8, num_focus=_k,
                         patch_size=_p, dropout=0.5, fc_dropout=0.5))

register("x3d-p128-16x32", "Uni-AdaFocus-X3D (Kinetics-400): X3D-S glance on 16 frames at 160 px + X3D-L on 32 "
         "patches (one box a view) of 96 candidates, patch 128, 2 exits; 400 classes",
         ModelConfig(family="x3d", num_classes=400, glance_size=160, num_segments=96, num_glance=16, num_focus=32,
                     patch_size=128, glance_arch="x3d_s", local_arch="x3d_l", dropout=0.5, fc_dropout=0.5))

register("x3d-tiny", "test model of the X3D family: tiny X3Ds (8..64 channels, 7 blocks) on 96 px frames, glance "
         "4 frames at 64 px, 4 patches of 64 px (boxes 48..96) from 12 candidates; 2 exits; 5 classes",
         ModelConfig(family="x3d", num_classes=5, frame_size=96, resize_size=110, glance_size=64, num_segments=12,
                     num_glance=4, num_focus=4, patch_size=64, crop_min=48, crop_max=96, glance_arch="x3d_tiny",
                     local_arch="x3d_tiny", stn_hidden_dim=16, temporal_hidden_dim=8, dropout=0.5, fc_dropout=0.5))

register("tiny", "demo/test model: MobileNetV2-0.25 glance at 64 px + ResNet-18/16 on 64 px patches, 16 "
         "candidates, 8 glance + 8 focus, frames 128 px; about 11 MFLOPs a step; 10 classes",
         ModelConfig(family="base", num_classes=10, frame_size=128, resize_size=128, glance_size=64,
                     num_segments=16, num_glance=8, num_focus=8, patch_size=64, crop_min=48, crop_max=96,
                     glance_width=0.25, glance_last_channel=256, local_arch="resnet18", local_width=16,
                     stn_hidden_dim=32, temporal_hidden_dim=16, mlp_dim=256, dropout=0.1, fc_dropout=0.1))


def list_presets() -> list[Preset]:
    return list(_PRESETS.values())


def get_preset(name: str) -> Preset:
    if name not in _PRESETS:
        import difflib

        close = difflib.get_close_matches(name, _PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise AdaFocusError(f"unknown preset {name!r}{hint}; known: {', '.join(_PRESETS)}")
    return _PRESETS[name]


def preset_config(name: str, num_classes: int | None = None) -> ModelConfig:
    cfg = get_preset(name).config
    return cfg.replace(num_classes=num_classes) if num_classes else cfg.replace()

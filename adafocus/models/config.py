"""The one dataclass that describes a Uni-AdaFocus model: architecture, sampling and crop arithmetic."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from adafocus.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FAMILIES = ("base", "tsm", "x3d")
# X3D variants the x3d family builds (adafocus.models.x3d.X3D_ARCHS holds their width/depth factors)
X3D_ARCH_NAMES = ("x3d_s", "x3d_l", "x3d_tiny")


@dataclass
class ModelConfig:
    """Everything needed to build a model and to feed it, and nothing about weights.

    ``base`` is the ActivityNet/FCVID/Mini-Kinetics design: N candidate frames, every (N/Tg)-th one glanced,
    K focus frames drawn from the temporal policy, one patch per focus frame, one exit per step.
    ``tsm`` is the Something-Something/Jester design: one crop per video and two exits (glance, full).
    ``x3d`` is the Kinetics-400 design: X3D-S glance on Tg frames resized to ``glance_size``, X3D-L on K
    patches of one box per video (view), drawn from ``num_segments`` candidates sampled apart from the glance
    frames; two exits. ``glance_arch`` / ``local_arch`` name the X3D variants (``x3d_s``, ``x3d_l``,
    ``x3d_tiny``).
    """

    family: str = "base"
    num_classes: int = 200
    # frames and sampling
    frame_size: int = 224  # side of the square centre crop that both encoders see
    resize_size: int = 256  # shorter side the decoded frame is resized to before the centre crop
    glance_size: int = 224  # side the glance encoder sees (== frame_size upstream; smaller = downsampled)
    num_segments: int = 48  # N candidate frames sampled from the video (TSN segment centres)
    num_glance: int = 16  # Tg frames the global encoder sees
    num_focus: int = 16  # K focus frames, one local step each (base)
    patch_size: int = 128  # P: side of the patch the local encoder sees
    crop_min: float = 96.0  # smallest crop-box side in frame pixels (upstream hard-codes 96)
    crop_max: float = 224.0  # largest crop-box side in frame pixels (upstream hard-codes 224)
    # global encoder (MobileNetV2)
    glance_arch: str = "mobilenet_v2"
    glance_width: float = 1.0
    glance_last_channel: int | None = None  # None: MobileNetV2's own rule (1280 for width <= 1)
    # local encoder (ResNet v1.5)
    local_arch: str = "resnet50"
    local_width: int = 64  # channels of the stem / first stage (64 = torchvision)
    # policy and classifier
    stn_hidden_dim: int = 128
    temporal_hidden_dim: int = 64
    mlp_dim: int = 4096
    temperature: float = 1.0
    dropout: float = 0.2
    fc_dropout: float = 0.2
    shift_div: int = 8  # TSM: 1/shift_div of the channels move each way
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.validate()

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        errors = []
        if self.family not in FAMILIES:
            errors.append(f"family must be one of {FAMILIES}, not {self.family!r}")
        if self.num_classes < 1:
            errors.append("num_classes must be >= 1")
        small = [k for k in ("frame_size", "resize_size", "num_segments", "num_glance", "num_focus", "patch_size",
                             "local_width", "stn_hidden_dim", "temporal_hidden_dim", "mlp_dim", "shift_div")
                 if getattr(self, k) < 1]
        if small:
            errors.append(f"{', '.join(small)} must be >= 1")
        if self.glance_last_channel is not None and self.glance_last_channel < 1:
            errors.append("glance_last_channel must be >= 1 (or null)")
        if not self.glance_width > 0:
            errors.append("glance_width must be positive")
        for k in ("dropout", "fc_dropout"):
            if not 0 <= getattr(self, k) <= 1:
                errors.append(f"{k} must lie in [0, 1]")
        if self.family == "x3d":
            bad = [a for a in (self.glance_arch, self.local_arch) if a not in X3D_ARCH_NAMES]
            if bad:
                errors.append(f"the x3d family builds {', '.join(X3D_ARCH_NAMES)}, not {', '.join(map(repr, bad))}")
        if self.family == "base" and self.num_glance >= 1 and self.num_segments % self.num_glance:
            errors.append("num_segments must be a multiple of num_glance")
        if self.num_focus > self.candidates:
            errors.append("num_focus cannot exceed the number of candidate frames")
        if self.glance_size % 32 or self.glance_size < 32:
            errors.append("glance_size must be a positive multiple of 32")
        if not (0 < self.crop_min <= self.crop_max <= self.frame_size):
            errors.append("need 0 < crop_min <= crop_max <= frame_size")
        if self.labels and len(self.labels) != self.num_classes:
            errors.append(f"{len(self.labels)} labels for {self.num_classes} classes")
        if errors:
            raise ConfigError("invalid model config: " + "; ".join(errors))

    @property
    def candidates(self) -> int:
        """Candidate frames the focus frames are drawn from (base, x3d: the N loaded; tsm: 3K)."""
        return 3 * self.num_focus if self.family == "tsm" else self.num_segments

    @property
    def feature_size(self) -> int:
        """Side of the glance feature map (stride 32)."""
        return self.glance_size // 32

    @property
    def num_exits(self) -> int:
        return self.num_focus + 1 if self.family == "base" else 2

    @property
    def patches_per_step(self) -> int:
        """Patches the local engine consumes per step: 1 (base) or all K at once (tsm, x3d)."""
        return 1 if self.family == "base" else self.num_focus

    def label_names(self) -> list[str]:
        return list(self.labels) if self.labels else [f"class_{i}" for i in range(self.num_classes)]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """A config from JSON (a checkpoint's or a manifest's): typed, unknown keys refused with the key path."""
        from adafocus.schema import read_record

        return read_record(cls, d, "config")

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

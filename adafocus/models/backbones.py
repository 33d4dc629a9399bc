"""Backbones written here with torchvision/tonylins parameter names, so upstream state_dicts map onto them.

- ``MobileNetV2``: the tonylins layout used by Uni-AdaFocus (``features.0..18`` + ``classifier``).
- ``ResNet``: torchvision ResNet v1.5 (stride on the 3x3 conv), with an optional width for tiny models.
- ``TemporalShift``: TSM's shift built from concatenated slices (no in-place writes, so it traces right);
  it wraps a conv as ``.net``, which is where upstream TSM checkpoints get their ``.net.`` keys.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from adafocus.errors import ConfigError


def make_divisible(value: float, divisor: int = 8) -> int:
    return int(((value + divisor / 2) // divisor) * divisor) if value >= divisor else divisor


# ---------------------------------------------------------------------------------------- TSM shift
def temporal_shift(x: torch.Tensor, n_segment: int, fold_div: int = 8) -> torch.Tensor:
    """Shift 1/fold_div of the channels one frame back, 1/fold_div one frame forward, the rest stay."""
    nt, c, h, w = x.shape
    x = x.view(nt // n_segment, n_segment, c, h, w)
    fold = c // fold_div
    zeros = x[:, :1, :fold] * 0
    back = torch.cat([x[:, 1:, :fold], zeros], dim=1)  # frame t sees frame t+1
    fwd = torch.cat([zeros, x[:, :-1, fold : 2 * fold]], dim=1)  # frame t sees frame t-1
    out = torch.cat([back, fwd, x[:, :, 2 * fold :]], dim=2)
    return out.view(nt, c, h, w)


class TemporalShift(nn.Module):
    """Applies :func:`temporal_shift` to the input, then the wrapped module ``net``."""

    def __init__(self, net: nn.Module, n_segment: int, fold_div: int = 8):
        super().__init__()
        self.net = net
        self.n_segment = n_segment
        self.fold_div = fold_div

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(temporal_shift(x, self.n_segment, self.fold_div))


# -------------------------------------------------------------------------------------- MobileNetV2
def _conv_bn(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(oup), nn.ReLU6(inplace=True)
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """tonylins MobileNetV2: the stem always has 32 channels; width scales the expanded blocks."""

    # (expansion t, channels c, repeats n, stride s)
    SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
               (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, width_mult: float = 1.0, last_channel: int | None = None, num_classes: int = 0):
        super().__init__()
        inp = 32
        if last_channel is None:
            last_channel = make_divisible(1280 * width_mult) if width_mult > 1.0 else 1280
        self.last_channel = last_channel
        blocks: list[nn.Module] = [_conv_bn(3, inp, 3, 2)]
        for t, c, n, s in self.SETTING:
            out = make_divisible(c * width_mult) if t > 1 else c
            for i in range(n):
                blocks.append(InvertedResidual(inp, out, s if i == 0 else 1, t))
                inp = out
        blocks.append(_conv_bn(inp, last_channel, 1, 1))
        self.features = nn.Sequential(*blocks)
        # the ImageNet head is only built when asked for: Uni-AdaFocus never uses it
        self.classifier = nn.Linear(last_channel, num_classes) if num_classes else None
        _init_weights(self)

    def get_featmap(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.features(x)
        return fmap, fmap.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_featmap(x)[1]


def add_mobilenet_shift(model: MobileNetV2, n_segment: int, fold_div: int = 8) -> None:
    """TSM for MobileNetV2: shift before ``conv[0]`` of residual blocks with an expansion (8-layer conv)."""
    for block in model.features:
        if isinstance(block, InvertedResidual) and block.use_res_connect and len(block.conv) == 8:
            block.conv[0] = TemporalShift(block.conv[0], n_segment, fold_div)


# ------------------------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: stride on the 3x3
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


RESNETS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
           "resnet50": (Bottleneck, (3, 4, 6, 3))}


class ResNet(nn.Module):
    """torchvision ResNet v1.5; ``width`` is the stem's channel count (64 = torchvision)."""

    def __init__(self, arch: str = "resnet50", width: int = 64, num_classes: int = 0):
        super().__init__()
        if arch not in RESNETS:
            raise ConfigError(f"unknown ResNet {arch!r}; known: {', '.join(RESNETS)}")
        block, layers = RESNETS[arch]
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0], 1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2)
        self.feature_dim = width * 8 * block.expansion
        self.fc = nn.Linear(self.feature_dim, num_classes) if num_classes else None
        _init_weights(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def get_featmap(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def get_featvec(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_featmap(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_featvec(x)


def add_resnet_shift(model: ResNet, n_segment: int, fold_div: int = 8) -> None:
    """TSM 'blockres': shift before ``conv1`` of every residual block."""
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            block.conv1 = TemporalShift(block.conv1, n_segment, fold_div)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)

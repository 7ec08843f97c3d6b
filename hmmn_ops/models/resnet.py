"""A ResNet of our own with torchvision's parameter names, so torchvision checkpoints load.

``ResNet(BackboneConfig())`` is torchvision's ResNet-50 (v1.5: stride on the 3x3 conv) cut
after ``layer3`` (1/16, 1024 channels), which is all STM-family encoders use; give four
stages and ``num_classes`` for the whole network. ``BackboneConfig`` makes depth, block and
width explicit and serialisable, so small variants for CPU and synthetic training are one
line: ``BackboneConfig(block="bottleneck", layers=(1, 1, 1), width=16)``.
"""
import dataclasses

from torch import nn

__all__ = ["BackboneConfig", "BACKBONES", "ResNet", "backbone_config"]


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """block: "bottleneck" (expansion 4) or "basic" (expansion 1); layers: blocks per stage
    (torchvision layer1, layer2, ...); width: channels of the stem, doubled at every stage."""

    block: str = "bottleneck"
    layers: tuple = (3, 4, 6)
    width: int = 64

    def __post_init__(self):
        if self.block not in ("bottleneck", "basic"):
            raise ValueError(f"BackboneConfig.block: expected 'bottleneck' or 'basic', got {self.block!r}")
        layers = tuple(int(n) for n in self.layers)
        if not 1 <= len(layers) <= 4 or min(layers) < 1:
            raise ValueError(f"BackboneConfig.layers: expected 1 to 4 positive block counts, got {self.layers!r}")
        if int(self.width) < 1:
            raise ValueError(f"BackboneConfig.width: expected a positive int, got {self.width!r}")
        object.__setattr__(self, "layers", layers)  # lists from JSON become tuples
        object.__setattr__(self, "width", int(self.width))

    @property
    def expansion(self):
        return 4 if self.block == "bottleneck" else 1

    def channels(self, stage):
        """Output channels of stage `stage` (1 = layer1, at 1/4 resolution)."""
        return self.width * 2 ** (stage - 1) * self.expansion


# Named variants. resnet50 (to layer3) is the released HMMN encoder; the small ones train on a CPU.
BACKBONES = {
    "resnet50": BackboneConfig("bottleneck", (3, 4, 6), 64),
    "resnet18": BackboneConfig("basic", (2, 2, 2), 64),
    "small": BackboneConfig("bottleneck", (1, 1, 1), 32),
    "tiny": BackboneConfig("bottleneck", (1, 1, 1), 8),
}


def backbone_config(backbone):
    """A BackboneConfig from a name in BACKBONES, a dict of its fields, or a BackboneConfig."""
    if isinstance(backbone, BackboneConfig):
        return backbone
    if isinstance(backbone, str):
        if backbone not in BACKBONES:
            raise ValueError(f"backbone: expected one of {sorted(BACKBONES)} or a BackboneConfig, got {backbone!r}")
        return BACKBONES[backbone]
    if isinstance(backbone, dict):
        return BackboneConfig(**backbone)
    raise ValueError(f"backbone: expected a name, a dict or a BackboneConfig, got {type(backbone).__name__}")


def _conv(cin, cout, k, stride=1):
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = _conv(cin, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = _conv(cin, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, stride)  # v1.5: the stride sits on the 3x3 conv
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, planes * 4, 1)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """conv1 (7x7/2) - bn1 - relu - maxpool (3x3/2) - layer1 .. layerN [- avgpool - fc].

    ``forward`` returns the output of every stage: [layer1 (1/4), layer2 (1/8), ...].
    """

    def __init__(self, config=None, num_classes=None):
        super().__init__()
        self.config = config = backbone_config(config if config is not None else "resnet50")
        block = Bottleneck if config.block == "bottleneck" else BasicBlock
        w = config.width
        self.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = w
        for i, blocks in enumerate(config.layers):
            planes, stride = w * 2 ** i, 1 if i == 0 else 2
            downsample = None
            if stride != 1 or cin != planes * block.expansion:
                downsample = nn.Sequential(_conv(cin, planes * block.expansion, 1, stride),
                                           nn.BatchNorm2d(planes * block.expansion))
            layers = [block(cin, planes, stride, downsample)]
            cin = planes * block.expansion
            layers += [block(cin, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.num_stages = len(config.layers)
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def stages(self):
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for stage in self.stages():
            x = stage(x)
            outs.append(x)
        return outs


def init_weights(module):
    """torchvision's initialisation: Kaiming-normal (fan_out) convs, BatchNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


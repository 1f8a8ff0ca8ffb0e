"""Models of the course (chapter 1 introduces `small_cnn`, chapter 4 the guide `resnet18`).

Every model takes images in [0, 1] (no normalisation layer) and returns logits. All use adaptive
average pooling, so the same definition runs on 32×32 (CIFAR) and 64×64 (Tiny ImageNet) inputs.

| name               | role                                   | parameters (10 classes) |
|--------------------|----------------------------------------|-------------------------|
| `small_cnn`        | fast CPU teaching model                | 35,962                  |
| `preact_resnet18`  | target (PreActResNet-18)               | 11,171,146              |
| `resnet18`         | guide: LBGAT/D2R ResNet18_cifar        | 11,173,962              |
| `resnet18_standard`| CIFAR ResNet-18 with layer2 stride 2   | 11,173,962              |
| `wrn34_10`         | target of the paper (WRN-34-10)        | 46,160,474              |

`resnet18` follows the official guide: its layer2 keeps stride 1 (maps 32→32→16→8), about 3× the
compute of the usual CIFAR ResNet-18, which is available as `resnet18_standard`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import validate

__all__ = [
    "SmallCNN", "ResNet18", "PreActResNet18", "WideResNet", "MODELS", "build_model",
    "count_parameters",
]


# -------------------------------------------------------------------------------------------- small
class SmallCNN(nn.Module):
    """Five 3×3 convolutions with BatchNorm, three max-pools, one linear layer: fast on a laptop
    CPU."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.linear = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.linear(self.features(x))


# ---------------------------------------------------------------------------------------- ResNet-18
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (3×3 stem, no max-pool). `layer2_stride=1` is the official guide
    (ResNet18_cifar)."""

    def __init__(self, num_classes: int = 10, layer2_stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cfg = [(64, 1), (128, layer2_stride), (256, 2), (512, 2)]
        layers, cin = [], 64
        for cout, stride in cfg:
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


# ---------------------------------------------------------------------------------- PreActResNet-18
class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreActResNet-18 as in the official code (no BatchNorm after the last block)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


# ---------------------------------------------------------------------------------------- WRN-34-10
class WideBlock(nn.Module):
    def __init__(self, cin, cout, stride, drop_rate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal = cin == cout
        self.shortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.equal else self.shortcut(out)
        out = F.relu(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    """WideResNet (TRADES/LBGAT variant) without the official code's unused `sub_block1`."""

    def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10,
                 drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4 (e.g. 28, 34); got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks = []
        for i, stride in enumerate([1, 2, 2]):
            cin, cout = widths[i], widths[i + 1]
            blocks.append(nn.Sequential(*[WideBlock(cin if j == 0 else cout, cout,
                                                    stride if j == 0 else 1, drop_rate)
                                          for j in range(n)]))
        self.block1, self.block2, self.block3 = blocks
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


MODELS = {
    "small_cnn": lambda num_classes: SmallCNN(num_classes),
    "preact_resnet18": lambda num_classes: PreActResNet18(num_classes),
    "resnet18": lambda num_classes: ResNet18(num_classes, layer2_stride=1),
    "resnet18_standard": lambda num_classes: ResNet18(num_classes, layer2_stride=2),
    "wrn34_10": lambda num_classes: WideResNet(34, 10, num_classes),
}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """Build a freshly initialised model by name (see MODELS). Chapter 1."""
    validate.choice("name", name, MODELS)
    validate.number("num_classes", num_classes, min=2, integer=True)
    return MODELS[name](num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

"""Reference models. Each class records its constructor arguments in ``init_kwargs`` so that a
checkpoint can rebuild it (and then its pruned shapes) without pickling code."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..core.errors import ConfigError
from ._base import _Recorded

__all__ = ["LeNet300", "LeNet5", "SmallResNet", "SmallMobileNet", "build_model", "MODELS"]


class LeNet300(_Recorded):
    """LeNet-300-100: 784-300-100-10 fully connected net (LeCun et al. 1998)."""

    def __init__(self, num_classes: int = 10, in_features: int = 784):
        super().__init__()
        self._record(num_classes=num_classes, in_features=in_features)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(self.flatten(x))))))


class LeNet5(_Recorded):
    """Caffe LeNet-5: conv20-5x5, pool, conv50-5x5, pool, fc500, fc10 (431k parameters) on 1x28x28."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0):
        super().__init__()
        self._record(num_classes=num_classes, in_channels=in_channels, width=width)
        c1, c2, f1 = max(1, round(20 * width)), max(1, round(50 * width)), max(1, round(500 * width))
        self.conv1 = nn.Conv2d(in_channels, c1, 5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * 4 * 4, f1)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(f1, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(_Recorded):
    """CIFAR-style ResNet with BasicBlocks (residual adds), for 28x28 or 32x32 inputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 widths: tuple[int, ...] = (32, 64, 128), blocks: tuple[int, ...] = (2, 2, 2)):
        super().__init__()
        self._record(num_classes=num_classes, in_channels=in_channels, widths=list(widths), blocks=list(blocks))
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, residual add when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.use_residual else out


class SmallMobileNet(_Recorded):
    """A small MobileNetV2-style net (depthwise convs, inverted residuals)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, expand: int = 4):
        super().__init__()
        self._record(num_classes=num_classes, in_channels=in_channels, width=width, expand=expand)
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(w, w, 1, expand),
            InvertedResidual(w, 2 * w, 2, expand),
            InvertedResidual(2 * w, 2 * w, 1, expand),
            InvertedResidual(2 * w, 4 * w, 2, expand),
            InvertedResidual(4 * w, 4 * w, 1, expand),
        )
        self.head = nn.Sequential(nn.Conv2d(4 * w, 8 * w, 1, bias=False), nn.BatchNorm2d(8 * w), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.head(self.blocks(self.stem(x))))))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300": LeNet300,
    "lenet5": LeNet5,
    "resnet_small": SmallResNet,
    "mobilenet_small": SmallMobileNet,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a built-in model by name (``lenet300``, ``lenet5``, ``resnet_small``, ``mobilenet_small``)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; built-in models: {sorted(MODELS)}")
    return MODELS[name](**kwargs)

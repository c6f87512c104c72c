"""A zoo of real architecture shapes, written small (``width``, ``depth`` and input sizes are configurable):
ResNet-18/50, MobileNetV2/V3, EfficientNet, DenseNet, ConvNeXt, UNet, ViT, TCN, LSTM and GRU classifiers
and a grouped conv fed by a concatenation. Every model records its constructor arguments for checkpoints.

``ZOO`` maps a name to a :class:`ZooEntry`: the class, the input shape of one sample and the kind of model.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import BasicBlock, _Recorded

__all__ = ["ResNet18", "ResNet50", "MobileNetV2", "MobileNetV3", "EfficientNet", "DenseNet", "ConvNeXt", "UNet",
           "ViT", "TCN", "RNNClassifier", "GroupedCatNet", "ZooEntry", "ZOO"]


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: Callable[[], nn.Module] = nn.ReLU
         ) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         act())


class _Classifier(_Recorded):
    """features -> global average pool -> Linear."""

    features: nn.Module
    fc: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class ResNet18(_Classifier):
    """ResNet-18 layout: 4 stages of BasicBlocks (``blocks`` each), widths ``width * (1, 2, 4, 8)``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16, blocks: int = 2):
        super().__init__()
        self._record(num_classes=num_classes, in_channels=in_channels, width=width, blocks=blocks)
        layers, cin = [_cbr(in_channels, width)], width
        for i, w in enumerate(width * m for m in (1, 2, 4, 8)):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if j == 0 and i > 0 else 1))
                cin = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), residual add."""

    def __init__(self, cin: int, mid: int, stride: int):
        super().__init__()
        cout = mid * 4
        self.body = nn.Sequential(_cbr(cin, mid, 1), _cbr(mid, mid, 3, stride),
                                  nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ResNet50(_Classifier):
    """ResNet-50 layout: Bottleneck stages with ``blocks`` = (3, 4, 6, 3) at full depth."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16,
                 blocks: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        self._record(num_classes=num_classes, in_channels=in_channels, width=width, blocks=list(blocks))
        layers, cin = [_cbr(in_channels, width)], width
        for i, n in enumerate(blocks):
            for j in range(n):
                layers.append(Bottleneck(cin, width * 2 ** i, 2 if j == 0 and i > 0 else 1))
                cin = width * 2 ** i * 4
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)


class SqueezeExcite(nn.Module):
    """Channel gating from globally pooled features (1x1 convs, so the channels stay traceable)."""

    def __init__(self, channels: int, squeeze: int, act: Callable[[], nn.Module], gate: Callable[[], nn.Module]):
        super().__init__()
        self.reduce, self.act = nn.Conv2d(channels, squeeze, 1), act()
        self.expand, self.gate = nn.Conv2d(squeeze, channels, 1), gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(F.adaptive_avg_pool2d(x, 1)))))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, optional SE, 1x1 project, residual when shapes allow."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, act: Callable[[], nn.Module],
                 se: Callable[[], nn.Module] | None = None):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        layers = [_cbr(cin, hidden, 1, act=act)] if expand != 1 else []
        layers.append(_cbr(hidden, hidden, k, stride, groups=hidden, act=act))
        if se is not None:
            layers.append(SqueezeExcite(hidden, max(4, cin // 4), nn.ReLU if act is nn.Hardswish else act, se))
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


def _mb_net(model: _Classifier, spec: list[tuple], in_channels: int, width: int, num_classes: int, head: int,
            act: Callable[[], nn.Module], se: Callable[[], nn.Module] | None) -> None:
    """spec: (expand, channels multiplier, repeats, stride, kernel, use SE)."""
    layers, cin = [_cbr(in_channels, width, act=act)], width
    for t, c, n, s, k, use_se in spec:
        for j in range(n):
            layers.append(MBConv(cin, width * c, k, s if j == 0 else 1, t, act, se if use_se else None))
            cin = width * c
    layers.append(_cbr(cin, width * head, 1, act=act))
    model.features = nn.Sequential(*layers)
    model.fc = nn.Linear(width * head, num_classes)


class MobileNetV2(_Classifier):
    """MobileNetV2: inverted residuals with ReLU6 and linear bottlenecks."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 8, depth: int = 2):
        super().__init__()
        self._record(num_classes=num_classes, in_channels=in_channels, width=width, depth=depth)
        spec = [(1, 1, 1, 1, 3, False), (6, 2, depth, 2, 3, False), (6, 4, depth, 2, 3, False),
                (6, 8, depth, 2, 3, False), (6, 12, depth, 1, 3, False)]
        _mb_net(self, spec, in_channels, width, num_classes, 40, nn.ReLU6, None)


class MobileNetV3(_Classifier):
    """MobileNetV3-like: hardswish, squeeze-excitation gated by hardsigmoid, 5x5 depthwise convs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 8, depth: int = 2):
        super().__init__()
        self._record(num_classes=num_classes, in_channels=in_channels, width=width, depth=depth)
        spec = [(1, 1, 1, 2, 3, True), (4, 2, depth, 2, 3, False), (3, 4, depth, 2, 5, True),
                (6, 8, depth, 1, 5, True)]
        _mb_net(self, spec, in_channels, width, num_classes, 24, nn.Hardswish, nn.Hardsigmoid)


class EfficientNet(_Classifier):
    """EfficientNet-like: MBConv blocks with squeeze-excitation and swish (SiLU)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 8, depth: int = 2):
        super().__init__()
        self._record(num_classes=num_classes, in_channels=in_channels, width=width, depth=depth)
        spec = [(1, 1, 1, 1, 3, True), (6, 2, depth, 2, 3, True), (6, 4, depth, 2, 5, True),
                (6, 8, depth, 2, 3, True)]
        _mb_net(self, spec, in_channels, width, num_classes, 32, nn.SiLU, nn.Sigmoid)


class DenseLayer(nn.Module):
    """BN-ReLU-1x1-BN-ReLU-3x3, its ``growth`` new channels concatenated to its input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False),
                                  nn.BatchNorm2d(4 * growth), nn.ReLU(), nn.Conv2d(4 * growth, growth, 3, 1, 1,
                                                                                   bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class DenseNet(_Classifier):
    """DenseNet-like: dense blocks (every layer reads the concatenation of all before it) and transitions."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, growth: int = 8, layers: int = 3,
                 blocks: int = 3):
        super().__init__()
        self._record(num_classes=num_classes, in_channels=in_channels, growth=growth, layers=layers, blocks=blocks)
        cin = 2 * growth
        parts: list[nn.Module] = [nn.Conv2d(in_channels, cin, 3, 1, 1, bias=False)]
        for b in range(blocks):
            for _ in range(layers):
                parts.append(DenseLayer(cin, growth))
                cin += growth
            if b < blocks - 1:
                parts += [nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cin // 2, 1, bias=False), nn.AvgPool2d(2)]
                cin //= 2
        parts += [nn.BatchNorm2d(cin), nn.ReLU()]
        self.features = nn.Sequential(*parts)
        self.fc = nn.Linear(cin, num_classes)


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW tensor (permute to channels-last and back)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise, then channels-last LayerNorm and an inverted MLP (Linear 4x, GELU, Linear), residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1, self.act, self.pw2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        return x + self.pw2(self.act(self.pw1(self.norm(y)))).permute(0, 3, 1, 2)


class ConvNeXt(_Classifier):
    """ConvNeXt-like: patchify stem, stages of ConvNeXt blocks, LayerNorm + 2x2 stride-2 downsampling."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16, depth: int = 2):
        super().__init__()
        self._record(num_classes=num_classes, in_channels=in_channels, width=width, depth=depth)
        dims = [width, 2 * width, 4 * width]
        parts: list[nn.Module] = [nn.Conv2d(in_channels, dims[0], 2, 2), ChannelsFirstLayerNorm(dims[0])]
        for i, d in enumerate(dims):
            if i:
                parts += [ChannelsFirstLayerNorm(dims[i - 1]), nn.Conv2d(dims[i - 1], d, 2, 2)]
            parts += [ConvNeXtBlock(d) for _ in range(depth)]
        parts.append(ChannelsFirstLayerNorm(dims[-1]))
        self.features = nn.Sequential(*parts)
        self.fc = nn.Linear(dims[-1], num_classes)


class UNet(_Recorded):
    """UNet: conv blocks, max-pool down, ConvTranspose2d up, skip concatenation; per-pixel class scores."""

    def __init__(self, num_classes: int = 2, in_channels: int = 3, width: int = 8, levels: int = 3):
        super().__init__()
        self._record(num_classes=num_classes, in_channels=in_channels, width=width, levels=levels)
        widths = [width * 2 ** i for i in range(levels)]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(nn.Sequential(_cbr(cin, w), _cbr(w, w)))
            cin = w
        self.up, self.dec = nn.ModuleList(), nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(cin, w, 2, 2))
            self.dec.append(nn.Sequential(_cbr(2 * w, w), _cbr(w, w)))
            cin = w
        self.out = nn.Conv2d(cin, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1])):
            x = dec(torch.cat([skip, up(x)], 1))
        return self.out(x)


class ViTBlock(nn.Module):
    """Pre-norm transformer block: LayerNorm, nn.MultiheadAttention, LayerNorm, MLP (GELU)."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(_Recorded):
    """ViT-tiny layout: patch-embedding conv, class token, position embeddings, transformer blocks."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch: int = 8,
                 dim: int = 32, depth: int = 2, heads: int = 4):
        super().__init__()
        self._record(num_classes=num_classes, in_channels=in_channels, image_size=image_size, patch=patch,
                     dim=dim, depth=depth, heads=heads)
        self.patch = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, 4 * dim) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class TemporalBlock(nn.Module):
    """Two dilated causal Conv1d (left padding), BN, ReLU, residual (1x1 conv when widths differ)."""

    def __init__(self, cin: int, cout: int, k: int, dilation: int):
        super().__init__()
        self.pad = (k - 1) * dilation
        self.conv1, self.bn1 = nn.Conv1d(cin, cout, k, dilation=dilation), nn.BatchNorm1d(cout)
        self.conv2, self.bn2 = nn.Conv1d(cout, cout, k, dilation=dilation), nn.BatchNorm1d(cout)
        self.skip = nn.Identity() if cin == cout else nn.Conv1d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(F.pad(x, (self.pad, 0)))))
        y = self.bn2(self.conv2(F.pad(y, (self.pad, 0))))
        return F.relu(y + self.skip(x))


class TCN(_Recorded):
    """Temporal convolutional network over (batch, channels, time): dilations 1, 2, 4, ..., then pool + Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 4, width: int = 16, levels: int = 3,
                 kernel: int = 3):
        super().__init__()
        self._record(num_classes=num_classes, in_channels=in_channels, width=width, levels=levels, kernel=kernel)
        self.blocks = nn.Sequential(*[TemporalBlock(in_channels if i == 0 else width, width, kernel, 2 ** i)
                                      for i in range(levels)])
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(x).mean(2))


class RNNClassifier(_Recorded):
    """Sequence classifier over (batch, time, features): a (bidirectional, multi-layer) LSTM or GRU, the
    last time step's output, a Linear."""

    def __init__(self, num_classes: int = 10, in_features: int = 8, hidden: int = 32, layers: int = 2,
                 bidirectional: bool = True, cell: str = "lstm"):
        super().__init__()
        self._record(num_classes=num_classes, in_features=in_features, hidden=hidden, layers=layers,
                     bidirectional=bidirectional, cell=cell)
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(in_features, hidden, layers, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0][:, -1])


class GroupedCatNet(_Classifier):
    """Two branches concatenated into a grouped conv (``groups``), ResNeXt-style grouped 3x3 stages."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16, groups: int = 4):
        super().__init__()
        self._record(num_classes=num_classes, in_channels=in_channels, width=width, groups=groups)
        self.left, self.right = _cbr(in_channels, width), _cbr(in_channels, width, 5)
        self.mix = nn.Sequential(_cbr(2 * width, 4 * width, 3, 2, groups=groups), _cbr(4 * width, 4 * width, 1),
                                 _cbr(4 * width, 4 * width, 3, 2, groups=groups), _cbr(4 * width, 8 * width, 1))
        self.fc = nn.Linear(8 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.cat([self.left(x), self.right(x)], 1))


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """A zoo model: ``build(**kwargs)``, the shape of one input sample, ``kind`` ("image", "dense" for
    per-pixel outputs, "sequence" for (time, features), "signal" for (channels, time)) and the constructor
    arguments of the small version the tests use."""

    build: Callable[..., nn.Module]
    sample: tuple[int, ...]
    kind: str
    small: dict


ZOO: dict[str, ZooEntry] = {
    "resnet18": ZooEntry(ResNet18, (3, 32, 32), "image", {"width": 8, "blocks": 1}),
    "resnet50": ZooEntry(ResNet50, (3, 32, 32), "image", {"width": 8, "blocks": (1, 1, 1, 1)}),
    "mobilenet_v2": ZooEntry(MobileNetV2, (3, 32, 32), "image", {"width": 4, "depth": 1}),
    "mobilenet_v3": ZooEntry(MobileNetV3, (3, 32, 32), "image", {"width": 4, "depth": 1}),
    "efficientnet": ZooEntry(EfficientNet, (3, 32, 32), "image", {"width": 4, "depth": 1}),
    "densenet": ZooEntry(DenseNet, (3, 32, 32), "image", {"growth": 4, "layers": 2, "blocks": 2}),
    "convnext": ZooEntry(ConvNeXt, (3, 32, 32), "image", {"width": 8, "depth": 1}),
    "unet": ZooEntry(UNet, (3, 32, 32), "dense", {"width": 4, "levels": 3}),
    "vit": ZooEntry(ViT, (3, 32, 32), "image", {"dim": 16, "depth": 1, "heads": 2}),
    "tcn": ZooEntry(TCN, (4, 32), "signal", {"width": 8, "levels": 3}),
    "lstm": ZooEntry(RNNClassifier, (12, 8), "sequence", {"hidden": 16, "cell": "lstm"}),
    "gru": ZooEntry(RNNClassifier, (12, 8), "sequence", {"hidden": 16, "cell": "gru"}),
    "grouped_cat": ZooEntry(GroupedCatNet, (3, 32, 32), "image", {"width": 8, "groups": 4}),
}
"""The zoo, by name."""

"""DenseNet-BC for CIFAR: "Densely Connected Convolutional Networks" (Huang et al., CVPR 2017).

Layout (the CIFAR DenseNet-BC of the paper, section 3 "Implementation Details"): a 3x3 conv with
2*growth filters; three dense blocks separated by transitions; then BN-ReLU, global average
pooling and a linear head. A dense layer is the bottleneck BN-ReLU-conv1x1(4*growth)-BN-ReLU-
conv3x3(growth) whose output is concatenated to its input; a transition is
BN-ReLU-conv1x1(floor(0.5 * channels))-avgpool2x2 (compression 0.5).

Depth counts the convs plus the head: depth = 1 + 2L + 2 + 1 = 2L + 4 for L dense layers in
total. The paper's DenseNet-BC depths (100, 190, 250) give (depth - 4) / 6 layers in each of the
three equal blocks. The Born-Again Networks paper (Furlanello et al., ICML 2018, CIFAR tables)
names DenseNet-112-33, 90-60, 80-80 and 80-120 (depth-growth) without block layouts, and
90 and 80 are not 6n + 4, so here the L = (depth - 4) / 2 layers are split over the three
blocks as evenly as possible, the first blocks taking the one or two left over:

=======  =====  ======  ================  =============  ====================
preset   depth  growth  layers per block  params (ours)  params (BAN paper*)
=======  =====  ======  ================  =============  ====================
112-33   112    33      18, 18, 18        6.99M          6.3M
90-60    90     60      15, 14, 14        15.8M          16.1M
80-80    80     80      13, 13, 12        23.1M          22.4M
80-120   80     120     13, 13, 12        51.8M          50.4M
=======  =====  ======  ================  =============  ====================

Parameters at 100 classes. (*) The paper's parameter column as recalled, not checked against
the PDF (no copy was at hand). They differ from ours by 2-11%, so the paper's layout was
not exactly this one; without the bottleneck or without compression the counts are 1.5x to
10x off, so bottleneck + compression 0.5 is the closest reading.

Default depth=100, growth=12 (DenseNet-BC-100-12, 16 layers per block, 0.8M parameters).
Initialisation: Kaiming-normal (fan_out, ReLU) convs, BN weight 1 and bias 0, zero Linear
bias, as torchvision's DenseNet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ban_analysis.models import init_conv_bn, register_model

PRESETS = {"112-33": (112, 33), "90-60": (90, 60), "80-80": (80, 80), "80-120": (80, 120)}
# Parameter counts at 100 classes (sum of p.numel()); tests check them.
PRESET_PARAMS = {"112-33": 6_987_916, "90-60": 15_805_120, "80-80": 23_104_540, "80-120": 51_766_960}


def block_layers(depth: int) -> list[int]:
    """Layers in each of the 3 dense blocks for ``depth`` (module docstring)."""
    total = (depth - 4) // 2
    base, extra = divmod(total, 3)
    return [base + (1 if i < extra else 0) for i in range(3)]


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k); returns the input with the k new maps appended."""

    def __init__(self, in_channels: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], dim=1)  # (B, C + k, H, W)


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1-avgpool2x2 (compression)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.BatchNorm2d(in_channels), nn.ReLU(),
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.AvgPool2d(2),
        )


class DenseNetBC(nn.Module):
    """DenseNet-BC with 3 blocks of ``layers`` dense layers (module docstring).

    Args:
        in_channels: C of the input.
        num_classes: logits per sample.
        layers: dense layers per block.
        growth: growth rate k.
        compression: transition output fraction (0.5 in DenseNet-BC).
    """

    def __init__(self, in_channels: int, num_classes: int, layers: list[int], growth: int, compression: float):
        super().__init__()
        channels = 2 * growth
        modules: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)]
        for i, count in enumerate(layers):
            for _ in range(count):
                modules.append(DenseLayer(channels, growth))
                channels += growth
            if i < len(layers) - 1:
                out = int(channels * compression)
                modules.append(Transition(channels, out))
                channels = out
        modules += [nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*modules)
        self.head = nn.Linear(channels, num_classes)
        init_conv_bn(self)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes) logits."""
        return self.head(self.features(x))


@register_model("densenet_bc", test_input_shape=(3, 16, 16))
def densenet_bc(num_classes: int, input_shape: tuple[int, int, int], *, depth: int | None = None,
                growth: int | None = None, preset: str | None = None) -> nn.Module:
    """DenseNet-BC-depth-growth, or one of the BAN paper's ``PRESETS`` (module docstring).

    Args:
        num_classes: logits per sample.
        input_shape: (C, H, W).
        depth: even, >= 10 (at least one layer per block); default 100.
        growth: growth rate >= 1; default 12.
        preset: "112-33", "90-60", "80-80" or "80-120"; excludes depth and growth.
    """
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"densenet_bc preset must be one of {', '.join(PRESETS)}; got {preset!r}")
        if depth is not None or growth is not None:
            raise ValueError("densenet_bc: give either preset or depth/growth, not both")
        depth, growth = PRESETS[preset]
    depth = 100 if depth is None else depth
    growth = 12 if growth is None else growth
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or depth % 2:
        raise ValueError(f"densenet_bc depth must be an even integer >= 10 (2L + 4 for L dense layers); got {depth!r}")
    if isinstance(growth, bool) or not isinstance(growth, int) or growth < 1:
        raise ValueError(f"densenet_bc growth must be an integer >= 1; got {growth!r}")
    return DenseNetBC(input_shape[0], num_classes, block_layers(depth), growth, 0.5)

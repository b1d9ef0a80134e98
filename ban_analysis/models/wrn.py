"""Wide ResNets: "Wide Residual Networks" (Zagoruyko & Komodakis, BMVC 2016).

WRN-d-k: a 3x3 conv with 16 filters, then three groups of n = (d - 4) / 6 pre-activation blocks
(BN-ReLU-conv3x3-[dropout]-BN-ReLU-conv3x3, the paper's B(3,3)) with 16k, 32k, 64k filters and
stride 2 at the start of groups 2 and 3, then BN-ReLU, global average pooling and a linear
head. Where a block changes shape its shortcut is a 1x1 conv applied to the block's
pre-activated input, as in the authors' code. Dropout sits between the two convs (the paper's
recommended placement). Parameters at 10 classes: WRN-28-10 36.5M, WRN-16-8 11.0M, WRN-28-1 0.37M.

Initialisation: Kaiming-normal (fan_out, ReLU) convs, BN weight 1 and bias 0, zero Linear bias,
as the authors' PyTorch code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ban_analysis.models import init_conv_bn, register_model


class WideBlock(nn.Module):
    """Pre-activation block; ``shortcut`` is a 1x1 conv when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
            if (stride != 1 or in_channels != out_channels)
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        # Shape-changing blocks project the pre-activated input, as the authors' code does.
        return out + (self.shortcut(pre) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-depth-width (module docstring).

    Args:
        in_channels: C of the input.
        num_classes: logits per sample.
        depth: 6n + 4.
        width: widening factor k.
        dropout: dropout probability between the convs of each block.
    """

    def __init__(self, in_channels: int, num_classes: int, depth: int, width: int, dropout: float):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        groups, channels = [], 16
        for i, w in enumerate(widths):
            stride = 2 if i > 0 else 1  # the first block of groups 2 and 3 halves the resolution
            blocks = [WideBlock(channels if j == 0 else w, w, stride if j == 0 else 1, dropout) for j in range(n)]
            channels = w
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)
        init_conv_bn(self)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes) logits."""
        out = F.relu(self.bn(self.groups(self.stem(x))))
        return self.head(self.pool(out).flatten(1))  # (B, 64k) -> (B, num_classes)


@register_model("wrn", test_input_shape=(3, 8, 8))
def wrn(num_classes: int, input_shape: tuple[int, int, int], *, depth: int = 28, width: int = 10,
        dropout: float = 0.0) -> nn.Module:
    """WRN-depth-width (default WRN-28-10; the test runs it at 8x8 to stay fast).

    Args:
        num_classes: logits per sample.
        input_shape: (C, H, W).
        depth: 10, 16, 22, 28, 34, 40, ... (6n + 4, n >= 1).
        width: widening factor >= 1.
        dropout: in [0, 1); the paper uses 0.3 on CIFAR.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"wrn depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...); got {depth!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"wrn width must be an integer >= 1; got {width!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"wrn dropout must be in [0, 1); got {dropout!r}")
    return WideResNet(input_shape[0], num_classes, depth, width, float(dropout))

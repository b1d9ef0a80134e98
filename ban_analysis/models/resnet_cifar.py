"""CIFAR ResNets: He et al. 2016 (resnet20...resnet110) and a CIFAR-stem ResNet-18.

``resnet{20,32,44,56,110}``: "Deep Residual Learning for Image Recognition" (He, Zhang, Ren,
Sun, CVPR 2016), section 4.2: a 3x3 conv with 16 filters, then three stages of n basic blocks
(two 3x3 convs, post-activation: conv-BN-ReLU-conv-BN, add, ReLU) with 16, 32, 64 filters and
stride 2 at the start of stages 2 and 3, global average pooling and a linear head; depth 6n+2
(n = 3, 5, 7, 9, 18). Shortcuts where the shape changes: option A by default, as the paper
uses on CIFAR (identity on every second pixel, extra channels zero-padded: no parameters), or
option B (1x1 conv + BN projection). Parameters at 10 classes, option A: resnet20 0.27M,
resnet32 0.46M, resnet44 0.66M, resnet56 0.85M, resnet110 1.7M (the paper's Table 6).

``resnet18_cifar``: the standard (post-activation) ResNet-18 of He et al. (BasicBlock,
[2, 2, 2, 2] blocks of 64, 128, 256, 512 filters, 1x1 conv + BN projection shortcuts) with the
ImageNet stem (7x7 stride-2 conv + max-pool) replaced by a 3x3 stride-1 conv and no max-pool,
the usual CIFAR variant (e.g. kuangliu/pytorch-cifar); 11.17M parameters at 10 classes.

Initialisation: Kaiming-normal (fan_out, ReLU) convs, BN weight 1 and bias 0, PyTorch's
default Linear init, as torchvision's ResNet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ban_analysis.models import init_conv_bn, register_model


class ShortcutA(nn.Module):
    """Option A: subsample by ``stride`` and zero-pad the channel dimension (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # Pad half the new channels before and half after, as the reference Torch7 code does.
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU (post-activation)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem conv3x3 -> stages of BasicBlocks -> global average pool -> ``head``.

    Args:
        in_channels: C of the input.
        num_classes: logits per sample.
        widths: filters per stage; stages after the first start with stride 2.
        blocks: blocks per stage.
        shortcut: "A" or "B" for blocks that change shape.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: list[int], blocks: list[int], shortcut: str):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages = []
        channels = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(count):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(channels, width, stride, shortcut))
                channels = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)
        init_conv_bn(self)  # the head keeps PyTorch's default Linear init, as torchvision's ResNet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes) logits."""
        features = self.pool(self.stages(self.stem(x))).flatten(1)  # (B, widths[-1])
        return self.head(features)


def _check_shortcut(shortcut: str) -> str:
    if shortcut not in ("A", "B"):
        raise ValueError(f"shortcut must be 'A' (zero-pad identity) or 'B' (1x1 projection); got {shortcut!r}")
    return shortcut


def _he_resnet(depth: int):
    n = (depth - 2) // 6

    def factory(num_classes: int, input_shape: tuple[int, int, int], *, shortcut: str = "A") -> nn.Module:
        return CifarResNet(input_shape[0], num_classes, [16, 32, 64], [n] * 3, _check_shortcut(shortcut))

    factory.__name__ = f"resnet{depth}"
    factory.__doc__ = f"ResNet-{depth} of He et al. 2016 for CIFAR ({n} blocks per stage); shortcut 'A' or 'B'."
    return factory


for _depth in (20, 32, 44, 56, 110):
    # Tests run the deepest one at 16 px to stay fast; the others at CIFAR's 32 px.
    register_model(f"resnet{_depth}", test_input_shape=(3, 16, 16) if _depth > 56 else (3, 32, 32))(_he_resnet(_depth))


@register_model("resnet18_cifar", test_input_shape=(3, 16, 16))
def resnet18_cifar(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """Standard ResNet-18 with a 3x3 stride-1 stem and no max-pool (module docstring)."""
    return CifarResNet(input_shape[0], num_classes, [64, 128, 256, 512], [2, 2, 2, 2], "B")

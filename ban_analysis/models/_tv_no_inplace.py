"""torchvision models without in-place activations (imported by ``torchvision.py`` on first use).

torchvision builds its networks with ``nn.ReLU(inplace=True)`` (also Hardswish and Dropout in
MobileNetV3) and does in-place arithmetic in some forwards: ``F.relu(features, inplace=True)`` in
``DenseNet.forward``, ``out += identity`` in ResNet's ``BasicBlock``/``Bottleneck`` and
``result += input`` in MobileNetV3's ``InvertedResidual``. The models here carry no in-place
ops, for hook-based per-sample-gradient tools (Opacus, BackPACK) and any hook that keeps a
layer's output, which a later in-place op would overwrite. :func:`strip_inplace` removes them:

* every ``nn.ReLU`` becomes a fresh ``nn.ReLU()``; every other module with an ``inplace``
  attribute gets ``inplace = False``;
* modules of the classes above are re-classed (``module.__class__ = ...``) to the subclasses
  below, whose forwards are torchvision's with the in-place op written out of place.

Re-classing keeps each module's parameters, buffers, names and ``isinstance`` relations, and
draws no random numbers, so a seeded model has the same weights as before. The out-of-place
ops compute the same values (``relu`` vs ``relu_``, ``a + b`` vs ``a += b``, ``dropout`` vs
``dropout_`` draw the same mask), so outputs and gradients are bit-identical; the test suite
checks that against the in-place originals.

This module imports torchvision at the top: it is only imported when a torchvision model is
built (or unpickled), keeping ``import ban_analysis.models`` fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import densenet, mobilenetv3, resnet


class DenseNet(densenet.DenseNet):
    """torchvision's DenseNet; the final ReLU is out of place."""

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        out = F.relu(features)  # torchvision: F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


class BasicBlock(resnet.BasicBlock):
    """torchvision's ResNet BasicBlock; the residual sum is out of place."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)  # torchvision: out += identity


class Bottleneck(resnet.Bottleneck):
    """torchvision's ResNet Bottleneck; the residual sum is out of place."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)  # torchvision: out += identity


class InvertedResidual(mobilenetv3.InvertedResidual):
    """torchvision's MobileNetV3 block; the residual sum is out of place."""

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result = result + input  # torchvision: result += input
        return result


# Exact torchvision class -> our subclass. Subclasses of these are left alone: their forward
# is not torchvision's, so swapping it would change the network.
RECLASS: dict[type, type] = {
    densenet.DenseNet: DenseNet,
    resnet.BasicBlock: BasicBlock,
    resnet.Bottleneck: Bottleneck,
    mobilenetv3.InvertedResidual: InvertedResidual,
}


def strip_inplace(model: nn.Module) -> nn.Module:
    """Remove every in-place activation and in-place residual op from ``model`` (module docstring).

    Args:
        model: modified in place.

    Returns:
        ``model``.
    """
    for module in list(model.modules()):
        new_class = RECLASS.get(type(module))
        if new_class is not None:
            module.__class__ = new_class
        for name, child in list(module.named_children()):
            if type(child) is nn.ReLU and child.inplace:
                setattr(module, name, nn.ReLU())
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return model

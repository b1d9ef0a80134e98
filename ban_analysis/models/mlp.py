"""Multi-layer perceptron on flattened inputs: the quick CPU model (Fashion-MNIST, digits)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ban_analysis.models import register_model


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] per hidden width -> Linear head.

    Args:
        in_features: C*H*W of one input.
        num_classes: logits per sample.
        widths: hidden layer widths (empty: multinomial logistic regression).
        dropout: dropout probability after each hidden ReLU (0 = none).
    """

    def __init__(self, in_features: int, num_classes: int, widths: Sequence[int], dropout: float):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width_in = in_features
        for width in widths:
            layers += [nn.Linear(width_in, width), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width_in = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes) logits."""
        return self.head(self.body(x))


@register_model("mlp", test_input_shape=(1, 28, 28))
def mlp(num_classes: int, input_shape: tuple[int, int, int], *, widths: Sequence[int] = (256, 256),
        dropout: float = 0.0) -> nn.Module:
    """MLP with PyTorch's default Linear initialisation (Kaiming-uniform, a=sqrt(5)).

    Args:
        num_classes: logits per sample.
        input_shape: (C, H, W); the input is flattened to C*H*W features.
        widths: hidden widths, each >= 1 (default two layers of 256).
        dropout: in [0, 1).
    """
    if isinstance(widths, (str, bytes)) or not all(
        isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths
    ):
        raise ValueError(f"mlp widths must be a list of integers >= 1; got {widths!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"mlp dropout must be in [0, 1); got {dropout!r}")
    return MLP(math.prod(input_shape), num_classes, list(widths), float(dropout))

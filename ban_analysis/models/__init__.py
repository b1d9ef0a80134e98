"""Model registry: each model is one decorated factory found by name (the timm pattern).

A factory has the signature ``factory(num_classes, input_shape, *, <params with defaults>)``
and returns an ``nn.Module`` mapping (B, C, H, W) float inputs to (B, num_classes) logits,
whose final ``nn.Linear`` is reachable by :func:`head_of`. Registering is one decorator::

    @register_model("mlp", test_input_shape=(1, 28, 28))
    def mlp(num_classes, input_shape, *, widths=(256, 256), dropout=0.0): ...

``test_input_shape`` is the documented (C, H, W) at which the test suite runs every registered
model (forward + backward); keep it small for big networks.

Models do no in-place operations on activations (no ``nn.ReLU(inplace=True)``, no ``x += y``
on a tensor autograd needs), for hook-based per-sample-gradient tools (Opacus, BackPACK) and
``torch.func``; the tests check every registered model for it at the aten-op level.

Registered (see each module's docstring for the architecture):

=================================  ============================================================
``mlp``                            widths=[256, 256], dropout=0.0
``resnet20/32/44/56/110``          He et al. 2016 CIFAR ResNets, shortcut="A" (or "B")
``resnet18_cifar``                 standard ResNet-18, 3x3 stride-1 stem, no max-pool
``wrn``                            depth=28, width=10, dropout=0.0 (Zagoruyko & Komodakis)
``densenet_bc``                    depth=100, growth=12, or preset="112-33"|"90-60"|"80-80"|"80-120"
``densenet121, resnet18, ...``     torchvision architectures, weights=None, small_input=None
=================================  ============================================================
"""

from __future__ import annotations

import inspect
import logging
from typing import Callable

import torch
from torch import nn

from ban_analysis.registry import Registry

logger = logging.getLogger(__name__)

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str | None = None, *, test_input_shape: tuple[int, int, int] = (3, 32, 32)):
    """Decorator adding a factory to ``MODELS`` under ``name`` (default: the function name).

    Args:
        name: registry key.
        test_input_shape: (C, H, W) at which tests run the model; stored on the factory as
            ``factory.test_input_shape``.

    Returns:
        The decorator; it returns the factory unchanged (apart from that attribute).
    """

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or factory.__name__
        MODELS.register(key, factory)  # refuses an empty or duplicate name
        factory.test_input_shape = tuple(test_input_shape)
        return factory

    return decorate


def init_conv_bn(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) Conv2d weights; BatchNorm2d weight 1 and bias 0.

    The initialisation of torchvision's ResNet and DenseNet and of the WRN authors' code, shared
    by the CIFAR models here. It walks ``model.modules()`` in order and draws only for convs, so
    a seeded model's weights depend on that order: keep it when changing this function.

    Args:
        model: the module to initialise in place (its head and other layers are left as they are).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def model_params(name: str) -> dict[str, object]:
    """The keyword parameters of model ``name`` and their defaults."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(sorted(MODELS))}")
    sig = inspect.signature(MODELS[name])
    return {p.name: p.default for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def create_model(
    name: str,
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    seed: int | None = None,
    **params,
) -> nn.Module:
    """Build registered model ``name``.

    Args:
        name: a key of ``MODELS``.
        num_classes: logits per sample, >= 1.
        input_shape: (C, H, W) of one input.
        seed: when given, the weights are initialised under ``torch.random.fork_rng`` after
            ``torch.manual_seed(seed)``, so the same seed gives the same weights and the
            caller's global RNG is left untouched; None uses the global RNG as it stands.
        **params: the model's parameters (see :func:`model_params`).

    Returns:
        The model, in training mode, on the CPU.
    """
    params_allowed = model_params(name)
    unknown = sorted(set(params) - set(params_allowed))
    if unknown:
        allowed = ", ".join(f"{k}={v!r}" for k, v in params_allowed.items()) or "none"
        raise ValueError(f"unknown parameter(s) {unknown} for model {name!r}; allowed: {allowed}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1; got {num_classes!r}")
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be (C, H, W) with positive integers; got {input_shape!r}")
    if seed is None:
        model = MODELS[name](num_classes, shape, **params)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MODELS[name](num_classes, shape, **params)
    head = head_of(model)
    if head.out_features != num_classes:  # a factory bug, not a user error
        raise RuntimeError(f"model {name!r}: head has {head.out_features} outputs, expected {num_classes}")
    logger.debug("created %s (%d parameters)", name, sum(p.numel() for p in model.parameters()))
    return model


def head_of(model: nn.Module) -> nn.Linear:
    """The final ``nn.Linear`` producing the logits; its input is the penultimate feature vector.

    Looks for, in order: ``model.head`` (every model defined here), ``model.head_name`` (a
    dotted submodule path, set on wrapped torchvision models), then the last ``nn.Linear`` in
    ``model.modules()``. Unwraps ``torch.compile`` (``_orig_mod``) and DataParallel (``module``).

    Args:
        model: a model from :func:`create_model`, possibly compiled or wrapped.

    Returns:
        The head layer (the module itself, not a copy).
    """
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            break
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return head
    head_name = getattr(model, "head_name", None)
    if isinstance(head_name, str):
        head = model.get_submodule(head_name)
        if isinstance(head, nn.Linear):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to serve as the logit head")
    return linears[-1]


# Importing the modules registers their models; kept last because they use register_model.
from ban_analysis.models import densenet_bc, mlp, resnet_cifar, torchvision, wrn  # noqa: E402,F401

__all__ = ["MODELS", "create_model", "head_of", "model_params", "register_model"]

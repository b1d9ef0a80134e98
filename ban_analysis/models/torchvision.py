"""torchvision ImageNet architectures by name, randomly initialised, with a small-input stem.

``create_model("resnet18", num_classes, input_shape, small_input=None)``: the torchvision model
with ``weights=None`` (never a download) and a ``num_classes``-way head. ``small_input`` (default:
True when min(H, W) <= 64) replaces the ImageNet stem, which divides the resolution by 4
(stride-2 7x7 conv + stride-2 max-pool; MobileNetV3: stride-2 3x3 conv) and would leave 1x1
maps at 32 px, by a 3x3 stride-1 conv and no max-pool: the CIFAR convention (e.g. the
ResNet-18 of kuangliu/pytorch-cifar, DenseNet-121 of the CWTM/DKPP experiments). Inputs with C
other than 3 get a first conv with C input channels either way. The head is the final Linear:
``fc`` (ResNets), ``classifier`` (DenseNets), ``classifier.3`` (MobileNetV3), recorded in
``model.head_name`` for :func:`ban_analysis.models.head_of`.

No in-place activations: torchvision's ``nn.ReLU(inplace=True)`` modules, the in-place
``F.relu`` of ``DenseNet.forward`` and the in-place residual sums of the ResNet and MobileNetV3
blocks are replaced by out-of-place equivalents (:mod:`ban_analysis.models._tv_no_inplace`),
which give bit-identical outputs and gradients.

Adding an architecture is one line in ``ARCHS``: (stem conv path, stem pool path or None,
head path).
"""

from __future__ import annotations

from torch import nn

from ban_analysis.models import register_model

ARCHS: dict[str, tuple[str, str | None, str]] = {
    "resnet18": ("conv1", "maxpool", "fc"),
    "resnet34": ("conv1", "maxpool", "fc"),
    "resnet50": ("conv1", "maxpool", "fc"),
    "densenet121": ("features.conv0", "features.pool0", "classifier"),
    "mobilenet_v3_small": ("features.0.0", None, "classifier.3"),
}


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def build_torchvision(arch: str, num_classes: int, input_shape: tuple[int, int, int],
                      small_input: bool | None) -> nn.Module:
    """torchvision ``arch`` with the stem rule of the module docstring.

    Args:
        arch: a key of ``ARCHS``.
        num_classes: logits per sample.
        input_shape: (C, H, W).
        small_input: replace the stem by a 3x3 stride-1 conv and drop the max-pool; None ->
            min(H, W) <= 64.

    Returns:
        The model with ``head_name`` set.
    """
    import torchvision  # deferred: only these models need it, and it is slow to import

    if small_input is not None and not isinstance(small_input, bool):
        raise ValueError(f"small_input must be true, false or unset (auto); got {small_input!r}")
    channels, height, width = input_shape
    small = min(height, width) <= 64 if small_input is None else small_input
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    stem_path, pool_path, head_path = ARCHS[arch]
    stem = model.get_submodule(stem_path)
    if small or channels != stem.in_channels:
        kernel, stride, padding = (3, 1, 1) if small else (stem.kernel_size, stem.stride, stem.padding)
        new = nn.Conv2d(channels, stem.out_channels, kernel, stride, padding, bias=stem.bias is not None)
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")  # torchvision's conv init
        _replace(model, stem_path, new)
    if small and pool_path is not None:
        _replace(model, pool_path, nn.Identity())
    model.head_name = head_path
    from ban_analysis.models._tv_no_inplace import strip_inplace  # deferred: imports torchvision

    return strip_inplace(model)


def _factory(arch: str):
    def factory(num_classes: int, input_shape: tuple[int, int, int], *, small_input: bool | None = None) -> nn.Module:
        return build_torchvision(arch, num_classes, input_shape, small_input)

    factory.__name__ = arch
    factory.__doc__ = f"torchvision {arch}, weights=None; small_input: 3x3 stride-1 stem, no max-pool."
    return factory


for _arch in ARCHS:
    register_model(_arch, test_input_shape=(3, 16, 16))(_factory(_arch))

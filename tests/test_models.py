"""Tests of ban_analysis.models: every registered model runs, heads, parameter counts, errors;
no in-place activations; one SGD step, channels_last and torch.compile (the GPU-config paths).

Each model runs at its documented ``factory.test_input_shape`` (small for the big networks:
WRN-28-10 at 8x8, torchvision models at 16x16) with batch 2.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ban_analysis.models import MODELS, create_model, head_of, model_params, register_model
from ban_analysis.models.densenet_bc import PRESET_PARAMS, PRESETS, block_layers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batch-2 passes are too small to gain from threads; with the 2 cores shared, two spinning
    OpenMP threads made these tests 5-10x slower than one (measured under load), so use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward_and_head(name):
    shape = MODELS[name].test_input_shape
    model = create_model(name, num_classes=7, input_shape=shape, seed=0)
    head = head_of(model)
    assert isinstance(head, nn.Linear) and head.out_features == 7
    captured = {}
    handle = head.register_forward_hook(lambda mod, args, out: captured.update(out=out, features=args[0]))
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    logits = model(x)
    handle.remove()
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert captured["out"] is logits or torch.equal(captured["out"], logits)  # the head produces the logits
    assert captured["features"].shape == (2, head.in_features)
    logits.square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads), "a parameter got no gradient"
    assert torch.isfinite(torch.cat([g.flatten() for g in grads])).all()
    assert head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "name, params, num_classes, expected",
    [
        ("resnet20", {}, 10, 0.27e6),  # He et al. 2016, Table 6
        ("resnet110", {}, 10, 1.7e6),
        ("wrn", {}, 10, 36.5e6),  # Zagoruyko & Komodakis, Table 3: WRN-28-10
        ("wrn", {"depth": 16, "width": 8}, 10, 11.0e6),
        ("densenet_bc", {}, 100, 0.8e6),  # Huang et al. Table 2: DenseNet-BC-100-12
        ("resnet18_cifar", {}, 10, 11.17e6),
    ],
)
def test_parameter_counts_match_papers(name, params, num_classes, expected):
    n = count(create_model(name, num_classes, (3, 32, 32), **params))
    assert abs(n - expected) / expected < 0.02, n


def test_torchvision_counts_match_imagenet_models():
    # Exact counts of torchvision's ImageNet models (its documentation) with the ImageNet stem.
    assert count(create_model("resnet18", 1000, (3, 224, 224))) == 11_689_512
    assert count(create_model("densenet121", 1000, (3, 224, 224))) == 7_978_856


def test_option_a_shortcut_has_no_parameters():
    a = count(create_model("resnet20", 10, (3, 32, 32), shortcut="A"))
    b = count(create_model("resnet20", 10, (3, 32, 32), shortcut="B"))
    # Option B adds two 1x1 conv + BN projections: 16*32 + 2*32 and 32*64 + 2*64.
    assert b - a == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64


@pytest.mark.parametrize("depth, expected", [(20, 20), (56, 56), (110, 110)])
def test_resnet_depth_counts_layers(depth, expected):
    model = create_model(f"resnet{depth}", 10, (3, 32, 32))
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == expected  # option A: every conv and the head are weight layers


@pytest.mark.parametrize("preset", sorted(PRESET_PARAMS))
def test_densenet_presets_layout_and_counts(preset):
    depth, growth = (int(v) for v in preset.split("-"))
    model = create_model("densenet_bc", 100, (3, 32, 32), preset=preset)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == depth  # stem + 2 per dense layer + 2 transitions + head
    assert sum(block_layers(depth)) == (depth - 4) // 2 and max(block_layers(depth)) - min(block_layers(depth)) <= 1
    assert count(model) == PRESET_PARAMS[preset]
    assert head_of(model).in_features > 0 and model.features[1].conv2.out_channels == growth


def test_densenet_block_layouts_documented():
    assert block_layers(112) == [18, 18, 18]
    assert block_layers(90) == [15, 14, 14]
    assert block_layers(80) == [13, 13, 12]
    assert block_layers(100) == [16, 16, 16]


def test_mlp_widths_and_dropout():
    logistic = create_model("mlp", 10, (1, 28, 28), widths=[])
    assert count(logistic) == 784 * 10 + 10
    two = create_model("mlp", 10, (1, 8, 8), widths=[5, 4], dropout=0.5)
    assert count(two) == (64 * 5 + 5) + (5 * 4 + 4) + (4 * 10 + 10)
    assert sum(isinstance(m, nn.Dropout) for m in two.modules()) == 2


def test_torchvision_small_input_stem():
    small = create_model("resnet18", 10, (3, 32, 32))  # auto: 32 <= 64 -> small
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    big = create_model("resnet18", 10, (3, 96, 96))
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, nn.MaxPool2d)
    forced = create_model("resnet18", 10, (3, 32, 32), small_input=False)
    assert forced.conv1.stride == (2, 2)
    grey = create_model("densenet121", 10, (1, 16, 16))
    assert grey.features.conv0.in_channels == 1 and isinstance(grey.features.pool0, nn.Identity)
    mobile = create_model("mobilenet_v3_small", 10, (1, 16, 16))
    assert mobile.features[0][0].stride == (1, 1) and mobile.features[0][0].in_channels == 1


def test_grey_input_for_cifar_models():
    model = create_model("resnet20", 10, (1, 28, 28))
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_seed_gives_same_weights_and_keeps_global_rng():
    state = torch.get_rng_state()
    a = create_model("resnet20", 10, (3, 32, 32), seed=5)
    b = create_model("resnet20", 10, (3, 32, 32), seed=5)
    c = create_model("resnet20", 10, (3, 32, 32), seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.head.weight, c.head.weight)


@pytest.mark.parametrize(
    "args, params, fragment",
    [
        (("resnet21", 10, (3, 32, 32)), {}, "allowed: densenet121"),
        (("mlp", 10, (1, 8, 8)), {"width": 3}, r"unknown parameter\(s\) \['width'\] for model 'mlp'; allowed: widths="),
        (("resnet18_cifar", 10, (3, 32, 32)), {"depth": 3}, "allowed: none"),
        (("mlp", 0, (1, 8, 8)), {}, "num_classes must be an integer >= 1"),
        (("mlp", 10, (8, 8)), {}, r"input_shape must be \(C, H, W\)"),
        (("wrn", 10, (3, 32, 32)), {"depth": 27}, "6n \\+ 4"),
        (("densenet_bc", 10, (3, 32, 32)), {"preset": "100-12"}, "preset must be one of 112-33"),
        (("densenet_bc", 10, (3, 32, 32)), {"preset": "80-80", "depth": 80}, "either preset or depth"),
        (("densenet_bc", 10, (3, 32, 32)), {"depth": 41}, "even integer"),
        (("resnet20", 10, (3, 32, 32)), {"shortcut": "C"}, "shortcut must be 'A'"),
        (("mlp", 10, (1, 8, 8)), {"widths": [0]}, "widths must be a list of integers >= 1"),
        (("mlp", 10, (1, 8, 8)), {"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        (("resnet18", 10, (3, 32, 32)), {"small_input": "yes"}, "small_input must be"),
    ],
)
def test_bad_arguments(args, params, fragment):
    with pytest.raises(ValueError, match=fragment):
        create_model(*args, **params)


def test_registry_helpers():
    assert model_params("wrn") == {"depth": 28, "width": 10, "dropout": 0.0}
    assert model_params("densenet_bc") == {"depth": None, "growth": None, "preset": None}
    required = {"mlp", "resnet20", "resnet56", "resnet18_cifar", "wrn", "densenet_bc", "densenet121", "resnet18"}
    assert required <= set(MODELS)
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp")(lambda num_classes, input_shape: nn.Linear(1, 1))


def test_head_of_fallbacks():
    seq = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert head_of(seq) is seq[3]
    model = create_model("resnet20", 10, (3, 32, 32))
    assert head_of(nn.DataParallel(model)) is model.head
    tv = create_model("mobilenet_v3_small", 10, (3, 32, 32))
    assert head_of(tv) is tv.classifier[3]
    with pytest.raises(ValueError, match="no nn.Linear"):
        head_of(nn.Conv2d(1, 1, 1))


# ------------------------------------------------------------------ no in-place activations


class ActivationWrites(TorchDispatchMode):
    """Records every aten op that writes into a tensor derived from the input or the parameters.

    A tensor is an *activation* when it is the input, a parameter, or the output of an op that
    read an activation (views included, tracked by storage). Ops that only take a tensor's
    shape (``empty_like``, ``new_zeros``, ...) do not propagate, so dropout's fresh noise buffer
    (``bernoulli_``, ``div_``) and BatchNorm's ``num_batches_tracked.add_`` are not activations.
    ``writes`` lists every mutation (schema ``Tensor(a!)``) and ``violations`` those into an
    activation, e.g. ``aten.relu_.default`` or ``aten.add_.Tensor`` of ``out += identity``.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor):
        super().__init__()
        self.keep = [x, *model.parameters()]  # kept alive, so a storage address is never reused
        self.tainted = {t.untyped_storage().data_ptr() for t in self.keep}
        self.writes: list[str] = []
        self.violations: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs, written, position = [], [], 0
        for arg in func._schema.arguments:
            value = kwargs.get(arg.name) if arg.kwarg_only else (args[position] if position < len(args) else None)
            position += not arg.kwarg_only
            tensors = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, torch.Tensor)]
            inputs += tensors
            if arg.alias_info is not None and arg.alias_info.is_write:
                written += tensors
        if written:
            self.writes.append(str(func))
            if any(t.untyped_storage().data_ptr() in self.tainted for t in written):
                self.violations.append(str(func))
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if not (name.endswith("_like") or name.startswith("new_")) and any(
            t.untyped_storage().data_ptr() in self.tainted for t in inputs
        ):
            for t in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.keep.append(t)
                    self.tainted.add(t.untyped_storage().data_ptr())
        return out


def with_inplace(model: nn.Module) -> nn.Module:
    """A copy of ``model`` as it was before in-place activations were removed: every module with
    an ``inplace`` flag set to True and torchvision's original classes (in-place forwards) back."""
    from ban_analysis.models._tv_no_inplace import RECLASS

    original = {ours: theirs for theirs, ours in RECLASS.items()}
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if type(m) in original:
            m.__class__ = original[type(m)]
        if hasattr(m, "inplace"):
            m.inplace = True
    return ref


def forward_backward(model: nn.Module, x: torch.Tensor, log: ActivationWrites | None = None):
    """Logits, input gradient and parameter gradients of one seeded forward + backward."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks for every call
    with log if log is not None else contextlib.nullcontext():
        logits = model(x)
    (logits.square().sum() + logits[:, 0].sum()).backward()
    return [logits.detach(), x.grad, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_inplace_activations_and_numbers_unchanged(name):
    shape = MODELS[name].test_input_shape
    model = create_model(name, num_classes=5, input_shape=shape, seed=0)
    flagged = [n for n, m in model.named_modules() if getattr(m, "inplace", False)]
    assert not flagged, f"modules with inplace=True: {flagged}"
    reference = with_inplace(model)  # before any forward: same weights and BatchNorm buffers
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))

    log = ActivationWrites(model, x)
    ours = forward_backward(model, x, log)  # training mode
    assert not log.violations, f"in-place ops on activations: {sorted(set(log.violations))}"
    assert all(torch.isfinite(t).all() for t in ours)
    model.eval()
    with ActivationWrites(model, x) as strict:
        model(x)
    assert not strict.writes, f"eval-mode forward mutates tensors: {sorted(set(strict.writes))}"

    # The in-place original computes bit-identical logits and gradients; where it has in-place
    # modules, the detector must see their ops (so the check above is not vacuous).
    ref_log = ActivationWrites(reference, x)
    theirs = forward_backward(reference, x, ref_log)
    if any(hasattr(m, "inplace") for m in reference.modules()):
        assert ref_log.violations
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


# ----------------------------------------------------- GPU-config code paths, tested on CPU


@pytest.mark.parametrize(
    "name, params",
    [("densenet_bc", {"preset": min(PRESETS, key=PRESET_PARAMS.get)}),  # 112-33, the smallest
     ("wrn", {})],  # WRN-28-10, the default
)
def test_one_sgd_step(name, params):
    shape = MODELS[name].test_input_shape
    model = create_model(name, 10, shape, seed=0, **params)
    # The run defaults (TrainConfig): SGD, lr 0.1, Nesterov momentum 0.9, weight decay 5e-4.
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, *shape, generator=g), torch.randint(0, 10, (2,), generator=g)
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    changed = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    assert all(changed), f"{changed.count(False)} of {len(changed)} parameter tensors unchanged"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(F.cross_entropy(model(x), y))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_channels_last_matches_contiguous(name):
    shape = MODELS[name].test_input_shape
    model = create_model(name, 5, shape, seed=0).eval()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)  # as the training loop does
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        formats = []
        if convs:
            convs[-1].register_forward_hook(
                lambda m, a, out: formats.append(out.is_contiguous(memory_format=torch.channels_last)))
        got = model(x.contiguous(memory_format=torch.channels_last))
    assert formats == ([True] if convs else [])  # the channels_last kernels really ran
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _no_compiler_reason() -> str | None:
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (dynamo) is not supported on this Python/platform"
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
        return "torch.compile's CPU backend (inductor) needs a C/C++ compiler; none on PATH"
    return None


@pytest.mark.slow  # inductor's first compile takes ~20 s on 2 shared cores
@pytest.mark.skipif(_no_compiler_reason() is not None, reason=str(_no_compiler_reason()))
def test_torch_compile_matches_eager():
    model = create_model("mlp", 5, (1, 8, 8), seed=0, widths=[16])
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = model(x)
    expected.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model)
    start = time.perf_counter()
    got = compiled(x)
    got.sum().backward()
    print(f"compile + first call: {time.perf_counter() - start:.1f} s")
    assert head_of(compiled) is model.head
    torch.testing.assert_close(got, expected)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)

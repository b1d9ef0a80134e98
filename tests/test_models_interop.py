"""Per-sample gradients through our models with torch.func (functional_call + vmap + grad).

Opacus and BackPACK (hook-based per-sample-gradient tools) are not installed, so these tests
use torch.func, which computes per-sample gradients as one vmapped function. Each test checks that the per-sample gradients of
the mean cross-entropy exist for every parameter and that their mean over the batch equals
the gradient of an ordinary ``loss.backward()`` on the whole batch. Models run in eval mode:
BatchNorm then uses its running statistics, so samples are independent and the identity
holds exactly up to rounding (in training mode batch statistics couple the samples). The
running statistics are first set from one warm-up batch: with a fresh model's (0, 1) statistics
the deep networks' logits are huge, the softmax saturates and every sample's head gradient is
the same one-hot difference, which would make a per-sample test weak.

The comparison is in float64, where rtol 1e-5 leaves no room for a real mismatch but is far
above the rounding of a different summation order.

These are interoperability checks, not in-place detectors: torch.func (2.14) also copes with
the former in-place versions of these models. ``test_models.py`` checks for in-place ops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ban_analysis.models import MODELS, create_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def per_sample_and_batch_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """({name: (B, *shape) per-sample grads}, {name: batch grad}) of the mean cross-entropy."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def loss_one(p, xi, yi):  # one sample, run as a batch of one
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(logits, yi.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return per_sample, {k: p.grad for k, p in model.named_parameters()}


def calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of batch ``x``; leaves eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, exactly its statistics
    with torch.no_grad():
        model.train()(x)
    model.eval()


def check_model(model: nn.Module, shape: tuple[int, int, int], batch: int = 4) -> None:
    model = model.double()
    g = torch.Generator().manual_seed(0)
    calibrate_batchnorm(model, torch.randn(8, *shape, generator=g, dtype=torch.float64))
    x = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (batch,), generator=g)
    per_sample, batch_grads = per_sample_and_batch_grads(model, x, y)
    assert per_sample.keys() == batch_grads.keys() == dict(model.named_parameters()).keys()
    for name, g_batch in batch_grads.items():
        g_each = per_sample[name]
        assert g_each.shape == (batch, *g_batch.shape), name
        assert torch.isfinite(g_each).all(), name
        torch.testing.assert_close(g_each.mean(0), g_batch, rtol=1e-5, atol=1e-12, msg=lambda m: f"{name}: {m}")
    # The samples' gradients really differ (not one gradient broadcast over the batch).
    flat = torch.cat([g.flatten(1) for g in per_sample.values()], dim=1)  # (B, n_params)
    assert not torch.allclose(flat[0], flat[1])


def test_per_sample_grads_mlp():
    check_model(create_model("mlp", 10, (1, 8, 8), seed=0, widths=[32, 16]), (1, 8, 8))


def test_per_sample_grads_cifar_resnet():
    # ResNet-20 (BatchNorm, option-A zero-pad shortcuts, residual sums) at 16x16 to stay fast.
    check_model(create_model("resnet20", 10, (3, 16, 16), seed=0), (3, 16, 16))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_per_sample_grads_every_registered_model(name):
    # The torchvision models included: their in-place forwards were rewritten out of place.
    shape = MODELS[name].test_input_shape
    check_model(create_model(name, 10, shape, seed=0), shape, batch=2)

"""Per-sample term gradient vectors: they add up to each sample's own loss gradient, and their mean to G."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ban_analysis as ba
from ban_analysis.instrument.vectors import per_sample_term_grads

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_target_plus_dark_is_the_per_sample_loss_gradient():
    torch.manual_seed(0)
    model = ba.create_model("mlp", num_classes=4, input_shape=(1, 3, 3), widths=[8]).double()
    x = torch.randn(5, 1, 3, 3, dtype=torch.float64)
    teacher = torch.randn(5, 4, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3, 0])
    z = model(x)
    out = ba.get_objective("ban")(z, teacher, target)
    vecs = per_sample_term_grads(model, z, out.logit_grad, target, rows=[1, 3])
    for i, s in enumerate([1, 3]):
        # independent: the gradient of sample s's own loss H(p_s, q_s) (no BatchNorm: no coupling)
        loss_s = -(F.softmax(teacher[s], 0) * F.log_softmax(model(x[s:s + 1])[0], 0)).sum()
        grads = torch.autograd.grad(loss_s, list(model.parameters()))
        for (name, _), g in zip(model.named_parameters(), grads):
            torch.testing.assert_close(vecs["target"][name][i] + vecs["dark"][name][i], g)
    # the target term uses only the label coordinate: its head-bias gradient is zero elsewhere
    bias = [n for n, _ in model.named_parameters() if n.endswith("bias")][-1]
    tb = vecs["target"][bias]
    assert torch.count_nonzero(tb[0]) == 1 and tb[0].nonzero().item() == target[1].item()


def test_mean_over_the_batch_is_the_batch_gradient():
    torch.manual_seed(1)
    model = ba.create_model("mlp", num_classes=3, input_shape=(1, 2, 2), widths=[6]).double()
    x, target = torch.randn(4, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 2, 1, 1])
    z = model(x)
    out = ba.get_objective("ce")(z, None, target)
    vecs = per_sample_term_grads(model, z, out.logit_grad, target, rows=range(4))
    batch = torch.autograd.grad(out.loss, list(model.parameters()), retain_graph=True)
    for (name, _), g in zip(model.named_parameters(), batch):
        torch.testing.assert_close((vecs["target"][name] + vecs["dark"][name]).mean(0), g)
    with pytest.raises(ValueError, match="rows must be batch positions"):
        per_sample_term_grads(model, z, out.logit_grad, target, rows=[7])

"""Tests of ``cwtc``: label CE weighted by the teacher's probability of the true label
(Tang et al. 2020, arXiv 2002.03532), against ``cwtm`` (Furlanello et al. 2018, eq. 10) and ``ce``.

The generic checks (output contract, gradcheck in float64, agreement with autograd of a plain
torch forward, the pure-Python equation on the hand-built cases, bad inputs) run for ``cwtc``
through the parametrised tests of tests/test_losses.py; these are its specific cases.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ban_analysis.losses import get_objective
from ban_analysis.losses.cwtc import teacher_label_weights
from tests.conftest import gen, make_batch

# conftest.one_torch_thread: these tensors are tiny (see the fixture for why one thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def call(name, student, teacher, target, seed=123):
    return get_objective(name)(student, teacher, target, generator=gen(seed))


def test_weights_are_teacher_label_probability_normalised_and_gradient_closed_form():
    student, teacher, target = make_batch(B=50, C=10, seed=6, dtype=torch.float32)
    out = call("cwtc", student, teacher, target)
    p_label = torch.softmax(teacher, 1)[torch.arange(50), target]
    torch.testing.assert_close(out.sample_weight, p_label / p_label.sum())
    assert out.sample_weight.sum().item() == pytest.approx(1.0, abs=1e-6)
    # Per-sample gradient w_s (q_s - onehot(y_s)); the target is the one-hot label.
    expected = out.sample_weight[:, None] * (torch.softmax(student, 1) - F.one_hot(target, 10))
    torch.testing.assert_close(out.logit_grad, expected)
    assert torch.equal(out.target_dist, F.one_hot(target, 10).float())


def test_hand_computed_numbers():
    """p = softmax([log 3, 0]) = (3/4, 1/4) in both rows; labels 0 and 1, so p_label = (3/4, 1/4)
    and w = (3/4, 1/4), while cwtm's p_max = (3/4, 3/4) gives w = (1/2, 1/2). A uniform student
    q = (1/2, 1/2) has CE log 2 in each row, so both losses are log 2; the gradients are
    w_s (q_s - onehot(y_s)): (3/4)(-1/2, 1/2) and (1/4)(1/2, -1/2)."""
    z = torch.zeros(2, 2, dtype=torch.float64)
    t = torch.tensor([[math.log(3.0), 0.0]] * 2, dtype=torch.float64)
    y = torch.tensor([0, 1])
    cwtc, cwtm = call("cwtc", z, t, y), call("cwtm", z, t, y)
    assert cwtc.sample_weight.tolist() == pytest.approx([0.75, 0.25], rel=1e-15)
    assert cwtm.sample_weight.tolist() == pytest.approx([0.5, 0.5], rel=1e-15)
    assert cwtc.loss.item() == pytest.approx(math.log(2), rel=1e-15)
    assert cwtc.logit_grad.tolist() == [pytest.approx([-0.375, 0.375]), pytest.approx([0.125, -0.125])]
    assert cwtm.logit_grad.tolist() == [pytest.approx([-0.25, 0.25]), pytest.approx([0.25, -0.25])]


@pytest.mark.parametrize("teacher_kind", ["uniform", "same_label_probability"])
def test_equal_label_probabilities_give_plain_ce(teacher_kind):
    student, _, target = make_batch(B=5, C=4, seed=7)
    if teacher_kind == "uniform":
        teacher = torch.zeros(5, 4, dtype=torch.float64)
    else:  # p_label = softmax([3, 1, 0, 0])_0 in every row, the rest of each row arranged differently
        teacher = torch.zeros(5, 4, dtype=torch.float64)
        for s in range(5):
            others = [c for c in range(4) if c != target[s]]
            teacher[s, target[s]] = 3.0
            teacher[s, others[s % 3]] = 1.0
    cw, ce = call("cwtc", student, teacher, target), call("ce", student, None, target)
    torch.testing.assert_close(cw.sample_weight, torch.full((5,), 0.2, dtype=torch.float64), rtol=1e-15, atol=0)
    torch.testing.assert_close(cw.loss, ce.loss, rtol=1e-15, atol=0)
    torch.testing.assert_close(cw.logit_grad, ce.logit_grad, rtol=1e-15, atol=1e-17)


def test_sample_whose_label_probability_is_zero_gets_weight_zero():
    """Row 1's label logit is 1000 below its max: p_label = exp(-1000) = 0 in float64, so that
    sample contributes nothing and the loss is the CE of the other two samples, weighted by
    their p_label."""
    student = torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.0, -2.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1000.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    target = torch.tensor([0, 0, 1])
    out = call("cwtc", student, teacher, target)
    assert out.sample_weight[1].item() == 0.0
    assert (out.logit_grad[1] == 0).all()
    p_label = torch.softmax(teacher, 1)[[0, 2], [0, 1]]
    expected_w = p_label / p_label.sum()
    torch.testing.assert_close(out.sample_weight[[0, 2]], expected_w, rtol=1e-14, atol=0)
    ce_rows = F.cross_entropy(student[[0, 2]], target[[0, 2]], reduction="none")
    torch.testing.assert_close(out.loss, (expected_w * ce_rows).sum(), rtol=1e-14, atol=0)


def test_weights_stay_finite_when_every_label_probability_underflows():
    """In float32, p_label = exp(-130) and exp(-110) both underflow to 0, so p / sum p is 0 / 0;
    the weights are their ratio all the same (computed in log space), as float64 gives it."""
    teacher = torch.tensor([[0.0, 130.0], [0.0, 110.0]])
    target = torch.tensor([0, 0])
    assert (torch.softmax(teacher, 1)[:, 0] == 0).all()
    out = call("cwtc", torch.zeros(2, 2), teacher, target)
    p64 = torch.softmax(teacher.double(), 1)[:, 0]
    torch.testing.assert_close(out.sample_weight.double(), p64 / p64.sum(), rtol=1e-6, atol=0)
    assert torch.isfinite(out.loss) and torch.isfinite(out.logit_grad).all()
    torch.testing.assert_close(teacher_label_weights(teacher, target), out.sample_weight, rtol=0, atol=0)


def test_equals_cwtm_when_teacher_is_right_and_differs_when_it_is_wrong():
    student, teacher, target = make_batch(B=8, C=5, seed=11)
    right = teacher.argmax(1)  # labels = teacher argmax: p_label = p_max in every row
    a, b = call("cwtc", student, teacher, right), call("cwtm", student, teacher, right)
    torch.testing.assert_close(a.sample_weight, b.sample_weight, rtol=1e-15, atol=0)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-15, atol=0)
    torch.testing.assert_close(a.logit_grad, b.logit_grad, rtol=1e-15, atol=1e-17)

    wrong = right.clone()
    wrong[0] = (right[0] + 1) % 5  # sample 0: teacher argmax != label
    a, b = call("cwtc", student, teacher, wrong), call("cwtm", student, teacher, wrong)
    assert not torch.allclose(a.sample_weight, b.sample_weight)
    assert not torch.allclose(a.loss, b.loss)
    # cwtm still weights sample 0 by the teacher's max; cwtc by its (smaller) label probability.
    assert a.sample_weight[0] < b.sample_weight[0]
    p = torch.softmax(teacher, 1)
    p_label = p[torch.arange(8), wrong]
    torch.testing.assert_close(a.sample_weight, p_label / p_label.sum(), rtol=1e-14, atol=0)


def test_teacher_gets_no_gradient_and_weights_are_detached():
    student, teacher, target = make_batch(B=6, C=5, seed=12)
    z = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    out = call("cwtc", z, t, target)
    assert not out.sample_weight.requires_grad
    out.loss.backward()
    assert t.grad is None
    torch.testing.assert_close(z.grad, out.logit_grad, rtol=0, atol=0)


def test_gradcheck_with_a_wrong_and_underconfident_teacher():
    """Float64 gradcheck on a batch where the teacher is wrong on half the samples and p_label
    spans several orders of magnitude (the generic gradcheck uses a random teacher)."""
    student = torch.randn(4, 6, dtype=torch.float64, generator=gen(13))
    teacher = torch.tensor([[4.0, 0, 0, 0, 0, 0], [0, 6.0, 0, 0, 0, 0], [0, 0, 0.5, 0, 0, 0], [0, 0, 0, 0, 0, 9.0]],
                           dtype=torch.float64)
    target = torch.tensor([0, 2, 2, 1])
    obj = get_objective("cwtc")
    assert torch.autograd.gradcheck(lambda z: obj(z, teacher, target).loss,
                                    (student.clone().requires_grad_(True),))

"""Tests of the two probes of Furlanello et al. 2018: CWTM (eq. 10) and DKPP (eq. 11).

DKPP's permutation is checked for what eq. 11 demands (argmax kept, each row's values kept,
rows permuted independently, fresh per call, reproducible from the generator) and for
uniformity with chi-square tests over many draws. Split from test_losses.py to keep files short.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chi2_contingency, chisquare

from ban_analysis.losses import get_objective
from ban_analysis.losses.dkpp import permute_dark_knowledge
from tests.conftest import gen, make_batch


# conftest.one_torch_thread: these tensors are tiny (see the fixture for why one thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def call(name, student, teacher, target, seed=123):
    return get_objective(name)(student, teacher, target, generator=gen(seed))


# ------------------------------------------------------------------------------------- CWTM


def test_cwtm_weights_sum_to_one_and_follow_teacher_max():
    student, teacher, target = make_batch(B=50, C=10, seed=6, dtype=torch.float32)
    out = call("cwtm", student, teacher, target)
    assert out.sample_weight.sum().item() == pytest.approx(1.0, abs=1e-6)
    p_max = torch.softmax(teacher, 1).max(1).values
    torch.testing.assert_close(out.sample_weight, p_max / p_max.sum())
    # Per-sample gradient w_s (q_s - onehot(y_s)), eq. 10.
    expected = out.sample_weight[:, None] * (torch.softmax(student, 1) - F.one_hot(target, 10))
    torch.testing.assert_close(out.logit_grad, expected)


def test_cwtm_with_equally_confident_teacher_is_ce():
    student, _, target = make_batch(B=5, C=4, seed=7)
    teacher = torch.tensor([[3.0, 1.0, 0.0, 0.0]]).repeat(5, 1).double()
    for s in range(5):  # same confidence, different argmax per row
        teacher[s] = teacher[s].roll(s)
    cw, ce = call("cwtm", student, teacher, target), call("ce", student, None, target)
    torch.testing.assert_close(cw.loss, ce.loss)
    torch.testing.assert_close(cw.logit_grad, ce.logit_grad)


# ------------------------------------------------------------------------------------- DKPP


def _dkpp_target(teacher, target=None, anchor="argmax", seed=0):
    B = teacher.shape[0]
    target = torch.zeros(B, dtype=torch.int64) if target is None else target
    out = get_objective("dkpp", anchor=anchor)(torch.zeros_like(teacher), teacher, target, generator=gen(seed))
    return out.target_dist, torch.softmax(teacher, 1)


def test_dkpp_keeps_argmax_and_each_rows_values():
    student, teacher, target = make_batch(B=64, C=10, seed=8, dtype=torch.float32)
    r, p = _dkpp_target(teacher, target)
    a = p.argmax(1)
    rows = torch.arange(64)
    assert torch.equal(r[rows, a], p[rows, a])
    assert torch.equal(r.sort(1).values, p.sort(1).values)  # same multiset, values moved not recomputed
    assert not torch.equal(r, p)  # and something did move


def test_dkpp_label_anchor_puts_max_at_label():
    _, teacher, target = make_batch(B=64, C=10, seed=9, dtype=torch.float32)
    r, p = _dkpp_target(teacher, target, anchor="label")
    rows = torch.arange(64)
    assert torch.equal(r[rows, target], p.max(1).values)
    assert torch.equal(r.sort(1).values, p.sort(1).values)


def test_dkpp_ties_anchor_first_argmax():
    teacher = torch.tensor([[1.0, 2.0, 2.0, 0.0, -1.0]]).repeat(200, 1)
    r, p = _dkpp_target(teacher)
    assert torch.equal(r[:, 1], p[:, 1])  # first of the tied maxima stays
    assert torch.equal(r.sort(1).values, p.sort(1).values)
    assert (r[:, 2] != p[0, 2]).any()  # the second maximum is permuted like any other entry


def test_dkpp_reproducible_from_generator_and_fresh_per_call():
    _, teacher, _ = make_batch(B=32, C=10, seed=10, dtype=torch.float32)
    r1, _ = _dkpp_target(teacher, seed=3)
    r2, _ = _dkpp_target(teacher, seed=3)
    r3, _ = _dkpp_target(teacher, seed=4)
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)
    obj, g = get_objective("dkpp"), gen(3)
    z, y = torch.zeros(32, 10), torch.zeros(32, dtype=torch.int64)
    first, second = obj(z, teacher, y, generator=g), obj(z, teacher, y, generator=g)
    assert torch.equal(first.target_dist, r1) and not torch.equal(first.target_dist, second.target_dist)


def _arrangement_ids(r, values):
    """Index (0..k!-1) of the arrangement of ``values`` in each row's non-anchor columns."""
    perms = {perm: i for i, perm in enumerate(itertools.permutations(range(len(values))))}
    ids = []
    for row in r.tolist():
        placed = [v for v in row if v in values]
        ids.append(perms[tuple(values.index(v) for v in placed)])
    return torch.tensor(ids)


@pytest.mark.parametrize("anchor", ["argmax", "label"])
def test_dkpp_uniform_over_permutations_and_independent_rows(anchor):
    """C = 4: the 3 non-anchor values have 3! = 6 arrangements; all must be equally likely,
    and the arrangements of two rows must be independent (a batch-wide shuffle would fail)."""
    n = 12000
    teacher = torch.tensor([[3.0, 2.0, 1.0, 0.0]], dtype=torch.float64).repeat(n, 1)
    target = torch.full((n,), 2, dtype=torch.int64)  # label != argmax: for "label" the max moves
    r, p = _dkpp_target(teacher, target, anchor=anchor, seed=11)
    dest = 0 if anchor == "argmax" else 2
    assert (r[:, dest] == p[0, 0]).all()
    values = sorted(p[0, 1:].tolist())
    ids = _arrangement_ids(r, values)
    counts = torch.bincount(ids, minlength=6)
    assert chisquare(counts.numpy()).pvalue > 1e-3, counts
    table = torch.zeros(6, 6)
    for i, j in zip(ids[0::2].tolist(), ids[1::2].tolist()):
        table[i, j] += 1
    assert chi2_contingency(table.numpy()).pvalue > 1e-3


def test_dkpp_uniform_over_positions_c10():
    """Each of the 9 non-argmax values lands on each of the 9 other classes equally often."""
    n = 9000
    teacher = torch.linspace(2.0, 0.0, 10, dtype=torch.float64).repeat(n, 1)  # distinct values, argmax 0
    r, p = _dkpp_target(teacher, seed=12)
    for v in p[0, 1:]:
        positions = (r == v).nonzero()[:, 1]
        assert positions.numel() == n and positions.min() >= 1
        counts = torch.bincount(positions - 1, minlength=9)
        assert chisquare(counts.numpy()).pvalue > 1e-3 / 9, (v, counts)


def test_permute_dark_knowledge_is_a_bijection():
    p = torch.softmax(torch.randn(100, 7, generator=gen(13)), 1)
    anchor = p.argmax(1)
    dest = torch.randint(0, 7, (100,), generator=gen(14))
    r = permute_dark_knowledge(p, anchor, dest, gen(15))
    rows = torch.arange(100)
    assert torch.equal(r[rows, dest], p[rows, anchor])
    assert torch.equal(r.sort(1).values, p.sort(1).values)


def test_dkpp_requires_a_generator():
    student, teacher, target = make_batch()
    with pytest.raises(ValueError, match="needs a torch.Generator; generator=None is not allowed"):
        get_objective("dkpp")(student, teacher, target)

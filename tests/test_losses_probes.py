"""Tests of the two probes of Furlanello et al. 2018: CWTM (eq. 10) and DKPP (eq. 11).

DKPP's permutation is checked for what eq. 11 demands (argmax kept, each row's values kept,
rows permuted independently, fresh per call, reproducible from the generator) and for
uniformity with chi-square tests over many draws, including the step that re-orders random
keys that tied (common at C ~ 1000 with int32 keys, so it is tested on its own with forced
ties). Split from test_losses.py to keep files short.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chi2_contingency, chisquare

from ban_analysis.losses import dkpp, get_objective
from ban_analysis.losses.dkpp import anchor_first_orders, permute_dark_knowledge
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


@pytest.mark.parametrize("anchor_col, dest_col", [(0, 0), (2, 2), (3, 0), (1, 3)])
def test_permute_dark_knowledge_uniform_for_any_anchor_and_destination(anchor_col, dest_col):
    """C = 4, anchor and destination anywhere: the 3 non-anchor values fill the 3
    non-destination classes in each of the 3! = 6 arrangements equally often."""
    n = 6000
    values = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    values[anchor_col], values[3] = values[3].item(), values[anchor_col].item()  # max (0.4) at the anchor
    p = values.repeat(n, 1)
    anchor = torch.full((n,), anchor_col)
    dest = torch.full((n,), dest_col)
    r = permute_dark_knowledge(p, anchor, dest, gen(16))
    assert (r[:, dest_col] == 0.4).all()
    assert torch.equal(r.sort(1).values, p.sort(1).values)
    others = [c for c in range(4) if c != dest_col]
    ids = _arrangement_ids(r[:, others], [0.1, 0.2, 0.3])
    assert chisquare(torch.bincount(ids, minlength=6).numpy()).pvalue > 1e-3


@pytest.mark.parametrize("C", [2, 3, 10, 1000, 1024, 1025, 1500])
def test_anchor_first_orders_are_permutations_for_both_key_widths(C):
    """int32 keys up to C = 1024, int64 above: column 0 is the anchor slot (0), the others are
    each non-anchor column exactly once; the same generator state gives the same orders."""
    B = 64
    anchor = torch.randint(0, C, (B,), generator=gen(17))
    order = anchor_first_orders(anchor, C, gen(18))
    assert order.dtype == (torch.int32 if C <= 1024 else torch.int64)
    assert (order[:, 0] == 0).all()
    expected = torch.arange(C).repeat(B, 1)
    expected = expected[expected != anchor.unsqueeze(1)].view(B, C - 1)
    assert torch.equal(order[:, 1:].long().sort(1).values, expected)
    assert torch.equal(anchor_first_orders(anchor, C, gen(18)), order)
    if C >= 10:
        assert not torch.equal(anchor_first_orders(anchor, C, gen(19)), order)


def test_tied_keys_occur_at_c1000_and_are_reordered(monkeypatch):
    """With int32 keys at C = 1000 (21 random bits per key) about 1 row in 5 has two keys with
    the same random bits; the full path through the tie step still gives valid permutations."""
    calls = []
    original = dkpp._shuffle_tied_runs_

    def spy(keys, bits, generator, start=0, spare=None):
        high = keys[:, start:] >> bits
        calls.append(int((torch.diff(high, dim=1) == 0).any(dim=1).sum()))
        original(keys, bits, generator, start, spare)

    monkeypatch.setattr(dkpp, "_shuffle_tied_runs_", spy)
    B, C = 256, 1000
    p = torch.softmax(3 * torch.randn(B, C, generator=gen(20), dtype=torch.float64), 1)
    a = p.argmax(1)
    r = permute_dark_knowledge(p, a, a, gen(21))
    assert calls and calls[0] > 20  # ~54 expected
    assert torch.equal(r[torch.arange(B), a], p[torch.arange(B), a])
    assert torch.equal(r.sort(1).values, p.sort(1).values)


def test_shuffle_tied_runs_uniform_within_runs_independent_and_local():
    """Forced ties: even rows have runs at positions 1-2 (size 2) and 4-6 (size 3), odd rows
    none. Each run's arrangement must be uniform (2 and 6 outcomes), the two runs of a row and
    the runs of different rows independent; entries outside runs and tie-free rows stay put."""
    n = 6000
    high = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4], dtype=torch.int32).repeat(n, 1)
    high[1::2] = torch.arange(8, dtype=torch.int32)
    keys = (high << 3) | torch.arange(8, dtype=torch.int32)  # random bits above the 3 column bits
    dkpp._shuffle_tied_runs_(keys, 3, gen(22))
    assert torch.equal(keys >> 3, high)  # still sorted by random bits
    order = keys & 7
    tied, free = order[0::2], order[1::2]
    assert torch.equal(free, torch.arange(8, dtype=torch.int32).repeat(n // 2, 1))
    assert (tied[:, [0, 3, 7]] == torch.tensor([0, 3, 7], dtype=torch.int32)).all()
    assert torch.equal(tied[:, 1:3].sort(1).values, torch.tensor([1, 2], dtype=torch.int32).repeat(n // 2, 1))
    assert torch.equal(tied[:, 4:7].sort(1).values, torch.tensor([4, 5, 6], dtype=torch.int32).repeat(n // 2, 1))
    pair = (tied[:, 1] == 2).long()  # 0: (1, 2), 1: (2, 1)
    triple = _arrangement_ids(tied[:, 4:7], [4, 5, 6])
    assert chisquare(torch.bincount(pair, minlength=2).numpy()).pvalue > 1e-3
    assert chisquare(torch.bincount(triple, minlength=6).numpy()).pvalue > 1e-3
    within = torch.zeros(2, 6)
    within.index_put_((pair, triple), torch.ones(len(pair)), accumulate=True)
    assert chi2_contingency(within.numpy()).pvalue > 1e-3
    across = torch.zeros(6, 6)
    across.index_put_((triple[0::2], triple[1::2]), torch.ones(len(triple) // 2), accumulate=True)
    assert chi2_contingency(across.numpy()).pvalue > 1e-3


def test_shuffle_tied_runs_never_moves_entries_across_rows():
    """Whole rows tied with the same random bits as the next row: runs end at the row boundary.
    (Low 12 bits: a batch-wide entry number, so an entry moved to another row would show.)"""
    n, C = 500, 3
    keys = torch.arange(n * C).view(n, C)  # random bits (above bit 12) 0 everywhere
    dkpp._shuffle_tied_runs_(keys, 12, gen(23))
    assert torch.equal(keys.sort(1).values, torch.arange(n * C).view(n, C))
    assert chisquare(torch.bincount(keys[:, 0] % C, minlength=C).numpy()).pvalue > 1e-3


def test_row_sort_matches_torch_sort():
    """The CPU path sorts with numpy; every other device with torch.sort: same result."""
    keys = torch.randint(-(2**31), 2**31 - 1, (50, 300), generator=gen(24), dtype=torch.int32)
    keys = keys.bitwise_and_(~511).bitwise_or_(torch.arange(300, dtype=torch.int32))  # distinct per row
    expected = torch.sort(keys, dim=1).values
    assert torch.equal(dkpp._sort_rows_(keys.clone()), expected)


@pytest.mark.parametrize("drawn", ["zero", "all_ones"])
def test_orders_uniform_when_every_key_draws_the_same_random_bits(drawn):
    """C = 4, anchor 2: all three other columns draw the same random bits (all 0, or all 1), so
    the sort alone would order them by index. The tie step must make all 3! orders equally
    likely, independently per row, and leave the anchor slot first."""
    n = 6000
    value = 0 if drawn == "zero" else -1
    keys = torch.full((n, 4), value, dtype=torch.int32)
    anchor = torch.full((n,), 2)
    order = dkpp._orders_from_random_bits_(keys, anchor, gen(25))
    assert (order[:, 0] == 0).all()
    assert torch.equal(order[:, 1:].sort(1).values, torch.tensor([0, 1, 3], dtype=torch.int32).repeat(n, 1))
    ids = _arrangement_ids(order[:, 1:], [0, 1, 3])
    assert chisquare(torch.bincount(ids, minlength=6).numpy()).pvalue > 1e-3
    table = torch.zeros(6, 6)
    table.index_put_((ids[0::2], ids[1::2]), torch.ones(n // 2), accumulate=True)
    assert chi2_contingency(table.numpy()).pvalue > 1e-3


def test_only_the_anchor_key_is_negative():
    """Column 0 draws the int32 minimum (only the sign bit set, which is cleared): it sorts
    right after the anchor (the one negative key), the rest in random-bit order, no ties."""
    keys = torch.tensor([[torch.iinfo(torch.int32).min, 5 << 3, 1 << 3, 7 << 3, 3 << 3, 2 << 3]], dtype=torch.int32)
    order = dkpp._orders_from_random_bits_(keys, torch.tensor([4]), gen(26))
    assert order.tolist() == [[0, 0, 2, 5, 1, 3]]


def test_shuffle_tied_runs_leaves_columns_before_start_alone():
    n = 2000
    keys = (torch.tensor([0, 0, 1, 1], dtype=torch.int32) << 2) | torch.arange(4, dtype=torch.int32)
    keys = keys.repeat(n, 1)
    dkpp._shuffle_tied_runs_(keys, 2, gen(27), start=1)
    order = keys & 3
    assert (order[:, :2] == torch.tensor([0, 1], dtype=torch.int32)).all()  # 0-1 tie ignored, 1 alone
    assert chisquare(torch.bincount((order[:, 2] == 3).long(), minlength=2).numpy()).pvalue > 1e-3


def test_row_argmax_is_torch_argmax_first_maximum():
    p = torch.tensor([[0.1, 0.4, 0.4, 0.1], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 1.0]])
    for x in (p, p.double(), torch.softmax(torch.randn(64, 1000, generator=gen(28)), 1)):
        assert torch.equal(dkpp.row_argmax(x), x.argmax(1))
        assert dkpp.row_argmax(x).dtype == torch.int64
    assert dkpp.row_argmax(p).tolist() == [1, 0, 3]
    assert torch.equal(dkpp.row_argmax(p.clone().requires_grad_(True)), p.argmax(1))  # the torch path


@pytest.mark.parametrize("C", [10, 1000, 1500])
def test_numpy_and_torch_paths_give_the_same_permutation(monkeypatch, C):
    """CPU tensors use numpy for the argmax, the row sort and the small tie arrays; other
    devices use torch ops. Same generator state, same result, ties included (C = 1000)."""
    p = torch.softmax(3 * torch.randn(128, C, generator=gen(29)), 1)
    y = torch.randint(0, C, (128,), generator=gen(30))
    obj = get_objective("dkpp", anchor="label")
    via_numpy = obj(torch.zeros_like(p), p.log(), y, generator=gen(31)).target_dist
    monkeypatch.setattr(dkpp, "_NUMPY_ON_CPU", False)
    via_torch = obj(torch.zeros_like(p), p.log(), y, generator=gen(31)).target_dist
    assert torch.equal(via_numpy, via_torch)


def test_scratch_memory_reused_only_when_it_fits_and_changes_nothing():
    like = torch.empty(4, 10, dtype=torch.int32)
    fits = torch.empty(4, 10, dtype=torch.float32)
    assert dkpp._buffer_like(like, fits).data_ptr() == fits.data_ptr()
    assert dkpp._buffer_like(like, torch.empty(4, 10, dtype=torch.float64)).shape == (4, 10)
    for spare in (None, torch.empty(4, 10, dtype=torch.float16), torch.empty(10, 8)[:, :4]):  # small, strided
        buffer = dkpp._buffer_like(like, spare)
        assert buffer.shape == (4, 10) and buffer.dtype == torch.int32
        assert spare is None or buffer.data_ptr() != spare.data_ptr()
    anchor = torch.randint(0, 1000, (64,), generator=gen(32))
    plain = anchor_first_orders(anchor, 1000, gen(33))
    assert torch.equal(anchor_first_orders(anchor, 1000, gen(33), spare=torch.empty(64, 1000)), plain)


def test_permutation_of_a_tensor_that_requires_grad_is_differentiable():
    p = torch.softmax(torch.randn(8, 6, generator=gen(34), dtype=torch.float64), 1).requires_grad_(True)
    a = p.detach().argmax(1)
    r = permute_dark_knowledge(p, a, a, gen(35))
    assert torch.equal(r.detach(), permute_dark_knowledge(p.detach(), a, a, gen(35)))
    w = torch.randn(8, 6, generator=gen(36), dtype=torch.float64)
    (r * w).sum().backward()
    # d/dp of sum(r * w) puts each weight back on the entry it came from: same multiset per row.
    assert torch.equal(p.grad.sort(1).values, w.sort(1).values)

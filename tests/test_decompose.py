"""Tests of ban_analysis.instrument.decompose: the logit-level split and the per-sample statistics.

Statistics are checked against numpy/scipy computations from the raw logits, not against the
library's own softmax.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import log_softmax as np_log_softmax
from scipy.stats import entropy as np_entropy

from ban_analysis.instrument.decompose import STAT_KEYS, per_sample_stats, split_logit_grad
from ban_analysis.losses import OBJECTIVES, get_objective
from tests.conftest import make_batch

NAMES = list(OBJECTIVES)


# conftest.one_torch_thread: these tensors are tiny (see the fixture for why one thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batch(B=8, C=6, seed=0):
    """float32 logits, the trainer's dtype (conftest.make_batch defaults to float64)."""
    return make_batch(B, C, seed, dtype=torch.float32)


def run(name, student, teacher, target):
    obj = get_objective(name)
    return obj(student, teacher if obj.needs_teacher else None, target, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------ split


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("index_kind", ["label", "teacher_argmax"])
def test_split_parts_sum_to_logit_grad(name, index_kind):
    student, teacher, target = batch(seed=2)
    out = run(name, student, teacher, target)
    index = target if index_kind == "label" else teacher.argmax(1)
    target_part, dark_part = split_logit_grad(out.logit_grad, index)
    assert torch.equal(target_part + dark_part, out.logit_grad)
    rows = torch.arange(len(index))
    mask = torch.zeros_like(out.logit_grad, dtype=torch.bool)
    mask[rows, index] = True
    assert torch.equal(target_part[rows, index], out.logit_grad[rows, index])
    assert (target_part[~mask] == 0).all() and (dark_part[mask] == 0).all()
    assert torch.equal(dark_part[~mask], out.logit_grad[~mask])


def test_split_of_ban_is_eq6_terms():
    """BAN at T = 1: target part q_* - p_* on the label, dark part q_i - p_i elsewhere (eq. 6)."""
    student, teacher, target = batch(B=5, C=4, seed=3)
    out = run("ban", student, teacher, target)
    q, p = torch.softmax(student, 1), torch.softmax(teacher, 1)
    target_part, dark_part = split_logit_grad(out.logit_grad * 5, target)
    rows = torch.arange(5)
    torch.testing.assert_close(target_part[rows, target], (q - p)[rows, target])
    expected_dark = q - p
    expected_dark[rows, target] = 0
    torch.testing.assert_close(dark_part, expected_dark)


@pytest.mark.parametrize(
    "grad, index, message",
    [
        (torch.zeros(4), torch.zeros(4, dtype=torch.int64), r"logit_grad must be a floating point \(B, C\) tensor"),
        (torch.zeros(4, 3, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), "logit_grad must be a floating point"),
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.int32), r"index must be an int64 tensor of shape \(4,\)"),
        (torch.zeros(4, 3), torch.zeros(5, dtype=torch.int64), r"index must be an int64 tensor of shape \(4,\)"),
        (torch.zeros(4, 3), torch.full((4,), 3), r"index values must lie in \[0, 2\], got range \[3, 3\]"),
        (torch.zeros(4, 3), torch.full((4,), -1), r"index values must lie in \[0, 2\]"),
    ],
)
def test_split_bad_inputs(grad, index, message):
    with pytest.raises(ValueError, match=message):
        split_logit_grad(grad, index)


# ---------------------------------------------------------------------------- per-sample stats


def numpy_stats(student, teacher, target, logit_grad):
    """Independent float64 numpy/scipy computation of the documented statistics."""
    z, t, y = student.double().numpy(), teacher.double().numpy(), target.numpy()
    g = logit_grad.double().numpy() * len(y)
    B, C = z.shape
    rows = np.arange(B)
    log_q, log_p = np_log_softmax(z, axis=1), np_log_softmax(t, axis=1)
    q, p = np.exp(log_q), np.exp(log_p)
    dark = g.copy()
    dark[rows, y] = 0
    nontarget = np.delete(p, y[:, None] + C * rows[:, None], axis=None).reshape(B, C - 1)
    ent = np.array([np_entropy(r / r.sum()) for r in nontarget]) / (math.log(C - 1) if C > 2 else 1.0)
    return {
        "g_target": g[rows, y],
        "g_dark_norm": np.linalg.norm(dark, axis=1),
        "g_norm": np.linalg.norm(g, axis=1),
        "p_label": p[rows, y],
        "p_max": p.max(1),
        "teacher_correct": (p.argmax(1) == y).astype(float),
        "teacher_argmax": p.argmax(1),
        "q_label": q[rows, y],
        "cw_part": p[rows, y] * (q[rows, y] - 1),
        "teacher_nontarget_entropy": ent if C > 2 else np.zeros(B),
        "kl_teacher_student": np.array([np_entropy(p[s], q[s]) for s in range(B)]),
    }


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("C", [2, 6, 100])
def test_stats_match_independent_computation(name, C):
    student, teacher, target = batch(B=9, C=C, seed=4)
    out = run(name, student, teacher, target)
    stats = per_sample_stats(student, teacher, target, out)
    assert list(stats) == list(STAT_KEYS)
    for key, value in stats.items():
        assert value.shape == (9,), key
        assert value.dtype == (torch.int64 if key == "teacher_argmax" else torch.float32), key
    expected = numpy_stats(student, teacher, target, out.logit_grad)
    for key, value in expected.items():
        np.testing.assert_allclose(stats[key].numpy(), value, rtol=2e-5, atol=2e-6, err_msg=key)
    np.testing.assert_allclose(stats["sample_weight"].numpy(), out.sample_weight.numpy() * 9, rtol=1e-6)
    assert ((stats["teacher_nontarget_entropy"] >= 0) & (stats["teacher_nontarget_entropy"] <= 1)).all()


def test_stats_without_teacher_are_nan():
    student, _, target = batch(seed=5)
    out = run("ce", student, None, target)
    stats = per_sample_stats(student, None, target, out)
    for key in ("p_label", "p_max", "teacher_correct", "cw_part", "teacher_nontarget_entropy", "kl_teacher_student"):
        assert torch.isnan(stats[key]).all(), key
    assert (stats["teacher_argmax"] == -1).all()
    q_label = torch.softmax(student, 1)[torch.arange(8), target]
    torch.testing.assert_close(stats["q_label"], q_label)
    torch.testing.assert_close(stats["g_target"], q_label - 1)  # CE: per-sample gradient q - onehot


def test_cwtm_per_sample_gradient_has_weight_mean_one():
    student, teacher, target = batch(B=10, C=5, seed=6)
    out = run("cwtm", student, teacher, target)
    stats = per_sample_stats(student, teacher, target, out)
    assert stats["sample_weight"].mean().item() == pytest.approx(1.0, abs=1e-6)
    q_label = torch.softmax(student, 1)[torch.arange(10), target]
    torch.testing.assert_close(stats["g_target"], stats["sample_weight"] * (q_label - 1))


def test_nontarget_entropy_extremes():
    # Label 0. Row 0: teacher certain of the label in float32 (other probs underflow) but uniform
    # among the rest -> 1. Row 1: all non-label mass on one class -> 0. Row 2: uniform -> 1.
    teacher = torch.tensor([[200.0, 0.0, 0.0, 0.0], [0.0, 50.0, -50.0, -50.0], [0.0, 0.0, 0.0, 0.0]])
    target = torch.zeros(3, dtype=torch.int64)
    student = torch.zeros(3, 4)
    stats = per_sample_stats(student, teacher, target, run("ban", student, teacher, target))
    torch.testing.assert_close(stats["teacher_nontarget_entropy"], torch.tensor([1.0, 0.0, 1.0]), atol=1e-5, rtol=0)
    assert stats["teacher_correct"].tolist() == [1.0, 0.0, 1.0]  # ties: first index counts as argmax
    assert stats["teacher_argmax"].tolist() == [0, 1, 0]


def test_stats_bad_inputs():
    student, teacher, target = batch(B=4, C=3, seed=7)
    out = run("ban", student, teacher, target)
    with pytest.raises(ValueError, match=r"teacher_logits shape \(4, 2\) does not match student_logits shape \(4, 3\)"):
        per_sample_stats(student, teacher[:, :2], target, out)
    with pytest.raises(ValueError, match=r"out.logit_grad shape \(4, 3\) does not match student_logits shape \(3, 3\)"):
        per_sample_stats(student[:3], teacher[:3], target[:3], out)
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 2\]"):
        per_sample_stats(student, teacher, target + 3, out)
    with pytest.raises(ValueError, match=r"student_logits must be a floating point \(B, C\) tensor"):
        per_sample_stats(student[0], teacher, target, out)


@pytest.mark.parametrize("shape", [(5000, 10), (3, 10), (200, 3), (64, 100)])
def test_row_log_softmax_matches_torch(shape):
    """per_sample_stats' log-softmax over rows (along the transpose for few classes) is torch's."""
    from ban_analysis.instrument.decompose import _log_softmax_rows

    x = 6 * torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x[0, 0] = -math.inf  # a class with no mass, as the non-label distribution has
    torch.testing.assert_close(_log_softmax_rows(x), torch.log_softmax(x, dim=1), rtol=1e-6, atol=1e-6)

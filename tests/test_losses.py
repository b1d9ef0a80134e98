"""Tests of ban_analysis.losses: every registered objective, its closed form and its inputs.

Three independent references:
- ``torch_reference``: plain-PyTorch forward built from torch.nn.functional; autograd of it must
  equal ``out.logit_grad``;
- ``equation``: the paper's per-sample formula in pure Python (math module, lists) for the
  hand-built examples;
- literal numbers worked out by hand in the docstrings of a few tests.
Tests parametrised over ``OBJECTIVES`` pick up a new objective automatically; those needing a
reference fail for it until one is added here. CWTM and DKPP specifics:
tests/test_losses_probes.py; CWTC specifics: tests/test_losses_cwtc.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ban_analysis.losses import OBJECTIVES, ObjectiveOutput, get_objective
from ban_analysis.losses.functional import label_and_soft_target_loss, soft_target_cross_entropy
from tests.conftest import gen, make_batch

NAMES = list(OBJECTIVES)
# Objectives whose sample weights depend on the teacher; every other one weights samples 1/B.
TEACHER_WEIGHTED = ("cwtm", "cwtc")
# Non-default hyperparameters too, so temperature != 1, alpha at its ends and both DKPP anchors run.
VARIANTS = [(n, {}) for n in NAMES] + [
    ("kd", {"alpha": 0.3, "temperature": 2.0}),
    ("kd", {"alpha": 1.0, "temperature": 1.0}),
    ("kd", {"alpha": 0.0}),
    ("ban", {"temperature": 3.0}),
    ("ban_l", {"label_weight": 0.5, "teacher_weight": 2.0, "temperature": 2.0}),
    ("ban_l", {"label_weight": 0.0}),
    ("ban_l", {"teacher_weight": 0.0}),
    ("dkpp", {"anchor": "label"}),
]
VARIANT_IDS = [n + "".join(f"-{k}={v}" for k, v in p.items()) for n, p in VARIANTS]


# conftest.one_torch_thread: these tensors are tiny (see the fixture for why one thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def call(name, params, student, teacher, target, seed=123) -> ObjectiveOutput:
    return get_objective(name, **params)(student, teacher, target, generator=gen(seed))


# ------------------------------------------------------------------------------- references


def torch_reference(name, params, z, t, y, out):
    """Plain-PyTorch forward of each objective (autograd gives its gradient)."""
    B, C = z.shape
    rows = torch.arange(B)
    if name == "ce":
        return F.cross_entropy(z, y)
    if name == "kd":
        a, T = params.get("alpha", 0.9), params.get("temperature", 4.0)
        kl = F.kl_div(F.log_softmax(z / T, dim=1), F.softmax(t / T, dim=1), reduction="batchmean")
        return (1 - a) * F.cross_entropy(z, y) + a * T * T * kl
    if name == "ban":
        T = params.get("temperature", 1.0)
        return F.cross_entropy(z / T, F.softmax(t / T, dim=1))
    if name == "ban_l":
        lw, tw = params.get("label_weight", 1.0), params.get("teacher_weight", 1.0)
        T = params.get("temperature", 1.0)
        return lw * F.cross_entropy(z, y) + tw * F.cross_entropy(z / T, F.softmax(t / T, dim=1))
    if name == "cwtm":
        p_max = F.softmax(t, dim=1).max(dim=1).values
        return ((p_max / p_max.sum()) * F.cross_entropy(z, y, reduction="none")).sum()
    if name == "cwtc":  # plain p / sum p (the objective normalises in log space)
        p_y = F.softmax(t, dim=1)[rows, y]
        return ((p_y / p_y.sum()) * F.cross_entropy(z, y, reduction="none")).sum()
    if name == "dkpp":
        # The permutation itself is checked by the DKPP tests; here: CE to the drawn target.
        return F.cross_entropy(z, out.target_dist)
    if name == "tmls":
        p_y = F.softmax(t, dim=1)[rows, y]
        r = ((1 - p_y) / (C - 1)).unsqueeze(1).repeat(1, C)
        r[rows, y] = p_y
        return F.cross_entropy(z, r)
    raise AssertionError(f"no torch reference for objective {name!r}: add one to tests/test_losses.py")


def _softmax(row, T=1.0):
    m = max(row)
    e = [math.exp((v - m) / T) for v in row]
    s = sum(e)
    return [x / s for x in e]


def equation(name, params, z, t, y, permuted=None):
    """The objective's equation, sample by sample, in pure Python: (loss, gradient rows)."""
    B, C = len(z), len(z[0])
    onehot = [[1.0 if c == y[s] else 0.0 for c in range(C)] for s in range(B)]
    p = [_softmax(r) for r in t]
    q = [_softmax(r) for r in z]

    def soft_ce(r, qq):
        return -sum(ri * math.log(qi) for ri, qi in zip(r, qq))

    if name in ("ce", "cwtm", "cwtc", "dkpp", "tmls"):
        if name in ("ce", "cwtm", "cwtc"):
            targets = onehot
        elif name == "dkpp":
            targets = permuted
        else:  # tmls: p_y on the label, (1 - p_y)/(C - 1) elsewhere
            targets = [[p[s][y[s]] if c == y[s] else (1 - p[s][y[s]]) / (C - 1) for c in range(C)] for s in range(B)]
        if name == "cwtm":  # eq. 10: w_s = max_j p_js / sum_u max_j p_ju
            total = sum(max(r) for r in p)
            w = [max(r) / total for r in p]
        elif name == "cwtc":  # Tang et al. 2020: w_s = p_{y_s,s} / sum_u p_{y_u,u}
            total = sum(p[s][y[s]] for s in range(B))
            w = [p[s][y[s]] / total for s in range(B)]
        else:
            w = [1.0 / B] * B
        loss = sum(w[s] * soft_ce(targets[s], q[s]) for s in range(B))
        grad = [[w[s] * (q[s][c] - targets[s][c]) for c in range(C)] for s in range(B)]
        return loss, grad
    if name in ("ban", "ban_l", "kd"):
        if name == "kd":
            a, T = params.get("alpha", 0.9), params.get("temperature", 4.0)
            lab, soft, kl = 1 - a, a * T * T, True
        elif name == "ban":
            lab, soft, kl, T = 0.0, 1.0, False, params.get("temperature", 1.0)
        else:
            lab, soft, kl = params.get("label_weight", 1.0), params.get("teacher_weight", 1.0), False
            T = params.get("temperature", 1.0)
        pT = [_softmax(r, T) for r in t]
        qT = [_softmax(r, T) for r in z]
        loss, grad = 0.0, []
        for s in range(B):
            term = soft_ce(pT[s], qT[s])
            if kl:  # KL = CE - teacher entropy
                term -= -sum(pi * math.log(pi) for pi in pT[s] if pi > 0)
            loss += (lab * -math.log(q[s][y[s]]) + soft * term) / B
            grad.append([(lab * (q[s][c] - onehot[s][c]) + soft / T * (qT[s][c] - pT[s][c])) / B for c in range(C)])
        return loss, grad
    raise AssertionError(f"no equation for objective {name!r}: add one to tests/test_losses.py")


# --------------------------------------------------------------------------------- registry


def test_registry_has_the_contract_keys_and_defaults():
    expected = {
        "ce": {},
        "kd": {"alpha": 0.9, "temperature": 4.0},
        "ban": {"temperature": 1.0},
        "ban_l": {"label_weight": 1.0, "teacher_weight": 1.0, "temperature": 1.0},
        "cwtm": {},
        "cwtc": {},
        "dkpp": {"anchor": "argmax"},
        "tmls": {},
    }
    assert set(expected) <= set(OBJECTIVES)
    for name, params in expected.items():
        obj = get_objective(name)
        assert obj.name == name
        assert obj.params == params
        assert obj.needs_teacher == (name != "ce")
        assert repr(obj).startswith(name + "(")


@pytest.mark.parametrize("name", NAMES)
def test_registry_entry_name_and_params_roundtrip(name):
    obj = get_objective(name)
    assert obj.name == name
    assert get_objective(name, **obj.params).params == obj.params


def test_unknown_objective_lists_valid_names():
    valid = ", ".join(sorted(OBJECTIVES))  # every registered objective, in sorted order
    with pytest.raises(ValueError, match=rf"unknown objective 'bann'; valid objectives: {valid}$"):
        get_objective("bann")


@pytest.mark.parametrize("name", NAMES)
def test_unknown_parameter_lists_valid_ones(name):
    valid = ", ".join(get_objective(name).params) or "none"
    with pytest.raises(ValueError, match=rf"unknown parameter\(s\) beta; valid parameters: {valid}$"):
        get_objective(name, beta=1.0)


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("kd", {"alpha": 1.5}, r"kd alpha must lie in \[0.0, 1.0\]"),
        ("kd", {"alpha": -0.1}, r"kd alpha must lie in"),
        ("kd", {"alpha": float("nan")}, r"kd alpha must be finite"),
        ("kd", {"alpha": "0.5"}, r"kd alpha must be a real number"),
        ("kd", {"alpha": True}, r"kd alpha must be a real number"),
        ("kd", {"temperature": 0.0}, r"kd temperature must lie in \(0.0"),
        ("kd", {"temperature": float("inf")}, r"kd temperature must be finite"),
        ("ban", {"temperature": -1.0}, r"ban temperature must lie in \(0.0"),
        ("ban_l", {"label_weight": -1.0}, r"ban_l label_weight must lie in \[0.0"),
        ("ban_l", {"label_weight": 0.0, "teacher_weight": 0.0}, r"cannot both be 0"),
        ("ban_l", {"temperature": 0}, r"ban_l temperature must lie in"),
        ("dkpp", {"anchor": "random"}, r"dkpp anchor must be one of argmax, label; got 'random'"),
    ],
)
def test_bad_hyperparameter_values(name, params, message):
    with pytest.raises(ValueError, match=message):
        get_objective(name, **params)


# ------------------------------------------------------------------------ contract, per objective


@pytest.mark.parametrize("name, params", VARIANTS, ids=VARIANT_IDS)
def test_output_contract(name, params):
    student, teacher, target = make_batch(B=7, C=5, dtype=torch.float32)
    out = call(name, params, student, teacher, target)
    assert isinstance(out, ObjectiveOutput)
    assert out.loss.shape == () and out.loss.dtype == torch.float32
    for x in (out.logit_grad, out.target_dist, out.sample_weight):
        assert x.dtype == torch.float32 and not x.requires_grad
    assert out.logit_grad.shape == out.target_dist.shape == (7, 5)
    assert out.sample_weight.shape == (7,)
    assert torch.allclose(out.sample_weight.sum(), torch.tensor(1.0), atol=1e-6)
    if name not in TEACHER_WEIGHTED:
        assert torch.equal(out.sample_weight, torch.full((7,), 1 / 7))
    assert (out.target_dist >= 0).all()
    assert torch.allclose(out.target_dist.sum(1), torch.ones(7), atol=1e-6)
    # Every objective is a soft-target CE (or sum of them): each gradient row sums to 0.
    assert torch.allclose(out.logit_grad.sum(1), torch.zeros(7), atol=1e-6)


@pytest.mark.parametrize("name, params", VARIANTS, ids=VARIANT_IDS)
def test_logit_grad_matches_backward_and_independent_autograd(name, params):
    student, teacher, target = make_batch(B=6, C=5, seed=1)
    z = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    out = call(name, params, z, t, target)
    out.loss.backward()
    assert t.grad is None, "the teacher must never receive gradient"
    torch.testing.assert_close(z.grad, out.logit_grad, rtol=0, atol=1e-15)

    z_ref = student.clone().requires_grad_(True)
    ref = torch_reference(name, params, z_ref, teacher, target, out)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.logit_grad, z_ref.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, params", VARIANTS, ids=VARIANT_IDS)
def test_gradcheck_float64(name, params):
    student, teacher, target = make_batch(B=3, C=4, seed=2)
    obj = get_objective(name, **params)

    def loss_of(z):  # a fresh generator per evaluation keeps DKPP's permutation fixed
        return obj(z, teacher, target, generator=gen(5)).loss

    assert torch.autograd.gradcheck(loss_of, (student.clone().requires_grad_(True),))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_gradcheck_soft_target_function(temperature):
    z = torch.randn(4, 6, dtype=torch.float64, generator=gen(3), requires_grad=True)
    r = torch.softmax(torch.randn(4, 6, dtype=torch.float64, generator=gen(4)), dim=1)
    w = torch.rand(4, dtype=torch.float64, generator=gen(5))
    assert torch.autograd.gradcheck(lambda x: soft_target_cross_entropy(x, r, w, temperature)[0], (z,))


@pytest.mark.parametrize("label_coef, soft_coef, temperature, kl", [
    (0.3, 1.7, 1.0, False), (0.1, 14.4, 4.0, True), (0.0, 1.0, 2.0, True), (1.0, 0.0, 3.0, False),
])
def test_gradcheck_label_and_soft_function(label_coef, soft_coef, temperature, kl):
    z = torch.randn(4, 6, dtype=torch.float64, generator=gen(3), requires_grad=True)
    y = torch.randint(0, 6, (4,), generator=gen(4))
    r = torch.softmax(torch.randn(4, 6, dtype=torch.float64, generator=gen(5)), dim=1)
    log_r = r.log() if kl else None
    fn = lambda x: label_and_soft_target_loss(x, y, r, label_coef, soft_coef, temperature, log_r)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z,))


@pytest.mark.parametrize("name", NAMES)
def test_non_random_objectives_leave_generator_alone_and_dkpp_uses_it(name):
    student, teacher, target = make_batch()
    g = gen(9)
    before = g.get_state()
    get_objective(name)(student, teacher, target, generator=g)
    assert torch.equal(g.get_state(), before) != get_objective(name).needs_generator


@pytest.mark.parametrize("name", NAMES)
def test_extreme_logits_stay_finite(name):
    student = torch.tensor([[1000.0, -1000.0, 0.0], [-80.0, 80.0, 80.0]])
    teacher = torch.tensor([[-1000.0, 1000.0, 0.0], [300.0, -300.0, 0.0]])
    out = call(name, {}, student, teacher, torch.tensor([0, 2]))
    assert torch.isfinite(out.loss) and torch.isfinite(out.logit_grad).all()


# ----------------------------------------------------------------------- hand-built examples

_g = torch.Generator().manual_seed(77)
HAND_CASES = {
    # teacher right (argmax = label 0), student unsure
    "teacher_right": ([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], [[2.0, 0.5, 0.0], [0.0, 3.0, 1.0]], [0, 1]),
    # teacher wrong: argmax 2 != label 0 and argmax 0 != label 1
    "teacher_wrong": ([[0.0, 1.0, 0.0], [1.0, 1.0, 2.0]], [[0.0, 0.5, 3.0], [2.0, 0.0, 1.0]], [0, 1]),
    # ties: tied teacher max, uniform student, tied teacher non-max entries
    "ties": ([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]], [[1.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]], [1, 3]),
    "C2": ([[0.3, -0.2], [2.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [-1.0, 1.0], [0.7, 0.7]], [0, 0, 1]),
    "B1": ([[0.1, 0.2, 0.3, 0.4, 0.5]], [[1.0, -1.0, 0.5, 0.0, 2.0]], [3]),
    "C100": (
        (2 * torch.randn(4, 100, generator=_g, dtype=torch.float64)).tolist(),
        (3 * torch.randn(4, 100, generator=_g, dtype=torch.float64)).tolist(),
        [0, 17, 42, 99],
    ),
}


@pytest.mark.parametrize("case", list(HAND_CASES))
@pytest.mark.parametrize("name, params", VARIANTS, ids=VARIANT_IDS)
def test_objective_equals_its_equation(name, params, case):
    z, t, y = HAND_CASES[case]
    out = call(name, params, torch.tensor(z, dtype=torch.float64), torch.tensor(t, dtype=torch.float64),
               torch.tensor(y))
    permuted = out.target_dist.tolist() if name == "dkpp" else None
    loss, grad = equation(name, params, z, t, y, permuted)
    assert out.loss.item() == pytest.approx(loss, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(out.logit_grad, torch.tensor(grad, dtype=torch.float64), rtol=1e-10, atol=1e-14)


def test_hand_computed_numbers():
    """p = softmax([log 3, 0]) = (3/4, 1/4); a uniform student q = (1/2, 1/2)."""
    z = torch.zeros(1, 2, dtype=torch.float64)
    t = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    y = torch.tensor([1])
    ban = call("ban", {}, z, t, y)  # H(p, q) = log 2, gradient q - p
    assert ban.loss.item() == pytest.approx(math.log(2))
    assert ban.logit_grad.tolist()[0] == pytest.approx([-0.25, 0.25])
    dkpp = call("dkpp", {}, z, t, y)  # C = 2: nothing to permute, DKPP == BAN
    assert dkpp.target_dist.tolist()[0] == pytest.approx([0.75, 0.25])
    ce = call("ce", {}, z, t, y)
    assert ce.loss.item() == pytest.approx(math.log(2)) and ce.logit_grad.tolist()[0] == pytest.approx([0.5, -0.5])
    # ban_l default = CE + BAN: log 2 + log 2, gradient (q - onehot) + (q - p)
    banl = call("ban_l", {}, z, t, y)
    assert banl.loss.item() == pytest.approx(2 * math.log(2))
    assert banl.logit_grad.tolist()[0] == pytest.approx([0.25, -0.25])
    assert banl.target_dist.tolist()[0] == pytest.approx([0.375, 0.625])
    # tmls with C = 3, p_y = 0.5: target (0.25, 0.5, 0.25)
    t3 = torch.tensor([[0.0, math.log(2.0), 0.0]], dtype=torch.float64)
    tmls = call("tmls", {}, torch.zeros(1, 3, dtype=torch.float64), t3, y)
    assert tmls.target_dist.tolist()[0] == pytest.approx([0.25, 0.5, 0.25])
    assert tmls.loss.item() == pytest.approx(math.log(3))


def test_kd_limits():
    student, teacher, target = make_batch(seed=4)
    ce = call("ce", {}, student, None, target)
    kd0 = call("kd", {"alpha": 0.0}, student, teacher, target)
    torch.testing.assert_close(kd0.loss, ce.loss)
    torch.testing.assert_close(kd0.logit_grad, ce.logit_grad)
    # Student equal to the teacher: the KL term is zero, only the label term remains.
    kd_same = call("kd", {"alpha": 0.4, "temperature": 3.0}, teacher, teacher, target)
    torch.testing.assert_close(kd_same.loss, 0.6 * call("ce", {}, teacher, None, target).loss)
    # At T = 1 the KD gradient is (q - target_dist) / B with target (1 - a) onehot + a p.
    kd1 = call("kd", {"alpha": 0.7, "temperature": 1.0}, student, teacher, target)
    expected = 0.3 * F.one_hot(target, 5) + 0.7 * torch.softmax(teacher, 1)
    torch.testing.assert_close(kd1.target_dist, expected)
    torch.testing.assert_close(kd1.logit_grad, (torch.softmax(student, 1) - expected) / 6)


def test_ce_ignores_the_teacher():
    student, teacher, target = make_batch()
    a = call("ce", {}, student, teacher, target)
    b = call("ce", {}, student, None, target)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.logit_grad, b.logit_grad)
    assert torch.equal(a.target_dist, F.one_hot(target, 5).double())


# ------------------------------------------------------------------------- precision, autocast


@pytest.mark.parametrize("name, params", VARIANTS, ids=VARIANT_IDS)
def test_autocast_bf16_inputs_computed_in_float32(name, params):
    student, teacher, target = make_batch(B=8, C=6, seed=16, dtype=torch.float32)
    z16 = student.bfloat16().requires_grad_(True)
    t16 = teacher.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(name, params, z16, t16, target)
    ref = call(name, params, z16.detach().float(), t16.float(), target)
    assert out.loss.dtype == out.logit_grad.dtype == out.target_dist.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.logit_grad, ref.logit_grad, rtol=1e-6, atol=1e-7)
    out.loss.backward()
    assert z16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(z16.grad.float(), out.logit_grad, rtol=1e-2, atol=1e-4)


def test_autocast_linear_layer_logits_train():
    layer = torch.nn.Linear(12, 5)
    x = torch.randn(8, 12, generator=gen(17))
    teacher = torch.randn(8, 5, generator=gen(18))
    target = torch.randint(0, 5, (8,), generator=gen(19))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        assert logits.dtype == torch.bfloat16
        out = get_objective("ban")(logits, teacher, target)
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_float16_input_without_autocast():
    student, teacher, target = make_batch(dtype=torch.float16)
    out = call("kd", {}, student, teacher, target)
    assert out.loss.dtype == out.logit_grad.dtype == torch.float32


# ------------------------------------------------------------------------------- bad inputs

BAD_INPUTS = {
    # key: (builder(student, teacher, target) -> (student, teacher, target), message, teacher-only?)
    "student_not_tensor": (lambda s, t, y: (s.tolist(), t, y), "student_logits must be a torch.Tensor", False),
    "student_1d": (lambda s, t, y: (s[0], t, y), r"student_logits must have shape \(B, C\)", False),
    "student_3d": (lambda s, t, y: (s[None], t, y), r"student_logits must have shape \(B, C\)", False),
    "student_int": (lambda s, t, y: (s.long(), t, y), "student_logits must be floating point", False),
    "one_class": (lambda s, t, y: (s[:, :1], t[:, :1], y * 0), r"at least 2 classes \(C >= 2\), got C=1", False),
    "empty_batch": (lambda s, t, y: (s[:0], t[:0], y[:0]), r"at least one sample \(B >= 1\)", False),
    "student_nan": (lambda s, t, y: (s.index_fill(1, torch.tensor([1]), math.nan), t, y),
                    "student_logits contains NaN or inf", False),
    "student_inf": (lambda s, t, y: (s.index_fill(1, torch.tensor([0]), math.inf), t, y),
                    "student_logits contains NaN or inf", False),
    "target_float": (lambda s, t, y: (s, t, y.float()), "target must have dtype torch.int64", False),
    "target_int32": (lambda s, t, y: (s, t, y.int()), "target must have dtype torch.int64", False),
    "target_shape": (lambda s, t, y: (s, t, y[:, None]), r"target must have shape \(B,\)", False),
    "target_short": (lambda s, t, y: (s, t, y[:-1]), r"target must have shape \(B,\)", False),
    "target_list": (lambda s, t, y: (s, t, y.tolist()), "target must be a torch.Tensor", False),
    "target_negative": (lambda s, t, y: (s, t, y - 10), r"target values must lie in \[0, 4\]", False),
    "target_too_big": (lambda s, t, y: (s, t, y * 0 + 5), r"target values must lie in \[0, 4\] .* got range \[5, 5\]", False),
    "teacher_missing": (lambda s, t, y: (s, None, y), "teacher_logits is None but this objective needs a teacher", True),
    "teacher_shape": (lambda s, t, y: (s, t[:, :-1], y), r"teacher_logits shape \(6, 4\) does not match", True),
    "teacher_int": (lambda s, t, y: (s, t.long(), y), "teacher_logits must be floating point", True),
    "teacher_nan": (lambda s, t, y: (s, t.index_fill(1, torch.tensor([2]), math.nan), y),
                    "teacher_logits contains NaN or inf", True),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("name", NAMES)
def test_bad_input_raises_naming_the_problem(name, case):
    build, message, teacher_only = BAD_INPUTS[case]
    obj = get_objective(name)
    if teacher_only and not obj.needs_teacher:
        pytest.skip(f"{name} ignores the teacher")
    student, teacher, target = build(*make_batch(B=6, C=5, dtype=torch.float32))
    with pytest.raises(ValueError, match=message):
        obj(student, teacher, target, generator=gen(0))


@pytest.mark.parametrize("name", NAMES)
def test_generator_of_wrong_type(name):
    student, teacher, target = make_batch()
    with pytest.raises(ValueError, match="generator must be a torch.Generator or None, got int"):
        get_objective(name)(student, teacher, target, generator=0)


@pytest.mark.parametrize("name", NAMES)
def test_finite_logits_whose_sum_overflows_are_accepted(name):
    """Validation sums the logits as a fast finiteness test; an overflowing sum of finite
    values must fall back to the exact check rather than reject the input."""
    student = torch.tensor([[3e38, 3e38, 0.0], [1.0, 2.0, 3.0]])
    teacher = torch.tensor([[3e38, 3e38, 0.0], [0.0, 0.0, 1.0]])
    assert not math.isfinite(student.sum().item())
    out = call(name, {}, student, teacher, torch.tensor([0, 2]))
    assert torch.isfinite(out.loss) and torch.isfinite(out.logit_grad).all()

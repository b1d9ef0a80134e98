"""Parameter-level split: every mode against an independent per-sample Python loop (float64).

The loop re-runs the forward for each sample (alone where samples do not interact; the whole
batch on a copy of the model where training-mode BatchNorm couples them) and differentiates
<cotangent_s, z_s> with plain autograd, so it shares no code with the functions under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ban_analysis.instrument import param_grads as pg
from ban_analysis.losses import get_objective

DT = torch.float64
B, C = 6, 5
ROWS = torch.tensor([0, 2, 5])
COLUMNS = ("param_target_norm", "param_dark_norm", "param_cos", "target_cos_batch", "dark_cos_batch")


class Tokens(nn.Module):
    """Linear layers on (B, L, D) inputs (both the Gram and the materialised path) + LayerNorm."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)  # L=3: 3*(8+8) <= 8*8 -> Gram form
        self.norm = nn.LayerNorm(8)
        self.b = nn.Linear(8, 2)  # 3*(8+2) > 8*2 -> materialised
        self.head = nn.Linear(6, C)

    def forward(self, x):
        h = torch.tanh(self.norm(self.a(x.reshape(x.shape[0], 3, 8))))
        return self.head(self.b(h).flatten(1))


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(1)
    if kind == "mlp":
        m = nn.Sequential(nn.Flatten(), nn.Linear(24, 16), nn.ReLU(inplace=True), nn.Linear(16, 12),
                          nn.Tanh(), nn.Linear(12, C))
    elif kind == "tokens":
        m = Tokens()
    else:
        bn = kind == "cnn_bn"
        norm1 = nn.BatchNorm2d(4) if bn else nn.GroupNorm(2, 4)
        m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), norm1, nn.ReLU(inplace=True),
                          nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
                          nn.BatchNorm2d(6) if bn else nn.Identity(), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, C))
    return m.to(DT).train()


def batch(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, 2, 4, 3) if kind in ("mlp", "tokens") else (B, 2, 6, 6)
    x = torch.randn(shape, generator=g, dtype=DT)
    target = torch.randint(0, C, (B,), generator=g)
    teacher_logits = 2 * torch.randn(B, C, generator=g, dtype=DT)
    return x, target, teacher_logits


def forward(model, x, kind):
    """Student forward with activations captured (and the logits' graph)."""
    with pg.capture_activations(model, pg.covered_modules(model)) as captured:
        student_logits = model(x)
    return student_logits, captured


def cotangents(student_logits, teacher_logits, target, objective="ban"):
    out = get_objective(objective)(student_logits, teacher_logits, target)
    g = out.logit_grad * B  # per-sample convention: batch-mean factor removed
    t = torch.zeros_like(g)
    t[torch.arange(B), target] = g[torch.arange(B), target]
    return {"target": t, "dark": g - t}, out


def loop_grads(model, x, cot, rows, coupled):
    """Independent reference: per-sample term gradients (n, P) by a Python loop."""
    res = {t: [] for t in pg.TERMS}
    for s in rows.tolist():
        for term in pg.TERMS:
            m = copy.deepcopy(model)  # BN buffers of the original stay untouched
            z = m(x)[s] if coupled else m(x[s:s + 1])[0]
            g = torch.autograd.grad((z * cot[term][s]).sum(), list(m.parameters()))
            res[term].append(torch.cat([p.reshape(-1) for p in g]))
    return {t: torch.stack(v) for t, v in res.items()}


def stats_of(gt, gd, batch_grad):
    """The five columns from materialised per-sample gradients."""
    n = lambda v: v.norm(dim=1)  # noqa: E731
    return {
        "param_target_norm": n(gt), "param_dark_norm": n(gd),
        "param_cos": (gt * gd).sum(1) / (n(gt) * n(gd)),
        "target_cos_batch": gt @ batch_grad / (n(gt) * batch_grad.norm()),
        "dark_cos_batch": gd @ batch_grad / (n(gd) * batch_grad.norm()),
    }


def batch_grad_of(student_logits, model, cot):
    g = torch.autograd.grad(student_logits, list(model.parameters()), retain_graph=True,
                            grad_outputs=cot["target"] + cot["dark"])
    return torch.cat([p.reshape(-1) for p in g])


def assert_columns_close(got, want, tol=1e-5):
    for k in COLUMNS:
        torch.testing.assert_close(got[k], want[k].to(got[k].dtype), rtol=tol, atol=tol, msg=k)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "tokens", "cnn_bn"])
def test_modes_match_per_sample_loop(kind):
    model = make_model(kind)
    x, target, teacher_logits = batch(kind)
    student_logits, captured = forward(model, x, kind)
    cot, _ = cotangents(student_logits, teacher_logits, target)
    coupled = kind == "cnn_bn"
    ref = loop_grads(model, x, cot, ROWS, coupled)
    want = stats_of(ref["target"], ref["dark"], batch_grad_of(student_logits, model, cot))
    params = dict(model.named_parameters())
    for batched in (True, False):
        got = pg.exact_stats(student_logits, params, cot, ROWS, chunk_size=2, batched=batched)
        assert_columns_close(got, want)
    if coupled:
        with pytest.raises(ValueError, match="training-mode BatchNorm"):
            pg.vmap_stats(model, x, cot, {}, ROWS)
        # Contributions are not d loss_s/dtheta under BN coupling: the test can tell them apart.
        contrib, _ = pg.contribution_stats(student_logits, model, captured, cot, ROWS)
        assert not torch.allclose(contrib["param_target_norm"], want["param_target_norm"], rtol=1e-3)
        return
    bg = dict(zip(params, torch.autograd.grad(student_logits, list(params.values()), retain_graph=True,
                                              grad_outputs=cot["target"] + cot["dark"])))
    assert_columns_close(pg.vmap_stats(model, x, cot, bg, ROWS, chunk_size=2), want)
    contrib, info = pg.contribution_stats(student_logits, model, captured, cot, ROWS)
    assert info["covered_params"] == info["total_params"] == sum(p.numel() for p in model.parameters())
    assert_columns_close(contrib, want)


def test_vmap_eval_mode_matches_eval_loop_and_restores_flags():
    model = make_model("cnn_bn")
    model[1].running_mean.uniform_(-0.5, 0.5)  # non-trivial running statistics
    x, target, teacher_logits = batch("cnn_bn")
    student_logits = model(x)  # training forward (its cotangents are what a hook would use)
    cot, _ = cotangents(student_logits, teacher_logits, target)
    evaluated = copy.deepcopy(model).eval()
    ref = loop_grads(evaluated, x, cot, ROWS, coupled=False)
    bg = dict(zip(dict(model.named_parameters()), torch.autograd.grad(
        evaluated(x), list(evaluated.parameters()), grad_outputs=cot["target"] + cot["dark"])))
    want = stats_of(ref["target"], ref["dark"], torch.cat([g.reshape(-1) for g in bg.values()]))
    got = pg.vmap_stats(model, x, cot, bg, ROWS, eval_mode=True)
    assert_columns_close(got, want)
    assert all(m.training for m in model.modules())


def test_linearised_terms_sum_to_per_sample_loss_gradient():
    """target + dark of sample s is the gradient of the BAN per-sample loss CE(p_s, q_s)."""
    model = make_model("mlp")
    x, target, teacher_logits = batch("mlp")
    student_logits, _ = forward(model, x, "mlp")
    cot, _ = cotangents(student_logits, teacher_logits, target, "ban")
    ref = loop_grads(model, x, cot, ROWS, coupled=False)
    p = torch.softmax(teacher_logits, 1)
    for i, s in enumerate(ROWS.tolist()):
        m = copy.deepcopy(model)
        loss_s = -(p[s] * torch.log_softmax(m(x[s:s + 1])[0], 0)).sum()
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss_s, list(m.parameters()))])
        torch.testing.assert_close(ref["target"][i] + ref["dark"][i], g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["cnn_bn", "tokens", "cnn"])
def test_contributions_sum_to_each_terms_batch_gradient(kind):
    model = make_model(kind)
    x, target, teacher_logits = batch(kind)
    student_logits, captured = forward(model, x, kind)
    cot, _ = cotangents(student_logits, teacher_logits, target)
    pieces = pg.contribution_pieces(student_logits, model, captured, cot)
    names = [n for n, _ in model.named_parameters()]
    for term in pg.TERMS:
        assert sorted(pieces[term]) == sorted(names)
        want = torch.autograd.grad(student_logits, list(model.parameters()), grad_outputs=cot[term],
                                   retain_graph=True)
        for n, w in zip(names, want):
            torch.testing.assert_close(pieces[term][n].sum(0), w, rtol=1e-10, atol=1e-12, msg=n)
    # The closed forms / Gram tricks agree with the materialised pieces.
    flat = {t: torch.cat([pieces[t][n].reshape(B, -1) for n in names], 1)[ROWS] for t in pg.TERMS}
    want = stats_of(flat["target"], flat["dark"], batch_grad_of(student_logits, model, cot))
    got, _ = pg.contribution_stats(student_logits, model, captured, cot, ROWS)
    assert_columns_close(got, want, tol=1e-10)


def test_capture_clone_survives_inplace_relu_and_keeps_forward():
    model = make_model("mlp")
    x, _, _ = batch("mlp")
    plain = model(x)
    with pg.capture_activations(model, ["1"]) as captured:
        z = model(x)
    assert torch.equal(plain, z)
    assert model[1]._forward_hooks == {}
    inp, out = captured["1"]
    torch.testing.assert_close(out, torch.nn.functional.linear(x.flatten(1), model[1].weight, model[1].bias))
    assert (out < 0).any()  # the in-place ReLU did not rewrite the captured output


def test_uncloned_capture_rewritten_in_place_is_refused():
    model = make_model("mlp")  # Linear "1" is followed by ReLU(inplace=True)
    x, target, teacher_logits = batch("mlp")
    with pg.capture_activations(model, ["1", "3"], clone_outputs=False) as captured:
        student_logits = model(x)
    cot, _ = cotangents(student_logits, teacher_logits, target)
    with pytest.raises(ValueError, match="in place"):
        pg.contribution_stats(student_logits, model, captured, cot, ROWS)
    pg.contribution_stats(student_logits, model, captured, cot, ROWS, modules=["3"])  # Tanh: not in place


@pytest.mark.parametrize("kind", ["mlp", "cnn_bn"])
def test_head_closed_form_equals_param_split_on_head(kind):
    model = make_model(kind)
    x, target, teacher_logits = batch(kind)
    student_logits, captured = forward(model, x, kind)
    cot, _ = cotangents(student_logits, teacher_logits, target)
    head = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    head_params = {f"{head}.weight": model.get_submodule(head).weight, f"{head}.bias": model.get_submodule(head).bias}
    got = pg.head_stats(captured[head][0], cot, ROWS)
    contrib, info = pg.contribution_stats(student_logits, model, captured, cot, ROWS, modules=[head])
    exact = pg.exact_stats(student_logits, head_params, cot, ROWS)
    assert info["covered_params"] == sum(p.numel() for p in head_params.values())
    for other in (contrib, exact):
        torch.testing.assert_close(got["head_target_norm"], other["param_target_norm"], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(got["head_dark_norm"], other["param_dark_norm"], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(got["head_cos"], other["param_cos"], rtol=0, atol=1e-12)
    # Without the bias: |cot_s| |f_s|.
    nb = pg.head_stats(captured[head][0], cot, ROWS, include_bias=False)
    f = captured[head][0][ROWS]
    torch.testing.assert_close(nb["head_target_norm"], cot["target"][ROWS].norm(dim=1) * f.norm(dim=1))


@pytest.mark.parametrize("batched", [False, True])
def test_update_share_matches_autograd_and_sums_to_one(batched):
    model = make_model("cnn_bn")
    x, target, teacher_logits = batch("cnn_bn")
    student_logits = model(x)
    out = get_objective("kd")(student_logits, teacher_logits, target)
    g = out.logit_grad
    t = torch.zeros_like(g)
    t[torch.arange(B), target] = g[torch.arange(B), target]
    params = list(model.parameters())
    grads = pg.term_batch_grads(student_logits, params, {"target": t, "dark": g - t})
    names = [n for n, _ in model.named_parameters()]
    stats = pg.update_share_stats(grads, pg.layer_groups(names, 1))
    # Independent: autograd of the objective's own loss, and of the target term alone.
    full = torch.cat([p.reshape(-1) for p in torch.autograd.grad(out.loss, params, retain_graph=True)])
    gt = torch.cat([p.reshape(-1) for p in torch.autograd.grad((student_logits * t).sum(), params, retain_graph=True)])
    gd = full - gt
    torch.testing.assert_close(stats["target_norm"], gt.norm(), rtol=1e-10, atol=0)
    torch.testing.assert_close(stats["dark_norm"], gd.norm(), rtol=1e-10, atol=0)
    torch.testing.assert_close(stats["grad_norm"], full.norm(), rtol=1e-10, atol=0)
    torch.testing.assert_close(stats["share_target"], gt @ full / (full @ full), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats["cos_target_dark"], gt @ gd / (gt.norm() * gd.norm()), rtol=1e-10, atol=1e-12)
    groups = sorted({k.rsplit(".", 1)[0] for k in stats if "." in k})
    assert groups == ["0", "1", "3", "4", "8"]
    for prefix in [""] + [gname + "." for gname in groups]:
        assert abs(float(stats[prefix + "share_target"] + stats[prefix + "share_dark"]) - 1) < 1e-12
    assert [p.grad for p in params] == [None] * len(params)


def test_term_batch_grads_unused_param_is_zero_and_layer_groups():
    lin, unused = nn.Linear(3, 2).to(DT), nn.Parameter(torch.ones(4, dtype=DT))
    z = lin(torch.randn(5, 3, dtype=DT))
    grads = pg.term_batch_grads(z, [lin.weight, unused], {"x": torch.ones(5, 2, dtype=DT)})
    assert torch.equal(grads["x"][1], torch.zeros(4, dtype=DT))
    assert pg.layer_groups(["layer1.0.conv1.weight", "fc.bias", "scale"], 2) == ["layer1.0", "fc", "scale"]
    with pytest.raises(ValueError, match="depth"):
        pg.layer_groups(["a.b"], 0)

"""The split hooks' ``anchor`` option: "label" (unchanged numbers) or "teacher_argmax".

Checked on the hook tests' Net (conv + training-mode BatchNorm + dropout): with the label anchor
the columns equal the label-split reference formulas bit for bit; with ``teacher_argmax`` on a
batch where the teacher's argmax is the label everywhere they equal the label's; where the two
differ, the target term is the logit gradient at the teacher's argmax, from independent autograd.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ban_analysis.instrument import param_grads as pg
from ban_analysis.instrument.decompose import anchor_index, per_sample_stats, split_logit_grad
from ban_analysis.instrument.hooks import HookRunner, StepContext
from ban_analysis.losses import get_objective
from tests.test_hooks import B, C, Net

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPLIT_HOOKS = ("logit_split", "head_split", "update_share", "param_split")


def config(anchor=None, mode="exact"):
    extra = {} if anchor is None else {"anchor": anchor}
    return {"logit_split": dict(extra), "head_split": dict(extra), "update_share": dict(extra),
            "param_split": {"every_n_steps": 1, "samples": 5, "mode": mode, **extra}}


def run_hooks(cfg, teacher="mixed", objective="ban", fuse=False, seed=0):
    """One trainer-like step on a fresh Net; returns (rows, ctx, runner)."""
    torch.manual_seed(seed)
    model = Net().train()
    runner = HookRunner(cfg, seed=0, train_size=60, fuse_backward=fuse)
    g = torch.Generator().manual_seed(100)
    x, target = torch.randn(B, 2, 5, 5, generator=g), torch.randint(0, C, (B,), generator=g)
    noise = torch.randn(B, C, generator=g)
    agree = torch.ones(B, 1) if teacher == "agrees" else (torch.arange(B) % 2 == 0).float()[:, None]
    teacher_logits = 8 * F.one_hot(target, C) * agree + 2 * noise  # "mixed": right on the even rows
    obj = get_objective(objective)
    teacher_logits = teacher_logits if obj.needs_teacher else None
    torch.manual_seed(7)  # the dropout mask
    with runner.capture(model, 0) as cap:
        logits = model(x)
    out = obj(logits, teacher_logits, target, generator=torch.Generator().manual_seed(1))
    ctx = StepContext(gen=1, epoch=0, step=0, sample_index=torch.arange(B), inputs=x, target=target,
                      student_logits=logits, teacher_logits=teacher_logits, out=out, model=model,
                      captured=cap.captured, lr=0.1)
    rows = runner.run(ctx)
    if fuse:
        model.zero_grad(set_to_none=True)
        out.loss.backward(retain_graph=True)
        rows.update(runner.after_backward())
    return rows, ctx, runner


def assert_rows_equal(a, b, skip=("anchor_teacher_argmax",)):
    assert set(a) == set(b)
    for hook in a:
        assert set(a[hook]) - set(skip) == set(b[hook]) - set(skip), hook
        for col in set(a[hook]) - set(skip):
            x, y = a[hook][col], b[hook][col]
            assert torch.equal(x.nan_to_num(123.0), y.nan_to_num(123.0)), f"{hook}.{col}"


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("mode", ["contribution", "exact"])
def test_label_anchor_is_the_default_and_the_label_split(mode):
    default, ctx, _ = run_hooks(config(None, mode))
    explicit, _, runner = run_hooks(config("label", mode))
    assert_rows_equal(default, explicit, skip=())
    assert all("anchor_teacher_argmax" not in cols for cols in explicit.values())
    assert all(runner.info()[h]["anchor"] == "label" and "anchor_effective" not in runner.info()[h]
               for h in SPLIT_HOOKS)
    # the reference formulas, split at the label (what the hooks computed before the option)
    stats = per_sample_stats(ctx.student_logits.detach(), ctx.teacher_logits, ctx.target, ctx.out)
    for k, v in stats.items():
        assert torch.equal(explicit["logit_split"][k].nan_to_num(9.0), v.nan_to_num(9.0)), k
    params = [p for p in ctx.model.parameters()]
    names = [n for n, _ in ctx.model.named_parameters()]
    t, d = split_logit_grad(ctx.out.logit_grad.detach(), ctx.target)
    ref = pg.update_share_stats(pg.term_batch_grads(ctx.student_logits, params, {"target": t, "dark": d}),
                                pg.layer_groups(names, 2))
    for k, v in ref.items():
        assert torch.equal(explicit["update_share"][k], v), k
    t, d = split_logit_grad(ctx.out.logit_grad.detach() * B, ctx.target)
    head = pg.head_stats(ctx.captured["head"][0], {"target": t, "dark": d})
    for k, v in head.items():
        assert torch.equal(explicit["head_split"][k], v), k


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("mode", ["contribution", "exact"])
def test_teacher_argmax_equals_label_where_the_teacher_is_right(fuse, mode):
    label, ctx, _ = run_hooks(config("label", mode), teacher="agrees", fuse=fuse)
    assert torch.equal(ctx.teacher_logits.argmax(1), ctx.target)
    argmax, _, runner = run_hooks(config("teacher_argmax", mode), teacher="agrees", fuse=fuse)
    assert_rows_equal(label, argmax)
    for hook in SPLIT_HOOKS:
        assert int(argmax[hook]["anchor_teacher_argmax"]) == 1
        assert runner.info()[hook]["anchor_effective"] == {"1": "teacher_argmax"}


@pytest.mark.parametrize("fuse", [False, True])
def test_teacher_argmax_anchor_puts_the_target_term_at_the_argmax(fuse):
    rows, ctx, _ = run_hooks(config("teacher_argmax"), fuse=fuse)
    a = ctx.teacher_logits.argmax(1)
    assert 0 < int((a != ctx.target).sum()) < B  # the anchors differ on some rows
    r = torch.arange(B)
    g = ctx.out.logit_grad.detach() * B  # per-sample logit gradient
    z = ctx.student_logits
    params = list(ctx.model.parameters())
    # logit level: the value at the argmax, and the parts still make up the whole row
    ls = rows["logit_split"]
    assert torch.equal(ls["g_target"], g[r, a])
    torch.testing.assert_close(ls["g_target"] ** 2 + ls["g_dark_norm"] ** 2, ls["g_norm"] ** 2)
    # head: outer product of the argmax column's gradient with the features (+ bias)
    f = ctx.captured["head"][0].detach()
    torch.testing.assert_close(rows["head_split"]["head_target_norm"], g[r, a].abs() * (f.pow(2).sum(1) + 1).sqrt())
    # all parameters: G_target is the VJP of the argmax column only; G_target + G_dark = G
    g_t = flat(torch.autograd.grad((g[r, a] / B * z[r, a]).sum(), params, retain_graph=True))
    g_all = flat(torch.autograd.grad(ctx.out.loss, params, retain_graph=True))
    us = rows["update_share"]
    torch.testing.assert_close(us["target_norm"], g_t.norm().double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(us["dark_norm"], (g_all - g_t).norm().double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(us["grad_norm"], g_all.norm().double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(us["share_target"] + us["share_dark"], torch.tensor(1.0, dtype=torch.float64))
    # per sample (exact mode, BatchNorm coupling included): d <g_s[a_s], z_s[a_s]> / d theta
    ps = rows["param_split"]
    for i, s in enumerate(ps["sample_index"].tolist()):
        want = flat(torch.autograd.grad(g[s, a[s]] * z[s, a[s]], params, retain_graph=True)).norm()
        torch.testing.assert_close(ps["param_target_norm"][i], want, rtol=1e-4, atol=1e-6)


def test_without_a_teacher_the_anchor_falls_back_to_the_label_and_says_so():
    label, _, _ = run_hooks(config("label"), objective="ce")
    argmax, _, runner = run_hooks(config("teacher_argmax"), objective="ce")
    assert_rows_equal(label, argmax)
    for hook in SPLIT_HOOKS:
        col = argmax[hook]["anchor_teacher_argmax"]
        assert int(col) == 0 and col.dtype == torch.int8
        assert runner.info()[hook]["anchor_effective"] == {"1": "label"}


def test_anchor_index_and_per_sample_stats_anchor():
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    target = torch.randint(0, 4, (6,), generator=g)
    assert anchor_index(target, teacher, "label") == (target, "label")
    assert anchor_index(target, None, "teacher_argmax") == (target, "label")
    index, effective = anchor_index(target, teacher, "teacher_argmax")
    assert effective == "teacher_argmax" and torch.equal(index, teacher.softmax(1).argmax(1))
    with pytest.raises(ValueError, match="anchor must be one of"):
        anchor_index(target, teacher, "max")
    out = get_objective("ban")(student, teacher, target)
    stats = per_sample_stats(student, teacher, target, out, anchor=index)
    base = per_sample_stats(student, teacher, target, out)
    assert torch.equal(stats["g_target"], (out.logit_grad * 6)[torch.arange(6), index])
    for k in base:  # only the split's two columns move with the anchor
        if k not in ("g_target", "g_dark_norm"):
            assert torch.equal(stats[k].nan_to_num(5.0), base[k].nan_to_num(5.0)), k
    with pytest.raises(ValueError, match="anchor"):
        per_sample_stats(student, teacher, target, out, anchor=index[:3])


@pytest.mark.parametrize("hook", SPLIT_HOOKS + ("heldout_attribution",))
def test_bad_anchor_is_refused(hook):
    with pytest.raises(ValueError, match=f"hooks.{hook}.anchor must be one of \\['label', 'teacher_argmax'\\]"):
        HookRunner({hook: {"anchor": "argmax"}}, seed=0, train_size=60)

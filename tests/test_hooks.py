"""Hook runner: config parsing, schedules, sample selection, columns, and that hooks observe only.

The invariance tests compare bit-for-bit: parameters, buffers (BN running statistics and
counters), pre-existing ``.grad`` and every random stream (torch, numpy, python) before and
after the hooks run, and a few SGD steps with hooks against the same steps without.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from torch import nn

from ban_analysis.instrument.hooks import HOOKS, HookRunner, StepContext
from ban_analysis.losses import OBJECTIVES, get_objective

B, C = 12, 5
ALL_HOOKS = {"logit_split": {}, "head_split": {}, "update_share": {"group_depth": 2},
             "param_split": {"every_n_steps": 1, "samples": 4}}


class Net(nn.Module):
    """Conv + training-mode BN + in-place ReLU + dropout + a ``head``: every coupling at once."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 16),
                                  nn.ReLU(inplace=True), nn.Dropout(0.3))
        self.head = nn.Linear(16, C)

    def forward(self, x):
        return self.head(self.body(x))


def make_batch(step: int = 0):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(B, 2, 5, 5, generator=g)
    target = torch.randint(0, C, (B,), generator=g)
    teacher_logits = 2 * torch.randn(B, C, generator=g)
    index = torch.randperm(60, generator=g)[:B]
    return x, target, teacher_logits, index


def step_context(runner, model, step, objective="ban", gen=1):
    """One trainer-like forward: capture, objective, context (the trainer's order)."""
    x, target, teacher_logits, index = make_batch(step)
    obj = get_objective(objective)
    capture = runner.capture(model, step) if runner is not None else None
    if capture is not None:
        with capture:
            student_logits = model(x)
    else:
        student_logits = model(x)
    teacher_logits = teacher_logits if obj.needs_teacher else None
    out = obj(student_logits, teacher_logits, target, generator=torch.Generator().manual_seed(step))
    return StepContext(gen=gen, epoch=0, step=step, sample_index=index, inputs=x, target=target,
                       student_logits=student_logits, teacher_logits=teacher_logits, out=out,
                       model=model, captured=capture.captured if capture is not None else {})


def snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].copy(),
        "python": random.getstate(), "training": [m.training for m in model.modules()],
    }


def assert_same(a, b):
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a["grad"], b["grad"]))
    assert torch.equal(a["torch"], b["torch"])
    assert np.array_equal(a["numpy"], b["numpy"]) and a["python"] == b["python"]
    assert a["training"] == b["training"]


def test_registry_order_puts_update_share_before_param_split():
    # the runner runs hooks in registry order so that update_share's batch gradients are cached
    # for param_split; the names themselves are the registry's (tests/test_registry.py)
    names = list(HOOKS)
    assert names.index("update_share") < names.index("param_split")
    assert names.index("update_share") < names.index("heldout_attribution")  # reuses its term gradients


@pytest.mark.parametrize("mode", ["contribution", "exact", "vmap"])
def test_hooks_leave_model_grads_and_rng_untouched(mode):
    torch.manual_seed(0)
    model = Net().train()
    for p in model.parameters():  # pre-existing .grad must survive too
        p.grad = torch.randn_like(p)
    cfg = copy.deepcopy(ALL_HOOKS)
    cfg["param_split"].update(mode=mode, eval_mode=mode == "vmap", exact_vjp="batched" if mode == "exact" else "auto")
    runner = HookRunner(cfg, seed=3, train_size=60)
    ctx = step_context(runner, model, step=0)
    before = snapshot(model)
    rows = runner.run(ctx)
    assert set(rows) == set(ALL_HOOKS)
    assert_same(before, snapshot(model))
    assert all(m._forward_hooks == {} for m in model.modules())
    # The trainer's own backward still works on the retained graph.
    ctx.out.loss.backward()
    assert runner.info()["param_split"]["mode"] == mode


@pytest.mark.parametrize("fuse", [False, True])
def test_training_with_hooks_is_bit_identical_to_without(fuse):
    torch.manual_seed(0)
    base = Net().train()
    results = []
    for cfg in (None, ALL_HOOKS):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        runner = HookRunner(cfg, seed=0, train_size=60, fuse_backward=fuse) if cfg else None
        torch.manual_seed(7)  # dropout masks come from the global stream, as in the trainer
        logits = []
        for step in range(3):
            ctx = step_context(runner, model, step)
            if runner is not None:
                assert runner.run(ctx)
            opt.zero_grad(set_to_none=True)
            ctx.out.loss.backward()
            if runner is not None:
                assert set(runner.after_backward()) == ({"update_share", "param_split"} if fuse else set())
            opt.step()
            logits.append(ctx.student_logits.detach())
        results.append((snapshot(model), torch.stack(logits)))
    assert_same(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_logit_split_columns_and_norm_identity(objective):
    torch.manual_seed(0)
    model = Net().train()
    runner = HookRunner({"logit_split": {}}, seed=0, train_size=60)
    ctx = step_context(runner, model, step=0, objective=objective)
    cols = runner.run(ctx)["logit_split"]
    for name in ("sample_index", "target", "teacher_argmax", "g_target", "g_dark_norm", "g_norm", "p_label",
                 "p_max", "q_label", "cw_part", "teacher_nontarget_entropy", "kl_teacher_student"):
        assert cols[name].shape == (B,), name
    torch.testing.assert_close(cols["g_target"] ** 2 + cols["g_dark_norm"] ** 2, cols["g_norm"] ** 2)
    torch.testing.assert_close(cols["g_norm"], ctx.out.logit_grad.norm(dim=1) * B)
    assert torch.equal(cols["sample_index"], ctx.sample_index) and torch.equal(cols["target"], ctx.target)
    if ctx.teacher_logits is not None:
        assert torch.equal(cols["teacher_argmax"], ctx.teacher_logits.argmax(1))


def test_head_split_needs_capture_and_matches_outer_product():
    torch.manual_seed(0)
    model = Net().train()
    runner = HookRunner({"head_split": {}}, seed=0, train_size=60)
    ctx = step_context(runner, model, step=0)
    features = ctx.captured["head"][0]
    cols = runner.run(ctx)["head_split"]
    g = ctx.out.logit_grad * B
    t = torch.zeros_like(g)
    t[torch.arange(B), ctx.target] = g[torch.arange(B), ctx.target]
    for s in range(B):  # explicit outer products, weight and bias
        wt = torch.cat([torch.outer(t[s], features[s]).flatten(), t[s]])
        wd = torch.cat([torch.outer(g[s] - t[s], features[s]).flatten(), g[s] - t[s]])
        torch.testing.assert_close(cols["head_target_norm"][s], wt.norm())
        torch.testing.assert_close(cols["head_dark_norm"][s], wd.norm())
    assert cols["head_cos"].abs().max() < 1e-6  # disjoint logit supports
    ctx.captured = {}
    runner._capture = None
    with pytest.raises(ValueError, match="capture"):
        runner.run(ctx)


def test_schedule_and_capture_only_when_needed():
    torch.manual_seed(0)
    model = Net().train()
    runner = HookRunner({"logit_split": {"every_n_steps": 2}, "param_split": {"every_n_steps": 3}},
                        seed=0, train_size=60)
    assert runner.due(0) == ["logit_split", "param_split"] and runner.due(1) == [] and runner.due(3) == ["param_split"]
    for step, hooked in ((1, False), (2, False), (3, True)):
        with runner.capture(model, step) as cap:
            active = any(m._forward_hooks for m in model.modules())
            model(make_batch(step)[0])
        assert active == hooked and bool(cap.captured) == hooked
        assert all(m._forward_hooks == {} for m in model.modules())
    assert runner.run(step_context(runner, model, step=1)) == {}
    out = runner.run(step_context(runner, model, step=3))
    assert set(out) == {"param_split"} and out["param_split"]["sample_index"].shape == (32 if B > 32 else B,)
    assert runner.info()["param_split"] == {
        "every_n_steps": 3, "samples": 32, "fused": False, "sample_from": "batch", "mode": "contribution",
        "chunk_size": 16, "eval_mode": False, "exact_vjp": "auto", "covered_params": sum(p.numel() for p in model.parameters()),
        "total_params": sum(p.numel() for p in model.parameters()), "modules": 4, "anchor": "label"}


def test_fixed_subset_is_seeded_per_hook_and_restricts_rows():
    train_index = torch.arange(0, 120, 2)  # e.g. odd indices went to validation
    state = torch.get_rng_state()
    torch.manual_seed(123)  # the global stream must play no part
    a = HookRunner({"logit_split": {"samples": 8}, "head_split": {"samples": 8}}, seed=5, train_size=120,
                   train_index=train_index)
    torch.manual_seed(456)
    b = HookRunner({"logit_split": {"samples": 8}}, seed=5, train_size=120, train_index=train_index)
    c = HookRunner({"logit_split": {"samples": 8}}, seed=6, train_size=120, train_index=train_index)
    torch.set_rng_state(state)
    sub = a.hooks["logit_split"].subset
    assert torch.equal(sub, b.hooks["logit_split"].subset) and sub.numel() == 8
    assert bool(torch.isin(sub, train_index).all())
    assert not torch.equal(sub, c.hooks["logit_split"].subset)
    assert not torch.equal(sub, a.hooks["head_split"].subset)
    # Rows: only subset samples present in the batch; a hook with none present is left out.
    model = Net().train()
    ctx = step_context(a, model, step=0)
    ctx.sample_index = torch.cat([sub[:3], torch.tensor([1, 3, 5, 7, 9, 11, 13, 15, 17])])  # odd: never drawn
    out = a.run(ctx)
    assert sorted(out["logit_split"]["sample_index"].tolist()) == sorted(sub[:3].tolist())
    assert torch.equal(out["logit_split"]["target"], ctx.target[:3])
    ctx.sample_index = torch.arange(1, 2 * B, 2)
    assert "logit_split" not in a.run(ctx)


def test_batch_sampling_is_deterministic_per_step():
    runner = HookRunner({"param_split": {"every_n_steps": 1, "samples": 4, "mode": "exact"}}, seed=0, train_size=60)
    model = Net().train()
    picks = []
    for step in (0, 0, 1):
        ctx = step_context(runner, model, step)
        picks.append(runner.run(ctx)["param_split"]["sample_index"])
        assert picks[-1].shape == (4,)
        assert bool(torch.isin(picks[-1], ctx.sample_index).all())
    assert torch.equal(picks[0], picks[1])


def test_vmap_on_dropout_model_without_eval_mode_raises():
    runner = HookRunner({"param_split": {"every_n_steps": 1, "samples": 2, "mode": "vmap"}}, seed=0, train_size=60)
    ctx = step_context(runner, Net().train(), step=0)
    with pytest.raises(ValueError, match="eval_mode"):
        runner.run(ctx)


@pytest.mark.parametrize("cfg, match", [
    ({"nope": {}}, "valid hooks: logit_split"),
    ({"logit_split": {"every": 2}}, "valid options: every_n_steps"),
    ({"logit_split": {"every_n_steps": 0}}, "every_n_steps must be an int >= 1"),
    ({"logit_split": {"every_n_steps": True}}, "every_n_steps"),
    ({"logit_split": {"every_n_steps": 1.5}}, "every_n_steps"),
    ({"logit_split": {"samples": 0}}, "samples must be 'all' or an int >= 1"),
    ({"logit_split": {"samples": "some"}}, "samples must be 'all' or an int >= 1"),
    ({"logit_split": {"sample_from": "val"}}, "sample_from must be 'train' or 'batch'"),
    ({"update_share": {"samples": 8}}, "must be 'all'"),
    ({"update_share": {"sample_from": "batch"}}, "unknown option"),
    ({"update_share": {"group_depth": 0}}, "group_depth"),
    ({"param_split": {"mode": "fast"}}, "one of \\['contribution', 'exact', 'vmap'\\]"),
    ({"param_split": {"chunk_size": "8"}}, "chunk_size must be int"),
    ({"param_split": {"exact_vjp": "fast"}}, "exact_vjp must be one of"),
    ({"head_split": {"include_bias": "yes"}}, "include_bias must be bool"),
    ({"head_split": 3}, "must be a table"),
])
def test_bad_configs_raise(cfg, match):
    with pytest.raises(ValueError, match=match):
        HookRunner(cfg, seed=0, train_size=100)


def test_defaults_and_name_list():
    runner = HookRunner(list(HOOKS), seed=0, train_size=100)
    info = runner.info()
    assert info["logit_split"]["every_n_steps"] == 1 and info["logit_split"]["samples"] == "all"
    assert info["head_split"]["every_n_steps"] == 1 and info["update_share"]["every_n_steps"] == 1
    assert (info["param_split"]["every_n_steps"], info["param_split"]["samples"],
            info["param_split"]["mode"]) == (50, 32, "contribution")
    assert HookRunner({}, seed=0, train_size=1).hooks == {}


def test_update_share_and_param_split_due_together_share_one_target_backward(monkeypatch):
    """Fused and due at one step, the two hooks run one backward of the target term (update_share's,
    which also returns param_split's layer-output gradients), and param_split's columns are those
    it computes alone, with its own backward."""
    torch.manual_seed(0)
    base = Net().train()
    calls, cols = [], {}
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls.append(1)
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    for cfg in ({"param_split": {"every_n_steps": 1, "samples": 6}},
                {"update_share": {}, "param_split": {"every_n_steps": 1, "samples": 6}}):
        model = copy.deepcopy(base)
        runner = HookRunner(cfg, seed=0, train_size=60, fuse_backward=True)
        torch.manual_seed(5)
        ctx = step_context(runner, model, 0)
        calls.clear()
        assert runner.run(ctx) == {}
        assert len(calls) == 1  # param_split's own output backward, or update_share's shared one
        ctx.out.loss.backward()
        cols[len(cfg)] = runner.after_backward()["param_split"]
    for k, v in cols[1].items():
        torch.testing.assert_close(cols[2][k], v, rtol=1e-5, atol=1e-7, msg=k)


def test_fused_backward_matches_separate_passes_and_cleans_up():
    torch.manual_seed(0)
    base = Net().train()
    cfg = {"update_share": {}, "param_split": {"every_n_steps": 1, "samples": 6}}
    out = {}
    for fuse in (False, True):
        model = copy.deepcopy(base)
        runner = HookRunner(cfg, seed=0, train_size=60, fuse_backward=fuse)
        torch.manual_seed(5)
        ctx = step_context(runner, model, 0)
        rows = runner.run(ctx)
        assert bool(rows) != fuse
        ctx.out.loss.backward()
        out[fuse] = rows or runner.after_backward()
        assert runner.info()["param_split"]["fused"] == fuse
    for hook, cols in out[False].items():
        for k, v in cols.items():
            torch.testing.assert_close(out[True][hook][k], v, rtol=1e-4, atol=1e-6, msg=f"{hook}.{k}")
    # A forgotten after_backward is dropped at the next run, with its tensor hooks removed.
    runner = HookRunner(cfg, seed=0, train_size=60, fuse_backward=True)
    ctx = step_context(runner, base, 0)
    runner.run(ctx)
    fused = dict(runner._pending)["param_split"].cache["fused_param_split"]
    assert fused.handles
    runner.run(step_context(runner, base, 1))
    assert fused.handles == [] and all(h.step == 1 for _, h in runner._pending)


def test_idle_steps_are_the_steps_with_no_hook_due():
    """idle(step) is `not due(step)` over two periods of the schedule (lcm 6), and for a long one."""
    runner = HookRunner({"update_share": {"every_n_steps": 2}, "param_split": {"every_n_steps": 3}},
                        seed=0, train_size=60)
    assert [runner.idle(s) for s in range(12)] == [not runner.due(s) for s in range(12)]
    assert [s for s in range(12) if not runner.idle(s)] == [0, 2, 3, 4, 6, 8, 9, 10]
    long = HookRunner({"update_share": {"every_n_steps": 9973}, "param_split": {"every_n_steps": 9967}},
                      seed=0, train_size=60)  # period 99,400,891: due sets computed per step
    assert [s for s in (0, 1, 9967, 9973, 19934) if not long.idle(s)] == [0, 9967, 9973, 19934]


@pytest.mark.parametrize("anchor", ["label", "teacher_argmax"])
def test_scaled_cotangents_are_the_split_of_b_times_the_logit_grad(anchor):
    """param_split's cotangents (times B) come from update_share's unscaled split times B (one split a
    step): exactly the split of B * logit_grad, as when each hook split on its own."""
    from types import SimpleNamespace

    from ban_analysis.instrument.decompose import anchor_index, split_at
    from ban_analysis.instrument.step_terms import _cotangents

    g = torch.Generator().manual_seed(3)
    logit_grad = torch.randn(B, C, generator=g) / B
    target, teacher = torch.randint(0, C, (B,), generator=g), torch.randn(B, C, generator=g)
    ctx = StepContext(gen=1, epoch=0, step=0, sample_index=torch.arange(B), inputs=torch.zeros(B, 1),
                      target=target, student_logits=torch.zeros(B, C), teacher_logits=teacher,
                      out=SimpleNamespace(logit_grad=logit_grad), model=nn.Linear(1, C))
    scaled, plain = _cotangents(ctx, True, anchor), _cotangents(ctx, False, anchor)
    at, _ = anchor_index(target, teacher, anchor)
    for got, want in ((scaled, split_at(logit_grad * B, at)), (plain, split_at(logit_grad, at))):
        assert torch.equal(got["target"], want[0]) and torch.equal(got["dark"], want[1])
    assert at.equal(target) == (anchor == "label") and not at.requires_grad

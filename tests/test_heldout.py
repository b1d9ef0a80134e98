"""heldout_attribution: TracIn's first-order term per split term, checked against independent autograd.

Small float64 MLP (no BatchNorm) so that the first-order checks are not drowned by float32
rounding; the protocol (run -> backward -> after_backward -> optimizer step -> after_step) is
driven through ``train_step``, as in training. The end-to-end test checks that the hook changes
nothing: a tiny ``run_chain`` with it on ends bit-identical to the run without it.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ban_analysis.config import ConfigError, config_from_dict
from ban_analysis.engine.chain import run_chain
from ban_analysis.engine.step import train_step
from ban_analysis.instrument.hook_config import seed_of
from ban_analysis.instrument.hooks import HookRunner, StepContext
from ban_analysis.losses import get_objective
from tests.conftest import tiny_config
from tests.test_hooks import Net, assert_same, snapshot
from tests.test_train import _assert_same_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, C, N_VAL = 16, 5, 40
NAME = "heldout_attribution"


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, C)).double()


def heldout_data():
    g = torch.Generator().manual_seed(11)
    return torch.randn(N_VAL, 1, 3, 4, generator=g, dtype=torch.float64), torch.randint(0, C, (N_VAL,), generator=g)


def batch(step: int):
    g = torch.Generator().manual_seed(200 + step)
    x = torch.randn(B, 1, 3, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, C, (B,), generator=g)
    teacher_logits = 2 * torch.randn(B, C, generator=g, dtype=torch.float64)
    return x, target, teacher_logits, torch.arange(B) + B * step


def runner_for(opts=None, fuse=False, with_update_share=False, **kw):
    cfg = {NAME: {"every_n_steps": 1, "samples": "all", **(opts or {})}}
    if with_update_share:
        cfg = {"update_share": {}, **cfg}
    return HookRunner(cfg, seed=3, train_size=1000, fuse_backward=fuse, heldout=heldout_data(), **kw)


def one_step(model, opt, runner, step=0, objective="ban"):
    x, target, teacher_logits, index = batch(step)
    obj = get_objective(objective)
    return train_step(model, obj, x, target, opt, teacher_logits=teacher_logits if obj.needs_teacher else None,
                      hooks=runner, step=step, sample_index=index)


def flat_grad(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])


def heldout_grad(model, rows=None):
    """Independent g_val and loss: eval-mode label CE on the held-out rows."""
    x, y = heldout_data()
    if rows is not None:
        x, y = x[rows], y[rows]
    loss = F.cross_entropy(model.eval()(x), y)
    model.train()
    return loss, flat_grad(loss, list(model.parameters()))


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("with_update_share", [False, True])
@pytest.mark.parametrize("objective", ["ban", "ce"])
def test_terms_sum_to_total_and_match_independent_autograd(fuse, with_update_share, objective):
    model, lr = mlp(), 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    runner = runner_for(fuse=fuse, with_update_share=with_update_share)
    before = copy.deepcopy(model)
    row = one_step(model, opt, runner, objective=objective).hook_rows[NAME]
    assert torch.allclose(row["a_target"] + row["a_dark"], row["a_total"], rtol=1e-6, atol=0)
    # independent: -lr <dL_val/dtheta, dL_train/dtheta> from plain autograd on the pre-step model
    x, target, teacher_logits, _ = batch(0)
    obj = get_objective(objective)
    out = obj(before(x), teacher_logits if obj.needs_teacher else None, target)
    g_train = flat_grad(out.loss, list(before.parameters()))
    loss_val, g_val = heldout_grad(before)
    torch.testing.assert_close(row["a_total"], -lr * (g_val @ g_train), rtol=1e-6, atol=0)
    torch.testing.assert_close(row["heldout_loss_before"], loss_val.detach(), rtol=1e-12, atol=0)
    # the target term on its own: the VJP of the logit gradient's label column
    z = before(x)
    lg = obj(z, teacher_logits if obj.needs_teacher else None, target).logit_grad.detach()
    at_label = (lg.gather(1, target[:, None]) * z.gather(1, target[:, None])).sum()
    torch.testing.assert_close(row["a_target"], -lr * (g_val @ flat_grad(at_label, list(before.parameters()))),
                               rtol=1e-6, atol=1e-14)
    assert row["a_total"].dtype == torch.float64 and row["a_total"].ndim == 0
    assert "anchor_teacher_argmax" not in row  # label anchor: no anchor column


def test_observed_change_matches_first_order_and_a_update_with_momentum():
    # plain SGD, tiny lr: the held-out loss moves by a_total to first order
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    runner = runner_for()
    for step in range(3):
        row = one_step(model, opt, runner, step=step).hook_rows[NAME]
        rel = abs(float(row["observed_change"] - row["a_total"])) / abs(float(row["a_total"]))
        assert rel < 1e-2, (step, rel)
        torch.testing.assert_close(row["a_update"], row["a_total"], rtol=1e-6, atol=1e-15)
        torch.testing.assert_close(row["observed_change"], row["heldout_loss_after"] - row["heldout_loss_before"])
    # momentum and weight decay: a_total no longer describes the update, a_update still does
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-2, nesterov=True)
    runner = runner_for()
    for step in range(4):
        row = one_step(model, opt, runner, step=step).hook_rows[NAME]
        rel = abs(float(row["observed_change"] - row["a_update"])) / abs(float(row["a_update"]))
        assert rel < 1e-2, (step, rel)
        torch.testing.assert_close(row["a_momentum_wd"], row["a_update"] - row["a_total"])
    assert abs(float(row["a_momentum_wd"])) > 0.1 * abs(float(row["a_total"]))  # the buffer matters by step 3


def test_subset_is_seeded_and_the_hook_changes_nothing():
    # `samples` rows of the held-out data, drawn from (seed, hook name)
    runner = runner_for({"samples": 12})
    pos = torch.randperm(N_VAL, generator=torch.Generator().manual_seed(seed_of(3, NAME)))[:12].sort().values
    hook = runner.hooks[NAME].hook
    assert torch.equal(hook._y, heldout_data()[1][pos]) and runner.info()[NAME]["heldout_rows"] == 12
    model = mlp()
    before = copy.deepcopy(model)
    row = one_step(model, torch.optim.SGD(model.parameters(), lr=0.1), runner).hook_rows[NAME]
    loss_val, _ = heldout_grad(before, pos)
    torch.testing.assert_close(row["heldout_loss_before"], loss_val.detach(), rtol=1e-12, atol=0)
    # BatchNorm + dropout model: the hook's phases move no buffer, .grad, flag or random stream
    torch.manual_seed(0)
    net = Net().train()
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    x = torch.randn(N_VAL, 2, 5, 5, generator=torch.Generator().manual_seed(4))
    r = HookRunner({NAME: {"every_n_steps": 1, "groups": True}}, seed=0, train_size=60,
                   heldout=(x, torch.randint(0, C, (N_VAL,))))
    g = torch.Generator().manual_seed(5)
    xb, tb = torch.randn(12, 2, 5, 5, generator=g), torch.randint(0, C, (12,), generator=g)
    tl = torch.randn(12, C, generator=g)
    logits = net(xb)
    ctx = StepContext(gen=1, epoch=0, step=0, sample_index=torch.arange(12), inputs=xb, target=tb,
                      student_logits=logits, teacher_logits=tl, out=get_objective("ban")(logits, tl, tb),
                      model=net, lr=0.1)
    snap = snapshot(net)
    assert r.run(ctx) == {} and r.after_backward() == {}
    cols = r.after_step()[NAME]
    assert_same(snap, snapshot(net))
    assert cols["observed_change"] == 0 and cols["a_update"] == 0  # no optimizer step was taken
    ctx.out.loss.backward()  # the training graph is still usable


@pytest.mark.parametrize("fuse", [False, True])
def test_groups_split_by_teacher_and_noise_match_per_sample_sums(fuse):
    model, lr = mlp(), 0.05
    x, target, teacher_logits, index = batch(0)
    clean = torch.arange(1000) % C
    clean[index] = target
    flipped = index[:5]
    clean[flipped] = (target[:5] + 1) % C  # rows 0..4 carry a flipped label
    runner = runner_for({"groups": True}, fuse=fuse, clean_labels=clean)
    before = copy.deepcopy(model)
    row = one_step(model, torch.optim.SGD(model.parameters(), lr=lr), runner).hook_rows[NAME]
    wrong = teacher_logits.argmax(1) != target
    assert 0 < int(wrong.sum()) < B and int(row["n_teacher_wrong"]) == int(wrong.sum()) and int(row["n_noisy"]) == 5
    for group, other in (("teacher_wrong", "teacher_correct"), ("noisy", "clean")):
        for term in ("target", "dark"):
            torch.testing.assert_close(row[f"a_{term}_{group}"] + row[f"a_{term}_{other}"], row[f"a_{term}"],
                                       rtol=1e-9, atol=1e-15)
    # independent: per-sample single-row forwards (no BN), contribution -lr <g_val, g_s> / B summed over the group
    _, g_val = heldout_grad(before)
    params = list(before.parameters())
    lg = get_objective("ban")(before(x), teacher_logits, target).logit_grad.detach() * B
    noisy = torch.zeros(B, dtype=torch.bool)
    noisy[:5] = True
    for group, mask in (("teacher_wrong", wrong), ("noisy", noisy)):
        want = {"target": 0.0, "dark": 0.0}
        for s in mask.nonzero().flatten().tolist():
            z = before(x[s:s + 1])[0]
            t = torch.zeros(C, dtype=torch.float64)
            t[target[s]] = lg[s, target[s]]
            want["target"] += -lr * (g_val @ flat_grad((t * z).sum(), params)) / B
            want["dark"] += -lr * (g_val @ flat_grad(((lg[s] - t) * z).sum(), params)) / B
        for term in ("target", "dark"):
            torch.testing.assert_close(row[f"a_{term}_{group}"], want[term], rtol=1e-6, atol=1e-14)
    # objective ce has no teacher: only the noise split
    model = mlp()
    row = one_step(model, torch.optim.SGD(model.parameters(), lr=lr), runner, objective="ce").hook_rows[NAME]
    assert "a_target_noisy" in row and "a_target_teacher_wrong" not in row


def test_teacher_argmax_anchor_records_itself():
    runner = runner_for({"anchor": "teacher_argmax"}, with_update_share=True)
    model = mlp()
    rows = one_step(model, torch.optim.SGD(model.parameters(), lr=0.05), runner).hook_rows
    assert int(rows[NAME]["anchor_teacher_argmax"]) == 1
    rows = one_step(model, torch.optim.SGD(model.parameters(), lr=0.05), runner, step=1, objective="ce").hook_rows
    assert int(rows[NAME]["anchor_teacher_argmax"]) == 0  # no teacher: the label, recorded
    assert runner.info()[NAME]["anchor"] == "teacher_argmax"
    assert runner.info()[NAME]["anchor_effective"] == {"1": "label"}


def test_hook_on_and_off_give_identical_runs(tiny_root, tmp_path):
    base = tiny_config(tiny_root, ban={"generations": 1, "objective": "ban"},
                       train={"momentum": 0.9, "weight_decay": 5e-4},
                       model={"arch": "mlp", "params": {"widths": [32], "dropout": 0.2}})
    hooks = {"update_share": {"every_n_steps": 3},
             NAME: {"every_n_steps": 3, "samples": 40, "groups": True, "anchor": "teacher_argmax"}}
    off = run_chain(config_from_dict(base), tmp_path / "off", progress=False)
    on = run_chain(config_from_dict({**base, "hooks": hooks}), tmp_path / "on", progress=False)
    assert on == off
    _assert_same_weights(tmp_path / "off", tmp_path / "on", [0, 1])
    for gen in (0, 1):
        files = sorted((tmp_path / "on" / f"gen-{gen}" / "hooks" / NAME).glob("epoch-*.parquet"))
        frame = pd.concat(pd.read_parquet(f) for f in files)
        assert len(frame) == len(frame["step"].unique()) and (frame["step"] % 3 == 0).all()  # one row per due step
        np.testing.assert_allclose(frame["a_target"] + frame["a_dark"], frame["a_total"], rtol=1e-6)
        assert np.isfinite(frame["observed_change"]).all() and (frame["anchor_teacher_argmax"] == min(gen, 1)).all()
        assert ("a_dark_teacher_wrong" in frame) == (gen == 1)
    info = json.loads((tmp_path / "on" / "manifest.json").read_text())["hooks"][NAME]
    assert info["heldout_rows"] == 40 and info["fused"]
    assert info["anchor_effective"] == {"0": "label", "1": "teacher_argmax"}


@pytest.mark.parametrize("opts, match", [
    ({"anchor": "argmax"}, "anchor must be one of"),
    ({"groups": "yes"}, "groups must be bool"),
    ({"eval_batch_size": 0}, "eval_batch_size must be an int >= 1"),
    ({"samples": 0}, "samples must be 'all' or an int >= 1"),
    ({"sample_from": "train"}, "unknown option"),
])
def test_bad_options_raise(opts, match):
    with pytest.raises(ValueError, match=match):
        HookRunner({NAME: opts}, seed=0, train_size=10)


def test_missing_heldout_data_or_lr_raise(tiny_root):
    empty = (torch.empty(0, 1, 3, 4), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match="heldout_attribution.*data.val_size > 0"):
        HookRunner({NAME: {}}, seed=0, train_size=10, heldout=empty)
    with pytest.raises(ConfigError, match="hooks.heldout_attribution.*data.val_size = 0"):
        config_from_dict(tiny_config(tiny_root, data={"val_size": 0}, hooks={NAME: {}}))
    model = mlp()
    with pytest.raises(ValueError, match="no held-out data"):
        one_step(model, torch.optim.SGD(model.parameters(), lr=0.1),
                 HookRunner({NAME: {"every_n_steps": 1}}, seed=0, train_size=10))
    x, target, teacher_logits, index = batch(0)
    logits = model(x)
    ctx = StepContext(gen=1, epoch=0, step=0, sample_index=index, inputs=x, target=target, student_logits=logits,
                      teacher_logits=teacher_logits, out=get_objective("ban")(logits, teacher_logits, target),
                      model=model)
    with pytest.raises(ValueError, match="StepContext.lr"):
        runner_for().run(ctx)

"""train_step: the README's own-loop example runs, and hooks instrument a loss that is not registered."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ban_analysis as ba
from ban_analysis.engine.step import AutogradObjective, as_objective, train_step
from ban_analysis.instrument import HookRunner
from ban_analysis.losses import get_objective

pytestmark = pytest.mark.usefixtures("one_torch_thread")
README = Path(__file__).resolve().parents[1] / "README.md"
HOOKS = {"logit_split": {}, "head_split": {}, "update_share": {}, "param_split": {"samples": 8, "every_n_steps": 1}}


def test_readme_own_loop_example_runs(capsys):
    text = README.read_text()
    match = re.search(r"<!-- example: train_step -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its train_step example"
    exec(compile(match.group(1), "README.md:train_step", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith(str(i)) for i, line in enumerate(lines))


def _plain_ban_loss(student_logits, teacher_logits, target):
    """Eq. 2 written in plain PyTorch: H(p, q) averaged over the batch."""
    return -(F.softmax(teacher_logits, 1) * F.log_softmax(student_logits, 1)).sum(1).mean()


def _one_step(objective, seed=0):
    torch.manual_seed(seed)
    model = ba.create_model("mlp", num_classes=5, input_shape=(1, 4, 4), widths=[16])
    teacher_logits = torch.randn(12, 5, generator=torch.Generator().manual_seed(1))
    x = torch.randn(12, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    target = torch.randint(0, 5, (12,), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = HookRunner(HOOKS, seed=0, train_size=12, fuse_backward=True)
    result = train_step(model, objective, x, target, optimizer, teacher_logits=teacher_logits, hooks=hooks,
                        sample_index=torch.arange(12))
    return result, model


def test_hooks_instrument_an_unregistered_loss_like_the_registered_one():
    plain, plain_model = _one_step(_plain_ban_loss)
    closed, closed_model = _one_step(get_objective("ban"))
    assert isinstance(as_objective(_plain_ban_loss), AutogradObjective)
    torch.testing.assert_close(plain.out.logit_grad, closed.out.logit_grad, rtol=1e-5, atol=1e-7)
    assert set(plain.hook_rows) == set(HOOKS)
    for hook, columns in closed.hook_rows.items():
        assert set(plain.hook_rows[hook]) == set(columns), hook
        for name, value in columns.items():
            other = plain.hook_rows[hook][name]
            if value.is_floating_point():
                torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-6, msg=f"{hook}.{name}")
            else:
                assert torch.equal(other, value), f"{hook}.{name}"
    # the optimizer step is the same step: the parameters agree after it
    for a, b in zip(plain_model.parameters(), closed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_autograd_objective_gives_the_implied_soft_target():
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 4, dtype=torch.float64)
    out = AutogradObjective(_plain_ban_loss)(z, t, torch.zeros(6, dtype=torch.long))
    # eq. 5: the per-sample gradient of soft-target CE is q - p, so the implied target is p
    torch.testing.assert_close(out.target_dist.double(), F.softmax(t, 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.sample_weight.sum().double(), torch.tensor(1.0, dtype=torch.float64))


def test_a_loss_that_is_not_a_scalar_is_refused():
    z = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="scalar"):
        AutogradObjective(lambda s, t, y: s.sum(1))(z, None, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="loss callable"):
        as_objective(42)


def test_non_finite_loss_stops_with_a_diagnosis():
    model = ba.create_model("mlp", num_classes=3, input_shape=(1, 2, 2), widths=[4])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ba.TrainingDiverged, match="gen 1 epoch 1 step 0: loss is nan"):
        train_step(model, lambda s, t, y: s.sum() * float("nan"), torch.randn(2, 1, 2, 2),
                   torch.zeros(2, dtype=torch.long), optimizer, teacher_logits=torch.zeros(2, 3))

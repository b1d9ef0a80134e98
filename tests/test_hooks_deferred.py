"""Deferred per-sample hooks (``HookRunner(defer=True)``): rows gathered per step, statistics at flush.

The deferred rows must be the rows the per-step path gives: same columns in the same order, same
dtypes, same row order (step, then batch position), values equal to 1e-6 relative; and a run folder
written by ``run_chain`` (which defers) must hold the same Parquet files as one written without
deferral, also after a crash mid-epoch and a resume.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from types import SimpleNamespace
import pytest
import torch
from torch import nn

from ban_analysis.config import config_from_dict
from ban_analysis.engine.chain import run_chain
from ban_analysis.engine.runs import HookWriter
from ban_analysis.instrument import hooks as hooks_mod
from ban_analysis.instrument.capture import capture_activations
from ban_analysis.instrument.hooks import HookRunner
from ban_analysis.layout import RunLayout
from tests.conftest import tiny_config
from tests.test_hooks import Net, make_batch, step_context

# experiments/study_fmnist_mlp.toml's hook set, at the tiny data's scale
STUDY_HOOKS = {"logit_split": {"every_n_steps": 1, "samples": 200}, "head_split": {"every_n_steps": 1, "samples": 200},
               "update_share": {"every_n_steps": 5}, "param_split": {"every_n_steps": 7, "samples": 8}}


def _as_frame(rows_by_step: list[tuple[int, dict]], gen: int = 1) -> dict[str, pd.DataFrame]:
    """What HookWriter would write for these (step, rows) calls: hook -> frame (as its flush builds it)."""
    writer = HookWriter(None, gen)
    for step, rows in rows_by_step:
        writer.add(0, step, rows)
    return {hook: pd.concat([pd.DataFrame(b) for b in blocks], ignore_index=True)
            for hook, blocks in writer._buffers.items()}


def _assert_frames_match(got: pd.DataFrame, want: pd.DataFrame, what: str) -> None:
    assert list(got.columns) == list(want.columns), what
    assert list(got.dtypes) == list(want.dtypes), what
    assert len(got) == len(want), what
    # float rounding: 1e-6 relative, and 1e-6 of the column's largest magnitude absolute. The
    # deferred path takes its statistics in other op orders (e.g. the log-softmax along the
    # transpose), so a value near 1 may differ in its last bit or two (~1e-7), and a column that
    # subtracts it from 1 (cw_part = p_label * (q_label - 1)) then differs by ~1e-7 absolute: on an
    # AMD EPYC VM, -0.015622723 against -0.015622606 (7.5e-6 relative; 1e-6 relative passed on an
    # Intel VM)
    for name in want.columns:
        values = want[name].to_numpy(dtype=float) if want[name].dtype.kind == "f" else np.zeros(0)
        finite = np.abs(values[np.isfinite(values)])  # NaN columns (cw_part without a teacher) have no scale
        scale = float(finite.max()) if finite.size else 0.0
        pd.testing.assert_series_equal(got[name], want[name], check_exact=False, rtol=1e-6, atol=1e-6 * scale,
                                       obj=f"{what} [{name}]")


class ScaledNet(Net):
    """Logits that are not the head's own matmul (a scale after it): the head input then comes from a
    forward hook kept through the epoch, not from the autograd graph."""

    def forward(self, x):
        return self.head(self.body(x)) * 1.0


@pytest.mark.parametrize("anchor", ["label", "teacher_argmax"])
@pytest.mark.parametrize("objective", ["ban", "ce", "cwtm"])
@pytest.mark.parametrize("defer_bytes", [2**26, 2000])
@pytest.mark.parametrize("head_rows", [{"samples": 30}, {"samples": 5, "sample_from": "batch"}])
@pytest.mark.parametrize("net", [Net, ScaledNet])
def test_deferred_rows_equal_the_per_step_rows(anchor, objective, defer_bytes, head_rows, net):
    """run() per step vs flush(): same columns, dtypes, row order and values (all rows, a fixed
    subset, rows drawn per step, label-noise columns, an anchor at the teacher's argmax, no teacher,
    steps computed in groups of one or two: 2,000 bytes; the head input read from the logits'
    graph, or from a forward hook)."""
    cfg = {"logit_split": {"anchor": anchor}, "head_split": {"anchor": anchor, **head_rows},
           "update_share": {"every_n_steps": 2}}
    clean = torch.randint(0, 5, (60,), generator=torch.Generator().manual_seed(3))
    runners = {d: HookRunner(cfg, seed=0, train_size=60, clean_labels=clean, defer=d, defer_bytes=defer_bytes)
               for d in (False, True)}
    assert runners[True].info()["logit_split"]["deferred"] and "deferred" not in runners[False].info()["logit_split"]
    assert not runners[True].hooks["update_share"].hook.deferred
    torch.manual_seed(0)
    model = net()
    calls = {False: [], True: []}
    hooked = []  # after each step: does the model carry a forward hook (the deferred runner's)?
    for step in range(6):
        for deferred, runner in runners.items():
            torch.manual_seed(step)  # the same dropout mask for both runners' forward
            ctx = step_context(runner, model, step, objective=objective)
            rows = runner.run(ctx)
            assert not (deferred and ({"logit_split", "head_split"} & set(rows)))
            calls[deferred].append((step, rows))
            if deferred:
                hooked.append(any(m._forward_hooks for m in model.modules()))
    # Net's logits are the head's addmm: after the first step (the probe) no hook is kept; ScaledNet's
    # are not: the head's hook stays from the first step to flush()
    assert hooked == ([False] * 6 if net is Net else [True] * 6)
    assert runners[True].hooks["head_split"].hook.state["_graph"] == (net is Net)
    flushed = runners[True].flush()
    assert not any(m._forward_hooks for m in model.modules())  # removed by flush
    assert set(flushed) == {"logit_split", "head_split"} and runners[True].flush() == {}
    assert list(flushed["logit_split"])[:2] == ["step", "sample_index"]
    want = _as_frame(calls[False])
    got = _as_frame(calls[True] + [(5, flushed)])
    assert set(got) == set(want)
    for hook in want:
        _assert_frames_match(got[hook], want[hook], hook)
    assert runners[True].info()["logit_split"].get("anchor_effective") == \
        runners[False].info()["logit_split"].get("anchor_effective")


class MLP(nn.Module):
    """Linear layers only, a bias-free one among them: a deferred param_split's batched path."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(50, 16), nn.ReLU(), nn.Linear(16, 12, bias=False), nn.ReLU())
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.body(x))


def _fused_steps(runner, steps: int, set_to_none: bool = True, net=Net) -> list[tuple[int, dict]]:
    """A trainer's fused steps (run, backward, after_backward, SGD) on ``net``: (step, rows) of each."""
    torch.manual_seed(0)
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    for step in range(steps):
        torch.manual_seed(step)
        ctx = step_context(runner, model, step)
        rows = runner.run(ctx)
        opt.zero_grad(set_to_none=set_to_none)
        ctx.out.loss.backward()
        rows.update(runner.after_backward())
        opt.step()
        calls.append((step, rows))
    return calls


@pytest.mark.parametrize("anchor", ["label", "teacher_argmax"])
@pytest.mark.parametrize("net", [Net, MLP])
def test_deferred_fused_hooks_rows_equal_their_rows_per_step(anchor, net):
    """Fused update_share and param_split in a deferred runner keep their steps (update_share its (P, 3)
    dots; param_split on a Linear model its rows' layer pieces, computed for all steps in one pass, on
    Net its columns at the step) and make their rows at flush(): the per-step runner's rows (update_share
    bit for bit; param_split to float rounding), with step columns, and nothing from after_backward."""
    cfg = {"update_share": {"every_n_steps": 2, "anchor": anchor},
           "param_split": {"every_n_steps": 3, "samples": 4, "anchor": anchor}}
    clean = torch.randint(0, 5, (60,), generator=torch.Generator().manual_seed(3))
    runners = {d: HookRunner(cfg, seed=0, train_size=60, fuse_backward=True, defer=d, clean_labels=clean)
               for d in (False, True)}
    assert all(runners[True].info()[h]["deferred"] and "deferred" not in runners[False].info()[h] for h in cfg)
    calls = {d: _fused_steps(runner, 7, net=net) for d, runner in runners.items()}
    assert not any(rows for _, rows in calls[True])
    flushed = runners[True].flush()
    assert sorted(flushed) == sorted(cfg) and runners[True].flush() == {}
    assert flushed["update_share"]["step"].tolist() == [0, 2, 4, 6]
    assert flushed["param_split"]["step"].tolist() == [0] * 4 + [3] * 4 + [6] * 4
    want, got = _as_frame(calls[False]), _as_frame([(6, flushed)])
    pd.testing.assert_frame_equal(got["update_share"], want["update_share"], check_exact=True)
    _assert_frames_match(got["param_split"], want["param_split"], "param_split")
    assert {"clean_target", "label_noisy", "anchor_teacher_argmax"} & set(got["param_split"]) == \
        {"clean_target", "label_noisy"} | ({"anchor_teacher_argmax"} if anchor == "teacher_argmax" else set())
    assert runners[True].info()["param_split"]["covered_params"] == runners[False].info()["param_split"]["covered_params"]


def test_deferred_update_share_refuses_steps_of_models_with_other_groups():
    runner = HookRunner({"update_share": {}}, seed=0, train_size=60, fuse_backward=True, defer=True)
    _fused_steps(runner, 1, net=Net)
    _fused_steps(runner, 1, net=MLP)  # another model in the same epoch, not flushed between: other groups
    with pytest.raises(ValueError, match="parameter groups differ"):
        runner.flush()


def test_deferred_update_share_drops_the_steps_of_an_unflushed_epoch(caplog):
    runner = HookRunner({"update_share": {}}, seed=0, train_size=60, fuse_backward=True, defer=True)
    _fused_steps(runner, 1)
    runner.run(dataclasses.replace(step_context(runner, Net(), 1), epoch=1))  # the next epoch
    runner._drop_pending()
    assert runner.flush() == {} and "dropping the deferred rows of ['update_share']" in caplog.text


@pytest.mark.parametrize("net", [Net, ScaledNet])
def test_train_step_keep_path_gives_the_rows_and_weights_of_the_general_path(net):
    """train_step's keep path (HookRunner.keeps_only / keep: no capture, no after_backward or
    after_step on the steps where the due hooks only keep tensors) against the same steps driven
    through capture / run / after_backward / after_step: bit-identical weights and rows."""
    from ban_analysis.engine.step import train_step
    from ban_analysis.losses import get_objective

    objective = get_objective("ban")
    runners, models, rows, kept = {}, {}, {}, {}
    for path in ("keep", "general"):
        torch.manual_seed(0)
        models[path] = net()
        runners[path] = HookRunner(STUDY_HOOKS, seed=0, train_size=60, fuse_backward=True, defer=True)
        rows[path], kept[path] = [], []
    optimizers = {p: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for p, m in models.items()}
    for step in range(16):
        x, target, teacher_logits, index = make_batch(step)
        for path, runner in runners.items():
            model, opt = models[path], optimizers[path]
            torch.manual_seed(step)  # the same dropout mask on both paths
            if path == "keep":
                kept[path].append(not runner.idle(step) and runner.keeps_only(step, model))
                runner._keeping = None  # train_step asks again
                res = train_step(model, objective, x, target, opt, teacher_logits=teacher_logits, hooks=runner,
                                 step=step, gen=1, epoch=0, sample_index=index)
                rows[path].append((step, res.hook_rows))
                continue
            with runner.capture(model, step) as cap:
                logits = model(x)
            out = objective(logits, teacher_logits, target)
            ctx = hooks_mod.StepContext(gen=1, epoch=0, step=step, sample_index=index, inputs=x, target=target,
                                        student_logits=logits, teacher_logits=teacher_logits, out=out, model=model,
                                        captured=getattr(cap, "captured", {}) or {}, lr=0.1)
            step_rows = runner.run(ctx)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            step_rows.update(runner.after_backward())
            opt.step()
            step_rows.update(runner.after_step())
            rows[path].append((step, step_rows))
    # Net: step 1 probes the head's graph and step 2's capture finds no module to hook, so from step 3
    # on, every step where only logit_split and head_split are due; ScaledNet keeps a forward hook: never
    due_lh_only = [step >= 3 and step % 5 != 0 and step % 7 != 0 for step in range(16)]
    assert kept["keep"] == (due_lh_only if net is Net else [False] * 16), kept["keep"]
    for a, b in zip(models["keep"].parameters(), models["general"].parameters()):
        assert torch.equal(a, b)
    flushed = {path: runner.flush() for path, runner in runners.items()}
    assert set(flushed["keep"]) == set(STUDY_HOOKS)  # update_share, param_split: fused and deferred, at flush
    for hook, cols in flushed["general"].items():
        assert list(flushed["keep"][hook]) == list(cols)
        for name, col in cols.items():
            assert torch.equal(flushed["keep"][hook][name], col), (hook, name)
    # a keep() not announced by keeps_only for its step takes run()'s way, rows included
    runner, model = runners["keep"], models["keep"]
    assert runner.keeps_only(16, model) == (net is Net)
    ctx = step_context(runner, model, 20)  # step 20: update_share due, never announced
    assert runner.keep(ctx) == {}  # fused update_share: finished by after_backward, its row at flush
    assert [name for name, _ in runner._pending] == ["update_share"]
    runner._drop_pending()
    for (_, got), (_, want) in zip(rows["keep"], rows["general"]):
        assert set(got) == set(want)
        for hook in want:
            for name, col in want[hook].items():
                assert torch.equal(got[hook][name], col) or (col.isnan() & got[hook][name].isnan()).all(), (hook, name)


def test_head_input_from_the_graph_is_the_hooked_input_and_a_changed_head_is_refused():
    """The graph's saved head input is the very tensor a forward hook captures (the probe's test); a
    model whose logits stop being the head's matmul mid-epoch gets a clear error, not wrong rows."""
    runner = HookRunner({"head_split": {}}, seed=0, train_size=60, defer=True)
    model = Net()
    for step in range(2):
        runner.run(step_context(runner, model, step))
    hook = runner.hooks["head_split"].hook
    assert hook.state["_graph"] and hook.capture_modules(model) == ([], False)
    with capture_activations(model, ["head"], clone_outputs=False) as cap:
        logits = model(make_batch(0)[0])
    assert hook._graph_input(SimpleNamespace(student_logits=logits, model=model)) is cap["head"][0]
    model.forward = lambda x: Net.forward(model, x) * 1.0  # the last op is no longer the head's
    with pytest.raises(RuntimeError, match="not the head layer's matmul"):
        runner.run(step_context(runner, model, 2))


def test_rows_of_an_earlier_epoch_are_dropped_with_a_warning(caplog):
    runner = HookRunner({"logit_split": {}}, seed=0, train_size=60, defer=True)
    model = Net()
    runner.run(step_context(runner, model, 0))
    ctx = step_context(runner, model, 1)
    ctx.epoch = 1
    with caplog.at_level("WARNING", logger="ban_analysis.instrument.hooks"):
        runner.run(ctx)
    assert "flush was not called" in caplog.text
    assert set(runner.flush()["logit_split"]["step"].tolist()) == {1}


def test_a_tensor_changed_in_place_after_its_step_is_refused():
    runner = HookRunner({"logit_split": {}}, seed=0, train_size=60, defer=True)
    ctx = step_context(runner, Net(), 0)
    runner.run(ctx)
    ctx.target.add_(0)
    with pytest.raises(RuntimeError, match="changed in place"):
        runner.flush()


def test_membership_lookup_matches_isin():
    """The CPU subset lookup (a bool mask over sample ids) picks the rows torch.isin picks, ids
    beyond the largest subset id included."""
    runner = HookRunner({"logit_split": {"samples": 20}}, seed=0, train_size=60)
    r = runner.hooks["logit_split"]
    for index in (torch.randperm(60)[:12], torch.tensor([59, 3, 70, 200, 0]), torch.tensor([], dtype=torch.long)):
        ctx = step_context(runner, Net(), 0)
        ctx.sample_index = index
        got = runner._rows("logit_split", r, ctx)
        assert torch.equal(got, torch.isin(index, r.subset).nonzero().squeeze(1))


def _immediate(monkeypatch):
    """run_chain with HookRunner(defer=False): the per-step path, for comparison."""
    real = hooks_mod.HookRunner

    class Immediate(real):
        def __init__(self, *args, **kwargs):
            kwargs["defer"] = False
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(hooks_mod, "HookRunner", Immediate)


def _hook_frames(out, hooks=("logit_split", "head_split", "update_share", "param_split")):
    layout = RunLayout(out)
    return {(hook, gen, path.name): pd.read_parquet(path) for hook in hooks for gen, path in layout.hook_files(hook)}


def _assert_same_hook_files(a, b):
    fa, fb = _hook_frames(a), _hook_frames(b)
    assert sorted(fa) == sorted(fb) and fa
    for key in fa:
        _assert_frames_match(fb[key], fa[key], str(key))


def test_run_chain_deferred_files_equal_the_per_step_files(tiny_root, tmp_path, monkeypatch):
    table = tiny_config(tiny_root, hooks=STUDY_HOOKS, ban={"generations": 1})
    cfg = config_from_dict(table)
    deferred = run_chain(cfg, tmp_path / "deferred", progress=False)
    with monkeypatch.context() as m:
        _immediate(m)
        immediate = run_chain(cfg, tmp_path / "immediate", progress=False)
    assert deferred == immediate
    _assert_same_hook_files(tmp_path / "immediate", tmp_path / "deferred")
    frame = pd.read_parquet(tmp_path / "deferred" / "gen-1" / "hooks" / "logit_split" / "epoch-1.parquet")
    assert list(frame.columns[:4]) == ["gen", "epoch", "step", "sample_index"]
    assert frame["step"].is_monotonic_increasing and frame["epoch"].eq(1).all()
    import json

    manifest = json.loads((tmp_path / "deferred" / "manifest.json").read_text())
    assert manifest["hooks"]["logit_split"]["deferred"] is True


from tests.test_train import _crash_at  # noqa: E402  the same simulated kill as the resume tests


def test_resume_after_a_crash_mid_epoch_gives_the_same_files(tiny_root, tmp_path, monkeypatch):
    """520 training samples / batch 32 = 17 steps per epoch, 34 objective calls per generation: call 61
    is gen 1, epoch 1 (0-based), step 26. That epoch's deferred rows are lost with the process and
    redone by the resume."""
    cfg = config_from_dict(tiny_config(tiny_root, hooks=STUDY_HOOKS, ban={"generations": 1}))
    with monkeypatch.context() as m:
        _immediate(m)
        run_chain(cfg, tmp_path / "ref", progress=False)
    with monkeypatch.context() as m:
        _crash_at(m, 61)
        with pytest.raises(KeyboardInterrupt):
            run_chain(cfg, tmp_path / "crashed", progress=False)
    assert (tmp_path / "crashed" / "gen-1" / "hooks" / "logit_split" / "epoch-0.parquet").exists()
    assert not (tmp_path / "crashed" / "gen-1" / "hooks" / "logit_split" / "epoch-1.parquet").exists()
    run_chain(cfg, tmp_path / "crashed", progress=False)
    _assert_same_hook_files(tmp_path / "ref", tmp_path / "crashed")
    got = pd.concat(f for (hook, gen, _), f in _hook_frames(tmp_path / "crashed").items() if hook == "logit_split")
    assert not got.duplicated(["gen", "epoch", "step", "sample_index"]).any()
    np.testing.assert_array_equal(got["gen"].unique(), [0, 1])

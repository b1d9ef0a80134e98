"""Mixed precision on CPU: bf16 autocast, the fp16 GradScaler path, skipped steps, exact resume.

Autocast to float16 runs on CPU in the torch versions this project supports, and
``torch.amp.GradScaler("cpu")`` exists, so the fp16 path the GPU takes (scale, unscale, skip
on inf/NaN, back off the scale) is exercised here as it is on a GPU.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from ban_analysis.config import config_from_dict
from ban_analysis.engine import loop as loop_mod
from ban_analysis.engine.amp import autocast_dtype, make_scaler, uses_scaler
from ban_analysis.engine.chain import run_chain
from ban_analysis.engine.step import train_step
from ban_analysis.losses import get_objective
from ban_analysis.models import create_model
from tests.conftest import tiny_config
from tests.test_train import _assert_same_weights, _crash_at, _state

# tiny tensors: one thread (a second OpenMP thread on a loaded 2-core machine only waits)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_autocast_dtype_and_scaler_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("off", cpu) is None and autocast_dtype("off", cuda) is None
    assert autocast_dtype("auto", cpu) is None  # auto is off on CPU
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("fp16", cpu) is torch.float16
    assert isinstance(make_scaler("fp16", cpu), torch.amp.GradScaler)
    for amp in ("off", "auto", "bf16"):
        assert make_scaler(amp, cpu) is None
    # auto on a GPU: bf16 where it is supported, else fp16 with a scaler
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype("auto", cuda) is torch.bfloat16 and not uses_scaler("auto", cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype("auto", cuda) is torch.float16 and uses_scaler("auto", cuda)
    with pytest.raises(ValueError, match="allowed: off, auto, bf16, fp16"):
        autocast_dtype("fp8", cpu)


def _mlp_and_batch(seed=0):
    torch.manual_seed(seed)
    model = create_model("mlp", num_classes=5, input_shape=(1, 4, 4), widths=[16])
    x, target = torch.randn(32, 1, 4, 4), torch.randint(0, 5, (32,))
    return model, x, target


def test_scaler_skips_a_step_with_an_inf_gradient():
    """An inf in one gradient: the step is skipped, the weights and momentum unchanged, the scale halved."""
    model, x, target = _mlp_and_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    objective = get_objective("ce")
    first = train_step(model, objective, x, target, optimizer, amp="fp16", scaler=scaler)
    assert not first.skipped and scaler.get_scale() == 65536.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    weight = next(model.parameters())
    weight_before = weight.detach().clone()
    handle = weight.register_hook(lambda g: g * float("inf"))
    try:
        bad = train_step(model, objective, x, target, optimizer, step=1, amp="fp16", scaler=scaler)
    finally:
        handle.remove()
    assert bad.skipped and torch.isfinite(bad.loss)
    assert scaler.get_scale() == 32768.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, m in zip(model.parameters(), momentum):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], m)
    good = train_step(model, objective, x, target, optimizer, step=2, amp="fp16", scaler=scaler)
    assert not good.skipped
    assert not torch.equal(weight, weight_before)  # the next finite step updates again


def _inject_inf(monkeypatch, at: set[tuple[int, int]], record: dict):
    """Wrap the loop's train_step: at (gen, step) in ``at`` one parameter's gradient becomes inf;
    every step's ``skipped`` flag is recorded per (gen, epoch)."""
    real = loop_mod.train_step

    def wrapped(model, *args, **kwargs):
        key = (kwargs["gen"], kwargs["step"])
        handle = next(model.parameters()).register_hook(lambda g: g * float("inf")) if key in at else None
        try:
            result = real(model, *args, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        record.setdefault((kwargs["gen"], kwargs["epoch"]), []).append(result.skipped)
        if key in at:
            record.setdefault("injected", []).append(result.skipped)
        return result

    monkeypatch.setattr(loop_mod, "train_step", wrapped)


# 520 training samples / batch 32 = 17 steps per epoch; gen 0 takes objective calls 1..51, so
# call 74 is gen 1, epoch 2 (of 3), step 5: after gen 1's injected skip (step 3, epoch 1)
def test_fp16_scaler_counts_skips_and_resumes_exactly(tiny_root, tmp_path, monkeypatch):
    cfg = config_from_dict(tiny_config(tiny_root, train={"epochs": 3, "amp": "fp16"}, ban={"generations": 1}))
    record: dict = {}
    with monkeypatch.context() as m:
        _inject_inf(m, {(1, 3)}, record)
        reference = run_chain(cfg, tmp_path / "ref", progress=False)
    assert record["injected"] == [True]
    for gen in (0, 1):
        metrics = pd.read_csv(tmp_path / "ref" / f"gen-{gen}" / "metrics.csv")
        assert metrics["skipped_steps"].tolist() == [sum(record[(gen, e)]) for e in range(3)]
        assert metrics[["train_loss", "val_loss"]].notna().all().all()
    assert pd.read_csv(tmp_path / "ref" / "gen-1" / "metrics.csv")["skipped_steps"][0] >= 1
    ref_scaler = _state(tmp_path / "ref", 1)["scaler"]
    assert ref_scaler["scale"] < 65536.0  # backed off: a resume that forgot the scaler would differ

    with monkeypatch.context() as m:
        _inject_inf(m, {(1, 3)}, {})
        _crash_at(m, 74)
        with pytest.raises(KeyboardInterrupt):
            run_chain(cfg, tmp_path / "crashed", progress=False)
    assert _state(tmp_path / "crashed", 1)["epoch"] == 1  # gen 1 stopped in its second epoch
    with monkeypatch.context() as m:
        _inject_inf(m, {(1, 3)}, {})  # step 3 is not redone: the resume starts at epoch 2
        resumed = run_chain(cfg, tmp_path / "crashed", progress=False)
    assert resumed == reference
    _assert_same_weights(tmp_path / "ref", tmp_path / "crashed", [0, 1])
    assert _state(tmp_path / "crashed", 1)["scaler"] == ref_scaler
    for gen in (0, 1):
        pd.testing.assert_frame_equal(
            pd.read_csv(tmp_path / "ref" / f"gen-{gen}" / "metrics.csv").drop(columns="seconds"),
            pd.read_csv(tmp_path / "crashed" / f"gen-{gen}" / "metrics.csv").drop(columns="seconds"))


def test_bf16_chain_is_finite_and_has_no_scaler(tiny_root, tmp_path):
    cfg = config_from_dict(tiny_config(tiny_root, train={"epochs": 2, "amp": "bf16"}, ban={"generations": 1}))
    summary = run_chain(cfg, tmp_path / "run", progress=False)
    for g in summary["generations"]:
        assert 0.3 < g["test_acc"] <= 1 and torch.isfinite(torch.tensor(g["test_nll"]))
    for gen in (0, 1):
        metrics = pd.read_csv(tmp_path / "run" / f"gen-{gen}" / "metrics.csv")
        assert "skipped_steps" not in metrics.columns  # no scaler for bf16
        assert metrics[["train_loss", "val_loss"]].map(lambda v: torch.isfinite(torch.tensor(v)).item()).all().all()
        assert "scaler" not in _state(tmp_path / "run", gen)


def test_amp_auto_on_cpu_is_bit_identical_to_off(tiny_root, tmp_path):
    base = tiny_config(tiny_root, train={"epochs": 1}, ban={"generations": 0})
    off = run_chain(config_from_dict(base), tmp_path / "off", progress=False)
    auto = run_chain(config_from_dict({**base, "train": {**base["train"], "amp": "auto"}}), tmp_path / "auto",
                     progress=False)
    assert auto == off
    _assert_same_weights(tmp_path / "off", tmp_path / "auto", [0])

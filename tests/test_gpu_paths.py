"""The GPU configs' code paths, run on CPU at tiny sizes (experiments/cifar100_*.toml,
imagewang_densenet121_resnet18.toml): crop+flip augmentation with the teacher's forward in
every step, a cross-architecture chain (DenseNet-BC teacher, ResNet students), channels_last
in a chain, AdamW in a chain, torch.compile in a chain. (Mixed precision: tests/test_amp.py; torch.compile and
channels_last of single models, and one step of the paper's DenseNet-BC / WRN sizes:
tests/test_models.py.)
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from ban_analysis.config import config_from_dict
from ban_analysis.engine import step as step_mod
from ban_analysis.engine.chain import run_chain
from tests.conftest import tiny_config, write_tiny_npz
from tests.test_train import _assert_same_weights, _crash_at, _state

# tiny tensors: one thread (a second OpenMP thread on a loaded 2-core machine only waits)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_crop_flip_runs_the_teacher_in_every_step(tiny_root, tmp_path, monkeypatch):
    """With augmentation the teacher's logits cannot be cached: one eval-mode forward of the
    augmented batch per student step, under inference mode."""
    cfg = config_from_dict(tiny_config(tiny_root, data={"augment": "crop_flip", "pad": 1},
                                       train={"epochs": 1}, ban={"generations": 1}))
    calls = []
    real = step_mod.teacher_forward

    def spy(teacher, x, amp="off"):
        calls.append((teacher.training, x.shape[0], x.detach().clone()))
        return real(teacher, x, amp)

    monkeypatch.setattr(step_mod, "teacher_forward", spy)
    summary = run_chain(cfg, tmp_path / "run", progress=False)
    assert len(calls) == 17  # gen 1 only (gen 0 is CE), 520 samples / batch 32 = 17 steps
    assert not any(training for training, _, _ in calls)  # eval mode
    assert sum(n for _, n, _ in calls) == 520
    assert all(0 <= g["test_acc"] <= 1 for g in summary["generations"])
    assert all(x.shape[1:] == (1, 8, 8) for _, _, x in calls)  # crops keep the image size
    metrics = pd.read_csv(tmp_path / "run" / "gen-1" / "metrics.csv")
    assert metrics["train_loss"].notna().all()


@pytest.fixture
def small_root(tmp_path):
    """A smaller tiny set for the conv nets: 64 training images after 16 for validation, 40 test."""
    root = tmp_path / "small"
    write_tiny_npz(root, n_train=80, n_test=40)
    return root


def _small(root, **sections):
    table = tiny_config(root, **sections)
    table["data"] = {**table["data"], "val_size": 16}
    return table


def test_cross_architecture_chain_densenet_teacher_resnet_students(small_root, tmp_path):
    """A DenseNet-BC teacher (depth 10, growth 4) and ResNet-20 students, on 8x8 grey images;
    the chain is stopped after generation 1 and resumed, so both architectures are reloaded
    from their checkpoints as teachers."""
    table = _small(small_root, train={"epochs": 1, "batch_size": 32}, model={"arch": "resnet20", "params": {}},
                   teacher={"arch": "densenet_bc", "params": {"depth": 10, "growth": 4}}, ban={"generations": 2})
    cfg = config_from_dict(table)
    assert run_chain(cfg, tmp_path / "run", until_gen=1, progress=False) is None
    summary = run_chain(cfg, tmp_path / "run", progress=False)
    assert [g["arch"] for g in summary["generations"]] == ["densenet_bc", "resnet20", "resnet20"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["generations"]["0"]["arch"] == "densenet_bc"
    assert manifest["generations"]["2"]["parent_sha256"] == manifest["generations"]["1"]["checkpoint_sha256"]
    assert _state(tmp_path / "run", 0)["arch_params"] == {"depth": 10, "growth": 4}
    assert _state(tmp_path / "run", 1)["arch"] == "resnet20"
    assert any(k.startswith("stages") or "conv" in k for k in _state(tmp_path / "run", 1)["model"])
    for g in summary["generations"]:
        assert 0 <= g["test_acc"] <= 1 and torch.isfinite(torch.tensor(g["test_nll"]))


def test_channels_last_chain_matches_contiguous(small_root, tmp_path):
    """channels_last changes the convolution kernels, not the maths: a ResNet-20 chain ends close
    to the contiguous one (float rounding of other kernels), and its checkpoints load anywhere."""
    base = _small(small_root, train={"epochs": 1, "batch_size": 32}, model={"arch": "resnet20", "params": {}},
                  ban={"generations": 1})
    plain = run_chain(config_from_dict(base), tmp_path / "plain", progress=False)
    cl_table = {**base, "train": {**base["train"], "channels_last": True}}
    cl = run_chain(config_from_dict(cl_table), tmp_path / "cl", progress=False)
    for a, b in zip(plain["generations"], cl["generations"]):
        assert b["test_acc"] == pytest.approx(a["test_acc"], abs=0.05)  # 2 of 40 test images
        assert b["test_nll"] == pytest.approx(a["test_nll"], rel=1e-3)
    for gen in (0, 1):
        pa, pb = _state(tmp_path / "plain", gen)["model"], _state(tmp_path / "cl", gen)["model"]
        for key in pa:
            torch.testing.assert_close(pb[key], pa[key], rtol=1e-3, atol=1e-4, msg=f"gen {gen} {key}")


def test_adamw_chain_and_exact_resume(tiny_root, tmp_path, monkeypatch):
    table = tiny_config(tiny_root, train={"epochs": 2, "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.01},
                        ban={"generations": 1})
    cfg = config_from_dict(table)
    reference = run_chain(cfg, tmp_path / "ref", progress=False)
    optimizer_state = _state(tmp_path / "ref", 1)["optimizer"]
    assert {"exp_avg", "exp_avg_sq"} <= set(next(iter(optimizer_state["state"].values())))
    assert optimizer_state["param_groups"][0]["weight_decay"] == 0.01
    assert reference["generations"][0]["test_acc"] > 0.5  # AdamW learns the tiny set
    # 17 steps per epoch: call 54 is gen 1, epoch 2, step 3
    with monkeypatch.context() as m:
        _crash_at(m, 54)
        with pytest.raises(KeyboardInterrupt):
            run_chain(cfg, tmp_path / "crashed", progress=False)
    assert run_chain(cfg, tmp_path / "crashed", progress=False) == reference
    _assert_same_weights(tmp_path / "ref", tmp_path / "crashed", [0, 1])


@pytest.mark.skipif(not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported(),
                    reason="torch.compile (dynamo) is not supported here")
def test_compile_in_a_chain(tiny_root, tmp_path, monkeypatch):
    """``train.compile = true`` runs the student through torch.compile in the loop (a compiled
    module's truth value raises, so the step must not test it with ``or``). Dynamo's "eager"
    backend keeps this fast: it checks the loop's wiring; inductor itself is
    tests/test_models.py::test_torch_compile_matches_eager."""
    compiled = []
    real = torch.compile

    def eager_compile(model, **kwargs):
        compiled.append(type(model).__name__)
        return real(model, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", eager_compile)
    base = tiny_config(tiny_root, train={"epochs": 1}, ban={"generations": 1})
    plain = run_chain(config_from_dict(base), tmp_path / "plain", progress=False)
    got = run_chain(config_from_dict({**base, "train": {**base["train"], "compile": True}}), tmp_path / "compiled",
                    progress=False)
    assert compiled == ["MLP", "MLP"]  # gens 0 and 1
    for a, b in zip(plain["generations"], got["generations"]):
        assert b["test_acc"] == pytest.approx(a["test_acc"], abs=0.01)
        assert b["test_nll"] == pytest.approx(a["test_nll"], rel=1e-4)

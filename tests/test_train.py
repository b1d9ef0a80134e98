"""The training engine end to end: run folders, resume after a crash, refusals, divergence."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from ban_analysis.engine import chain as train_mod
from ban_analysis.config import config_from_dict
from ban_analysis.engine.runs import RunDir, RunFolderError, load_checkpoint_file
from ban_analysis.engine.chain import run_chain
from ban_analysis.engine.loop import derive_seed, lr_at
from ban_analysis.engine.step import TrainingDiverged
from tests.conftest import real_data_root, requires_real_data, tiny_config


def _state(run_dir, gen):
    return load_checkpoint_file(RunDir(run_dir).checkpoint_path(gen))


def _assert_same_weights(dir_a, dir_b, gens):
    for gen in gens:
        a, b = _state(dir_a, gen)["model"], _state(dir_b, gen)["model"]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"gen {gen} {key} differs"


def test_complete_run_folder(tiny_root, tmp_path):
    cfg = config_from_dict(tiny_config(tiny_root))
    out = tmp_path / "run"
    summary = run_chain(cfg, out, progress=False)

    assert json.loads((out / "config.json").read_text()) == json.loads(cfg.to_json())
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("seed", "git_commit", "versions", "device", "started", "finished", "generations"):
        assert key in manifest
    assert manifest["generations"]["1"]["parent_sha256"] == manifest["generations"]["0"]["checkpoint_sha256"]
    targets = np.load(out / "test_targets.npy")
    for gen in range(3):
        metrics = pd.read_csv(out / f"gen-{gen}" / "metrics.csv")
        assert list(metrics.columns) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
        assert metrics["epoch"].tolist() == [1, 2]
        logits = np.load(out / f"gen-{gen}" / "test_logits.npy")
        assert logits.dtype == np.float32 and logits.shape == (len(targets), 10)
        row = summary["generations"][gen]
        assert row["gen"] == gen and row["objective"] == ("ce" if gen == 0 else "ban")
        assert row["test_acc"] == pytest.approx((logits.argmax(1) == targets).mean())
        assert 0 <= row["val_acc"] <= 1
    # the synthetic set is learnable: the teacher is far above chance (10%)
    assert summary["generations"][0]["test_acc"] > 0.5
    # ensemble of gens 1+2 equals an independent average of softmax outputs
    (ens,) = summary["ensembles"]
    assert ens["members"] == [1, 2]
    probs = sum(torch.softmax(torch.from_numpy(np.load(out / f"gen-{g}" / "test_logits.npy")).double(), 1)
                for g in (1, 2)) / 2
    assert ens["test_acc"] == pytest.approx((probs.argmax(1).numpy() == targets).mean())
    assert ens["test_nll"] == pytest.approx(-np.log(probs.numpy()[np.arange(len(targets)), targets]).mean(), rel=1e-6)
    # a rerun reports it complete and returns the same summary without training
    assert run_chain(cfg, out, progress=False) == summary


def test_same_seed_same_numbers_and_pairing(tiny_root, tmp_path):
    cfg = config_from_dict(tiny_config(tiny_root, ban={"generations": 1}))
    a = run_chain(cfg, tmp_path / "a", progress=False)
    b = run_chain(cfg, tmp_path / "b", progress=False)
    assert a == b
    _assert_same_weights(tmp_path / "a", tmp_path / "b", [0, 1])


def test_initial_weights_depend_on_seed_and_gen_only(tiny_root):
    """Pairing: a student's init comes from (seed, gen), not the objective or the global RNG."""
    from ban_analysis.data import load_dataset

    bundle = load_dataset("mnist", root=str(tiny_root), val_size=80, cache_dir=str(tiny_root / "cache"))
    torch.manual_seed(123)
    a = train_mod.build_model("mlp", {"widths": [16]}, bundle, seed=0, gen=1)
    torch.manual_seed(999)
    b = train_mod.build_model("mlp", {"widths": [16]}, bundle, seed=0, gen=1)
    c = train_mod.build_model("mlp", {"widths": [16]}, bundle, seed=0, gen=2)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    assert derive_seed(0, "init", 1) != derive_seed(1, "init", 1)


def _crash_at(monkeypatch, calls: int):
    """Make the objective raise at its ``calls``-th call (mid-epoch): a deterministic 'kill'."""
    real = train_mod.get_objective
    counter = {"n": 0}

    def crashing(name, **params):
        objective = real(name, **params)

        class Crashing:
            def __getattr__(self, attr):
                return getattr(objective, attr)

            def __call__(self, *args, **kwargs):
                counter["n"] += 1
                if counter["n"] == calls:
                    raise KeyboardInterrupt("simulated kill")
                return objective(*args, **kwargs)

        return Crashing()

    monkeypatch.setattr(train_mod, "get_objective", crashing)


# 520 training samples / batch 32 = 17 steps per epoch, 51 per generation (3 epochs), counted
# over gens 0, 1, 2: call 60 is gen 1 epoch 1 step 8; call 141 is gen 2 epoch 2 step 4
@pytest.mark.parametrize("crash_call", [60, 141])
def test_kill_and_resume_gives_same_numbers(tiny_root, tmp_path, monkeypatch, crash_call):
    table = tiny_config(tiny_root, train={"epochs": 3, "checkpoint_every": 1},
                        hooks={"logit_split": {"every_n_steps": 1}})
    cfg = config_from_dict(table)
    reference = run_chain(cfg, tmp_path / "ref", progress=False)
    with monkeypatch.context() as m:
        _crash_at(m, crash_call)
        with pytest.raises(KeyboardInterrupt):
            run_chain(cfg, tmp_path / "crashed", progress=False)
    assert not (tmp_path / "crashed" / "summary.json").exists()
    resumed = run_chain(cfg, tmp_path / "crashed", progress=False)
    assert resumed == reference
    _assert_same_weights(tmp_path / "ref", tmp_path / "crashed", [0, 1, 2])
    # hook rows: no duplicated or missing (epoch, step, sample_index) after the resume
    for gen in (1, 2):
        frames = [pd.read_parquet(p) for p in sorted((tmp_path / "crashed" / f"gen-{gen}" / "hooks" / "logit_split").glob("*.parquet"))]
        ref = [pd.read_parquet(p) for p in sorted((tmp_path / "ref" / f"gen-{gen}" / "hooks" / "logit_split").glob("*.parquet"))]
        got, want = pd.concat(frames), pd.concat(ref)
        keys = ["epoch", "step", "sample_index"]
        assert not got.duplicated(keys).any()
        assert len(got) == 3 * 520  # 3 epochs x 520 training samples, each seen once per epoch
        pd.testing.assert_frame_equal(got.sort_values(keys).reset_index(drop=True),
                                      want.sort_values(keys).reset_index(drop=True))


def test_changed_config_is_refused(tiny_root, tmp_path):
    run_chain(config_from_dict(tiny_config(tiny_root, ban={"generations": 1})), tmp_path / "run", progress=False)
    other = config_from_dict(tiny_config(tiny_root, ban={"generations": 1}, train={"epochs": 3}))
    with pytest.raises(RunFolderError, match="different config.*train.epochs"):
        run_chain(other, tmp_path / "run", progress=False)


def test_eval_batch_size_auto_rule_and_explicit_values():
    from ban_analysis.config import TrainConfig
    from ban_analysis.engine.loop import eval_batch_size

    assert TrainConfig().eval_batch_size == 0  # auto
    assert eval_batch_size(TrainConfig(), "cpu") == 256
    assert eval_batch_size(TrainConfig(batch_size=32), "cpu") == 64
    assert eval_batch_size(TrainConfig(), "cuda") == 1024
    assert eval_batch_size(TrainConfig(eval_batch_size=1024), "cpu") == 1024
    assert eval_batch_size(TrainConfig(eval_batch_size=7, batch_size=512), "cuda") == 7


def test_a_folder_from_before_auto_eval_batch_size_resumes_with_its_1024(tiny_root, tmp_path):
    """config.json written when 1024 was the default; the same TOML (key unset) resumes it, keeping 1024,
    and ends with the numbers of a run with eval_batch_size = 1024 from the start."""
    table = tiny_config(tiny_root, ban={"generations": 1})
    del table["train"]["eval_batch_size"]
    old = {**table, "train": {**table["train"], "eval_batch_size": 1024}}
    reference = run_chain(config_from_dict(old), tmp_path / "ref", progress=False)
    run_chain(config_from_dict(old), tmp_path / "run", progress=False, until_gen=0)  # the "old" folder
    resumed = run_chain(config_from_dict(table), tmp_path / "run", progress=False)
    assert resumed == reference
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["eval_batch_size"] == 1024
    # a new folder takes auto (0) and is refused by an explicit other value
    run_chain(config_from_dict(table), tmp_path / "new", progress=False, until_gen=0)
    assert json.loads((tmp_path / "new" / "config.json").read_text())["train"]["eval_batch_size"] == 0
    with pytest.raises(RunFolderError, match="eval_batch_size"):
        run_chain(config_from_dict(old), tmp_path / "new", progress=False)


def test_corrupted_checkpoint_is_a_clear_error(tiny_root, tmp_path):
    cfg = config_from_dict(tiny_config(tiny_root, ban={"generations": 1}))
    run_chain(cfg, tmp_path / "run", progress=False)
    (tmp_path / "run" / "summary.json").unlink()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    manifest.pop("finished")
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest))
    ckpt = tmp_path / "run" / "gen-1" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(RunFolderError, match="corrupt"):
        run_chain(cfg, tmp_path / "run", progress=False)


def test_divergence_stops_with_a_diagnosis(tiny_root, tmp_path):
    cfg = config_from_dict(tiny_config(tiny_root, train={"lr": 1e12, "schedule": "constant"}))
    with pytest.raises(TrainingDiverged, match=r"gen 0 epoch 1 step \d+: .*lower train.lr"):
        run_chain(cfg, tmp_path / "run", progress=False)


def test_step_schedule_is_the_wrn_recipe():
    cfg = config_from_dict({"train": {"epochs": 200, "lr": 0.1}}).train
    assert [lr_at(cfg, e) for e in (0, 59, 60, 119, 120, 159, 160, 199)] == pytest.approx(
        [0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008])


def test_hooks_on_and_off_give_identical_runs(tiny_root, tmp_path):
    """Hooks observe only: final weights and every metric are bit-identical with them on (CPU)."""
    base = tiny_config(tiny_root, ban={"generations": 1, "objective": "dkpp"},
                       model={"arch": "mlp", "params": {"widths": [32], "dropout": 0.2}})
    hooks = {"logit_split": {}, "head_split": {}, "update_share": {},
             "param_split": {"every_n_steps": 3, "samples": 40, "mode": "contribution"}}
    off = run_chain(config_from_dict(base), tmp_path / "off", progress=False)
    on = run_chain(config_from_dict({**base, "hooks": hooks}), tmp_path / "on", progress=False)
    assert on == off
    _assert_same_weights(tmp_path / "off", tmp_path / "on", [0, 1])
    for gen in (0, 1):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "off" / f"gen-{gen}" / "metrics.csv").drop(columns="seconds"),
                                      pd.read_csv(tmp_path / "on" / f"gen-{gen}" / "metrics.csv").drop(columns="seconds"))
    columns = {
        "logit_split": ["gen", "epoch", "step", "sample_index", "target", "teacher_argmax", "g_target",
                        "g_dark_norm", "g_norm", "p_label", "p_max", "q_label", "cw_part",
                        "teacher_nontarget_entropy", "kl_teacher_student"],
        "head_split": ["gen", "epoch", "step", "sample_index", "head_target_norm", "head_dark_norm", "head_cos"],
        "update_share": ["gen", "epoch", "step", "target_norm", "dark_norm", "cos_target_dark",
                         "share_target", "share_dark"],
        "param_split": ["gen", "epoch", "step", "sample_index", "param_target_norm", "param_dark_norm", "param_cos"],
    }
    for hook, cols in columns.items():
        files = sorted((tmp_path / "on" / "gen-1" / "hooks" / hook).glob("epoch-*.parquet"))
        assert [f.name for f in files] == ["epoch-0.parquet", "epoch-1.parquet"], hook
        frame = pd.concat(pd.read_parquet(f) for f in files)
        assert set(cols) <= set(frame.columns), (hook, set(cols) - set(frame.columns))
        assert len(frame) > 0 and frame["gen"].eq(1).all()
    shares = pd.read_parquet(tmp_path / "on" / "gen-1" / "hooks" / "update_share" / "epoch-0.parquet")
    np.testing.assert_allclose(shares["share_target"] + shares["share_dark"], 1.0, atol=1e-4)


@requires_real_data
@pytest.mark.slow
def test_real_data_digits_run(tmp_path):
    """End to end on real data (UCI digits from BAN_DATA): the teacher learns, the folder is complete."""
    table = {"data": {"name": "digits", "root": str(real_data_root()), "val_size": 200},
             "model": {"arch": "mlp", "params": {"widths": [64]}},
             "train": {"epochs": 6, "batch_size": 64, "lr": 0.05, "schedule": "cosine"},
             "ban": {"generations": 2, "objective": "ban", "ensemble_with_teacher": True}}
    summary = run_chain(config_from_dict(table), tmp_path / "digits", progress=False)
    assert summary["generations"][0]["test_acc"] > 0.85
    assert all(g["test_acc"] > 0.8 for g in summary["generations"])
    assert [e["members"] for e in summary["ensembles"]] == [[1, 2], [0, 1, 2]]


@requires_real_data
@pytest.mark.slow
def test_sigkill_mid_generation_and_rerun_via_the_cli(tmp_path):
    """A real kill (SIGKILL of the CLI process mid-run), then the same command: same summary."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "experiments" / "quick.toml"
    sets = ["--set", "data.train_subset=3000", "--set", "train.epochs=3", "--set", "data.val_size=500"]
    env = {**os.environ, "BAN_DATA": str(real_data_root())}

    def command(out):
        return [sys.executable, "-m", "ban_analysis.cli", "run", str(config), "--out", str(out), "--quiet", *sets]

    subprocess.run(command(tmp_path / "ref"), env=env, check=True, capture_output=True)
    proc = subprocess.Popen(command(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = tmp_path / "killed" / "gen-1" / "metrics.csv"  # gen 1 has finished an epoch
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "summary.json").exists(), "killed too late to test a resume"
    subprocess.run(command(tmp_path / "killed"), env=env, check=True, capture_output=True)
    ref = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert json.loads((tmp_path / "killed" / "summary.json").read_text()) == ref
    _assert_same_weights(tmp_path / "ref", tmp_path / "killed", [0, 1, 2])
    assert len(json.loads((tmp_path / "killed" / "manifest.json").read_text())["resumed"]) == 1

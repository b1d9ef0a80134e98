"""TensorBoard event files: the scalars are metrics.csv's and the hook Parquet files' epoch means, one
TensorBoard run per generation, no epoch twice after a resume, and a clear error without the package."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from ban_analysis.cli import _log_overrides, build_parser  # noqa: E402
from ban_analysis.config import ConfigError, LogConfig, config_from_dict  # noqa: E402
from ban_analysis.engine import loop as loop_mod  # noqa: E402
from ban_analysis.engine.chain import run_chain  # noqa: E402
from ban_analysis.layout import RunLayout  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every scalar in a TensorBoard run folder."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_are_the_metrics_and_the_hook_means(tiny_root, tmp_path):
    table = tiny_config(tiny_root, ban={"generations": 1}, log={"tensorboard": True},
                        hooks={"logit_split": {}, "update_share": {}})
    out = tmp_path / "run"
    run_chain(config_from_dict(table), out, progress=False)
    layout = RunLayout(out)
    for gen in (0, 1):
        got = scalars(layout.tensorboard(gen))
        metrics = pd.read_csv(layout.metrics(gen))
        for tag, column in (("train/loss", "train_loss"), ("train/acc", "train_acc"), ("val/loss", "val_loss"),
                            ("val/acc", "val_acc"), ("lr", "lr")):
            assert [s for s, _ in got[tag]] == metrics["epoch"].tolist(), tag  # global_step = 1-based epoch
            np.testing.assert_allclose([v for _, v in got[tag]], metrics[column], rtol=1e-6, err_msg=tag)
        if gen == 1:  # the hooks measure the student
            for hook, column in (("logit_split", "g_norm"), ("logit_split", "p_label"),
                                 ("update_share", "share_target")):
                frames = [pd.read_parquet(layout.hook_file(gen, hook, e)) for e in (0, 1)]
                want = [f[column].astype("float64").mean() for f in frames]
                tag = f"hooks/{hook}/{column}"
                assert [s for s, _ in got[tag]] == [1, 2]
                np.testing.assert_allclose([v for _, v in got[tag]], want, rtol=1e-5, err_msg=tag)
            # integer columns (ids, labels) are no scalars
            assert "hooks/logit_split/sample_index" not in got and "hooks/logit_split/target" not in got
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["gen-0", "gen-1"]


def test_a_resumed_generation_logs_each_epoch_once(tiny_root, tmp_path, monkeypatch):
    # checkpoint_every = 2: epoch 1 is logged, then the crash in epoch 2 makes the rerun redo it
    table = tiny_config(tiny_root, ban={"generations": 0}, log={"tensorboard": True},
                        train={"epochs": 3, "checkpoint_every": 2})
    cfg = config_from_dict(table)
    real, calls = loop_mod.train_step, {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 17 + 5:  # 17 steps per epoch: epoch 2, step 5
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(loop_mod, "train_step", crashing)
        with pytest.raises(KeyboardInterrupt):
            run_chain(cfg, out, progress=False)
    log_dir = RunLayout(out).tensorboard(0)
    assert [s for s, _ in scalars(log_dir)["train/loss"]] == [1]
    run_chain(cfg, out, progress=False)
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2  # the crashed process's file and the rerun's
    got = scalars(log_dir)
    metrics = pd.read_csv(RunLayout(out).metrics(0))
    for tag, column in (("train/loss", "train_loss"), ("val/acc", "val_acc")):
        assert [s for s, _ in got[tag]] == [1, 2, 3], tag
        np.testing.assert_allclose([v for _, v in got[tag]], metrics[column], rtol=1e-6)


def test_cli_flag_and_a_missing_package(monkeypatch):
    parser = build_parser()
    args = parser.parse_args(["run", "cfg.toml", "--tensorboard", "--set", "train.epochs=1"])
    assert _log_overrides(args) == ["train.epochs=1", "log.tensorboard=true"]
    args = parser.parse_args(["study", "s.toml", "--out", "o", "--tensorboard"])
    assert _log_overrides(args) == ["log.tensorboard=true"]
    assert _log_overrides(parser.parse_args(["run", "cfg.toml"])) == []

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"log.tensorboard needs the tensorboard package: "
                                          r"pip install 'ban-analysis\[tensorboard\]'"):
        LogConfig(tensorboard=True)
    LogConfig(tensorboard=False)  # off: the package is not needed


def test_turning_tensorboard_on_for_a_resume_is_allowed(tiny_root, tmp_path):
    # [log] changes no number: the folder's config check ignores it (no training here)
    from ban_analysis.engine.runs import RunDir

    run = RunDir(tmp_path / "run")
    run.bind_config(config_from_dict(tiny_config(tiny_root)).to_dict())
    on = config_from_dict(tiny_config(tiny_root, log={"tensorboard": True}))
    assert run.check_config(on.to_dict()) is True

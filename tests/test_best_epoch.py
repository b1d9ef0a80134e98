"""Best and last epoch: each generation records its best-validation epoch and that epoch's test
numbers beside the last epoch's, and a study with report_epoch = "best" reports those."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ban_analysis.config import ConfigError, config_from_dict
from ban_analysis.engine import loop as loop_mod
from ban_analysis.engine.chain import run_chain
from ban_analysis.engine.metrics import ensemble_metrics, logit_metrics
from ban_analysis.engine.runs import load_checkpoint_file
from ban_analysis.layout import RunLayout, StudyLayout
from ban_analysis.study import study_from_dict
from tests.conftest import tiny_config
from tests.test_cli import _toml

LAST_KEYS = ("gen", "objective", "arch", "val_acc", "test_acc", "test_nll", "test_ece")


def test_the_best_record_is_the_best_validation_epoch(tiny_root, tmp_path):
    table = tiny_config(tiny_root, train={"epochs": 4, "schedule": "constant", "lr": 0.2})
    summary = run_chain(config_from_dict(table), tmp_path / "on", progress=False)
    layout = RunLayout(tmp_path / "on")
    test_targets, val_targets = np.load(layout.targets("test")), np.load(layout.targets("val"))
    for g in summary["generations"]:
        gen = g["gen"]
        val_acc = pd.read_csv(layout.metrics(gen))["val_acc"].to_numpy()
        assert g["best_epoch"] == int(np.argmax(val_acc)) + 1  # the first epoch of the maximum
        assert g["best_val_acc"] == pytest.approx(val_acc.max(), abs=1e-6)
        best_test = np.load(layout.best_logits(gen, "test"))
        m = logit_metrics(best_test, test_targets)
        assert (g["best_test_acc"], g["best_test_nll"], g["best_test_ece"]) == (m["acc"], m["nll"], m["ece"])
        assert g["best_test_acc"] == pytest.approx((best_test.argmax(1) == test_targets).mean())
        assert g["best_val_acc"] == (np.load(layout.best_logits(gen, "val")).argmax(1) == val_targets).mean()
        # the plain keys stay the last epoch's
        assert g["test_acc"] == pytest.approx((np.load(layout.logits(gen, "test")).argmax(1) == test_targets).mean())
        assert g["val_acc"] == pytest.approx(val_acc[-1], abs=1e-6)
        if g["best_epoch"] == 4:
            assert np.array_equal(best_test, np.load(layout.logits(gen, "test")))
        assert load_checkpoint_file(layout.checkpoint(gen))["best"]["epoch"] == g["best_epoch"]
        assert json.loads(layout.manifest.read_text())["generations"][str(gen)]["best_epoch"] == g["best_epoch"]
    (ens,) = summary["ensembles"]
    m = ensemble_metrics([np.load(layout.best_logits(k, "test")) for k in (1, 2)], test_targets,
                         teacher_logits=np.load(layout.best_logits(0, "test")))
    assert (ens["best_test_acc"], ens["best_test_nll"], ens["best_agreement_with_teacher"]) == \
        (m["acc"], m["nll"], m["agreement"])

    # off: no best files and None in the summary; the training numbers are the same
    table["train"]["track_best"] = False
    off = run_chain(config_from_dict(table), tmp_path / "off", progress=False)
    for a, b in zip(summary["generations"], off["generations"]):
        assert {k: a[k] for k in LAST_KEYS} == {k: b[k] for k in LAST_KEYS}
        assert all(b[k] is None for k in ("best_epoch", "best_val_acc", "best_test_acc"))
        assert not RunLayout(tmp_path / "off").best_logits(b["gen"], "test").exists()
    assert off["ensembles"][0]["best_test_acc"] is None
    for gen in range(3):
        drop = ["seconds"]
        pd.testing.assert_frame_equal(pd.read_csv(layout.metrics(gen)).drop(columns=drop),
                                      pd.read_csv(RunLayout(tmp_path / "off").metrics(gen)).drop(columns=drop))


def test_a_best_epoch_before_the_last_is_that_epoch_model(tiny_root, tmp_path, monkeypatch):
    """Validation accuracies scripted to peak at epoch 2 of 3: the best test logits are those of the
    model after epoch 2, i.e. the last ones of the same run stopped after 2 epochs (constant lr)."""
    table = tiny_config(tiny_root, ban={"generations": 0}, train={"epochs": 3, "schedule": "constant"})
    real, script = loop_mod._split_loss_acc, iter([0.5, 0.9, 0.7])

    def scripted(logits, target):
        return {**real(logits, target), "val_acc": next(script)}

    with monkeypatch.context() as m:
        m.setattr(loop_mod, "_split_loss_acc", scripted)
        three = run_chain(config_from_dict(table), tmp_path / "three", progress=False)
    table["train"]["epochs"] = 2
    run_chain(config_from_dict(table), tmp_path / "two", progress=False)
    g = three["generations"][0]
    assert g["best_epoch"] == 2
    best = np.load(RunLayout(tmp_path / "three").best_logits(0, "test"))
    assert np.array_equal(best, np.load(RunLayout(tmp_path / "two").logits(0, "test")))
    assert not np.array_equal(best, np.load(RunLayout(tmp_path / "three").logits(0, "test")))
    targets = np.load(RunLayout(tmp_path / "three").targets("test"))
    assert g["best_test_acc"] == pytest.approx((best.argmax(1) == targets).mean())


def test_a_study_with_report_epoch_best_reports_the_best_epochs(tiny_root, tmp_path):
    """Through the CLI, with --tensorboard: results.csv holds the summaries' best_* numbers, and
    `tensorboard --logdir STUDY` finds one run per (seed, variant, trained generation)."""
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    from ban_analysis.cli import main

    base = tiny_config(tiny_root, train={"epochs": 3})
    base.pop("seed"), base.pop("ban")
    path = tmp_path / "study.toml"
    path.write_text(_toml({"name": "best", "seeds": [0], "objectives": ["ban"], "generations": {"ban": 2},
                           "report_epoch": "best", "base": base}))
    out = tmp_path / "study"
    assert main(["study", str(path), "--out", str(out), "--quiet", "--tensorboard"]) == 0
    layout = StudyLayout(out)
    results = pd.read_csv(layout.results)
    teacher = json.loads(layout.run(0, "teacher").summary.read_text())
    ban = json.loads(layout.run(0, "ban").summary.read_text())
    want = [("teacher", "model", "0", teacher["generations"][0])] + \
        [("ban", "model", str(g["gen"]), g) for g in ban["generations"][1:]] + \
        [("ban", "ensemble", "1+2", ban["ensembles"][0])]
    assert len(results) == len(want)
    for objective, kind, members, row in want:
        got = results[(results.objective == objective) & (results.kind == kind) &
                      (results.members.astype(str) == members)].iloc[0]
        for key in ("test_acc", "test_nll", "test_ece") + (("val_acc",) if kind == "model" else ()):
            assert got[key] == pytest.approx(row[f"best_{key}"], rel=1e-12), (objective, members, key)
    # the imported teacher brings its best record: the variant's gen 0 equals the teacher run's
    assert {k: v for k, v in ban["generations"][0].items() if k.startswith("best_")} == \
        {k: v for k, v in teacher["generations"][0].items() if k.startswith("best_")}

    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(out))
    assert sorted(multiplexer.Runs()) == ["runs/seed-0/ban/tensorboard/gen-1", "runs/seed-0/ban/tensorboard/gen-2",
                                          "runs/seed-0/teacher/tensorboard/gen-0"]


def test_report_epoch_best_needs_the_record(tiny_root):
    base = tiny_config(tiny_root, train={"track_best": False})
    base.pop("seed"), base.pop("ban")
    with pytest.raises(ConfigError, match="report_epoch = 'best' .* needs base.train.track_best = true"):
        study_from_dict({"seeds": [0], "objectives": ["ce"], "report_epoch": "best", "base": base})
    base = tiny_config(tiny_root, data={"val_size": 0})
    base.pop("seed"), base.pop("ban")
    with pytest.raises(ConfigError, match="base.data.val_size > 0"):
        study_from_dict({"seeds": [0], "objectives": ["ce"], "report_epoch": "best", "base": base})
    study_from_dict({"seeds": [0], "objectives": ["ce"], "base": base})  # "last" needs neither

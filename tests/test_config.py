"""Config validation: every kind of mistake is named, with what is allowed; overrides; JSON out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ban_analysis.config import ConfigError, RunConfig, config_from_dict, load_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_defaults_are_the_wrn_recipe():
    cfg = config_from_dict({})
    t = cfg.train
    assert (t.optimizer, t.lr, t.momentum, t.nesterov, t.weight_decay, t.schedule, t.milestones, t.gamma) == \
        ("sgd", 0.1, 0.9, True, 5e-4, "step", [0.3, 0.6, 0.8], 0.2)
    assert cfg.ban.objective == "ban" and cfg.ban.generations == 2


@pytest.mark.parametrize("table, message", [
    ({"trian": {}}, r"unknown key trian in the top level; allowed: .*train"),
    ({"train": {"epoch": 3}}, r"unknown key train.epoch in \[train\]; allowed: .*epochs"),
    ({"train": {"epochs": "3"}}, r"train.epochs: expected an integer, got '3'"),
    ({"train": {"epochs": 2.5}}, r"train.epochs: expected an integer"),
    ({"train": {"nesterov": 1}}, r"train.nesterov: expected true or false"),
    ({"train": {"lr": True}}, r"train.lr: expected a number"),
    ({"train": {"epochs": 0}}, r"train.epochs: 0 is out of range; allowed: an integer >= 1"),
    ({"train": {"lr": -0.1}}, r"train.lr: -0.1 is out of range; allowed: a number > 0"),
    ({"train": {"momentum": 1.0}}, r"train.momentum: .*allowed: a number in \[0, 1\)"),
    ({"train": {"milestones": [0.5, 1.5]}}, r"train.milestones: .*fractions in \(0, 1\)"),
    ({"train": {"milestones": 0.5}}, r"train.milestones: expected a list of a number"),
    ({"train": {"optimizer": "lbfgs"}}, r"train.optimizer: 'lbfgs' is out of range; allowed: one of 'sgd', 'adamw'"),
    ({"train": {"schedule": "linear"}}, r"allowed: one of 'step', 'cosine', 'constant'"),
    ({"data": {"augment": "mixup"}}, r"data.augment: .*'none', 'flip', 'crop_flip'"),
    ({"data": {"val_size": -1}}, r"data.val_size: -1 is out of range; allowed: >= 0"),
    ({"data": "fashion_mnist"}, r"data: expected a table"),
    ({"model": {"arch": "resnet9000"}}, r"model.arch: unknown architecture 'resnet9000'; allowed: .*mlp"),
    ({"teacher": {"arch": "nope"}}, r"teacher.arch: unknown architecture 'nope'"),
    ({"teacher": {"checkpoint": "/no/such/file.pt"}}, r"teacher.checkpoint: no such file"),
    ({"ban": {"objective": "distill"}}, r"ban.objective/ban.params: .*distill.*"),
    ({"ban": {"objective": "kd", "params": {"tau": 2}}}, r"ban.objective/ban.params: .*tau"),
    ({"ban": {"generations": -1}}, r"ban.generations: -1 is out of range"),
    ({"hooks": {"logit_spilt": {}}}, r"hooks: .*logit_spilt"),
])
def test_config_errors_name_the_key_and_what_is_allowed(table, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(table)


def test_set_overrides_parse_toml_values():
    cfg = config_from_dict({}, ["train.epochs=3", "model.params.widths=[128, 64]", "ban.objective=dkpp",
                                "train.nesterov=false", "train.lr=0.01"])
    assert cfg.train.epochs == 3 and cfg.model.params == {"widths": [128, 64]}
    assert cfg.ban.objective == "dkpp" and cfg.train.nesterov is False and cfg.train.lr == 0.01
    with pytest.raises(ConfigError, match="expected key=value"):
        config_from_dict({}, ["train.epochs"])
    with pytest.raises(ConfigError, match="unknown key train.epoch "):
        config_from_dict({}, ["train.epoch=3"])


def test_resolved_config_round_trips_through_json():
    cfg = config_from_dict({"train": {"epochs": 4}, "model": {"arch": "mlp", "params": {"widths": [8]}}})
    again = config_from_dict(json.loads(cfg.to_json()))
    assert again == cfg and isinstance(again, RunConfig)


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 3\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_experiment_configs_are_valid_and_documented(path):
    text = path.read_text()
    assert text.startswith("#"), "each experiment config starts with a comment saying what it reproduces"
    if "[base" in text:  # a study config
        from ban_analysis.study import load_study

        study = load_study(path)
        # 10 seeds, or fewer with the reason said in the config (a CPU-scale study)
        assert len(study.seeds) >= 10 or "seeds" in text.split("name =")[0] and len(study.seeds) >= 3
    else:
        load_config(path)


# ---- defects found on reading (issue: one shape for the library) ------------------------------

def test_config_dataclasses_built_in_python_are_validated():
    from ban_analysis.config import BanConfig, DataConfig, RunConfig, TrainConfig

    with pytest.raises(ConfigError, match=r"train\.epochs: 0 is out of range; allowed: an integer >= 1"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match=r"train\.lr: -1.0 is out of range"):
        TrainConfig(lr=-1)
    with pytest.raises(ConfigError, match=r"data\.augment: 'rotate' is out of range"):
        DataConfig(augment="rotate")
    with pytest.raises(ConfigError, match=r"ban\.generations: expected an integer"):
        BanConfig(generations="2")
    with pytest.raises(ConfigError, match="train: expected a TrainConfig"):
        RunConfig(train={"epochs": 3})
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)


def test_requires_python_matches_the_standard_library_the_config_uses():
    import tomllib
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    source = (Path(__file__).parents[1] / "ban_analysis" / "config.py").read_text()
    assert "import tomllib" in source and meta["requires-python"] == ">=3.11"  # tomllib is 3.11+

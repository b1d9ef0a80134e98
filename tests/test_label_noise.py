"""Label noise: the flip function's statistics, the config, and what a noisy run records."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from ban_analysis.config import ConfigError, RunConfig, build_section, config_from_dict
from ban_analysis.data.label_noise import (CIFAR10_CLASS_MAP, MNIST_CLASS_MAP, apply_label_noise,
                                           check_class_map)
from ban_analysis.engine.chain import run_chain
from ban_analysis.engine.runs import RunDir, load_checkpoint_file
from ban_analysis.layout import RunLayout
from tests.conftest import tiny_config


def _labels(n: int, classes: int = 10, seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n).astype(np.int64)


# ---------------------------------------------------------------------------- apply_label_noise


@pytest.mark.parametrize("kind", ["symmetric", "pair"])
@pytest.mark.parametrize("rate, n", [(0.2, 1000), (0.37, 999), (0.25, 10), (0.9, 101), (0.001, 100)])
def test_exact_count_of_flips(kind, rate, n):
    clean = _labels(n)
    noisy, flipped = apply_label_noise(clean, 10, rate, kind, seed=5)
    assert noisy.dtype == np.int64 and flipped.dtype == bool and noisy.shape == flipped.shape == (n,)
    assert flipped.sum() == math.floor(rate * n + 0.5)  # exact count, rounded half up (0.25 * 10 -> 3)
    np.testing.assert_array_equal(flipped, noisy != clean)  # every flip changes the label
    np.testing.assert_array_equal(noisy[~flipped], clean[~flipped])


def test_flips_are_a_uniform_sample_without_replacement():
    """Over many seeds every position is flipped equally often (a proper uniform sample)."""
    n, rate, seeds = 40, 0.25, 4000
    clean = _labels(n)
    hits = np.zeros(n)
    masks = set()
    for seed in range(seeds):
        _, flipped = apply_label_noise(clean, 10, rate, "symmetric", seed=seed)
        assert flipped.sum() == 10
        hits += flipped
        masks.add(flipped.tobytes())
    assert stats.chisquare(hits).pvalue > 0.001  # equal expected counts, seeds * rate per position
    assert len(masks) > 0.99 * seeds  # C(40, 10) ~ 8.5e8 subsets: essentially no repeats
    a = apply_label_noise(clean, 10, rate, "symmetric", seed=7)
    b = apply_label_noise(clean, 10, rate, "symmetric", seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_symmetric_flips_are_uniform_over_the_other_classes():
    C = 10
    clean = _labels(100_000, C)
    noisy, flipped = apply_label_noise(clean, C, 0.4, "symmetric", seed=0)
    counts = np.zeros((C, C), dtype=np.int64)
    np.add.at(counts, (clean[flipped], noisy[flipped]), 1)
    assert np.all(np.diag(counts) == 0)  # never y -> y
    for y in range(C):
        others = np.delete(counts[y], y)
        assert stats.chisquare(others).pvalue > 0.001, (y, others)
    # and the flipped samples are spread over the source classes like the labels are
    assert stats.chisquare(counts.sum(1), np.bincount(clean, minlength=C) * flipped.mean()).pvalue > 0.001


def test_pair_flips_go_to_the_next_class():
    clean = _labels(5000, 7)
    noisy, flipped = apply_label_noise(clean, 7, 0.3, "pair", seed=1)
    np.testing.assert_array_equal(noisy[flipped], (clean[flipped] + 1) % 7)
    assert set(clean[flipped]) == set(range(7))  # wrap-around 6 -> 0 included


@pytest.mark.parametrize("class_map", [MNIST_CLASS_MAP, CIFAR10_CLASS_MAP,
                                       {str(k): v for k, v in MNIST_CLASS_MAP.items()}])
def test_asymmetric_flips_follow_the_map(class_map):
    clean = _labels(20_000)
    mapping = {int(k): v for k, v in class_map.items()}
    noisy, flipped = apply_label_noise(clean, 10, 0.45, "asymmetric", seed=2, class_map=class_map)
    eligible = np.isin(clean, list(mapping))
    assert not flipped[~eligible].any()  # classes outside the map are never flipped
    assert flipped.sum() == math.floor(0.45 * eligible.sum() + 0.5)  # rate is within the mapped classes
    np.testing.assert_array_equal(noisy[flipped], [mapping[y] for y in clean[flipped]])
    assert set(clean[flipped]) == set(mapping)


def test_rate_zero_changes_nothing_and_draws_nothing(monkeypatch):
    clean = _labels(100)

    def no_rng(*args, **kwargs):
        raise AssertionError("rate 0 must not create a generator")

    monkeypatch.setattr(np.random, "default_rng", no_rng)
    noisy, flipped = apply_label_noise(clean, 10, 0.0, "symmetric", seed=3)
    np.testing.assert_array_equal(noisy, clean)
    assert not flipped.any() and noisy is not clean


@pytest.mark.parametrize("kwargs, message", [
    ({"rate": 1.0}, r"rate must be a number in \[0, 1\)"),
    ({"rate": -0.1}, r"rate must be"),
    ({"kind": "foo"}, r"kind must be one of symmetric, pair, asymmetric; got 'foo'"),
    ({"kind": "asymmetric"}, r"needs a class_map"),
    ({"kind": "asymmetric", "class_map": {3: 99}}, r"class_map.3: target class 99 is out of range; allowed: a class in 0..9"),
    ({"kind": "asymmetric", "class_map": {"12": 1}}, r"class_map.12: source class 12 is out of range"),
    ({"kind": "asymmetric", "class_map": {"4": 4}}, r"class_map.4: maps class 4 to itself"),
    ({"kind": "asymmetric", "class_map": {"x": 4}}, r"class_map.x: the source class must be an integer"),
    ({"kind": "pair", "class_map": {3: 5}}, r"applies only to kind 'asymmetric'"),
    ({"num_classes": 1}, r"num_classes must be an integer >= 2"),
])
def test_bad_arguments_raise_a_named_value_error(kwargs, message):
    args = {"num_classes": 10, "rate": 0.2, "kind": "symmetric", "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        apply_label_noise(_labels(50), **args)
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        apply_label_noise(np.array([0, 10]), 10, 0.2)
    assert check_class_map({"2": "7"}, 10) == {2: 7}


# --------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("noise, message", [
    ({"rate": 1.5}, r"data.label_noise.rate: 1.5 is out of range; allowed: a number in \[0, 1\)"),
    ({"rate": 1.0}, r"data.label_noise.rate: "),
    ({"kind": "foo"}, r"data.label_noise.kind: 'foo' is out of range; allowed: one of 'symmetric', 'pair', 'asymmetric'"),
    ({"kind": "asymmetric", "rate": 0.2, "class_map": {"3": 99}},
     r"data.label_noise.class_map.3: target class 99 is out of range; allowed: a class in 0..9"),
    ({"kind": "asymmetric", "rate": 0.2, "class_map": {"three": 5}}, r"data.label_noise.class_map.three: "),
    ({"kind": "asymmetric", "rate": 0.2, "class_map": {"3": 3}}, r"data.label_noise.class_map.3: maps class 3 to itself"),
    ({"kind": "asymmetric", "rate": 0.2, "class_map": {"3": -1}}, r"data.label_noise.class_map.3: expected a target"),
    ({"kind": "asymmetric", "rate": 0.2}, r"data.label_noise.class_map: kind 'asymmetric' needs a class map"),
    ({"rate": 0.2, "class_map": {"3": 5}}, r"data.label_noise.class_map: applies only to kind 'asymmetric'"),
    ({"seed": -1}, r"data.label_noise.seed: -1 is out of range"),
    ({"rates": 0.1}, r"unknown key data.label_noise.rates in \[data.label_noise\]; allowed: class_map, kind, rate, seed"),
    (0.2, r"data.label_noise: expected a table"),
])
def test_bad_label_noise_configs_name_the_key(noise, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"data": {"name": "mnist", "label_noise": noise}})


def test_label_noise_config_defaults_overrides_and_json():
    cfg = config_from_dict({})
    n = cfg.data.label_noise
    assert (n.rate, n.kind, n.seed, n.class_map) == (0.0, "symmetric", 0, {})
    assert cfg.to_dict()["data"]["label_noise"] == {"rate": 0.0, "kind": "symmetric", "seed": 0, "class_map": {}}
    cfg = config_from_dict({"data": {"name": "cifar10"}},
                           ["data.label_noise.rate=0.4", "data.label_noise.kind=asymmetric",
                            'data.label_noise.class_map={"9" = 1, "2" = 0, "4" = 7, "3" = 5, "5" = 3}'])
    assert cfg.data.label_noise.rate == 0.4
    assert {int(k): v for k, v in cfg.data.label_noise.class_map.items()} == CIFAR10_CLASS_MAP
    again = config_from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    # int keys (a config built in Python) are normalised to the TOML form
    assert build_section(RunConfig, {"data": {"label_noise": {"kind": "asymmetric", "rate": 0.1,
                                                              "class_map": {7: 1}}}}).data.label_noise.class_map \
        == {"7": 1}


# ------------------------------------------------------------------------------------ tiny runs


def _assert_same_weights(dir_a, dir_b, gens):
    for gen in gens:
        a = load_checkpoint_file(RunDir(dir_a).checkpoint_path(gen))["model"]
        b = load_checkpoint_file(RunDir(dir_b).checkpoint_path(gen))["model"]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"gen {gen} {key} differs"


def test_rate_zero_run_is_bit_identical_to_a_run_without_the_table(tiny_root, tmp_path, monkeypatch):
    from ban_analysis.engine import chain

    def never(*args, **kwargs):
        raise AssertionError("rate 0 must not reach the label-noise code")

    monkeypatch.setattr(chain, "_noisy_labels", never)
    hooks = {"logit_split": {}}
    plain = config_from_dict(tiny_config(tiny_root, ban={"generations": 1}, hooks=hooks))
    zero = config_from_dict(tiny_config(tiny_root, ban={"generations": 1}, hooks=hooks,
                                        data={"label_noise": {"rate": 0.0}}))
    assert zero == plain
    a, b = tmp_path / "plain", tmp_path / "zero"
    run_chain(plain, a, progress=False)
    run_chain(zero, b, progress=False)
    assert (a / "summary.json").read_bytes() == (b / "summary.json").read_bytes()
    _assert_same_weights(a, b, [0, 1])
    for gen in (0, 1):
        assert (a / f"gen-{gen}" / "metrics.csv").read_text().splitlines()[0] == \
            "epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds"
        assert (pd.read_parquet(a / f"gen-{gen}/hooks/logit_split/epoch-1.parquet")
                .equals(pd.read_parquet(b / f"gen-{gen}/hooks/logit_split/epoch-1.parquet")))
    assert not RunLayout(b).label_noise.exists()
    assert "label_noise" not in json.loads((b / "manifest.json").read_text())
    assert "clean_target" not in pd.read_parquet(b / "gen-1/hooks/logit_split/epoch-0.parquet").columns


def _noisy_table(root, **sections):
    sections = {"ban": {"generations": 1}, "hooks": {"logit_split": {}, "head_split": {}}, **sections}
    return tiny_config(root, data={"label_noise": {"rate": 0.3, "kind": "symmetric", "seed": 11}}, **sections)


def test_noisy_run_records_labels_metrics_and_hook_columns(tiny_root, tmp_path):
    from ban_analysis.data import load_dataset

    out = tmp_path / "noisy"
    run_chain(config_from_dict(_noisy_table(tiny_root)), out, progress=False)

    # label_noise.npz: the train split's ids, clean and noisy labels, the flips
    with np.load(RunLayout(out).label_noise) as z:
        rec = {k: z[k] for k in z.files}
    assert set(rec) == {"index", "clean", "noisy", "flipped"}
    bundle = load_dataset("mnist", root=str(tiny_root), val_size=80, cache_dir=str(tiny_root / "cache"))
    np.testing.assert_array_equal(rec["index"], bundle.train.index.numpy())
    np.testing.assert_array_equal(rec["clean"], bundle.train.y.numpy())
    np.testing.assert_array_equal(rec["flipped"], rec["noisy"] != rec["clean"])
    n_train = len(rec["index"])
    assert rec["flipped"].sum() == round(0.3 * n_train)
    # val and test stay clean
    np.testing.assert_array_equal(np.load(out / "val_targets.npy"), bundle.val.y.numpy())
    np.testing.assert_array_equal(np.load(out / "test_targets.npy"), bundle.test.y.numpy())

    info = json.loads((out / "manifest.json").read_text())["label_noise"]
    assert info["kind"] == "symmetric" and info["seed"] == 11 and info["rate"] == 0.3
    assert info["flipped"] == rec["flipped"].sum() and info["train_size"] == n_train
    assert info["realised_rate"] == pytest.approx(rec["flipped"].mean())

    for gen in (0, 1):
        metrics = pd.read_csv(out / f"gen-{gen}" / "metrics.csv")
        assert list(metrics.columns)[-2:] == ["train_acc_clean", "memorised"]
        assert metrics[["train_acc_clean", "memorised"]].apply(lambda c: c.between(0, 1)).all().all()
        for hook in ("logit_split", "head_split"):
            rows = pd.concat([pd.read_parquet(p) for g, p in RunLayout(out).hook_files(hook) if g == gen])
            assert rows["label_noisy"].dtype == bool and rows["clean_target"].dtype == np.int64
            ids = rows["sample_index"].to_numpy()
            pos = np.searchsorted(rec["index"], ids)
            np.testing.assert_array_equal(rows["label_noisy"].to_numpy(), rec["flipped"][pos])
            np.testing.assert_array_equal(rows["clean_target"].to_numpy(), rec["clean"][pos])
            if hook == "logit_split":  # the teacher and the student train on the same noisy labels
                np.testing.assert_array_equal(rows["target"].to_numpy(), rec["noisy"][pos])
            assert set(ids) == set(rec["index"])  # every sample, each epoch


def test_noise_depends_on_its_own_seed_only(tiny_root, tmp_path):
    """Another run seed and another objective: the same noisy labels; another noise seed: other ones."""
    def record(path):
        with np.load(RunLayout(path).label_noise) as z:
            return {k: z[k] for k in z.files}

    base = config_from_dict(_noisy_table(tiny_root, train={"epochs": 1}))
    other = config_from_dict(_noisy_table(tiny_root, seed=3, train={"epochs": 1},
                                          ban={"generations": 1, "objective": "ce"}))
    reseeded = config_from_dict(_noisy_table(tiny_root, train={"epochs": 1}),
                                ["data.label_noise.seed=12"])
    for cfg, name in ((base, "a"), (other, "b"), (reseeded, "c")):
        run_chain(cfg, tmp_path / name, progress=False, until_gen=0 if name == "c" else None)
    a, b, c = record(tmp_path / "a"), record(tmp_path / "b"), record(tmp_path / "c")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["flipped"], c["flipped"])
    # ... and different runs really did differ (seed 3 trains other weights)
    wa = load_checkpoint_file(RunDir(tmp_path / "a").checkpoint_path(0))["model"]
    wb = load_checkpoint_file(RunDir(tmp_path / "b").checkpoint_path(0))["model"]
    assert not all(torch.equal(wa[k], wb[k]) for k in wa)


def test_class_map_out_of_range_at_run_time_leaves_no_folder(tiny_root, tmp_path):
    """A config built without the dataset check (as a study plans it) still fails before writing."""
    table = tiny_config(tiny_root, data={"label_noise": {"rate": 0.2, "kind": "asymmetric",
                                                          "class_map": {"3": 99}}})
    cfg = build_section(RunConfig, table)
    with pytest.raises(ConfigError, match=r"data.label_noise.class_map.3: target class 99 is out of range"):
        run_chain(cfg, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_asymmetric_noise_run(tiny_root, tmp_path):
    noise = {"rate": 0.5, "kind": "asymmetric", "seed": 1, "class_map": {str(k): v for k, v in MNIST_CLASS_MAP.items()}}
    cfg = config_from_dict(tiny_config(tiny_root, data={"label_noise": noise}, ban={"generations": 0},
                                       train={"epochs": 1}))
    out = tmp_path / "asym"
    run_chain(cfg, out, progress=False)
    with np.load(RunLayout(out).label_noise) as z:
        clean, noisy, flipped = z["clean"], z["noisy"], z["flipped"]
    eligible = np.isin(clean, list(MNIST_CLASS_MAP))
    assert flipped.sum() == round(0.5 * eligible.sum()) and not flipped[~eligible].any()
    np.testing.assert_array_equal(noisy[flipped], [MNIST_CLASS_MAP[y] for y in clean[flipped]])
    info = json.loads((out / "manifest.json").read_text())["label_noise"]
    assert info["eligible"] == eligible.sum()
    assert info["realised_rate_eligible"] == pytest.approx(flipped.sum() / eligible.sum())
    assert "memorised" in pd.read_csv(out / "gen-0" / "metrics.csv").columns


def test_noisy_run_resumed_between_generations_gives_the_same_numbers(tiny_root, tmp_path):
    cfg = config_from_dict(_noisy_table(tiny_root, hooks={}))
    whole = run_chain(cfg, tmp_path / "whole", progress=False)
    assert run_chain(cfg, tmp_path / "split", progress=False, until_gen=0) is None
    assert run_chain(cfg, tmp_path / "split", progress=False) == whole
    _assert_same_weights(tmp_path / "whole", tmp_path / "split", [0, 1])
    for name in ("label_noise.npz", "gen-1/metrics.csv"):
        a, b = tmp_path / "whole" / name, tmp_path / "split" / name
        if name.endswith(".npz"):
            assert a.read_bytes() == b.read_bytes()
        else:  # the seconds differ
            assert pd.read_csv(a).drop(columns="seconds").equals(pd.read_csv(b).drop(columns="seconds"))

"""Studies: pairing, resumability, results.csv, and identical results under both executors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from ban_analysis.config import ConfigError
from ban_analysis.engine.runs import RunDir, load_checkpoint_file
from ban_analysis.study import RESULT_COLUMNS, collect_results, run_study, study_from_dict
from tests.conftest import tiny_config
from tests.test_cli import _toml


def _study_file(tmp_path, tiny_root, **extra) -> str:
    base = tiny_config(tiny_root, train={"epochs": 1}, hooks={"logit_split": {}})
    base.pop("seed")
    base.pop("ban")
    table = {"name": "tiny", "seeds": [0, 1], "objectives": ["ce", "ban", "dkpp"],
             "generations": {"ban": 2}, "equivalence_margin": 0.01, **extra, "base": base}
    path = tmp_path / "study.toml"
    path.write_text("# tiny study for tests\n" + _toml(table))
    return str(path)


def test_local_study_is_paired_and_complete(tmp_path, tiny_root):
    out = tmp_path / "study"
    rows = run_study(_study_file(tmp_path, tiny_root), out, progress=False)
    frame = pd.read_csv(out / "results.csv")
    assert list(frame.columns) == list(RESULT_COLUMNS) and len(frame) == len(rows)
    # per seed: teacher gen 0, ce gen 1, ban gens 1-2 + ensemble 1+2, dkpp gen 1
    per_seed = frame[frame.seed == 0].sort_values(["objective", "gen", "kind"])
    assert list(zip(per_seed.objective, per_seed.gen, per_seed.kind, per_seed.members.astype(str))) == [
        ("ban", 1, "model", "1"), ("ban", 2, "ensemble", "1+2"), ("ban", 2, "model", "2"),
        ("ce", 1, "model", "1"), ("dkpp", 1, "model", "1"), ("teacher", 0, "model", "0")]
    assert frame.test_acc.between(0, 1).all()
    for seed in (0, 1):
        runs = out / "runs" / f"seed-{seed}"
        teacher = load_checkpoint_file(runs / "teacher" / "gen-0" / "checkpoint.pt")["model"]
        for objective in ("ce", "ban", "dkpp"):
            # every objective imports the seed's one teacher ...
            imported = load_checkpoint_file(runs / objective / "gen-0" / "checkpoint.pt")["model"]
            assert all(torch.equal(teacher[k], imported[k]) for k in teacher)
            manifest = RunDir(runs / objective).manifest()
            assert manifest["generations"]["0"]["source_sha256"] == \
                RunDir(runs / "teacher").manifest()["generations"]["0"]["checkpoint_sha256"]
        # ... and students of one (seed, gen) see the same batches: the hook logs' sample order is identical
        orders = [pd.read_parquet(runs / o / "gen-1" / "hooks" / "logit_split" / "epoch-0.parquet")["sample_index"]
                  for o in ("ce", "ban", "dkpp")]
        assert orders[0].equals(orders[1]) and orders[0].equals(orders[2])
        assert not (runs / "teacher" / "gen-0" / "hooks").exists()
    # teachers of different seeds differ
    t0 = load_checkpoint_file(out / "runs/seed-0/teacher/gen-0/checkpoint.pt")["model"]
    t1 = load_checkpoint_file(out / "runs/seed-1/teacher/gen-0/checkpoint.pt")["model"]
    assert not all(torch.equal(t0[k], t1[k]) for k in t0)

    # the report reads this real (tiny) study folder and writes every file it promises
    from ban_analysis.report import write_report

    report = write_report(out, command="ban-analysis report <tiny study>")
    for name in ("index.md", "report.html", "stats.json"):
        assert (report / name).stat().st_size > 0, name
    assert any((report / "figures").glob("*.png"))
    stats_json = json.loads((report / "stats.json").read_text())
    assert stats_json["study"]["seeds"] == [0, 1] and stats_json["study"]["equivalence_margin"] == 0.01

    # resumable: an unfinished run is resumed, finished ones are skipped
    dkpp = RunDir(out / "runs" / "seed-1" / "dkpp")
    (dkpp.path / "summary.json").unlink()
    (dkpp.path / "gen-1" / "checkpoint.pt").unlink()
    finished_before = (out / "runs/seed-0/ban/summary.json").stat().st_mtime_ns
    run_study(_study_file(tmp_path, tiny_root), out, progress=False)
    assert (out / "runs/seed-0/ban/summary.json").stat().st_mtime_ns == finished_before
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), frame)


def test_ray_executor_gives_identical_results(tmp_path, tiny_root):
    pytest.importorskip("ray")
    local, remote = tmp_path / "local", tmp_path / "ray"
    cfg = _study_file(tmp_path, tiny_root)
    run_study(cfg, local, progress=False)
    try:
        run_study(cfg, remote, executor="ray", workers=2, progress=False)
    finally:
        import ray

        ray.shutdown()
    a, b = pd.read_csv(local / "results.csv"), pd.read_csv(remote / "results.csv")
    assert len(a) == 12
    pd.testing.assert_frame_equal(a, b)


def test_study_config_errors(tmp_path, tiny_root):
    base = tiny_config(tiny_root)
    with pytest.raises(ConfigError, match="unknown study key 'seed'"):
        study_from_dict({"seed": 1, "base": base})
    with pytest.raises(ConfigError, match="objective 'bann' is not registered"):
        study_from_dict({"objectives": ["bann"], "base": base})
    with pytest.raises(ConfigError, match="seeds: expected a non-empty list of distinct integers"):
        study_from_dict({"seeds": [1, 1], "base": base})
    with pytest.raises(ConfigError, match="generations.ban: expected an integer >= 1"):
        study_from_dict({"generations": {"ban": 0}, "base": base})
    with pytest.raises(ConfigError, match="unknown key train.epoch "):
        study_from_dict({"base": {**base, "train": {"epoch": 1}}})
    out = tmp_path / "s"
    run_study(_study_file(tmp_path, tiny_root, seeds=[0], objectives=["ce"]), out, progress=False)
    with pytest.raises(ConfigError, match="different config"):
        run_study(_study_file(tmp_path, tiny_root, seeds=[0, 1], objectives=["ce"]), out, progress=False)


def test_collect_results_skips_unfinished_runs(tmp_path):
    (tmp_path / "runs" / "seed-0" / "ban").mkdir(parents=True)
    assert collect_results(tmp_path) == []
    assert (tmp_path / "results.csv").read_text().strip() == ",".join(RESULT_COLUMNS)
    assert json.loads(json.dumps(list(RESULT_COLUMNS)))[0] == "seed"

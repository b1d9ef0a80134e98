"""Study variants and roles: two variants of one objective in one study, roles as data, old configs unchanged."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from ban_analysis.config import ConfigError
from ban_analysis.engine.runs import RunDir
from ban_analysis.study import Variant, plan_runs, run_study, study_from_dict
from tests.conftest import tiny_config
from tests.test_cli import _toml

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _base(tiny_root):
    base = tiny_config(tiny_root, train={"epochs": 1})
    base.pop("seed"), base.pop("ban")
    return base


def test_old_style_config_means_one_variant_per_objective(tiny_root):
    cfg = study_from_dict({"objectives": ["ce", "ban", "kd"], "generations": {"ban": 2},
                           "objective_params": {"kd": {"temperature": 2.0}}, "base": _base(tiny_root)})
    assert cfg.variant_list() == [Variant("ce", "ce", {}, 1), Variant("ban", "ban", {}, 2),
                                  Variant("kd", "kd", {"temperature": 2.0}, 1)]
    roles = cfg.resolved_roles()
    assert roles == {"reference": "ban", "probes": [], "controls": ["kd"], "label_only": "ce"}


def test_two_variants_of_one_objective_run_side_by_side(tmp_path, tiny_root):
    study = {"seeds": [0], "objectives": ["ce", {"name": "kd_T2", "objective": "kd", "params": {"temperature": 2.0}}],
             "variants": [{"name": "kd_T4", "objective": "kd", "params": {"temperature": 4.0}, "generations": 2}],
             "roles": {"reference": "kd_T4", "probes": ["kd_T2"]}, "base": _base(tiny_root)}
    cfg = study_from_dict(study)
    assert cfg.resolved_roles() == {"reference": "kd_T4", "probes": ["kd_T2"], "controls": [], "label_only": "ce"}
    specs = {s.objective: s for s in plan_runs(cfg, tmp_path / "s")}
    assert specs["kd_T4"].config.ban.params == {"temperature": 4.0} and specs["kd_T4"].generations == 2
    assert specs["kd_T2"].config.ban.objective == "kd" and specs["kd_T2"].path.name == "kd_T2"
    rows = run_study(study, tmp_path / "s", progress=False)
    frame = pd.DataFrame(rows)
    assert set(frame.objective) == {"teacher", "ce", "kd_T2", "kd_T4"}
    t2 = RunDir(tmp_path / "s/runs/seed-0/kd_T2").summary()["generations"][1]["test_acc"]
    t4 = RunDir(tmp_path / "s/runs/seed-0/kd_T4").summary()["generations"][1]["test_acc"]
    assert t2 != t4  # different temperatures, same init and batches: different students
    saved = json.loads((tmp_path / "s/study.json").read_text())
    assert saved["roles"]["reference"] == "kd_T4" and saved["variants"][0]["name"] == "kd_T4"


@pytest.mark.parametrize("change, needle", [
    ({"objectives": [{"objective": "kd"}]}, "a variant needs a name"),
    ({"objectives": [{"name": "x", "objective": "kd", "temperature": 2}]}, "unknown key 'temperature'"),
    ({"objectives": [{"name": "x", "objective": "kd", "params": {"temp": 2}}]}, "unknown parameter"),
    ({"objectives": ["ce", {"name": "ce", "objective": "kd"}]}, "repeated: ce"),
    ({"objectives": [{"name": "teacher", "objective": "kd"}]}, "'teacher' is not allowed"),
    ({"objectives": ["ce"], "roles": {"reference": "ban"}}, "roles.reference: 'ban' is not a variant"),
    ({"objectives": ["ce"], "roles": {"probes": "cwtm"}}, "roles.probes: expected a list"),
    ({"objectives": ["ce"], "roles": {"boss": "ce"}}, "roles: unknown key 'boss'"),
    ({"report_epoch": "first"}, "report_epoch"),
])
def test_bad_variants_and_roles_are_config_errors(tiny_root, change, needle):
    with pytest.raises(ConfigError, match=needle):
        study_from_dict({**change, "base": _base(tiny_root)})


def test_a_table_under_objectives_that_is_wrong_exits_2_in_one_line(tmp_path, tiny_root):
    # before variants, a table here ended in a TypeError traceback
    path = tmp_path / "study.toml"
    path.write_text(_toml({"seeds": [0], "base": _base(tiny_root)}).replace(
        "seeds = [0]", 'seeds = [0]\nobjectives = [{ name = "kd_T2", objective = "kd", temprature = 2.0 }]'))
    proc = subprocess.run([sys.executable, "-m", "ban_analysis.cli", "study", str(path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "unknown key 'temprature'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()

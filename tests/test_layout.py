"""The folder layout has one owner (ban_analysis.layout), the layers import downwards, and 0.1 folders still load."""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

import ban_analysis
from ban_analysis import layout
from ban_analysis.layout import TEACHER, RunLayout, StudyLayout

PACKAGE = Path(ban_analysis.__file__).parent
FIXTURE = Path(__file__).parent / "fixtures" / "study_v0_1"  # written by ban_analysis 0.1 (commit 7c34876)
# rank of each top-level part: a module may import only parts of lower or equal rank
RANK = {"registry": 0, "layout": 0, "roles": 0, "config": 1, "data": 2, "models": 2, "losses": 2, "stats": 2,
        "instrument": 3, "engine": 4, "study": 5, "report": 5, "cli": 6, "__init__": 7, "__main__": 7}
TORCH_FREE = ("layout", "registry", "roles", "stats", "report")
# The one sanctioned upward reach: config.validate_semantics checks names against the registries
# (objectives, models, hooks, datasets) inside the function, at validation time, so importing
# config loads none of them.
UPWARD_OK = {("config", "losses"), ("config", "models"), ("config", "instrument"), ("config", "data")}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        yield rel.parts[0].removesuffix(".py"), path


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names if node.module == "ban_analysis"]
    return names


@pytest.mark.parametrize("part,path", list(_modules()), ids=lambda v: str(v).split("ban_analysis/")[-1])
def test_each_module_imports_only_lower_layers(part, path):
    assert part in RANK, f"{path}: new top-level part {part!r}; give it a rank in this test and the README"
    for name in _imports(path):
        if not name.startswith("ban_analysis."):
            continue
        target = name.split(".")[1]
        if target in RANK and (part, target) not in UPWARD_OK:
            assert RANK[target] <= RANK[part], f"{path.name} ({part}) imports {name} from a higher layer"
        if part in TORCH_FREE:
            assert RANK[target] <= RANK[part] and target not in ("engine", "instrument", "data", "models", "losses")


@pytest.mark.parametrize("part", TORCH_FREE)
def test_torch_free_parts_import_no_torch(part):
    files = [PACKAGE / f"{part}.py"] if (PACKAGE / f"{part}.py").exists() else sorted((PACKAGE / part).rglob("*.py"))
    for path in files:
        assert not [n for n in _imports(path) if n.split(".")[0] in ("torch", "torchvision")], path


def test_report_and_stats_load_without_torch_in_a_fresh_interpreter():
    import subprocess

    code = ("import sys, ban_analysis.report, ban_analysis.stats, ban_analysis.layout; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_path_literals_outside_layout():
    # the file names of run and study folders are spelled in layout.py only
    names = ("summary.json", "manifest.json", "study.json", "results.csv", "metrics.csv", "checkpoint.pt",
             "_logits.npy", "_targets.npy")
    for part, path in _modules():
        if part == "layout":
            continue
        code = [n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
                and isinstance(n.value, str) and not n.value.startswith(("\n", " "))]
        for text in code:
            if " " in text or "\n" in text:  # prose (docstrings, messages) may name the files
                continue
            assert not any(name in text for name in names), f"{path}: path literal {text!r}; use ban_analysis.layout"


def test_engine_writes_and_report_reads_through_the_layout(tmp_path, tiny_root):
    from ban_analysis.report import load_hook, load_study
    from ban_analysis.study import run_study
    from tests.conftest import tiny_config

    base = tiny_config(tiny_root, train={"epochs": 1}, hooks={"logit_split": {"samples": 32}})
    base.pop("seed"), base.pop("ban")
    study = {"name": "layout", "seeds": [3], "objectives": ["ce", "ban"], "base": base}
    out = tmp_path / "study"
    run_study(study, out, progress=False)
    sl = StudyLayout(out)
    for path in (sl.config, sl.results, sl.teacher_checkpoint(3)):
        assert path.is_file(), path
    assert [s for s, _ in sl.seeds_on_disk()] == [3]
    for variant in (TEACHER, "ce", "ban"):
        run = sl.run(3, variant)
        for path in (run.config, run.manifest, run.summary, run.targets("test"), run.checkpoint(0),
                     run.metrics(0), run.logits(0, "test")):
            assert path.is_file(), path
    files = sl.run(3, "ban").hook_files("logit_split")
    assert [g for g, _ in files] == [1]
    loaded = load_study(out)
    assert set(loaded.results["objective"]) == {TEACHER, "ce", "ban"}
    frame = load_hook(loaded, "logit_split", objectives=["ban"])
    direct = pd.read_parquet(files[0][1])
    assert len(frame) == len(direct) and frame["g_norm"].tolist() == direct["g_norm"].tolist()
    assert list(pd.read_csv(sl.results).columns) == list(layout.RESULT_COLUMNS)


def test_a_study_folder_written_by_0_1_still_reports(tmp_path):
    from ban_analysis.report import load_study, write_report

    study_dir = tmp_path / "old"
    shutil.copytree(FIXTURE, study_dir)
    manifest = json.loads(RunLayout(study_dir / "runs/seed-0/ban").manifest.read_text())
    assert manifest["versions"]["ban_analysis"] == "0.1.0"
    study = load_study(study_dir)
    assert study.seeds == [0, 1] and {"ce", "ban", "dkpp"} <= set(study.objectives)
    folder = write_report(study_dir)
    stats = json.loads((StudyLayout(study_dir).report / "stats.json").read_text())
    assert (Path(folder) / "index.md").is_file() and stats["study"]["n_seeds"] == 2


def test_show_reads_a_run_folder_written_by_0_1(capsys):
    from ban_analysis.cli import main

    assert main(["show", str(FIXTURE / "runs/seed-0/ban")]) == 0
    table = capsys.readouterr().out
    summary = json.loads((FIXTURE / "runs/seed-0/ban/summary.json").read_text())
    assert f"{100 * summary['generations'][2]['test_acc']:6.2f}" in table


def test_a_run_folder_written_before_new_config_keys_resumes(tmp_path, tiny_root):
    from ban_analysis.config import config_from_dict
    from ban_analysis.engine.runs import RunDir, RunFolderError
    from tests.conftest import tiny_config

    cfg = config_from_dict(tiny_config(tiny_root))
    run = RunDir(tmp_path / "run")
    old = cfg.to_dict()
    del old["data"]["test_scoring"]  # as a 0.1 config.json has it: the key did not exist then
    run.bind_config(old)
    assert run.check_config(cfg.to_dict()) is True  # the same run: resumes
    other = cfg.to_dict()
    other["train"]["epochs"] += 1
    with pytest.raises(RunFolderError, match="differs in: train.epochs"):
        run.check_config(other)

"""The ``ban-analysis`` command: one-line errors with exit code 2, run/show/--hooks through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ban_analysis.cli import main
from tests.conftest import tiny_config


def _toml(table: dict) -> str:
    """A minimal TOML writer for the config tables the tests use (tables, scalars, lists)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines, tables = [], []

    def walk(prefix, node):
        scalars = {k: v for k, v in node.items() if not isinstance(v, dict)}
        if prefix:
            tables.append(f"[{prefix}]")
            tables.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        else:
            lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in node.items():
            if isinstance(v, dict):
                walk(f"{prefix}.{k}" if prefix else k, v)

    walk("", table)
    return "\n".join(lines + tables) + "\n"


def _write_config(tmp_path, table) -> str:
    path = tmp_path / "cfg.toml"
    path.write_text("# test config\n" + _toml(table))
    return str(path)


@pytest.mark.parametrize("table, overrides, needle", [
    ({"train": {"epochs": 0}}, [], "train.epochs: 0 is out of range"),
    ({"model": {"arch": "nope"}}, [], "model.arch: unknown architecture 'nope'"),
    ({}, ["train.lr=-1"], "train.lr: -1.0 is out of range"),
    ({}, ["bogus"], "expected key=value"),
    ({"data": {"name": "imagenet21k"}}, [], "unknown dataset 'imagenet21k'"),
])
def test_user_mistakes_give_one_line_and_exit_2(tmp_path, capsys, table, overrides, needle):
    args = ["run", _write_config(tmp_path, table), "--out", str(tmp_path / "out"), "--quiet"]
    for o in overrides:
        args += ["--set", o]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("ban-analysis: error: ") and needle in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_missing_config_and_show_of_a_non_run(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["show", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_missing_dataset_names_where_it_looked(tmp_path, capsys):
    table = {"data": {"name": "digits", "root": str(tmp_path / "empty")}}
    (tmp_path / "empty").mkdir()
    assert main(["run", _write_config(tmp_path, table), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "digits" in err and str(tmp_path / "empty") in err


def test_run_show_and_hooks_override(tmp_path, tiny_root, capsys):
    table = tiny_config(tiny_root, ban={"generations": 1}, hooks={"head_split": {"every_n_steps": 2}})
    cfg = _write_config(tmp_path, table)
    out = tmp_path / "run"
    assert main(["run", cfg, "--out", str(out), "--quiet", "--hooks", "logit_split,head_split"]) == 0
    printed = capsys.readouterr().out
    assert "gen  objective" in printed and f"run folder: {out}" in printed
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["hooks"] == {"logit_split": {}, "head_split": {"every_n_steps": 2}}
    assert sorted(p.name for p in (out / "gen-1" / "hooks").iterdir()) == ["head_split", "logit_split"]
    assert main(["show", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["0", "ce"]
    # same folder, other config: refused with exit 2, one line
    assert main(["run", cfg, "--out", str(out), "--quiet", "--set", "train.epochs=3"]) == 2
    assert "different config" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "ban_analysis.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "run" in result.stdout and "study" in result.stdout

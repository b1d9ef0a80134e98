"""The run-folder and study-folder locks: a second process on a folder in use is refused in one line
(exit code 2, the holder's pid), and a lock left by a killed process never blocks the rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ban_analysis.config import config_from_dict
from ban_analysis.engine.runs import RunDir, RunFolderError, folder_lock
from ban_analysis.layout import RunLayout, StudyLayout
from tests.conftest import tiny_config
from tests.test_cli import _toml, _write_config

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fcntl locks are POSIX")


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "ban_analysis.cli", *map(str, args), "--quiet"]


def wait_for(path, proc, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert path.exists() and proc.poll() is None, f"{path} did not appear while the first process ran"


def refused_line(folder, pid) -> str:
    return (f"ban-analysis: error: {folder} is in use by another ban-analysis process (pid {pid}); "
            "wait for it or use another --out folder")


def second_while_first_is_stopped(first, command) -> subprocess.CompletedProcess:
    """Run ``command`` while ``first`` is paused (SIGSTOP keeps its lock held), then let ``first`` go on."""
    first.send_signal(signal.SIGSTOP)
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)



def _race(command, started_marker):
    """Start ``command``; once it has written ``started_marker``, try the same command a second time
    while the first is stopped. Returns (first, second, first's stderr) after the first finished."""
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(started_marker, first)  # the first is training
        second = second_while_first_is_stopped(first, command)
        _, first_err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    return first, second, first_err

def test_a_second_run_on_a_folder_in_use_is_refused(tiny_root, tmp_path):
    config = _write_config(tmp_path, tiny_config(tiny_root, ban={"generations": 0}, train={"epochs": 40}))
    out = tmp_path / "run"
    first, second, first_err = _race(cli("run", config, "--out", out), RunLayout(out).config)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [refused_line(out, first.pid)]
    assert first.returncode == 0, first_err
    assert RunDir(out).is_complete() and not RunLayout(out).lock.exists()
    assert "resumed" not in json.loads(RunLayout(out).manifest.read_text())  # the second wrote nothing


def test_a_run_killed_mid_training_does_not_block_its_rerun(tiny_root, tmp_path):
    config = _write_config(tmp_path, tiny_config(tiny_root, ban={"generations": 1}, train={"epochs": 6}))
    out = tmp_path / "run"
    first = subprocess.Popen(cli("run", config, "--out", out), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    wait_for(RunLayout(out).checkpoint(0), first)  # gen 0 has finished an epoch
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not RunLayout(out).summary.exists(), "killed too late to test a resume"
    assert RunLayout(out).lock.read_text().strip() == str(first.pid)  # left behind, no longer held
    rerun = subprocess.run(cli("run", config, "--out", out), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert RunDir(out).is_complete() and not RunLayout(out).lock.exists()
    assert len(json.loads(RunLayout(out).manifest.read_text())["resumed"]) == 1


def test_a_second_study_on_a_folder_in_use_is_refused(tiny_root, tmp_path):
    base = tiny_config(tiny_root, train={"epochs": 20})
    base.pop("seed"), base.pop("ban")
    study = tmp_path / "study.toml"
    study.write_text(_toml({"name": "lock", "seeds": [0], "objectives": ["ce"], "base": base}))
    out = tmp_path / "study"
    first, second, first_err = _race(cli("study", study, "--out", out), StudyLayout(out).config)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [refused_line(out, first.pid)]
    assert first.returncode == 0, first_err
    assert StudyLayout(out).results.is_file() and not StudyLayout(out).lock.exists()


def test_the_lock_in_one_process(tmp_path):
    folder = tmp_path / "run"
    run = RunDir(folder)
    with run.lock():
        assert run.layout.lock.read_text() == f"{os.getpid()}\n"
        # the lock file alone does not make a new folder look foreign
        assert run.check_config({"seed": 0}) is False
        with pytest.raises(RunFolderError) as err, folder_lock(run.layout.lock, folder):
            pass  # flock conflicts between two opens of the file, in one process too
        assert str(err.value) == (f"{folder} is in use by another ban-analysis process (pid {os.getpid()}); "
                                  "wait for it or use another --out folder")
    # released: the lock file is gone, and so is the folder the lock created and nothing filled
    assert not folder.exists()
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    with run.lock():
        pass
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]  # a folder it did not create stays


def test_a_run_that_cannot_start_leaves_no_folder(tiny_root, tmp_path):
    from ban_analysis.engine.chain import run_chain

    cfg = config_from_dict(tiny_config(tiny_root, data={"name": "imagenet21k"}))
    with pytest.raises(ValueError, match="unknown dataset"):
        run_chain(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

"""A full disk: one line naming the file that could not be written, exit code 2, no temporary file
left, and the same command resumes to the numbers of an uninterrupted run."""

from __future__ import annotations

import builtins
import errno
import json

import numpy as np
import pytest

from ban_analysis.cli import main
from ban_analysis.config import config_from_dict
from ban_analysis.engine import files as files_mod
from ban_analysis.engine.chain import run_chain
from ban_analysis.engine.runs import RunFolderError, atomic_write_bytes, load_checkpoint_file
from ban_analysis.layout import RunLayout
from tests.conftest import tiny_config
from tests.test_cli import _write_config


def fill_disk_at(monkeypatch, name: str, nth: int = 1) -> dict:
    """From the ``nth`` write of a temporary file for ``name`` (e.g. "checkpoint.pt") on, ENOSPC after
    a partial write, as a full disk does; every other file is written as usual."""
    real_open, seen = builtins.open, {"n": 0, "paths": []}

    class FullFile:
        def __init__(self, fh):
            self._fh = fh

        def write(self, data):
            self._fh.write(data[: len(data) // 2])
            self._fh.flush()  # half the bytes reach the temporary file
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, attr):
            return getattr(self._fh, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._fh.close()

    def fake_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if "w" in mode and f".{name}.tmp-" in str(file):
            seen["n"] += 1
            if seen["n"] >= nth:
                seen["paths"].append(str(file))
                return FullFile(fh)
        return fh

    monkeypatch.setattr(files_mod, "open", fake_open, raising=False)  # the writer module's open, not the builtin
    return seen


def leftovers(folder) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if ".tmp-" in p.name)


def test_a_failed_write_removes_its_temporary_file_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    atomic_write_bytes(path, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files_mod.os, "fsync", full)
    with pytest.raises(RunFolderError) as err:
        atomic_write_bytes(path, b"new")
    assert str(err.value) == (f"could not write {path}: no space left on device (disk full?); free space and "
                              "rerun the same command to resume")
    assert path.read_bytes() == b"old" and leftovers(tmp_path) == []

    def quota(fd):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(files_mod.os, "fsync", quota)
    with pytest.raises(RunFolderError, match="no space left on device"):
        atomic_write_bytes(path, b"new")

    def io_error(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files_mod.os, "fsync", io_error)
    with pytest.raises(RunFolderError, match=r"could not write .*f\.json: Input/output error; fix that and rerun"):
        atomic_write_bytes(path, b"new")
    assert leftovers(tmp_path) == []


def test_full_disk_mid_generation_then_the_rerun_resumes_to_the_same_numbers(tiny_root, tmp_path, monkeypatch):
    cfg = config_from_dict(tiny_config(tiny_root, ban={"generations": 1}, train={"epochs": 3},
                                       hooks={"logit_split": {}}))
    reference = run_chain(cfg, tmp_path / "ref", progress=False)
    assert not (tmp_path / "ref" / "tensorboard").exists()  # log.tensorboard off: no event files
    out = tmp_path / "full"
    with monkeypatch.context() as m:
        seen = fill_disk_at(m, "checkpoint.pt", nth=5)  # gen 0: 3 checkpoints; gen 1: its epoch-2 one
        with pytest.raises(RunFolderError) as err:
            run_chain(cfg, out, progress=False)
    target = RunLayout(out).checkpoint(1)
    assert str(err.value) == (f"could not write {target}: no space left on device (disk full?); free space and "
                              "rerun the same command to resume")
    assert seen["paths"] and leftovers(out) == []
    assert load_checkpoint_file(target)["epoch"] == 1  # the last good checkpoint is intact
    assert not RunLayout(out).summary.exists() and not RunLayout(out).lock.exists()

    resumed = run_chain(cfg, out, progress=False)
    assert resumed == reference  # every number, the best-epoch record's included
    assert json.loads(RunLayout(out).summary.read_text()) == json.loads(RunLayout(tmp_path / "ref").summary.read_text())
    for gen in (0, 1):
        for split in ("val", "test"):
            for path in (RunLayout(out).best_logits(gen, split), RunLayout(out).logits(gen, split)):
                ref = RunLayout(tmp_path / "ref").path / path.relative_to(out)
                assert np.array_equal(np.load(path), np.load(ref)), path
        a = load_checkpoint_file(RunLayout(out).checkpoint(gen))["best"]
        b = load_checkpoint_file(RunLayout(tmp_path / "ref").checkpoint(gen))["best"]
        assert a["epoch"] == b["epoch"] and a["val_acc"] == b["val_acc"]
    assert len(json.loads(RunLayout(out).manifest.read_text())["resumed"]) == 1


def test_the_cli_says_it_in_one_line_and_exits_2(tiny_root, tmp_path, monkeypatch, capsys):
    config = _write_config(tmp_path, tiny_config(tiny_root, ban={"generations": 0}, train={"epochs": 1}))
    out = tmp_path / "out"
    fill_disk_at(monkeypatch, "checkpoint.pt")
    code = main(["run", config, "--out", str(out), "--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ban-analysis:")]
    assert code == 2
    assert err == [f"ban-analysis: error: could not write {RunLayout(out).checkpoint(0)}: no space left on device "
                   "(disk full?); free space and rerun the same command to resume"]
    assert leftovers(out) == []


def test_a_full_disk_outside_the_run_writer_is_one_line_too(tmp_path, monkeypatch, capsys):
    from ban_analysis import cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / "x.npz"))

    monkeypatch.setattr(cli, "cmd_show", full)
    assert main(["show", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ban-analysis: error: could not write {tmp_path / 'cache' / 'x.npz'}: no space left on device "
                   "(disk full?); free space and rerun the same command to resume"]

"""Data-parallel training under torchrun, on CPU: 2 ranks over gloo.

Each test starts ``python -m torch.distributed.run --standalone --nproc_per_node=2`` as a
subprocess (torchrun's own launcher, the one a user runs), most of whose time is three Python
processes importing torch on a loaded 2-core machine (~12-15 s).

Tolerances. A rank's gradient is the mean over its part of the global batch; the weighted
all-reduce adds the parts, each times its share n_r / B. That is the single-process gradient
with the sum over the batch split in two and added in another order, so the weights differ by
float32 rounding only. Measured here: at most 1.5e-8 absolute after 3 steps, 2.4e-7 after the
640 steps of the 20 + 20-epoch chain (both within rtol 1e-5, atol 1e-7), the same test accuracy
and test NLL to 7 digits. The first steps are compared at rtol 1e-5 (atol 1e-7). Over a chain
the roundings are carried through every step and can grow, and can flip a prediction that sits
on a decision boundary, so the chain is compared at rtol 1e-5 with atol 1e-6, NLL at rel 1e-4,
and test accuracy within one percentage point (2 of the 200 test images). A resumed DDP run
repeats exactly what the uninterrupted one did (a two-rank sum a + b is commutative, so the
all-reduce is deterministic): compared for equality.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ban_analysis.config import config_from_dict
from ban_analysis.engine.chain import run_chain
from ban_analysis.engine.runs import load_checkpoint_file
from tests.conftest import tiny_config, write_tiny_npz
from tests.test_cli import _toml

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="torch.distributed with gloo is needed"),
              # the in-process single-process runs on one thread, as each rank (OMP_NUM_THREADS=1)
              pytest.mark.usefixtures("one_torch_thread")]


def _launch(script: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *script]


def _env() -> dict:
    # a short collective timeout: a broken test fails in seconds instead of hanging for 10 minutes
    return {**os.environ, "BAN_DDP_TIMEOUT": "60", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _write_config(folder: Path, table: dict) -> Path:
    path = folder / "config.toml"
    path.write_text(_toml(table))
    return path


def _weights(run_dir: Path, gen: int) -> dict:
    return load_checkpoint_file(run_dir / f"gen-{gen}" / "checkpoint.pt")["model"]


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_world_from_the_environment_and_the_shards(monkeypatch, tmp_path):
    from ban_analysis.engine import distributed as d

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", d.TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)
    assert d.env_world() == d.SINGLE and not d.SINGLE.enabled and d.SINGLE.is_main
    world, device = d.setup(torch.device("cpu"))  # no torchrun: nothing joined, nothing changed
    assert world == d.SINGLE and device == torch.device("cpu") and not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert d.env_world() == d.SINGLE
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert d.env_world() == d.World(rank=2, world_size=3, local_rank=0)
    # contiguous slices that tile the global batch, sizes differing by at most one
    for batch in (3, 7, 33, 128):
        bounds = [d.shard_bounds(batch, d.World(r, 3)) for r in range(3)]
        assert bounds[0][0] == 0 and bounds[-1][1] == batch
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(h - l for l, h in bounds) - min(h - l for l, h in bounds) <= 1
    d.check_global_batches(520, 33, d.World(0, 2))  # last batch 25 rows: fine
    with pytest.raises(ValueError, match="cannot be shared by 4 ranks"):
        d.check_global_batches(521, 65, d.World(0, 4))  # last batch of 1 row
    with pytest.raises(ValueError, match="cannot be shared by 4 ranks"):
        d.check_global_batches(3, 128, d.World(0, 4))
    assert d.timeout_seconds() == d.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(d.TIMEOUT_ENV, "90")
    assert d.timeout_seconds() == 90.0
    monkeypatch.setenv(d.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="BAN_DDP_TIMEOUT"):
        d.timeout_seconds()
    # other ranks read the run folder and write nothing
    ro = d.run_dir_for(tmp_path / "run", d.World(1, 2))
    assert isinstance(ro, d.ReadOnlyRunDir) and not ro.writable
    ro.save_checkpoint(0, {"model": {}})
    ro.write_metrics(0, [{"epoch": 1}])
    ro.update_manifest(finished="now")
    ro.write_summary({})
    assert not (tmp_path / "run").exists()


def test_study_is_refused_under_torchrun(monkeypatch, tmp_path, capsys):
    from ban_analysis.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["study", str(tmp_path / "none.toml"), "--out", str(tmp_path / "s")]) == 2
    assert "does not run under torchrun" in capsys.readouterr().err


def test_ddp_first_steps_equal_single_process(tmp_path):
    """3 steps of a global batch of 175 (shards 87/88, then 85/85): the weights of a single process
    to rtol 1e-5; hook rows gathered to rank 0 with the single process's columns; rank 0 alone
    prints. Started through the console script's path, as the README shows."""
    root = tmp_path / "data"
    write_tiny_npz(root)  # 520 training samples after val_size 80
    table = tiny_config(root, train={"epochs": 1, "batch_size": 175, "schedule": "constant"},
                        ban={"generations": 0}, hooks={"logit_split": {}, "update_share": {}})
    config = _write_config(tmp_path, table)
    script = Path(sys.executable).parent / "ban-analysis"  # the console script itself, not a shim
    entry = [str(script)] if script.is_file() and script.read_text()[:2] == "#!" else ["-m", "ban_analysis"]
    proc = _run(_launch([*entry, "run", str(config), "--out", str(tmp_path / "ddp"), "--quiet"]))
    assert proc.stdout.count("run folder:") == 1  # rank 0 prints the table, rank 1 nothing
    single = run_chain(config_from_dict(table), tmp_path / "single", progress=False)

    a, b = _weights(tmp_path / "single", 0), _weights(tmp_path / "ddp", 0)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=key)
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["generations"][0]["test_acc"] == pytest.approx(single["generations"][0]["test_acc"], abs=0.01)
    manifest = json.loads((tmp_path / "ddp" / "manifest.json").read_text())
    assert "finished" in manifest and "0" in manifest["generations"]

    # per-sample rows: every sample of every global batch once, in the single process's order
    per_sample = [pd.read_parquet(d / "gen-0" / "hooks" / "logit_split" / "epoch-0.parquet")
                  for d in (tmp_path / "single", tmp_path / "ddp")]
    assert list(per_sample[0].columns) == list(per_sample[1].columns)
    assert (per_sample[0][["step", "sample_index"]].values == per_sample[1][["step", "sample_index"]].values).all()
    np.testing.assert_allclose(per_sample[1]["g_norm"], per_sample[0]["g_norm"], rtol=1e-4, atol=1e-6)
    # per-step rows: one per rank and step, each about its shard, same columns
    shares = [pd.read_parquet(d / "gen-0" / "hooks" / "update_share" / "epoch-0.parquet")
              for d in (tmp_path / "single", tmp_path / "ddp")]
    assert list(shares[0].columns) == list(shares[1].columns)
    assert shares[0]["step"].tolist() == [0, 1, 2] and shares[1]["step"].tolist() == [0, 0, 1, 1, 2, 2]


# 520 samples / global batch 33 = 15 batches of 33 (shards 16/17) and one of 25 (12/13)
CHAIN = {"train": {"epochs": 20, "batch_size": 33}, "ban": {"generations": 1}}


@pytest.fixture(scope="module")
def ddp_chain(tmp_path_factory):
    """One uninterrupted 2-rank chain (teacher + 1 BAN generation, 20 epochs each): the reference."""
    folder = tmp_path_factory.mktemp("ddp_chain")
    root = folder / "data"
    write_tiny_npz(root)
    table = tiny_config(root, **CHAIN)
    config = _write_config(folder, table)
    started = time.perf_counter()
    _run(_launch(["-m", "ban_analysis", "run", str(config), "--out", str(folder / "ref"), "--quiet"]))
    return {"folder": folder, "table": table, "config": config, "ref": folder / "ref",
            "seconds": time.perf_counter() - started}


def test_ddp_chain_matches_single_process(ddp_chain, tmp_path):
    single = run_chain(config_from_dict(ddp_chain["table"]), tmp_path / "single", progress=False)
    ddp = json.loads((ddp_chain["ref"] / "summary.json").read_text())
    for s, d in zip(single["generations"], ddp["generations"]):
        assert d["test_acc"] == pytest.approx(s["test_acc"], abs=0.01), (s, d)
        assert d["test_nll"] == pytest.approx(s["test_nll"], rel=1e-4)
    for gen in (0, 1):
        a, b = _weights(tmp_path / "single", gen), _weights(ddp_chain["ref"], gen)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"gen {gen} {key}")


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.slow  # two torchrun launches: 15-35 s, with the machine's load
def test_ddp_killed_rank_ends_the_job_and_a_rerun_resumes(ddp_chain):
    """kill -9 of rank 1 mid-training: torchrun stops rank 0 and exits non-zero (no hang); the
    same command again resumes from rank 0's last checkpoint and ends exactly as the uninterrupted run."""
    out = ddp_chain["folder"] / "killed"
    cmd = _launch(["-m", "ban_analysis", "run", str(ddp_chain["config"]), "--out", str(out), "--quiet"])
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = out / "gen-0" / "metrics.csv"  # generation 0 has finished an epoch
    deadline = time.time() + 180
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.fail(f"the job ended before it could be killed (rc {proc.returncode}): {proc.communicate()[1][-2000:]}")
    victims = [p for p in _children(proc.pid) if _rank_of(p) == 1]
    assert victims, f"rank 1 not found among torchrun's children {[(p, _rank_of(p)) for p in _children(proc.pid)]}"
    os.kill(victims[0], signal.SIGKILL)
    killed_at = time.time()
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job hung after a rank was killed")
    assert proc.returncode != 0
    assert time.time() - killed_at < 60
    assert "SIGKILL" in stderr or "Signal 9" in stderr, stderr[-2000:]
    assert not (out / "summary.json").exists(), "killed too late to test a resume"

    _run(cmd)  # the same command: resumes
    assert json.loads((out / "summary.json").read_text()) == json.loads((ddp_chain["ref"] / "summary.json").read_text())
    for gen in (0, 1):
        a, b = _weights(ddp_chain["ref"], gen), _weights(out, gen)
        for key in a:
            assert torch.equal(a[key], b[key]), f"gen {gen} {key}"
    assert len(json.loads((out / "manifest.json").read_text())["resumed"]) == 1

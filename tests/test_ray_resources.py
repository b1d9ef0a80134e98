"""Ray executor resources: what --cpus-per-run / --gpus-per-run / --device ask Ray for, and
that a study run with fractional GPUs gives the local executor's results.

A local Ray declares one GPU it does not have (``ray.init(num_gpus=1)``): Ray schedules on the
declared resources only, so the tasks' assigned shares can be checked on a CPU machine.
"""

from __future__ import annotations

import pandas as pd
import pytest

from ban_analysis.study import executors
from ban_analysis.study import run_study
from tests.test_study import _study_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the in-process local study: tiny tensors


def test_task_options_follow_the_flags():
    assert executors._task_options("cpu") == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert executors._task_options("cuda") == {"num_cpus": 1.0, "num_gpus": 1.0}  # --device cuda: 1 GPU
    assert executors._task_options("cuda", 4, 0.25) == {"num_cpus": 4.0, "num_gpus": 0.25}
    assert executors._task_options("auto", gpus_per_run=0.5) == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert executors._task_options("auto") == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert executors._task_threads({"num_cpus": 4.0}) == 4 and executors._task_threads({"num_cpus": 0.5}) == 1
    with pytest.raises(ValueError, match="--cpus-per-run must be > 0"):
        executors._task_options("cpu", 0)
    with pytest.raises(ValueError, match=r"--gpus-per-run must be in \[0, 1\]"):
        executors._task_options("cuda", 1, 2)
    with pytest.raises(ValueError, match=r"--gpus-per-run must be in \[0, 1\]"):
        executors._task_options("cuda", 1, -0.5)


def test_cli_refuses_resource_flags_without_ray(tmp_path, tiny_root, capsys):
    from ban_analysis.cli import main

    code = main(["study", _study_file(tmp_path, tiny_root, seeds=[0], objectives=["ce"]), "--out",
                 str(tmp_path / "s"), "--gpus-per-run", "0.5"])
    assert code == 2 and "apply to --executor ray only" in capsys.readouterr().err


@pytest.mark.slow  # ~15-30 s: Ray's start and two workers importing torch
def test_fractional_gpus_are_assigned_and_results_match_local(tmp_path, tiny_root, monkeypatch, capsys):
    ray = pytest.importorskip("ray")
    study = _study_file(tmp_path, tiny_root, seeds=[0], objectives=["ce"])
    run_study(study, tmp_path / "local", progress=False)

    records = []
    real = executors._execute_ray

    def spy(*args, **kwargs):
        records.extend(real(*args, **kwargs))
        return records

    monkeypatch.setattr(executors, "_execute_ray", spy)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        run_study(study, tmp_path / "ray", executor="ray", device="cpu", cpus_per_run=1, gpus_per_run=0.5,
                  progress=True)
    finally:
        ray.shutdown()
    # the teacher and ce's generation 1: two tasks, each given what the flags asked for
    assert len(records) == 2
    for record in records:
        assert record["resources"] == {"CPU": 1.0, "GPU": 0.5}, record
    assert sorted((r["path"].rsplit("/", 1)[1], r["gen"]) for r in records) == [("ce", 1), ("teacher", 0)]
    assert "study tasks" in capsys.readouterr().err  # the progress bar over the tasks
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "local" / "results.csv"),
                                  pd.read_csv(tmp_path / "ray" / "results.csv"))

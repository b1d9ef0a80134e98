"""Running a study's plan: the local executor (one run after another) and Ray (one task per generation).

Each task trains one run folder up to one generation, so a study killed at any moment resumes
from the last checkpoint of every run when the same command is given again. Both executors give
identical numbers (``tests/test_study.py``): they call the same :func:`_run_one`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ban_analysis.config import ConfigError, config_from_dict
from ban_analysis.engine.files import atomic_write_json, folder_lock, read_json
from ban_analysis.engine.runs import RunDir
from ban_analysis.layout import TEACHER, StudyLayout
from ban_analysis.study.collect import collect_results
from ban_analysis.study.plan import RunSpec, StudyConfig, load_study, plan_runs, study_from_dict

logger = logging.getLogger(__name__)

__all__ = ["run_study"]


def _run_one(spec_config: dict, path: str, until_gen: int | None, device: str, progress: bool,
             threads: int | None = None, _after: Any = None) -> str:
    """Train one run folder (up to ``until_gen``). Module-level so Ray can ship it to a worker."""
    import torch

    from ban_analysis.engine.chain import run_chain

    if threads:
        torch.set_num_threads(threads)
    cfg = config_from_dict(spec_config)  # checks the teacher checkpoint now that it exists
    run_chain(cfg, path, device=device, until_gen=until_gen, progress=progress)
    return path


def _ray_task(spec_config: dict, path: str, until_gen: int | None, device: str, threads: int,
              _after: Any = None) -> dict:
    """One Ray task: :func:`_run_one`, then where it ran and the resources Ray assigned to it."""
    import ray

    _run_one(spec_config, path, until_gen, device, False, threads)
    context = ray.get_runtime_context()
    return {"path": path, "gen": until_gen, "resources": dict(context.get_assigned_resources()),
            "node_id": context.get_node_id()}


def _task_options(device: str, cpus_per_run: float | None = None, gpus_per_run: float | None = None) -> dict:
    """``ray.remote`` options of one task: ``num_cpus`` (default 1; also the task's torch threads)
    and ``num_gpus`` (default 1 with ``device="cuda"``, else 0; a fraction lets runs share a GPU)."""
    cpus = 1.0 if cpus_per_run is None else float(cpus_per_run)
    if not cpus > 0:
        raise ValueError(f"--cpus-per-run must be > 0, got {cpus_per_run!r}")
    gpus = (1.0 if device == "cuda" else 0.0) if gpus_per_run is None else float(gpus_per_run)
    if not 0 <= gpus <= 1:
        raise ValueError(f"--gpus-per-run must be in [0, 1] (a run trains on one GPU; fractions share one), "
                         f"got {gpus_per_run!r}")
    if gpus > 0 and device == "cpu":
        logger.warning("--gpus-per-run %g with --device cpu: GPUs are reserved but training runs on the CPU", gpus)
    return {"num_cpus": cpus, "num_gpus": gpus}


def _task_threads(options: dict) -> int:
    """torch threads of a task: its CPUs, at least 1."""
    return max(1, int(round(options["num_cpus"])))


def _json_roundtrip(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _identity(study: dict) -> dict:
    """A study config as compared on resume: without ``base.log`` (``--tensorboard``), which
    changes no number, so a study may be resumed with TensorBoard turned on or off."""
    base = {k: v for k, v in study.get("base", {}).items() if k != "log"}
    return {**study, "base": base}


def _bind_study(study: StudyConfig, layout: StudyLayout) -> None:
    """Write study.json for a new folder; refuse a folder that holds another study."""
    if layout.config.exists():
        old = read_json(layout.config)
        try:  # an older study.json lacks keys added since: fill in their defaults before comparing
            old = _json_roundtrip(asdict(study_from_dict({k: v for k, v in old.items()})))
        except ConfigError:
            pass
        if _identity(old) != _identity(_json_roundtrip(asdict(study))):
            raise ConfigError(f"{layout.path} holds a study with a different config; use another --out folder")
        return
    layout.path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(layout.config, asdict(study))


def run_study(study: str | Path | StudyConfig | dict, out: str | Path, *, executor: str = "local",
              address: str | None = None, workers: int | None = None, device: str = "cpu",
              overrides: list[str] | None = None, progress: bool = True,
              cpus_per_run: float | None = None, gpus_per_run: float | None = None) -> list[dict]:
    """Run (or resume) a study into ``out`` and collect ``results.csv``; returns its rows.

    Args:
        study: a TOML path, a study table (dict) or a :class:`StudyConfig`.
        out: the study folder.
        executor: "local" or "ray".
        overrides: ``--set`` strings applied to the base run config.
        cpus_per_run, gpus_per_run: Ray resources per task (:func:`_task_options`).
    """
    if isinstance(study, StudyConfig):
        study = study_from_dict(_json_roundtrip(asdict(study)), overrides)
    elif isinstance(study, dict):
        study = study_from_dict(study, overrides)
    else:
        study = load_study(study, overrides)
    if executor not in ("local", "ray"):
        raise ValueError(f"executor {executor!r} is not supported; allowed: local, ray")
    options = _task_options(device, cpus_per_run, gpus_per_run) if executor == "ray" else None
    layout = StudyLayout(out)
    # the study folder's lock for the whole call: a second study process on it is refused (its
    # runs hold their own run-folder locks, wherever Ray runs them)
    with folder_lock(layout.lock, layout.path):
        _bind_study(study, layout)
        specs = plan_runs(study, layout.path)
        if executor == "local":
            _execute_local(specs, device, progress)
        else:
            _execute_ray(specs, device, address, workers, options, progress)
        return collect_results(layout.path)


def _execute_local(specs: list[RunSpec], device: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    for spec in tqdm(specs, desc="study runs", unit="run", disable=not progress):
        if RunDir(spec.path).is_complete():
            continue
        logger.info("seed %d, %s: %s", spec.seed, spec.objective, spec.path)
        _run_one(spec.config.to_dict(), str(spec.path), None, device, progress)


def _execute_ray(specs: list[RunSpec], device: str, address: str | None, workers: int | None,
                 options: dict | None = None, progress: bool = False) -> list[dict]:
    """One Ray task per generation; each depends on the task that produced its teacher.

    ``options`` are the tasks' resources (:func:`_task_options`; default one CPU, no GPU). A
    progress bar counts the tasks done (with an ETA) as ``ray.wait`` reports them. Returns each
    task's record (path, generation, the resources Ray assigned, node), in completion order.
    """
    try:
        import ray
    except ImportError:
        raise ValueError("the ray executor needs Ray: pip install 'ban-analysis[ray]'") from None

    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": workers or os.cpu_count()}
        ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
    options = options or _task_options(device)
    threads = _task_threads(options)  # torch threads = the task's CPUs: tasks side by side, no oversubscription
    remote = ray.remote(**options)(_ray_task)
    refs, teacher_ref = [], {}
    for spec in specs:
        if RunDir(spec.path).is_complete():
            if spec.objective == TEACHER:
                teacher_ref[spec.seed] = None
            continue
        cfg = spec.config.to_dict()
        if spec.objective == TEACHER:
            ref = remote.remote(cfg, str(spec.path), 0, device, threads)
            teacher_ref[spec.seed] = ref
            refs.append(ref)
            continue
        previous = teacher_ref.get(spec.seed)
        for gen in range(1, spec.generations + 1):
            previous = remote.remote(cfg, str(spec.path), gen, device, threads, _after=previous)
            refs.append(previous)
    from tqdm.auto import tqdm

    done_records, pending = [], list(refs)
    with tqdm(total=len(refs), desc="study tasks", unit="task", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            done_records += ray.get(done)  # a failed task raises here
            bar.update(len(done))
    return done_records

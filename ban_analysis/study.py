"""Seed studies: seeds x objectives x generations, paired by seed, every run an ordinary run folder.

Layout::

    <study>/study.json                      the resolved study config (seeds, objectives, base run config)
    <study>/results.csv                     one row per (seed, objective, gen or ensemble)
    <study>/runs/seed-<s>/teacher/          generation 0 on labels, trained once per seed
    <study>/runs/seed-<s>/<objective>/      gen-0 = that teacher (imported), gens 1..K with <objective>

Pairing: within a seed every objective imports the same teacher checkpoint, and students of the
same (seed, gen) share their initial weights and data order, because train.py derives those
streams from (seed, gen) only. The teacher run has no hooks (the hooks measure students).
"""

from __future__ import annotations

import copy
import csv
import io
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ban_analysis.config import ConfigError, RunConfig, config_from_dict, read_toml
from ban_analysis.runs import RunDir, atomic_write_bytes, atomic_write_json, read_json

logger = logging.getLogger(__name__)

RESULT_COLUMNS = ["seed", "objective", "gen", "kind", "members", "test_acc", "test_nll", "test_ece", "val_acc"]


@dataclass(frozen=True)
class StudyConfig:
    """What a study runs. ``base`` is a full run config (its seed and [ban] are set per run)."""

    name: str = "study"
    seeds: list[int] = field(default_factory=lambda: list(range(10)))
    objectives: list[str] = field(default_factory=lambda: ["ce", "ban", "cwtm", "dkpp", "tmls"])
    generations: dict = field(default_factory=dict)       # objective -> K (default 1)
    objective_params: dict = field(default_factory=dict)  # objective -> hyperparameters table
    equivalence_margin: float = 0.005   # accuracy fraction, fixed before looking (TOST)
    gain_fraction_threshold: float = 0.5  # "recovers most of BAN's gain" needs the CI above this
    base: dict = field(default_factory=dict)

    def generations_of(self, objective: str) -> int:
        return int(self.generations.get(objective, 1))


_STUDY_KEYS = {"name": str, "seeds": list, "objectives": list, "generations": dict,
               "objective_params": dict, "equivalence_margin": (int, float),
               "gain_fraction_threshold": (int, float), "base": dict}


def study_from_dict(table: dict, overrides: list[str] | None = None) -> StudyConfig:
    """Validate a study table; base-config ``overrides`` are ``--set`` strings for the base run."""
    from ban_analysis.losses import OBJECTIVES

    for key, value in table.items():
        if key not in _STUDY_KEYS:
            raise ConfigError(f"unknown study key {key!r}; allowed: {', '.join(sorted(_STUDY_KEYS))}")
        if isinstance(value, bool) or not isinstance(value, _STUDY_KEYS[key]):
            raise ConfigError(f"study key {key}: wrong type {type(value).__name__}")
    cfg = StudyConfig(**copy.deepcopy(table))
    if not cfg.seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in cfg.seeds) \
            or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds: expected a non-empty list of distinct integers, got {cfg.seeds!r}")
    if not cfg.objectives or len(set(cfg.objectives)) != len(cfg.objectives):
        raise ConfigError(f"objectives: expected a non-empty list of distinct names, got {cfg.objectives!r}")
    for name in list(cfg.objectives) + list(cfg.generations) + list(cfg.objective_params):
        if name not in OBJECTIVES:
            raise ConfigError(f"objective {name!r} is not registered; allowed: {', '.join(sorted(OBJECTIVES))}")
    for name, k in cfg.generations.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"generations.{name}: expected an integer >= 1, got {k!r}")
    if not 0 < cfg.equivalence_margin < 1:
        raise ConfigError(f"equivalence_margin: {cfg.equivalence_margin} out of range; allowed: (0, 1)")
    if not 0 < cfg.gain_fraction_threshold <= 1:
        raise ConfigError(f"gain_fraction_threshold: {cfg.gain_fraction_threshold} out of range; allowed: (0, 1]")
    base = copy.deepcopy(cfg.base)
    if overrides:
        from ban_analysis.config import _set_override

        for assignment in overrides:
            _set_override(base, assignment)
    base.pop("seed", None)
    config_from_dict(base)  # validate the base once, with every key named as in a run config
    return StudyConfig(**{**asdict(cfg), "base": base})


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    return study_from_dict(read_toml(path), overrides)


@dataclass(frozen=True)
class RunSpec:
    """One run folder of the study: which seed and objective, its config and its dependencies."""

    seed: int
    objective: str  # "teacher" for the seed's generation-0 run
    path: Path
    config: RunConfig
    generations: int


def plan_runs(study: StudyConfig, out: Path) -> list[RunSpec]:
    """Every run of the study, teacher first within each seed (seed-major, so partial studies are usable)."""
    specs = []
    for seed in study.seeds:
        seed_dir = (out / "runs" / f"seed-{seed}").resolve()
        teacher_table = {**copy.deepcopy(study.base), "seed": seed, "hooks": {}}
        teacher_table["ban"] = {**teacher_table.get("ban", {}), "generations": 0, "objective": "ce", "params": {}}
        specs.append(RunSpec(seed, "teacher", seed_dir / "teacher", config_from_dict(teacher_table), 0))
        teacher_ckpt = str(seed_dir / "teacher" / "gen-0" / "checkpoint.pt")
        for objective in study.objectives:
            table = {**copy.deepcopy(study.base), "seed": seed}
            table["teacher"] = {**table.get("teacher", {}), "checkpoint": teacher_ckpt}
            k = study.generations_of(objective)
            table["ban"] = {**table.get("ban", {}), "generations": k, "objective": objective,
                            "params": dict(study.objective_params.get(objective, {}))}
            # The teacher checkpoint does not exist before the teacher run: skip the file check here
            specs.append(RunSpec(seed, objective, seed_dir / objective, _config_unchecked(table), k))
    return specs


def _config_unchecked(table: dict) -> RunConfig:
    from ban_analysis.config import _build

    return _build(RunConfig, table, "")


def _run_one(spec_config: dict, path: str, until_gen: int | None, device: str, progress: bool,
             threads: int | None = None, _after: Any = None) -> str:
    """Train one run folder (up to ``until_gen``). Module-level so Ray can ship it to a worker."""
    import torch

    from ban_analysis.train import run_chain

    if threads:
        torch.set_num_threads(threads)
    cfg = config_from_dict(spec_config)  # checks the teacher checkpoint now that it exists
    run_chain(cfg, path, device=device, until_gen=until_gen, progress=progress)
    return path


def run_study(config_path: str | Path, out: str | Path, *, executor: str = "local", address: str | None = None,
              workers: int | None = None, device: str = "cpu", overrides: list[str] | None = None,
              progress: bool = True) -> list[dict]:
    """Run (or resume) a study into ``out`` and collect ``results.csv``; returns its rows."""
    study = load_study(config_path, overrides)
    out = Path(out)
    study_file = out / "study.json"
    if study_file.exists():
        old = read_json(study_file)
        if old != json_roundtrip(asdict(study)):
            raise ConfigError(f"{out} holds a study with a different config; use another --out folder")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(study_file, asdict(study))
    specs = plan_runs(study, out)
    if executor == "local":
        _execute_local(specs, device, progress)
    elif executor == "ray":
        _execute_ray(specs, device, address, workers)
    else:
        raise ValueError(f"executor {executor!r} is not supported; allowed: local, ray")
    return collect_results(out)


def json_roundtrip(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj))


def _execute_local(specs: list[RunSpec], device: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    for spec in tqdm(specs, desc="study runs", unit="run", disable=not progress):
        if RunDir(spec.path).is_complete():
            continue
        logger.info("seed %d, %s: %s", spec.seed, spec.objective, spec.path)
        _run_one(spec.config.to_dict(), str(spec.path), None, device, progress)


def _execute_ray(specs: list[RunSpec], device: str, address: str | None, workers: int | None) -> None:
    """One Ray task per generation; each depends on the task that produced its teacher."""
    try:
        import ray
    except ImportError:
        raise ValueError("the ray executor needs Ray: pip install 'ban-analysis[ray]'") from None
    import os

    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": workers or os.cpu_count()}
        ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
    # one thread per task: tasks run side by side, one per core
    remote = ray.remote(num_cpus=1)(_run_one)
    refs, teacher_ref = [], {}
    for spec in specs:
        if RunDir(spec.path).is_complete():
            if spec.objective == "teacher":
                teacher_ref[spec.seed] = None
            continue
        cfg = spec.config.to_dict()
        if spec.objective == "teacher":
            ref = remote.remote(cfg, str(spec.path), 0, device, False, 1)
            teacher_ref[spec.seed] = ref
            refs.append(ref)
            continue
        previous = teacher_ref.get(spec.seed)
        for gen in range(1, spec.generations + 1):
            previous = remote.remote(cfg, str(spec.path), gen, device, False, 1, _after=previous)
            refs.append(previous)
    ray.get(refs)


def collect_results(out: str | Path) -> list[dict]:
    """results.csv from the finished run folders of a study (unfinished ones are skipped)."""
    out = Path(out)
    rows = []
    for seed_dir in sorted((out / "runs").glob("seed-*"), key=lambda p: int(p.name.split("-")[1])):
        seed = int(seed_dir.name.split("-")[1])
        for run_path in sorted(p for p in seed_dir.iterdir() if p.is_dir()):
            run = RunDir(run_path)
            if not run.is_complete():
                continue
            summary = run.summary()
            objective = run_path.name
            for g in summary["generations"]:
                if objective != "teacher" and g["gen"] == 0:
                    continue  # the imported teacher is the teacher run's row
                rows.append({"seed": seed, "objective": objective, "gen": g["gen"], "kind": "model",
                             "members": str(g["gen"]), "test_acc": g["test_acc"], "test_nll": g["test_nll"],
                             "test_ece": g["test_ece"], "val_acc": g["val_acc"]})
            for e in summary["ensembles"]:
                rows.append({"seed": seed, "objective": objective, "gen": max(e["members"]), "kind": "ensemble",
                             "members": "+".join(str(m) for m in e["members"]), "test_acc": e["test_acc"],
                             "test_nll": e["test_nll"], "test_ece": e["test_ece"], "val_acc": None})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "results.csv", buf.getvalue().encode())
    return rows

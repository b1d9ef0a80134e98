"""What a study runs: seeds x variants x generations, paired by seed; the roles the report reads.

A *variant* is one student recipe: a ``name`` (its run folder and its label in every table),
an ``objective``, that objective's ``params`` and a number of ``generations``. A study lists
variants in ``[[variants]]`` tables, or in ``objectives`` (a name stands for the variant of that
objective with its defaults, ``generations.<name>`` and ``objective_params.<name>``; a table
entry is a variant), so ``kd_T2`` and ``kd_T4`` can share a study. Configs written before
variants existed keep working unchanged.

``[roles]`` says who is who for the analysis: the ``reference`` whose gain is explained
(default ``ban``), the ``probes`` that isolate one part of the teacher's signal (default
``cwtm``, ``dkpp``), the ``controls`` (default: every other variant with a teacher) and the
``label_only`` retrain (default ``ce``). The report reads these roles, never objective names.

Pairing: within a seed every variant imports the same teacher checkpoint, and students of the
same (seed, gen) share their initial weights and data order, because the engine derives those
streams from (seed, gen) only. The teacher run has no hooks (the hooks measure students).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ban_analysis.config import ConfigError, RunConfig, apply_override, build_section, config_from_dict, read_toml
from ban_analysis.layout import DEFAULT_GAIN_FRACTION_THRESHOLD, DEFAULT_MARGIN, TEACHER, StudyLayout
from ban_analysis.roles import DEFAULT_ROLES, resolve_roles  # noqa: F401  (DEFAULT_ROLES re-exported)

__all__ = ["RunSpec", "StudyConfig", "Variant", "load_study", "plan_runs", "study_from_dict"]

_VARIANT_KEYS = {"name": str, "objective": str, "params": dict, "generations": int}


@dataclass(frozen=True)
class Variant:
    """One student recipe of a study (its run folder is ``runs/seed-<s>/<name>``)."""

    name: str
    objective: str
    params: dict = field(default_factory=dict)
    generations: int = 1


@dataclass(frozen=True)
class StudyConfig:
    """What a study runs. ``base`` is a full run config (its seed and [ban] are set per run)."""

    name: str = "study"
    seeds: list[int] = field(default_factory=lambda: list(range(10)))
    objectives: list = field(default_factory=lambda: ["ce", "ban", "cwtm", "dkpp", "tmls"])
    generations: dict = field(default_factory=dict)       # objective -> K (default 1)
    objective_params: dict = field(default_factory=dict)  # objective -> hyperparameters table
    variants: list = field(default_factory=list)          # [[variants]] tables
    roles: dict = field(default_factory=dict)             # [roles]; missing keys: ban_analysis.roles.DEFAULT_ROLES
    equivalence_margin: float = DEFAULT_MARGIN   # accuracy fraction, fixed before looking (TOST)
    gain_fraction_threshold: float = DEFAULT_GAIN_FRACTION_THRESHOLD  # CI above this: "recovers most"
    report_epoch: str = "last"  # which epoch's model the results use: "last" or "best" (val acc)
    base: dict = field(default_factory=dict)

    def generations_of(self, objective: str) -> int:
        return int(self.generations.get(objective, 1))

    def variant_list(self) -> list[Variant]:
        """Every variant, ``objectives`` entries first, then ``[[variants]]``, in the order given."""
        out = []
        for entry in self.objectives:
            if isinstance(entry, str):
                out.append(Variant(entry, entry, dict(self.objective_params.get(entry, {})),
                                   self.generations_of(entry)))
            else:
                out.append(_variant(entry))
        return out + [_variant(t) for t in self.variants]

    def resolved_roles(self) -> dict[str, Any]:
        """Roles with defaults filled in, restricted to the variants this study has
        (:func:`ban_analysis.roles.resolve_roles`, the same rules the report reads study.json with)."""
        return resolve_roles(asdict(self), [v.name for v in self.variant_list()])

def _variant(table: dict) -> Variant:
    return Variant(name=table["name"], objective=table.get("objective", table["name"]),
                   params=dict(table.get("params", {})), generations=int(table.get("generations", 1)))


_STUDY_KEYS = {"name": str, "seeds": list, "objectives": list, "generations": dict, "objective_params": dict,
               "variants": list, "roles": dict, "equivalence_margin": (int, float),
               "gain_fraction_threshold": (int, float), "report_epoch": str, "base": dict}
# components: {component: [variant names]} overrides which variants carry the teacher's confidence
# ("confidence") or its non-target mass ("nontarget_mass") in the report (default: by objective)
_ROLE_KEYS = {"reference": str, "probes": list, "controls": list, "label_only": str, "components": dict}


def _check_variant_table(entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected an objective name or a table with name, objective, params, "
                          f"generations; got {entry!r}")
    for key, value in entry.items():
        if key not in _VARIANT_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}; allowed: {', '.join(_VARIANT_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, _VARIANT_KEYS[key]):
            raise ConfigError(f"{where}.{key}: expected {_VARIANT_KEYS[key].__name__}, got {value!r}")
    if "name" not in entry:
        raise ConfigError(f"{where}: a variant needs a name")


def _check_types(table: dict) -> None:
    for key, value in table.items():
        if key not in _STUDY_KEYS:
            raise ConfigError(f"unknown study key {key!r}; allowed: {', '.join(sorted(_STUDY_KEYS))}")
        if isinstance(value, bool) or not isinstance(value, _STUDY_KEYS[key]):
            raise ConfigError(f"study key {key}: wrong type {type(value).__name__}")
    for i, entry in enumerate(table.get("objectives", [])):
        if not isinstance(entry, str):
            _check_variant_table(entry, f"objectives[{i}]")
    for i, entry in enumerate(table.get("variants", [])):
        _check_variant_table(entry, f"variants[{i}]")
    for key, value in table.get("roles", {}).items():
        if key not in _ROLE_KEYS:
            raise ConfigError(f"roles: unknown key {key!r}; allowed: {', '.join(_ROLE_KEYS)}")
        if not isinstance(value, _ROLE_KEYS[key]) or (isinstance(value, list)
                                                       and not all(isinstance(v, str) for v in value)) \
                or (isinstance(value, dict) and not all(isinstance(v, list) for v in value.values())):
            raise ConfigError(f"roles.{key}: expected {'a list of names' if _ROLE_KEYS[key] is list else 'a name'}, "
                              f"got {value!r}")


def _check_variants(cfg: StudyConfig) -> None:
    from ban_analysis.losses import OBJECTIVES, get_objective

    variants = cfg.variant_list()
    names = [v.name for v in variants]
    if not variants:
        raise ConfigError("objectives/variants: a study needs at least one variant")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"variant names must be distinct; repeated: {', '.join(dupes)}")
    for v in variants:
        if v.name == TEACHER or "/" in v.name or not v.name.strip():
            raise ConfigError(f"variant name {v.name!r} is not allowed (reserved, empty or a path)")
        if v.objective not in OBJECTIVES:
            raise ConfigError(f"variant {v.name!r}: objective {v.objective!r} is not registered; "
                              f"allowed: {', '.join(sorted(OBJECTIVES))}")
        if v.generations < 1:
            raise ConfigError(f"variant {v.name!r}: generations must be >= 1, got {v.generations}")
        try:
            get_objective(v.objective, **v.params)
        except ValueError as err:
            raise ConfigError(f"variant {v.name!r}: {err}") from None
    for name in list(cfg.generations) + list(cfg.objective_params):
        if name not in OBJECTIVES:
            raise ConfigError(f"objective {name!r} is not registered; allowed: {', '.join(sorted(OBJECTIVES))}")
    for role in ("reference", "label_only"):
        if role in cfg.roles and cfg.roles[role] not in names:
            raise ConfigError(f"roles.{role}: {cfg.roles[role]!r} is not a variant; variants: {', '.join(names)}")
    for role in ("probes", "controls"):
        missing = [p for p in cfg.roles.get(role, []) if p not in names]
        if missing:
            raise ConfigError(f"roles.{role}: {missing} are not variants; variants: {', '.join(names)}")


def study_from_dict(table: dict, overrides: list[str] | None = None) -> StudyConfig:
    """Validate a study table; base-config ``overrides`` are ``--set`` strings for the base run."""
    if not isinstance(table, dict):
        raise ConfigError(f"a study config must be a table, got {type(table).__name__}")
    _check_types(table)
    cfg = StudyConfig(**copy.deepcopy(table))
    if not cfg.seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in cfg.seeds) \
            or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds: expected a non-empty list of distinct integers, got {cfg.seeds!r}")
    for name, k in cfg.generations.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"generations.{name}: expected an integer >= 1, got {k!r}")
    _check_variants(cfg)
    if not 0 < cfg.equivalence_margin < 1:
        raise ConfigError(f"equivalence_margin: {cfg.equivalence_margin} out of range; allowed: (0, 1)")
    if not 0 < cfg.gain_fraction_threshold <= 1:
        raise ConfigError(f"gain_fraction_threshold: {cfg.gain_fraction_threshold} out of range; allowed: (0, 1]")
    if cfg.report_epoch not in ("last", "best"):
        raise ConfigError(f"report_epoch: {cfg.report_epoch!r}; allowed: 'last', 'best'")
    base = copy.deepcopy(cfg.base)
    for assignment in overrides or []:
        apply_override(base, assignment)
    base.pop("seed", None)
    base_cfg = config_from_dict(base)  # validate the base once, with every key named as in a run config
    if cfg.report_epoch == "best" and not (base_cfg.train.track_best and base_cfg.data.val_size > 0):
        raise ConfigError("report_epoch = 'best' picks each generation's epoch by validation accuracy: it needs "
                          "base.train.track_best = true and base.data.val_size > 0")
    return StudyConfig(**{**asdict(cfg), "base": base})


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    return study_from_dict(read_toml(path), overrides)


@dataclass(frozen=True)
class RunSpec:
    """One run folder of the study: which seed and variant, its config and its dependencies."""

    seed: int
    objective: str  # the variant's name; TEACHER for the seed's generation-0 run
    path: Path
    config: RunConfig
    generations: int


def plan_runs(study: StudyConfig, out: Path) -> list[RunSpec]:
    """Every run of the study, teacher first within each seed (seed-major, so partial studies are usable)."""
    layout = StudyLayout(Path(out).resolve())
    specs = []
    for seed in study.seeds:
        teacher_table = {**copy.deepcopy(study.base), "seed": seed, "hooks": {}}
        teacher_table["ban"] = {**teacher_table.get("ban", {}), "generations": 0, "objective": "ce", "params": {}}
        specs.append(RunSpec(seed, TEACHER, layout.run(seed, TEACHER).path, config_from_dict(teacher_table), 0))
        for v in study.variant_list():
            table = {**copy.deepcopy(study.base), "seed": seed}
            table["teacher"] = {**table.get("teacher", {}), "checkpoint": str(layout.teacher_checkpoint(seed))}
            table["ban"] = {**table.get("ban", {}), "generations": v.generations, "objective": v.objective,
                            "params": dict(v.params)}
            # the teacher checkpoint does not exist before the teacher run: no file check here
            specs.append(RunSpec(seed, v.name, layout.run(seed, v.name).path, build_section(RunConfig, table),
                                 v.generations))
    return specs

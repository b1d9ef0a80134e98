"""Read a study folder into tidy pandas DataFrames (the folder layout is ``ban_analysis.layout``).

Analysis reads only files, never live objects, so a study trained on another machine (or copied
without its checkpoints) is analysed the same way. Nothing here trains, imports torch, or writes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ban_analysis.layout import (
    DEFAULT_GAIN_FRACTION_THRESHOLD, DEFAULT_MARGIN, HOOK_KEYS, RESULT_COLUMNS, TEACHER, StudyLayout,
)
from ban_analysis import roles as roles_mod

logger = logging.getLogger(__name__)

POINTS = 100.0  # accuracy fraction -> percentage points


@dataclass(frozen=True)
class Study:
    """A study folder, loaded.

    Attributes:
        root: the study folder.
        config: study.json as a dict ({} when missing).
        results: results.csv with RESULT_COLUMNS; ``members`` as str, ``gen`` as int.
        notes: what was missing or odd while loading, in plain words for the report.
    """

    root: Path
    config: dict
    results: pd.DataFrame
    notes: tuple[str, ...] = field(default=())

    @property
    def layout(self) -> StudyLayout:
        return StudyLayout(self.root)

    @property
    def seeds(self) -> list[int]:
        return sorted(int(s) for s in self.results["seed"].unique())

    @property
    def variants(self) -> list[str]:
        """Variant names the config lists (``objectives`` entries, then ``variants`` tables), in config order."""
        return roles_mod.variant_names(self.config)

    @property
    def objectives(self) -> list[str]:
        """Student variants present in results.csv, in the config's order when it lists them."""
        present = [o for o in self.results["objective"].unique() if o != TEACHER]
        listed = self.variants
        return [o for o in listed if o in present] + sorted(o for o in present if o not in listed)

    @property
    def variant_objectives(self) -> dict[str, str]:
        """Variant name -> its objective (a variant the config does not list: its own name)."""
        return roles_mod.variant_objectives(self.config, self.objectives)

    @property
    def declared_roles(self) -> dict[str, Any]:
        """The roles of study.json (defaults filled in), before checking which variants have results."""
        return roles_mod.declared_roles(self.config)

    @property
    def roles(self) -> dict[str, Any]:
        """{reference, probes, controls, label_only}, restricted to the variants in results.csv."""
        return roles_mod.resolve_roles(self.config, self.objectives)

    @property
    def components(self) -> dict[str, list[str]]:
        """Component of the teacher's signal -> the probes/controls that carry it (report.roles)."""
        return roles_mod.components(self.config, self.roles, self.objectives)

    @property
    def equivalence_margin(self) -> float:
        """The TOST margin as an accuracy fraction (study config; default layout.DEFAULT_MARGIN)."""
        return float(self.config.get("equivalence_margin", DEFAULT_MARGIN))

    @property
    def gain_fraction_threshold(self) -> float:
        return float(self.config.get("gain_fraction_threshold", DEFAULT_GAIN_FRACTION_THRESHOLD))

    def run_dir(self, seed: int, objective: str) -> Path:
        """The run folder of a variant (or the teacher) for one seed."""
        return self.layout.run(seed, objective).path


def load_study(study_dir: str | Path) -> Study:
    """Load study.json and results.csv from a study folder.

    Args:
        study_dir: folder written by ``ban-analysis study``.

    Returns:
        A Study. results.csv is required; study.json is optional (defaults then apply, noted).
    """
    root = Path(study_dir)
    if not root.is_dir():
        raise ValueError(f"study folder {root} does not exist; pass a folder written by `ban-analysis study`")
    layout = StudyLayout(root)
    if not layout.results.is_file():
        raise ValueError(f"{layout.results} is missing; a study folder needs results.csv "
                         "(written by `ban-analysis study`)")
    notes = []
    config: dict = {}
    if layout.config.is_file():
        config = json.loads(layout.config.read_text())
    else:
        notes.append(f"study.json is missing: the default equivalence margin ({DEFAULT_MARGIN}), gain-fraction "
                     f"threshold ({DEFAULT_GAIN_FRACTION_THRESHOLD}) and roles were used.")
    results = pd.read_csv(layout.results, dtype={"members": str})
    missing = [c for c in ("seed", "objective", "gen", "test_acc") if c not in results.columns]
    if missing:
        raise ValueError(f"{layout.results} lacks columns {missing}; expected {list(RESULT_COLUMNS)}")
    if "kind" not in results.columns:
        results["kind"] = "model"
    if "members" not in results.columns:
        results["members"] = results["gen"].astype(str)
    results["members"] = results["members"].fillna("").astype(str)
    results["seed"] = results["seed"].astype(int)
    results["gen"] = results["gen"].astype(int)
    if TEACHER not in set(results["objective"]):
        notes.append("results.csv has no teacher rows: gains over the teacher cannot be computed.")
    return Study(root=root, config=config, results=results, notes=tuple(notes))


def student_label(objective: str, gen: int, kind: str = "model", members: str = "") -> str:
    """Column label of a student in the per-seed matrix: "<variant>", "<variant> gen 2", "<variant> ens 1+2"."""
    if objective == TEACHER:
        return TEACHER
    if kind == "ensemble":
        return f"{objective} ens {members}"
    return objective if gen == 1 else f"{objective} gen {gen}"


def seed_matrix(results: pd.DataFrame, metric: str = "test_acc") -> pd.DataFrame:
    """Per-seed scores, one column per student (teacher, gen-1 students, later gens, ensembles).

    Args:
        results: results.csv rows (Study.results).
        metric: a results.csv column.

    Returns:
        (n_seeds, n_students) DataFrame indexed by seed; NaN where a run is missing. Rows of a
        variant's gen 0 (the loaded teacher repeated) are ignored: the teacher is its own column.
    """
    if metric not in results.columns:
        raise ValueError(f"metric {metric!r} is not a results.csv column; choose from {list(results.columns)}")
    rows = results[(results["objective"] == TEACHER) | (results["gen"] >= 1)]
    labels = [student_label(o, g, k, m) for o, g, k, m in
              zip(rows["objective"], rows["gen"], rows["kind"], rows["members"])]
    frame = rows.assign(label=labels)
    wide = frame.pivot_table(index="seed", columns="label", values=metric, aggfunc="mean")
    order = [TEACHER] + [c for c in dict.fromkeys(labels) if c != TEACHER]
    return wide[[c for c in order if c in wide.columns]].sort_index()


def load_hook(study: Study, hook: str, *, gens: tuple[int, ...] | None = (1,),
              objectives: list[str] | None = None, columns: list[str] | None = None) -> pd.DataFrame:
    """All Parquet files of one hook across seeds and variants, as one tidy DataFrame.

    Args:
        study: the loaded study.
        hook: hook name (a folder under gen-<k>/hooks/).
        gens: generations to read (None = all students' generations >= 1).
        objectives: variants to read (None = all in the study).
        columns: hook columns to read besides gen/epoch/step (None = all).

    Returns:
        DataFrame with seed, objective (the variant), gen, epoch, step and the hook's columns;
        empty (no columns) when the study has no such logs.
    """
    frames = []
    for objective in objectives or study.objectives:
        for seed in study.seeds:
            for gen, path in study.layout.run(seed, objective).hook_files(hook):
                if gen < 1 or (gens is not None and gen not in gens):
                    continue
                cols = None
                if columns is not None:
                    available = set(pq.read_schema(path).names)
                    cols = [c for c in (*HOOK_KEYS, *columns) if c in available]
                table = pq.read_table(path, columns=cols).to_pandas()
                frames.append(table.assign(seed=seed, objective=objective))
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, ignore_index=True)
    lead = ["seed", "objective"] + [k for k in HOOK_KEYS if k in out.columns]
    return out[lead + [c for c in out.columns if c not in lead]]


def load_test_outputs(study: Study, seed: int, objective: str, gen: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Test logits of one generation and the run's test labels.

    The teacher (objective "teacher" or gen 0) is read from runs/seed-<s>/teacher/gen-0, falling
    back to the variant run's gen-0 copy.

    Returns:
        (logits (N, C) float64, target (N,) int64), or None when a file is missing.
    """
    names = [TEACHER, objective] if gen == 0 or objective == TEACHER else [objective]
    for run in (study.layout.run(seed, name) for name in names):
        logits_path, target_path = run.logits(gen, "test"), run.targets("test")
        if logits_path.is_file() and target_path.is_file():
            logits = np.load(logits_path).astype(np.float64)  # (N, C)
            target = np.load(target_path).astype(np.int64)  # (N,)
            if logits.shape[0] != target.shape[0]:
                raise ValueError(f"{logits_path} has {logits.shape[0]} rows but {target_path} has {target.shape[0]} labels")
            return logits, target
    return None


def load_metrics(study: Study, gen: int = 1, *, columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """Every run's gen-<gen>/metrics.csv (the teacher's gen-0), one row per (seed, variant, epoch).

    Args:
        gen: the students' generation; the teacher row of each seed comes from its gen-0 run.
        columns: metrics.csv columns to keep besides epoch (missing ones are left out).

    Returns:
        seed, objective (the variant, or "teacher"), gen, epoch and ``columns``; empty when no
        metrics.csv exists.
    """
    frames = []
    for seed in study.seeds:
        for name, g in [(TEACHER, 0)] + [(o, gen) for o in study.objectives]:
            path = study.layout.run(seed, name).metrics(g)
            if not path.is_file():
                continue
            frame = pd.read_csv(path)
            keep = ["epoch"] + [c for c in columns if c in frame.columns]
            frames.append(frame[keep].assign(seed=seed, objective=name, gen=g))
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, ignore_index=True)
    lead = ["seed", "objective", "gen", "epoch"]
    return out[lead + [c for c in out.columns if c not in lead]]

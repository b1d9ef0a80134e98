"""Read a study folder (spec sections 7, 8, 10) into tidy pandas DataFrames.

Analysis reads only files, never live objects, so a study trained on another machine (or copied
without its checkpoints) is analysed the same way. Nothing here trains, imports torch, or writes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

RESULT_COLUMNS = ("seed", "objective", "gen", "kind", "members", "test_acc", "test_nll", "test_ece", "val_acc")
TEACHER = "teacher"
# Defaults of the study config (spec section 8), used when study.json omits them.
DEFAULT_MARGIN = 0.005
DEFAULT_THRESHOLD = 0.5
HOOK_KEYS = ("gen", "epoch", "step")


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
    def seeds(self) -> list[int]:
        return sorted(int(s) for s in self.results["seed"].unique())

    @property
    def objectives(self) -> list[str]:
        """Student objectives present in results.csv, in the config's order when it lists them."""
        present = [o for o in self.results["objective"].unique() if o != TEACHER]
        listed = [_objective_name(o) for o in self.config.get("objectives", [])]
        return [o for o in listed if o in present] + sorted(o for o in present if o not in listed)

    @property
    def equivalence_margin(self) -> float:
        """The TOST margin as an accuracy fraction (study config; default 0.005)."""
        return float(self.config.get("equivalence_margin", DEFAULT_MARGIN))

    @property
    def gain_fraction_threshold(self) -> float:
        return float(self.config.get("gain_fraction_threshold", DEFAULT_THRESHOLD))

    def run_dir(self, seed: int, objective: str) -> Path:
        return self.root / "runs" / f"seed-{seed}" / objective


def _objective_name(entry) -> str:
    """An objectives entry is a name, or a table with a "name" key (for objectives with params)."""
    if isinstance(entry, dict):
        return str(entry.get("name", entry.get("objective", "")))
    return str(entry)


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
    results_path = root / "results.csv"
    if not results_path.is_file():
        raise ValueError(f"{results_path} is missing; a study folder needs results.csv (spec section 8)")
    notes = []
    config: dict = {}
    if (root / "study.json").is_file():
        config = json.loads((root / "study.json").read_text())
    else:
        notes.append("study.json is missing: the default equivalence margin (0.005) and gain-fraction "
                     "threshold (0.5) were used.")
    results = pd.read_csv(results_path, dtype={"members": str})
    missing = [c for c in ("seed", "objective", "gen", "test_acc") if c not in results.columns]
    if missing:
        raise ValueError(f"{results_path} lacks columns {missing}; expected {list(RESULT_COLUMNS)}")
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
    """Column label of a student in the per-seed matrix: "ban", "ban gen 2", "ban ens 1+2"."""
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
        (n_seeds, n_students) DataFrame indexed by seed; NaN where a run is missing. Rows of an
        objective's gen 0 (the loaded teacher repeated) are ignored: the teacher is its own column.
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
    """All Parquet files of one hook across seeds and objectives, as one tidy DataFrame.

    Args:
        study: the loaded study.
        hook: hook name (a folder under gen-<k>/hooks/).
        gens: generations to read (None = all students' generations >= 1).
        objectives: objectives to read (None = all in the study).
        columns: hook columns to read besides gen/epoch/step (None = all).

    Returns:
        DataFrame with seed, objective, gen, epoch, step and the hook's columns; empty (no
        columns) when the study has no such logs.
    """
    frames = []
    for objective in objectives or study.objectives:
        for seed in study.seeds:
            run = study.run_dir(seed, objective)
            for path in sorted(run.glob(f"gen-*/hooks/{hook}/epoch-*.parquet")):
                gen = int(path.parent.parent.parent.name.split("-")[1])
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
    back to the objective run's gen-0 copy.

    Returns:
        (logits (N, C) float64, target (N,) int64), or None when a file is missing.
    """
    runs = [study.run_dir(seed, TEACHER), study.run_dir(seed, objective)] if gen == 0 or objective == TEACHER \
        else [study.run_dir(seed, objective)]
    for run in runs:
        logits_path = run / f"gen-{gen}" / "test_logits.npy"
        target_path = run / "test_targets.npy"
        if logits_path.is_file() and target_path.is_file():
            logits = np.load(logits_path).astype(np.float64)  # (N, C)
            target = np.load(target_path).astype(np.int64)  # (N,)
            if logits.shape[0] != target.shape[0]:
                raise ValueError(f"{logits_path} has {logits.shape[0]} rows but {target_path} has {target.shape[0]} labels")
            return logits, target
    return None

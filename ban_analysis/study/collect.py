"""results.csv from a study's finished run folders: one row per (seed, variant, gen or ensemble).

Which epoch's model the numbers are is the study's ``report_epoch`` (study.json): "last" (the
default) takes summary.json's plain keys, "best" its ``best_*`` keys (the best-validation epoch
of each generation; ensembles of those epochs). results.csv has the same columns either way;
the report's Methods name the epoch.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ban_analysis.engine.files import RunFolderError, atomic_write_bytes, read_json
from ban_analysis.engine.runs import RunDir
from ban_analysis.layout import RESULT_COLUMNS, TEACHER, StudyLayout

__all__ = ["collect_results"]


def collect_results(out: str | Path) -> list[dict]:
    """Write ``<out>/results.csv`` from the finished run folders (unfinished ones are skipped); returns its rows."""
    layout = StudyLayout(out)
    best = layout.config.is_file() and read_json(layout.config).get("report_epoch", "last") == "best"
    rows = []
    for seed, seed_dir in layout.seeds_on_disk():
        for run_path in sorted(p for p in seed_dir.iterdir() if p.is_dir()):
            run = RunDir(run_path)
            if not run.is_complete():
                continue
            summary = run.summary()
            variant = run_path.name
            if best:
                summary = _best_epoch_numbers(summary, run_path, skip_gen0=variant != TEACHER)
            for g in summary["generations"]:
                if variant != TEACHER and g["gen"] == 0:
                    continue  # the imported teacher is the teacher run's row
                rows.append({"seed": seed, "objective": variant, "gen": g["gen"], "kind": "model",
                             "members": str(g["gen"]), "test_acc": g["test_acc"], "test_nll": g["test_nll"],
                             "test_ece": g["test_ece"], "val_acc": g["val_acc"]})
            for e in summary["ensembles"]:
                rows.append({"seed": seed, "objective": variant, "gen": max(e["members"]), "kind": "ensemble",
                             "members": "+".join(str(m) for m in e["members"]), "test_acc": e["test_acc"],
                             "test_nll": e["test_nll"], "test_ece": e["test_ece"], "val_acc": None})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(RESULT_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(layout.results, buf.getvalue().encode())
    return rows


def _best_epoch_numbers(summary: dict, run_path: Path, skip_gen0: bool) -> dict:
    """summary.json with each row's test_acc, test_nll, test_ece (and a model's val_acc) taken from
    its best_* keys; a row without them (a run trained before train.track_best, or without it) is an error."""
    def swap(row: dict, keys: tuple[str, ...]) -> dict:
        missing = [k for k in keys if row.get(f"best_{k}") is None]
        if missing:
            raise RunFolderError(f"{run_path} has no best-epoch record (best_{missing[0]} in summary.json), but the "
                                 "study's report_epoch is 'best'; retrain that run with train.track_best = true")
        return {**row, **{k: row[f"best_{k}"] for k in keys}}

    return {**summary,
            "generations": [g if skip_gen0 and g["gen"] == 0 else swap(g, ("test_acc", "test_nll", "test_ece", "val_acc"))
                            for g in summary["generations"]],
            "ensembles": [swap(e, ("test_acc", "test_nll", "test_ece")) for e in summary["ensembles"]]}

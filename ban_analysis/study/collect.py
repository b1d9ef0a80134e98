"""results.csv from a study's finished run folders: one row per (seed, variant, gen or ensemble)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ban_analysis.engine.runs import RunDir, atomic_write_bytes
from ban_analysis.layout import RESULT_COLUMNS, TEACHER, StudyLayout

__all__ = ["collect_results"]


def collect_results(out: str | Path) -> list[dict]:
    """Write ``<out>/results.csv`` from the finished run folders (unfinished ones are skipped); returns its rows."""
    layout = StudyLayout(out)
    rows = []
    for seed, seed_dir in layout.seeds_on_disk():
        for run_path in sorted(p for p in seed_dir.iterdir() if p.is_dir()):
            run = RunDir(run_path)
            if not run.is_complete():
                continue
            summary = run.summary()
            variant = run_path.name
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

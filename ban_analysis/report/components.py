"""Which part of the teacher's signal carries the reference's gain over its teacher?

The hypothesis (``../shared/docs/RESEARCH.md`` beside this repository, sections 2, 3 and 8,
after Tang et al. 2020) splits what a teacher gives its student into three parts, each isolated
by a probe or a difference of two students:

- ``confidence``: the teacher's confidence as a per-sample weight on the label loss (CWTM, CWTC);
- ``nontarget_mass``: the non-target mass, whatever its structure (DKPP's permuted non-target
  entries, TMLS's uniform ones);
- ``structure``: the structure of the dark knowledge itself, what the reference has and a
  non-target-mass probe lacks: the per-seed difference reference - probe.

Each part is reported as a fraction of the reference's gain over the teacher, mean(part) /
mean(reference - teacher), with ``stats.gain_fraction``'s paired bootstrap CI and the wording of
FRACTION_RULES. Which variants carry which part comes from study.json (``Study.components``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ban_analysis.layout import TEACHER
from ban_analysis.report.attribution import _find, fraction_estimate
from ban_analysis.report.load import POINTS, Study
from ban_analysis.roles import COMPONENTS
from ban_analysis.report.rules import display_name, fraction_verdict

__all__ = ["STRUCTURE", "component_analysis", "seeds_needed", "seeds_needed_table"]

STRUCTURE = ("structure", "the structure of the dark knowledge itself")


def seeds_needed(alpha: float, family_size: int = 1) -> int:
    """Smallest n whose exact sign-flip test can reach Holm's first step: 2 / 2^n < alpha / m."""
    n = 1
    while 2.0 / 2.0 ** n >= alpha / family_size:
        n += 1
    return n


def seeds_needed_table(comparisons: pd.DataFrame, alpha: float) -> list[dict]:
    """Per Holm family: its size m, its smallest n, the smallest p an exact sign-flip test reaches
    with that n (2 / 2^n), and the seeds it would need (``seeds_needed``)."""
    if comparisons.empty:
        return []
    rows = []
    for family, block in comparisons.groupby("family", sort=False):
        m, n = int(len(block)), int(block["n"].min())
        needed = seeds_needed(alpha, m)
        rows.append({"family": family, "family_size": m, "n": n, "level": alpha / m,
                     "min_p_sign_flip": 2.0 / 2.0 ** n if n > 0 else 1.0, "seeds_needed": needed,
                     "enough": n >= needed})
    return rows


def _seeds_notes(needed: list[dict]) -> list[str]:
    """One note per (m, n) of the families whose exact sign-flip test cannot reach Holm's first step."""
    short: dict[tuple[int, int], list[dict]] = {}
    for f in needed:
        if not f["enough"]:
            short.setdefault((f["family_size"], f["n"]), []).append(f)
    notes = []
    for (m, n), fams in short.items():
        f = fams[0]
        which = "Family " + fams[0]["family"] if len(fams) == 1 else \
            "Families " + ", ".join(x["family"] for x in fams)
        notes.append(f"{which} (m = {m}): with n = {n} seeds the exact sign-flip test's smallest two-sided p "
                     f"is 2/2^{n} = {f['min_p_sign_flip']:.3g}, not below Holm's first-step level α/m = "
                     f"{f['level']:.3g}; it needs at least {f['seeds_needed']} seeds (smallest n with 2/2^n < α/m).")
    return notes


def _part_row(component: str, variant: str, part: pd.Series, ref_gain: pd.Series, label: str,
              ref_kind: str, threshold: float, reference: str, rng, n_boot: int) -> dict:
    row = {"component": component, "variant": variant, "label": label, "n": len(part),
           "seeds": [int(s) for s in part.index], "part_mean": float(part.mean()) if len(part) else math.nan,
           "reference_gain": float(ref_gain.mean()) if len(part) else math.nan,
           **fraction_estimate(part, ref_gain, rng, n_boot)}
    row["verdict_kind"], row["verdict"] = fraction_verdict({**row, "probe": variant}, ref_kind, threshold, reference)
    return row


def _rows(matrix: pd.DataFrame, study: Study, ref_kind: str, threshold: float, rng, n_boot: int) -> list[dict]:
    reference, members = study.roles["reference"], study.components
    objectives = study.variant_objectives
    cols = set(matrix.columns)
    if reference is None or not {TEACHER, reference} <= cols:
        return []
    rows = []
    for component in COMPONENTS:
        for v in (m for m in members[component] if m in cols):
            sub = matrix[[TEACHER, reference, v]].dropna() * POINTS
            row = _part_row(component, v, sub[v] - sub[TEACHER], sub[reference] - sub[TEACHER], display_name(v),
                            ref_kind, threshold, reference, rng, n_boot)
            rows.append({**row, "objective": objectives.get(v, v)})
    mass = [r for r in rows if r["component"] == "nontarget_mass"]
    best = max(mass, key=lambda r: r["estimate"] if np.isfinite(r["estimate"]) else -math.inf)["variant"] \
        if mass else None
    for r in mass:
        v = r["variant"]
        sub = matrix[[TEACHER, reference, v]].dropna() * POINTS
        label = f"{display_name(reference)} − {display_name(v)}"
        row = _part_row(STRUCTURE[0], v, sub[reference] - sub[v], sub[reference] - sub[TEACHER], label,
                        ref_kind, threshold, reference, rng, n_boot)
        rows.append({**row, "objective": objectives.get(v, v), "best": v == best})
    return rows


def component_analysis(matrix: pd.DataFrame, comparisons: pd.DataFrame, study: Study, ref_kind: str,
                       threshold: float, *, alpha: float, rng: np.random.Generator, n_boot: int) -> dict:
    """The reference's gain split into the teacher's confidence, non-target mass and dark-knowledge structure.

    Args:
        matrix: (seeds, students) accuracy fractions (seed_matrix).
        comparisons: attribution.compare_families output (its family B rows test reference - probe).
        ref_kind: the reference-vs-teacher verdict kind (family A); fractions are "undefined" unless
            it is "improves".
        rng: consumed in row order (confidence members, non-target members, then structure).

    Returns:
        {"reference", "members": {component: [variants]}, "rows": [...], "seeds_needed": [...],
        "notes": [...]}. A row: component ("confidence", "nontarget_mass", "structure"), variant,
        label, n, seeds, part_mean (points), reference_gain, estimate, ci_low, ci_high, verdict_kind,
        verdict, and vs_reference (the reference-vs-variant verdict of family B); structure rows
        also say whether their probe is the best non-target-mass probe (the one recovering most).
    """
    reference = study.roles["reference"]
    rows = _rows(matrix, study, ref_kind, threshold, rng, n_boot)
    for r in rows:
        hit = _find(comparisons, "B", reference, r["variant"])
        r["vs_reference"] = hit["verdict"] if hit else None
        r["vs_reference_kind"] = hit["verdict_kind"] if hit else None
        r["vs_reference_p_holm"] = hit["p_holm"] if hit else math.nan
    needed = seeds_needed_table(comparisons, alpha)
    notes = _seeds_notes(needed)
    members = study.components
    missing = [c for c in COMPONENTS if not members[c]]
    if reference is not None and missing:
        notes.append("No probe or control carries " + " or ".join(COMPONENTS[c] for c in missing)
                     + " (study.json roles.components, or a variant of a matching objective): that part of "
                       "the gain is not estimated.")
    return {"reference": reference, "members": members, "rows": rows, "seeds_needed": needed, "notes": notes}

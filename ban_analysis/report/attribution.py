"""Attribution analysis: do the probes explain the reference's gain over its teacher?

All numbers are in accuracy points (test accuracy x 100) and come from results.csv, paired by seed
(one teacher per seed; students of the same (seed, gen) share init and data order). Which variant
is the reference, which are probes, controls or the label-only retrain comes from study.json's
roles (``Study.roles``), never from objective names. The tests are ban_analysis.stats functions;
this module only chooses the comparisons, groups them into Holm families, and turns numbers into
words by the written rules of ``ban_analysis.report.rules`` (VERDICT_RULES, FRACTION_RULES,
ANSWER_RULES), which the report prints.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ban_analysis import stats
from ban_analysis.layout import TEACHER
from ban_analysis.report.load import POINTS, Study, seed_matrix
from ban_analysis.report.rules import (  # noqa: F401  (re-exported: the report's public rule tables)
    ALPHA, ANSWER_RULES, FAMILIES, FRACTION_RULES, NO_MDE, PERMUTATION_CAVEAT, VERDICT_RULES, display_name,
    fmt, fraction_verdict, verdict,
)

logger = logging.getLogger(__name__)

__all__ = ["ALPHA", "ANSWER_RULES", "Attribution", "FAMILIES", "FRACTION_RULES", "NO_MDE", "PERMUTATION_CAVEAT",
           "POWER", "VERDICT_RULES", "accuracy_table", "answer_question", "attribute", "compare_families",
           "display_name", "fmt", "fraction_estimate", "fraction_verdict", "gain_fractions", "improvement_matrix",
           "verdict"]

POWER = 0.8


def _compared(roles: dict) -> list[str]:
    """The variants family B compares with the reference: probes, controls, the label-only retrain."""
    return [*roles["probes"], *roles["controls"], *([roles["label_only"]] if roles.get("label_only") else [])]


def _compare(matrix: pd.DataFrame, a: str, b: str, margin: float, rng: np.random.Generator,
             n_boot: int) -> dict:
    pair = matrix[[a, b]].dropna() * POINTS  # (n, 2) seeds where both runs exist
    row = {"comparison": f"{display_name(a)} vs {display_name(b)}", "a": a, "b": b, "n": len(pair),
           "seeds": [int(s) for s in pair.index], "margin": margin}
    nan_fields = ("mean_diff", "sd_diff", "ci_low", "ci_high", "p_ttest", "p_wilcoxon", "p_permutation",
                  "d_z", "a12", "p_tost")
    if len(pair) < 2:
        return {**row, **{k: math.nan for k in nan_fields}, "ci_method": "",
                "mean_diff": float((pair[a] - pair[b]).mean()) if len(pair) else math.nan}
    x, y = pair[a].to_numpy(), pair[b].to_numpy()
    r = stats.paired_comparison(x, y, rng=rng, n_boot=n_boot)
    return {**row, "mean_diff": r.mean_diff, "sd_diff": r.sd_diff, "ci_low": r.ci_low, "ci_high": r.ci_high,
            "ci_method": r.ci_method, "p_ttest": r.p_ttest, "p_wilcoxon": r.p_wilcoxon,
            "p_permutation": r.p_permutation, "d_z": r.d_z, "a12": r.a12,
            "p_tost": stats.tost_paired(x, y, margin)}


def _mde(sd: float, n: int, alpha: float) -> float:
    """Minimum detectable effect (points) of the paired t-test at POWER; NaN where it cannot be computed."""
    if n < 2 or not np.isfinite(sd) or sd <= 0:
        return math.nan
    try:
        return stats.min_detectable_effect(sd, n, alpha, POWER)
    except ValueError as err:  # the noncentral-t root search can fail for very few seeds at small alpha
        logger.warning("minimum detectable effect not computable for n=%d, alpha=%.4g: %s", n, alpha, err)
        return math.nan


def _holm_column(values: pd.Series) -> pd.Series:
    """Holm over the finite p-values of a family; untestable rows stay NaN."""
    out = pd.Series(math.nan, index=values.index)
    ok = values.notna()
    if ok.any():
        out[ok] = stats.holm(values[ok].to_numpy())
    return out


def _family_pairs(matrix: pd.DataFrame, objectives: list[str], roles: dict) -> dict[str, list[tuple[str, str]]]:
    cols = set(matrix.columns)
    gen1 = [o for o in objectives if o in cols]
    reference, label_only = roles.get("reference"), roles.get("label_only")
    pairs: dict[str, list[tuple[str, str]]] = {"A": [], "B": [], "C": [], "D": []}
    if TEACHER in cols:
        pairs["A"] = [(o, TEACHER) for o in gen1]
        pairs["D"] = [(c, TEACHER) for c in matrix.columns if c != TEACHER and c not in gen1]
    if reference in cols:
        pairs["B"] = [(reference, p) for p in _compared(roles) if p in cols]
    if label_only in cols:
        pairs["C"] = [(o, label_only) for o in gen1 if o != label_only]
    return {k: v for k, v in pairs.items() if v}


def compare_families(matrix: pd.DataFrame, objectives: list[str], margin: float, *, roles: dict,
                     rng: np.random.Generator, alpha: float = ALPHA, n_boot: int = 10000) -> pd.DataFrame:
    """Every paired comparison of families A-D with Holm-adjusted p-values, power and verdicts.

    Args:
        matrix: (seeds, students) accuracies as fractions (seed_matrix).
        objectives: generation-1 variants, in report order.
        margin: equivalence margin in points.
        roles: Study.roles (family B is the reference vs probes, controls, label-only; C vs label-only).
        rng: consumed in family order, then row order (deterministic for a given seed).

    Returns:
        One row per comparison (points): family, comparison, a, b, n, seeds, mean_diff, sd_diff,
        ci_low, ci_high, ci_method, p_ttest, p_wilcoxon, p_permutation, d_z, a12, p_tost, p_holm,
        p_permutation_holm, p_tost_holm, family_size, mde, verdict_kind, verdict.
    """
    rows, cache = [], {}
    for family, pairs in _family_pairs(matrix, objectives, roles).items():
        for pair in pairs:
            # A pair in two families (reference vs label-only is in B and C) gets one set of numbers.
            if pair not in cache:
                cache[pair] = _compare(matrix, *pair, margin, rng, n_boot)
        block = pd.DataFrame([{"family": family, **cache[pair]} for pair in pairs])
        block["p_holm"] = _holm_column(block["p_ttest"])
        block["p_permutation_holm"] = _holm_column(block["p_permutation"])
        block["p_tost_holm"] = _holm_column(block["p_tost"])
        block["family_size"] = len(block)
        # Power at Holm's strictest step alpha/m: the effect a single true difference needs to be found.
        block["mde"] = [_mde(sd, n, alpha / len(block)) for sd, n in zip(block["sd_diff"], block["n"])]
        rows.append(block)
    if not rows:
        return pd.DataFrame()
    out = pd.concat(rows, ignore_index=True)
    kinds = [verdict(r, alpha) for r in out.to_dict("records")]
    out["verdict_kind"] = [k for k, _ in kinds]
    out["verdict"] = [t for _, t in kinds]
    return out


def fraction_estimate(part: pd.Series, ref_gain: pd.Series, rng: np.random.Generator, n_boot: int) -> dict:
    """mean(part) / mean(ref_gain) with stats.gain_fraction's paired bootstrap CI (NaN below 2 seeds
    or when the reference's gain does not vary)."""
    if len(part) >= 2 and np.ptp(ref_gain) > 0:
        est = stats.gain_fraction(part.to_numpy(), ref_gain.to_numpy(), rng=rng, n_boot=n_boot)
        return {"estimate": est.estimate, "ci_low": est.ci_low, "ci_high": est.ci_high}
    return {"estimate": math.nan, "ci_low": math.nan, "ci_high": math.nan}


def gain_fractions(matrix: pd.DataFrame, objectives: list[str], ref_kind: str, threshold: float, *,
                   roles: dict, rng: np.random.Generator, n_boot: int = 10000) -> pd.DataFrame:
    """Fraction of the reference's gain over the teacher that each other variant recovers.

    mean(probe - teacher) / mean(reference - teacher) over seeds where all three exist, with the
    paired bootstrap CI of stats.gain_fraction (unbounded when the reference's own gain CI contains
    0). Order: probes, controls, label-only, then any other variant. Not Holm corrected: these are
    estimates with intervals, judged by FRACTION_RULES.
    """
    cols, reference = set(matrix.columns), roles.get("reference")
    if reference is None or not {TEACHER, reference} <= cols:
        return pd.DataFrame()
    listed = _compared(roles)
    probes = [p for p in listed if p in cols] + [o for o in objectives if o in cols and o not in listed
                                                 and o != reference]
    rows = []
    for probe in probes:
        sub = matrix[[TEACHER, reference, probe]].dropna() * POINTS
        gain, ref_gain = sub[probe] - sub[TEACHER], sub[reference] - sub[TEACHER]
        row = {"probe": probe, "n": len(sub), "threshold": threshold,
               "probe_gain": float(gain.mean()) if len(sub) else math.nan,
               "reference_gain": float(ref_gain.mean()) if len(sub) else math.nan,
               **fraction_estimate(gain, ref_gain, rng, n_boot)}
        row["verdict_kind"], row["verdict"] = fraction_verdict(row, ref_kind, threshold, reference)
        rows.append(row)
    return pd.DataFrame(rows)


def _find(comparisons: pd.DataFrame, family: str, a, b) -> dict | None:
    if comparisons.empty:
        return None
    hit = comparisons[(comparisons["family"] == family) & (comparisons["a"] == a) & (comparisons["b"] == b)]
    return None if hit.empty else hit.iloc[0].to_dict()


def _probe_status(ref_kind: str, frac: dict | None, vs_ref: dict) -> str:
    """ANSWER_RULES for one probe."""
    if ref_kind != "improves":
        return "no gain to explain"
    if frac is not None and frac["verdict_kind"] == "most" and vs_ref["verdict_kind"] != "improves":
        return "explains"
    if (frac is not None and frac["verdict_kind"] == "less") or vs_ref["verdict_kind"] == "improves":
        return "does not explain"
    return "undetermined"


def _headline(ref_row: dict, per_probe: dict, declared: list[str], ref_name: str) -> str:
    names = {s: [display_name(p) for p, v in per_probe.items() if v == s] for s in set(per_probe.values())}
    if not per_probe:
        listed = ", ".join(display_name(p) for p in declared) or "none declared"
        return f"The question cannot be answered: none of the probes ({listed}) is in this study."
    if ref_row["verdict_kind"] != "improves":
        # the wording follows the reference-vs-teacher verdict: "worse" is said as such, not as "no gain"
        how = {"worse": "are worse than their teachers",
               "equivalent": "are equivalent to their teachers within the margin"}.get(
            ref_row["verdict_kind"], "show no detectable gain over their teachers")
        probes = [display_name(p) for p in per_probe]
        which = f"neither {' nor '.join(probes)}" if len(probes) > 1 else probes[0]
        verb = "can" if len(probes) > 1 else "cannot"
        return (f"There is no gain to explain: {ref_name}'s students {how} "
                f"({fmt(ref_row['mean_diff'], signed=True)} points, 95% CI [{fmt(ref_row['ci_low'], signed=True)}, "
                f"{fmt(ref_row['ci_high'], signed=True)}]), so {which} {verb} be said to explain it.")
    if set(names) == {"does not explain"} and len(names["does not explain"]) > 1:
        return f"No: neither {' nor '.join(names['does not explain'])} explains {ref_name}'s gain."
    parts = []
    for status, lead, tail in (("explains", "Yes for", f"explains most of {ref_name}'s gain"),
                               ("does not explain", "No for", f"does not explain {ref_name}'s gain"),
                               ("undetermined", "Undetermined for", "the study cannot tell")):
        if names.get(status):
            lead = lead if not parts else lead[0].lower() + lead[1:]
            parts.append(f"{lead} {' and '.join(names[status])}: {tail}")
    return "; ".join(parts) + "."


def answer_question(comparisons: pd.DataFrame, fractions: pd.DataFrame, roles: dict,
                    declared: dict | None = None) -> dict:
    """The answer to the research question by ANSWER_RULES, with its uncertainty.

    Args:
        roles: Study.roles; the question is asked of its probes.
        declared: Study.declared_roles (default ``roles``): the reference and probes study.json
            names, so those without results can be said to be missing.

    Returns:
        {"headline": str, "sentences": [str], "per_probe": {probe: status}}.
    """
    declared = declared if declared is not None else roles
    declared_probes = declared["probes"]
    reference = roles.get("reference")
    ref_name = display_name(reference or declared.get("reference"))
    ref_row = _find(comparisons, "A", reference, TEACHER) if reference else None
    if ref_row is None:
        return {"headline": f"The question cannot be answered: the study lacks {ref_name} students or teacher rows.",
                "sentences": [], "per_probe": {}}
    sentences = [f"{ref_name} vs teacher (generation 1, n = {ref_row['n']} seeds): {ref_row['verdict']}."]
    per_probe = {}
    for probe in declared_probes:
        vs_ref, vs_teacher = _find(comparisons, "B", reference, probe), _find(comparisons, "A", probe, TEACHER)
        name = display_name(probe)
        if vs_ref is None or vs_teacher is None:
            sentences.append(f"{name} is not in this study.")
            continue
        frac = fractions[fractions["probe"] == probe].iloc[0].to_dict() if not fractions.empty else None
        status = per_probe[probe] = _probe_status(ref_row["verdict_kind"], frac, vs_ref)
        parts = [f"{name} vs teacher: {vs_teacher['verdict']}", f"{ref_name} vs {name}: {vs_ref['verdict']}"]
        if frac is not None and status != "no gain to explain":
            parts.append(f"gain fraction: {frac['verdict']}")
        sentences.append(f"{name} ({status}). " + "; ".join(parts) + ".")
    headline = _headline(ref_row, per_probe, declared_probes, ref_name)
    return {"headline": headline, "sentences": sentences, "per_probe": per_probe}


def accuracy_table(matrix: pd.DataFrame, *, rng: np.random.Generator, n_boot: int = 10000) -> pd.DataFrame:
    """Per student: n seeds, mean, sd and bootstrap 95% CI of the mean accuracy (points)."""
    rows = []
    for label in matrix.columns:
        x = matrix[label].dropna().to_numpy() * POINTS
        row = {"student": label, "n": x.size, "mean": float(x.mean()) if x.size else math.nan,
               "sd": float(x.std(ddof=1)) if x.size >= 2 else math.nan, "ci_low": math.nan, "ci_high": math.nan}
        if x.size >= 2:
            _, row["ci_low"], row["ci_high"] = stats.mean_ci(x, rng=rng, n_boot=n_boot)
        rows.append(row)
    return pd.DataFrame(rows)


def improvement_matrix(matrix: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Within-seed probability that row beats column (stats.probability_of_improvement_matrix)."""
    sub = matrix[[c for c in labels if c in matrix.columns]].dropna()
    if sub.shape[0] < 2 or sub.shape[1] < 2:
        return pd.DataFrame()
    values = stats.probability_of_improvement_matrix(sub.to_numpy())
    return pd.DataFrame(values, index=sub.columns, columns=sub.columns)


@dataclass(frozen=True)
class Attribution:
    """Everything the attribution part of the report shows (points unless stated)."""

    matrix: pd.DataFrame  # (seeds, students) accuracy fractions
    accuracy: pd.DataFrame
    comparisons: pd.DataFrame
    fractions: pd.DataFrame
    answer: dict
    a12: pd.DataFrame
    margin: float  # points
    threshold: float
    alpha: float
    notes: list[str] = field(default_factory=list)
    roles: dict = field(default_factory=dict)  # Study.roles
    components: dict = field(default_factory=dict)  # ban_analysis.report.components.component_analysis


def _study_notes(study: Study, matrix: pd.DataFrame) -> list[str]:
    notes = list(study.notes)
    n_seeds = matrix.shape[0]
    if n_seeds < 3:
        notes.append(f"Only {n_seeds} seed(s): intervals are very wide and exact rank tests cannot reach "
                     "p < 0.05 below 6 seeds; treat every verdict as provisional.")
    declared = study.declared_roles
    for name in dict.fromkeys((declared["reference"], *declared["probes"], declared["label_only"])):
        if name and name not in matrix.columns:
            notes.append(f"Objective '{name}' is not in this study; comparisons involving it are left out.")
    incomplete = [c for c in matrix.columns if matrix[c].isna().any()]
    if incomplete:
        notes.append("Some runs are missing (" + ", ".join(incomplete) + "); each comparison uses the seeds "
                     "where both sides exist and states its n.")
    return notes


def attribute(study: Study, *, metric: str = "test_acc", alpha: float = ALPHA, seed: int = 0,
              n_boot: int = 10000) -> Attribution:
    """Run the whole attribution analysis on a loaded study.

    Args:
        study: from load_study.
        metric: results.csv accuracy column (fractions), shown in points.
        alpha: family-wise level for Holm and TOST.
        seed: seeds the one numpy Generator every bootstrap draws from, in a fixed order.
    """
    from ban_analysis.report.components import component_analysis

    rng = np.random.default_rng(seed)
    matrix = seed_matrix(study.results, metric)
    objectives = [o for o in study.objectives if o in matrix.columns]
    roles = study.roles
    margin = study.equivalence_margin * POINTS
    threshold = study.gain_fraction_threshold
    notes = _study_notes(study, matrix)
    comparisons = compare_families(matrix, objectives, margin, roles=roles, rng=rng, alpha=alpha, n_boot=n_boot)
    ref_row = _find(comparisons, "A", roles.get("reference"), TEACHER)
    ref_kind = ref_row["verdict_kind"] if ref_row is not None else "untestable"
    fractions = gain_fractions(matrix, objectives, ref_kind, threshold, roles=roles, rng=rng, n_boot=n_boot)
    accuracy = accuracy_table(matrix, rng=rng, n_boot=n_boot)
    a12 = improvement_matrix(matrix, [TEACHER, *objectives])
    # drawn last, so every number above is what it was before components existed
    components = component_analysis(matrix, comparisons, study, ref_kind, threshold, alpha=alpha, rng=rng,
                                    n_boot=n_boot)
    notes += components["notes"]
    answer = answer_question(comparisons, fractions, roles, study.declared_roles)
    return Attribution(matrix=matrix, accuracy=accuracy, comparisons=comparisons, fractions=fractions,
                       answer=answer, a12=a12, margin=margin, threshold=threshold, alpha=alpha, notes=notes,
                       roles=roles, components=components)

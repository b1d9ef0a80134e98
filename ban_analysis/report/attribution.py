"""Attribution analysis: do CWTM weighting or DKPP permutation explain the students' gains?

All numbers are in accuracy points (test accuracy x 100) and come from results.csv, paired by seed
(one teacher per seed; students of the same (seed, gen) share init and data order). The tests are
ban_analysis.stats functions; this module only chooses the comparisons, groups them into Holm
families, and turns numbers into words by the written rules in VERDICT_RULES, FRACTION_RULES and
ANSWER_RULES (the report prints those tables, so a reader can check every verdict by hand).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ban_analysis import stats
from ban_analysis.report.load import TEACHER, Study, seed_matrix

logger = logging.getLogger(__name__)

POINTS = 100.0  # accuracy fraction -> percentage points
ALPHA = 0.05
POWER = 0.8
REFERENCE = "ban"
LABEL_ONLY = "ce"
PROBES = ("cwtm", "dkpp", "tmls", "ce")  # compared with BAN (family B), in this order
QUESTION_PROBES = ("cwtm", "dkpp")  # the two the research question names

FAMILIES = {
    "A": "each student (generation 1) vs its own teacher",
    "B": "BAN vs each probe and control present (CWTM, DKPP, TMLS, label-only retrain CE)",
    "C": "each student (generation 1) vs the label-only retrain (CE)",
    "D": "later generations and ensembles vs the teacher",
}

# kind, rule (checked in this order; the first that holds decides), wording.
VERDICT_RULES = (
    ("untestable", "fewer than 2 paired seeds, or no variation at all", "not testable (n = {n})"),
    ("improves", "Holm-adjusted t-test p < alpha AND bootstrap CI excludes 0 AND mean difference > 0",
     "{a} improves on {b} by {diff} points (95% CI [{lo}, {hi}])"),
    ("worse", "Holm-adjusted t-test p < alpha AND bootstrap CI excludes 0 AND mean difference < 0",
     "{a} is worse than {b} by {absdiff} points (95% CI [{lo}, {hi}])"),
    ("equivalent", "Holm-adjusted TOST p < alpha (margin fixed in study.json before the runs)",
     "{a} and {b} are equivalent within ±{margin} points (difference {diff}, 95% CI [{lo}, {hi}])"),
    ("inconclusive", "otherwise (if the MDE cannot be computed the last clause reads 'the detectable effect "
     "could not be computed')",
     "inconclusive: difference {diff} points (95% CI [{lo}, {hi}]); the study could detect ≥ {mde} points"),
)
NO_MDE = "the detectable effect could not be computed"
# Appended to "improves"/"worse" when the assumption-free test does not agree.
PERMUTATION_CAVEAT = " (not confirmed by the sign-flip permutation test, Holm p = {p})"

FRACTION_RULES = (
    ("undefined", "BAN vs teacher (family A) is not 'improves'",
     "BAN itself shows no detectable gain over its teacher, so the fraction is undefined"),
    ("most", "CI low of the fraction > threshold",
     "{probe} recovers most of BAN's gain ({f}, 95% CI [{lo}, {hi}], above the threshold {t})"),
    ("less", "CI high of the fraction < threshold",
     "{probe} recovers less than {t} of BAN's gain ({f}, 95% CI [{lo}, {hi}])"),
    ("inconclusive", "otherwise",
     "inconclusive: {probe} recovers {f} of BAN's gain (95% CI [{lo}, {hi}] includes the threshold {t})"),
)

ANSWER_RULES = (
    ("no gain to explain", "BAN vs teacher (family A) is not 'improves'"),
    ("explains", "fraction verdict 'most' AND BAN vs probe (family B) is not 'improves'"),
    ("does not explain", "fraction verdict 'less' OR BAN vs probe (family B) is 'improves'"),
    ("undetermined", "otherwise"),
)


def _fmt(x: float, digits: int = 2, signed: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "n/a" if x is None or math.isnan(x) else ("∞" if x > 0 else "-∞")
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _pct(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.0%}"


def display_name(label: str) -> str:
    """"ban gen 2" -> "BAN gen 2"; the teacher keeps its lower-case name."""
    head, _, rest = label.partition(" ")
    return label if head == TEACHER else (head.upper() + (" " + rest if rest else ""))


def verdict(row: dict, alpha: float = ALPHA) -> tuple[str, str]:
    """Verdict (kind, words) of one comparison row by VERDICT_RULES.

    Args:
        row: a comparisons-table row with a, b, n, mean_diff, ci_low, ci_high, p_holm, p_tost_holm,
            p_permutation_holm, mde, margin (points).
    """
    fill = {"a": display_name(row["a"]), "b": display_name(row["b"]), "n": row["n"], "diff": _fmt(row["mean_diff"], signed=True),
            "absdiff": _fmt(abs(row["mean_diff"])), "lo": _fmt(row["ci_low"], signed=True),
            "hi": _fmt(row["ci_high"], signed=True), "margin": _fmt(row["margin"]), "mde": _fmt(row["mde"])}
    words = {kind: text for kind, _, text in VERDICT_RULES}
    if row["n"] < 2 or not np.isfinite(row["p_holm"]):
        return "untestable", words["untestable"].format(**fill)
    excludes_zero = row["ci_low"] > 0 or row["ci_high"] < 0
    if row["p_holm"] < alpha and excludes_zero and row["mean_diff"] != 0:
        kind = "improves" if row["mean_diff"] > 0 else "worse"
        text = words[kind].format(**fill)
        if not row["p_permutation_holm"] < alpha:
            text += PERMUTATION_CAVEAT.format(p=_fmt(row["p_permutation_holm"], 3))
        return kind, text
    if np.isfinite(row["p_tost_holm"]) and row["p_tost_holm"] < alpha:
        return "equivalent", words["equivalent"].format(**fill)
    text = words["inconclusive"].format(**fill)
    if not np.isfinite(row["mde"]):  # power could not be computed (too few seeds): say so, quote no number
        text = text.replace(f"the study could detect ≥ {fill['mde']} points", NO_MDE)
    return "inconclusive", text


def fraction_verdict(row: dict, ban_kind: str, threshold: float) -> tuple[str, str]:
    """Verdict (kind, words) of one gain fraction by FRACTION_RULES."""
    words = {kind: text for kind, _, text in FRACTION_RULES}
    fill = {"probe": row["probe"].upper(), "f": _pct(row["estimate"]), "lo": _pct(row["ci_low"]),
            "hi": _pct(row["ci_high"]), "t": _pct(threshold)}
    if ban_kind != "improves":
        return "undefined", words["undefined"]
    if row["ci_low"] > threshold:
        kind = "most"
        text = words["most"] if threshold >= 0.5 else words["most"].replace("most", "more than {t}", 1)
        return kind, text.format(**fill)
    if row["ci_high"] < threshold:
        return "less", words["less"].format(**fill)
    return "inconclusive", words["inconclusive"].format(**fill)


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


def _family_pairs(matrix: pd.DataFrame, objectives: list[str]) -> dict[str, list[tuple[str, str]]]:
    cols = set(matrix.columns)
    gen1 = [o for o in objectives if o in cols]
    pairs: dict[str, list[tuple[str, str]]] = {"A": [], "B": [], "C": [], "D": []}
    if TEACHER in cols:
        pairs["A"] = [(o, TEACHER) for o in gen1]
        pairs["D"] = [(c, TEACHER) for c in matrix.columns if c != TEACHER and c not in gen1]
    if REFERENCE in cols:
        pairs["B"] = [(REFERENCE, p) for p in PROBES if p in cols]
    if LABEL_ONLY in cols:
        pairs["C"] = [(o, LABEL_ONLY) for o in gen1 if o != LABEL_ONLY]
    return {k: v for k, v in pairs.items() if v}


def compare_families(matrix: pd.DataFrame, objectives: list[str], margin: float, *,
                     rng: np.random.Generator, alpha: float = ALPHA, n_boot: int = 10000) -> pd.DataFrame:
    """Every paired comparison of families A-D with Holm-adjusted p-values, power and verdicts.

    Args:
        matrix: (seeds, students) accuracies as fractions (seed_matrix).
        objectives: generation-1 objectives, in report order.
        margin: equivalence margin in points.
        rng: consumed in family order, then row order (deterministic for a given seed).

    Returns:
        One row per comparison (points): family, comparison, a, b, n, seeds, mean_diff, sd_diff,
        ci_low, ci_high, ci_method, p_ttest, p_wilcoxon, p_permutation, d_z, a12, p_tost, p_holm,
        p_permutation_holm, p_tost_holm, family_size, mde, verdict_kind, verdict.
    """
    rows, cache = [], {}
    for family, pairs in _family_pairs(matrix, objectives).items():
        for pair in pairs:
            # A pair in two families (BAN vs CE is in B and C) gets one set of numbers; only Holm differs.
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


def gain_fractions(matrix: pd.DataFrame, objectives: list[str], ban_kind: str, threshold: float, *,
                   rng: np.random.Generator, n_boot: int = 10000) -> pd.DataFrame:
    """Fraction of BAN's gain over the teacher that each other objective recovers.

    mean(probe - teacher) / mean(ban - teacher) over seeds where all three exist, with the paired
    bootstrap CI of stats.gain_fraction (unbounded when BAN's own gain CI contains 0). Not Holm
    corrected: these are estimates with intervals, judged by FRACTION_RULES.
    """
    cols = set(matrix.columns)
    if not {TEACHER, REFERENCE} <= cols:
        return pd.DataFrame()
    probes = [p for p in PROBES if p in cols] + [o for o in objectives if o in cols and o not in PROBES
                                                 and o != REFERENCE]
    rows = []
    for probe in probes:
        sub = matrix[[TEACHER, REFERENCE, probe]].dropna() * POINTS
        row = {"probe": probe, "n": len(sub), "threshold": threshold,
               "probe_gain": float((sub[probe] - sub[TEACHER]).mean()) if len(sub) else math.nan,
               "ban_gain": float((sub[REFERENCE] - sub[TEACHER]).mean()) if len(sub) else math.nan}
        if len(sub) >= 2 and np.ptp(sub[REFERENCE] - sub[TEACHER]) > 0:
            est = stats.gain_fraction((sub[probe] - sub[TEACHER]).to_numpy(),
                                      (sub[REFERENCE] - sub[TEACHER]).to_numpy(), rng=rng, n_boot=n_boot)
            row.update(estimate=est.estimate, ci_low=est.ci_low, ci_high=est.ci_high)
        else:
            row.update(estimate=math.nan, ci_low=math.nan, ci_high=math.nan)
        row["verdict_kind"], row["verdict"] = fraction_verdict(row, ban_kind, threshold)
        rows.append(row)
    return pd.DataFrame(rows)


def answer_question(comparisons: pd.DataFrame, fractions: pd.DataFrame) -> dict:
    """The answer to the research question by ANSWER_RULES, with its uncertainty.

    Returns:
        {"headline": str, "sentences": [str], "per_probe": {probe: status}}.
    """
    def find(family, a, b):
        if comparisons.empty:
            return None
        hit = comparisons[(comparisons["family"] == family) & (comparisons["a"] == a) & (comparisons["b"] == b)]
        return None if hit.empty else hit.iloc[0].to_dict()

    ban = find("A", REFERENCE, TEACHER)
    if ban is None:
        return {"headline": "The question cannot be answered: the study lacks BAN students or teacher rows.",
                "sentences": [], "per_probe": {}}
    ban_text = f"BAN vs teacher (generation 1, n = {ban['n']} seeds): {ban['verdict']}."
    sentences, per_probe = [ban_text], {}
    for probe in QUESTION_PROBES:
        vs_ban = find("B", REFERENCE, probe)
        vs_teacher = find("A", probe, TEACHER)
        if vs_ban is None or vs_teacher is None:
            sentences.append(f"{probe.upper()} is not in this study.")
            continue
        frac = fractions[fractions["probe"] == probe].iloc[0].to_dict() if not fractions.empty else None
        if ban["verdict_kind"] != "improves":
            status = "no gain to explain"
        elif frac is not None and frac["verdict_kind"] == "most" and vs_ban["verdict_kind"] != "improves":
            status = "explains"
        elif (frac is not None and frac["verdict_kind"] == "less") or vs_ban["verdict_kind"] == "improves":
            status = "does not explain"
        else:
            status = "undetermined"
        per_probe[probe] = status
        parts = [f"{probe.upper()} vs teacher: {vs_teacher['verdict']}", f"BAN vs {probe.upper()}: {vs_ban['verdict']}"]
        if frac is not None and status != "no gain to explain":
            parts.append(f"gain fraction: {frac['verdict']}")
        sentences.append(f"{probe.upper()} ({status}). " + "; ".join(parts) + ".")
    names = {s: [p.upper() for p, v in per_probe.items() if v == s] for s in set(per_probe.values())}
    if not per_probe:
        headline = "The question cannot be answered: neither CWTM nor DKPP is in this study."
    elif ban["verdict_kind"] != "improves":
        # the wording follows the BAN-vs-teacher verdict: "worse" is said as such, not as "no gain"
        how = {"worse": "are worse than their teachers",
               "equivalent": "are equivalent to their teachers within the margin"}.get(
            ban["verdict_kind"], "show no detectable gain over their teachers")
        headline = (f"There is no gain to explain: BAN's students {how} "
                    f"({_fmt(ban['mean_diff'], signed=True)} points, 95% CI [{_fmt(ban['ci_low'], signed=True)}, "
                    f"{_fmt(ban['ci_high'], signed=True)}]), so neither CWTM weighting nor DKPP permutation "
                    "can be said to explain it.")
    elif set(names) == {"does not explain"} and len(names["does not explain"]) > 1:
        headline = f"No: neither {' nor '.join(names['does not explain'])} explains BAN's gain."
    else:
        parts = []
        for status, lead, tail in (("explains", "Yes for", "explains most of BAN's gain"),
                                   ("does not explain", "No for", "does not explain BAN's gain"),
                                   ("undetermined", "Undetermined for", "the study cannot tell")):
            if names.get(status):
                lead = lead if not parts else lead[0].lower() + lead[1:]
                parts.append(f"{lead} {' and '.join(names[status])}: {tail}")
        headline = "; ".join(parts) + "."
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


def attribute(study: Study, *, metric: str = "test_acc", alpha: float = ALPHA, seed: int = 0,
              n_boot: int = 10000) -> Attribution:
    """Run the whole attribution analysis on a loaded study.

    Args:
        study: from load_study.
        metric: results.csv accuracy column (fractions), shown in points.
        alpha: family-wise level for Holm and TOST.
        seed: seeds the one numpy Generator every bootstrap draws from, in a fixed order.
    """
    rng = np.random.default_rng(seed)
    matrix = seed_matrix(study.results, metric)
    objectives = [o for o in study.objectives if o in matrix.columns]
    margin = study.equivalence_margin * POINTS
    threshold = study.gain_fraction_threshold
    notes = list(study.notes)
    n_seeds = matrix.shape[0]
    if n_seeds < 3:
        notes.append(f"Only {n_seeds} seed(s): intervals are very wide and exact rank tests cannot reach "
                     "p < 0.05 below 6 seeds; treat every verdict as provisional.")
    for name in (REFERENCE, *QUESTION_PROBES, LABEL_ONLY):
        if name not in matrix.columns:
            notes.append(f"Objective '{name}' is not in this study; comparisons involving it are left out.")
    incomplete = [c for c in matrix.columns if matrix[c].isna().any()]
    if incomplete:
        notes.append("Some runs are missing (" + ", ".join(incomplete) + "); each comparison uses the seeds "
                     "where both sides exist and states its n.")
    comparisons = compare_families(matrix, objectives, margin, rng=rng, alpha=alpha, n_boot=n_boot)
    ban_row = comparisons[(comparisons["family"] == "A") & (comparisons["a"] == REFERENCE)] \
        if not comparisons.empty else pd.DataFrame()
    ban_kind = ban_row["verdict_kind"].iloc[0] if not ban_row.empty else "untestable"
    fractions = gain_fractions(matrix, objectives, ban_kind, threshold, rng=rng, n_boot=n_boot)
    accuracy = accuracy_table(matrix, rng=rng, n_boot=n_boot)
    a12 = improvement_matrix(matrix, [TEACHER, *objectives])
    return Attribution(matrix=matrix, accuracy=accuracy, comparisons=comparisons, fractions=fractions,
                       answer=answer_question(comparisons, fractions), a12=a12, margin=margin,
                       threshold=threshold, alpha=alpha, notes=notes)

"""The written rules that turn numbers into words: verdicts, gain fractions, the answer per probe.

The report prints these tables, so a reader can check every verdict by hand. Names in the
wording are the study's own variant names (``display_name``); the rules speak of roles (the
reference, a probe), which ``study.json``'s ``[roles]`` table assigns (``ban_analysis.report.roles``).
"""

from __future__ import annotations

import math

import numpy as np

from ban_analysis.layout import TEACHER

ALPHA = 0.05

FAMILIES = {
    "A": "each student (generation 1) vs its own teacher",
    "B": "the reference vs each probe, control and the label-only retrain present",
    "C": "each student (generation 1) vs the label-only retrain",
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
    ("undefined", "the reference vs teacher (family A) is not 'improves'",
     "{ref} itself shows no detectable gain over its teacher, so the fraction is undefined"),
    ("most", "CI low of the fraction > threshold",
     "{probe} recovers most of {ref}'s gain ({f}, 95% CI [{lo}, {hi}], above the threshold {t})"),
    ("less", "CI high of the fraction < threshold",
     "{probe} recovers less than {t} of {ref}'s gain ({f}, 95% CI [{lo}, {hi}])"),
    ("inconclusive", "otherwise",
     "inconclusive: {probe} recovers {f} of {ref}'s gain (95% CI [{lo}, {hi}] includes the threshold {t})"),
)

ANSWER_RULES = (
    ("no gain to explain", "the reference vs teacher (family A) is not 'improves'"),
    ("explains", "fraction verdict 'most' AND the reference vs probe (family B) is not 'improves'"),
    ("does not explain", "fraction verdict 'less' OR the reference vs probe (family B) is 'improves'"),
    ("undetermined", "otherwise"),
)


def fmt(x: float, digits: int = 2, signed: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "n/a" if x is None or math.isnan(x) else ("∞" if x > 0 else "-∞")
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def pct(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.0%}"


def display_name(label: str | None) -> str:
    """"ban gen 2" -> "BAN gen 2"; the teacher keeps its lower-case name; None -> "the reference"."""
    if not label:
        return "the reference"
    head, _, rest = label.partition(" ")
    return label if head == TEACHER else (head.upper() + (" " + rest if rest else ""))


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def verdict(row: dict, alpha: float = ALPHA) -> tuple[str, str]:
    """Verdict (kind, words) of one comparison row by VERDICT_RULES.

    Args:
        row: a comparisons-table row with a, b, n, mean_diff, ci_low, ci_high, p_holm, p_tost_holm,
            p_permutation_holm, mde, margin (points).
    """
    fill = {"a": display_name(row["a"]), "b": display_name(row["b"]), "n": row["n"],
            "diff": fmt(row["mean_diff"], signed=True), "absdiff": fmt(abs(row["mean_diff"])),
            "lo": fmt(row["ci_low"], signed=True), "hi": fmt(row["ci_high"], signed=True),
            "margin": fmt(row["margin"]), "mde": fmt(row["mde"])}
    words = {kind: text for kind, _, text in VERDICT_RULES}
    if row["n"] < 2 or not np.isfinite(row["p_holm"]):
        return "untestable", words["untestable"].format(**fill)
    excludes_zero = row["ci_low"] > 0 or row["ci_high"] < 0
    if row["p_holm"] < alpha and excludes_zero and row["mean_diff"] != 0:
        kind = "improves" if row["mean_diff"] > 0 else "worse"
        text = words[kind].format(**fill)
        if not row["p_permutation_holm"] < alpha:
            text += PERMUTATION_CAVEAT.format(p=fmt(row["p_permutation_holm"], 3))
        return kind, text
    if np.isfinite(row["p_tost_holm"]) and row["p_tost_holm"] < alpha:
        return "equivalent", words["equivalent"].format(**fill)
    text = words["inconclusive"].format(**fill)
    if not np.isfinite(row["mde"]):  # power could not be computed (too few seeds): say so, quote no number
        text = text.replace(f"the study could detect ≥ {fill['mde']} points", NO_MDE)
    return "inconclusive", text


def fraction_verdict(row: dict, ref_kind: str, threshold: float, reference: str | None = None) -> tuple[str, str]:
    """Verdict (kind, words) of one gain fraction by FRACTION_RULES.

    Args:
        row: probe (a variant name), estimate, ci_low, ci_high; an optional ``label`` replaces the
            probe's name in the words.
        ref_kind: the verdict kind of the reference vs its teacher (family A).
        reference: the reference's variant name (None: "the reference").
    """
    words = {kind: text for kind, _, text in FRACTION_RULES}
    fill = {"probe": row.get("label") or display_name(row["probe"]), "f": pct(row["estimate"]),
            "lo": pct(row["ci_low"]), "hi": pct(row["ci_high"]), "t": pct(threshold),
            "ref": display_name(reference)}
    if ref_kind != "improves":
        return "undefined", _capital(words["undefined"].format(**fill))
    if row["ci_low"] > threshold:
        text = words["most"] if threshold >= 0.5 else words["most"].replace("most", "more than {t}", 1)
        return "most", text.format(**fill)
    if row["ci_high"] < threshold:
        return "less", words["less"].format(**fill)
    return "inconclusive", words["inconclusive"].format(**fill)

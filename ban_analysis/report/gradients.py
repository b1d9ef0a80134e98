"""What the hook logs and test logits say about how each objective teaches.

- update_share: the dark term's share of the update over training, per objective (seed bands).
- fixes: which test samples students fix (teacher wrong -> student right) or break, against the
  teacher's confidence and non-target entropy, computed from the teacher's test logits.
- param_split: per-sample cosine between the target and dark terms' parameter gradients by epoch.
- logit_split: teacher confidence vs per-sample term sizes (for the hexbin figure).
- heldout_attribution: the first-order change of a held-out loss each step's update causes, split
  into the target and dark terms' shares (TracIn-style; ``../shared/docs/RESEARCH.md`` beside
  this repository, section 8), summed over training per seed and variant.

Every function returns a tidy DataFrame (empty when the study has no such logs) so the report
can say "not logged" instead of failing.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from ban_analysis.layout import TEACHER
from ban_analysis.report.load import Study, load_hook, load_test_outputs

logger = logging.getLogger(__name__)

OUTCOMES = ("fixed", "broken", "kept right", "kept wrong")


def _seed_band(frame: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """Mean over seeds with a t-interval (95%) across seeds; NaN interval below 2 seeds."""
    import scipy.stats

    g = frame.groupby(keys)[value]
    out = g.agg(mean="mean", sd="std", n="count").reset_index()
    half = [scipy.stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) if n >= 2 else math.nan
            for sd, n in zip(out["sd"], out["n"])]
    out["ci_low"] = out["mean"] - np.asarray(half)
    out["ci_high"] = out["mean"] + np.asarray(half)
    return out


def update_share_by_epoch(study: Study, gen: int = 1) -> pd.DataFrame:
    """Per (objective, seed, epoch): mean share_target and share_dark of the update over the epoch's steps.

    Uses the whole-network columns of the update_share hook (those without a layer-group prefix).
    """
    logs = load_hook(study, "update_share", gens=(gen,), columns=["share_target", "share_dark"])
    if logs.empty or "share_dark" not in logs.columns:
        return pd.DataFrame()
    return logs.groupby(["objective", "seed", "epoch"], as_index=False)[["share_target", "share_dark"]].mean()


def update_share_summary(share: pd.DataFrame) -> pd.DataFrame:
    """Per objective: the dark share in the first and last logged epoch, mean over seeds with a 95% t-CI."""
    if share.empty:
        return pd.DataFrame()
    rows = []
    for objective, frame in share.groupby("objective", sort=False):
        first, last = frame["epoch"].min(), frame["epoch"].max()
        for which, epoch in (("first", first), ("last", last)):
            band = _seed_band(frame[frame["epoch"] == epoch], ["epoch"], "share_dark").iloc[0]
            rows.append({"objective": objective, "epoch": int(epoch), "which": which, "n": int(band["n"]),
                         "share_dark": band["mean"], "ci_low": band["ci_low"], "ci_high": band["ci_high"]})
    return pd.DataFrame(rows)


def seed_band(frame: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """Public name of the across-seed t-interval used by every hook summary (mean, sd, n, ci_low, ci_high)."""
    return _seed_band(frame, keys, value)


def teacher_test_features(logits: np.ndarray, target: np.ndarray) -> pd.DataFrame:
    """Teacher confidence (max softmax) and non-target entropy per test sample.

    Args:
        logits: (N, C) teacher test logits.
        target: (N,) labels.

    Returns:
        (N,) rows: teacher_correct, teacher_confidence, teacher_nontarget_entropy (nats; entropy of
        the teacher's softmax over the C-1 non-label classes, renormalised, as in decompose.py).
    """
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)  # (N, C)
    rest = probs.copy()
    rest[np.arange(target.size), target] = 0.0
    rest /= np.clip(rest.sum(axis=1, keepdims=True), 1e-300, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.sum(np.where(rest > 0, rest * np.log(rest), 0.0), axis=1)
    return pd.DataFrame({"teacher_correct": probs.argmax(axis=1) == target,
                         "teacher_confidence": probs.max(axis=1), "teacher_nontarget_entropy": entropy})


def fixes(study: Study, gen: int = 1) -> pd.DataFrame:
    """Per (seed, objective, test sample): teacher vs student correctness and the teacher's features.

    Returns:
        Columns seed, objective, sample, teacher_correct, student_correct, teacher_confidence,
        teacher_nontarget_entropy, outcome (one of OUTCOMES). Empty when no test logits are stored.
    """
    frames = []
    for seed in study.seeds:
        teacher = load_test_outputs(study, seed, TEACHER, 0)
        if teacher is None:
            continue
        feats = teacher_test_features(*teacher)
        for objective in study.objectives:
            student = load_test_outputs(study, seed, objective, gen)
            if student is None:
                continue
            logits, target = student
            if not np.array_equal(target, teacher[1]):
                raise ValueError(f"seed {seed}: {objective} test labels differ from the teacher's; runs are not paired")
            student_correct = logits.argmax(axis=1) == target
            tc = feats["teacher_correct"].to_numpy()
            outcome = np.select([~tc & student_correct, tc & ~student_correct, tc], list(OUTCOMES[:3]), OUTCOMES[3])
            frames.append(feats.assign(seed=seed, objective=objective, sample=np.arange(target.size),
                                       student_correct=student_correct, outcome=outcome))
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, ignore_index=True)
    return out[["seed", "objective", "sample", "teacher_correct", "student_correct", "teacher_confidence",
                "teacher_nontarget_entropy", "outcome"]]


def fixes_summary(fix: pd.DataFrame) -> pd.DataFrame:
    """Per objective, means over seeds: samples fixed and broken, the fix rate among teacher mistakes,
    and the teacher's mean confidence / non-target entropy on the mistakes students fixed vs kept.

    Descriptive (no tests): net fixes (fixed - broken) equal the student's accuracy gain x N.
    """
    if fix.empty:
        return pd.DataFrame()
    rows = []
    for (objective, seed), f in fix.groupby(["objective", "seed"], sort=False):
        wrong = f[~f["teacher_correct"]]
        fixed = wrong[wrong["outcome"] == "fixed"]
        kept = wrong[wrong["outcome"] == "kept wrong"]
        rows.append({"objective": objective, "seed": seed, "n_test": len(f),
                     "fixed": int((f["outcome"] == "fixed").sum()), "broken": int((f["outcome"] == "broken").sum()),
                     "fix_rate": len(fixed) / max(len(wrong), 1),
                     "conf_fixed": fixed["teacher_confidence"].mean(), "conf_kept_wrong": kept["teacher_confidence"].mean(),
                     "entropy_fixed": fixed["teacher_nontarget_entropy"].mean(),
                     "entropy_kept_wrong": kept["teacher_nontarget_entropy"].mean()})
    per_seed = pd.DataFrame(rows)
    cols = ["fixed", "broken", "fix_rate", "conf_fixed", "conf_kept_wrong", "entropy_fixed", "entropy_kept_wrong"]
    out = per_seed.groupby("objective", sort=False)[cols].mean().reset_index()
    out.insert(1, "n_seeds", per_seed.groupby("objective", sort=False)["seed"].nunique().to_numpy())
    out.insert(2, "n_test", per_seed.groupby("objective", sort=False)["n_test"].first().to_numpy())
    return out


def fix_rate_by_bin(fix: pd.DataFrame, column: str = "teacher_confidence", n_bins: int = 5) -> pd.DataFrame:
    """Fix rate among the teacher's mistakes per quantile bin of ``column``, per (objective, seed).

    Bins are quantiles of ``column`` over all teacher mistakes of the study, so every objective is
    binned identically. Returns objective, seed, bin, bin_mid, fix_rate.
    """
    if fix.empty:
        return pd.DataFrame()
    if column not in fix.columns:
        raise ValueError(f"column {column!r} is not in the fixes table; use teacher_confidence or teacher_nontarget_entropy")
    wrong = fix[~fix["teacher_correct"]].copy()
    if wrong.empty:
        return pd.DataFrame()
    edges = np.unique(np.quantile(wrong[column], np.linspace(0, 1, n_bins + 1)))
    if edges.size < 2:
        return pd.DataFrame()
    wrong["bin"] = np.clip(np.searchsorted(edges, wrong[column], side="right") - 1, 0, edges.size - 2)
    wrong["is_fixed"] = wrong["outcome"] == "fixed"
    out = wrong.groupby(["objective", "seed", "bin"], as_index=False)["is_fixed"].mean()
    out = out.rename(columns={"is_fixed": "fix_rate"})
    out["bin_mid"] = (edges[out["bin"]] + edges[out["bin"] + 1]) / 2
    return out


def param_cos_by_epoch(study: Study, gen: int = 1) -> pd.DataFrame:
    """Per (objective, seed, epoch): mean per-sample cosine between the terms' parameter gradients."""
    logs = load_hook(study, "param_split", gens=(gen,), columns=["param_cos"])
    if logs.empty or "param_cos" not in logs.columns:
        return pd.DataFrame()
    return logs.groupby(["objective", "seed", "epoch"], as_index=False)["param_cos"].mean()


def param_cos_summary(cos: pd.DataFrame) -> pd.DataFrame:
    """Per objective and epoch: mean param_cos over seeds with a 95% t-CI across seeds."""
    if cos.empty:
        return pd.DataFrame()
    return _seed_band(cos, ["objective", "epoch"], "param_cos")


def term_sizes(study: Study, gen: int = 1, *, max_rows: int = 20000,
               rng: np.random.Generator | None = None) -> pd.DataFrame:
    """Teacher confidence vs per-sample term sizes from logit_split (rows with a teacher only).

    Args:
        max_rows: per objective, a uniform subsample (drawn with ``rng``) keeps figures fast.
        rng: generator for the subsample; default np.random.default_rng(0).

    Returns:
        objective, seed, epoch, p_max, target_size (= |g_target|), g_dark_norm.
    """
    logs = load_hook(study, "logit_split", gens=(gen,), columns=["p_max", "g_target", "g_dark_norm"])
    if logs.empty or not {"p_max", "g_target", "g_dark_norm"} <= set(logs.columns):
        return pd.DataFrame()
    rng = rng if rng is not None else np.random.default_rng(0)
    logs = logs.dropna(subset=["p_max"])  # label-only objectives log no teacher columns
    logs = logs.assign(target_size=logs["g_target"].abs())
    parts = []
    for _, frame in logs.groupby("objective", sort=False):
        if len(frame) > max_rows:
            frame = frame.iloc[np.sort(rng.choice(len(frame), size=max_rows, replace=False))]
        parts.append(frame)
    if not parts:
        return pd.DataFrame()
    return pd.concat(parts, ignore_index=True)[["objective", "seed", "epoch", "p_max", "target_size", "g_dark_norm"]]


HELDOUT_HOOK = "heldout_attribution"
# Per-step columns of the heldout_attribution hook that are summed over training, in this order;
# group columns a_target_<group> / a_dark_<group> (teacher_wrong, noisy, clean, ...) follow.
HELDOUT_TERMS = ("a_target", "a_dark", "a_total", "a_update", "observed_change")


def _heldout_terms(columns) -> list[str]:
    groups = sorted(c for c in columns if c.startswith(("a_target_", "a_dark_")))
    return [c for c in HELDOUT_TERMS if c in columns] + groups


def heldout_attribution_by_step(study: Study, gen: int = 1) -> pd.DataFrame:
    """Cumulative held-out attribution over training, per (variant, seed, term), step by step.

    Each row of the heldout_attribution hook holds, for one logged step, the first-order change of
    the held-out loss due to each gradient term (a_target, a_dark, their sum a_total), the change
    the actual update predicts (a_update) and the change measured (observed_change); group
    columns split a_target / a_dark by sample group. A missing value (a group with no sample in a
    step) counts as 0 in the running sum.

    Returns:
        Long table objective, seed, epoch, step, term, value, cumulative (sum of ``value`` over this
        and every earlier logged step of the seed and variant); empty without such logs.
    """
    logs = load_hook(study, HELDOUT_HOOK, gens=(gen,))
    if logs.empty or not {"a_target", "a_dark"} <= set(logs.columns):
        return pd.DataFrame()
    terms = _heldout_terms(logs.columns)
    order = {o: i for i, o in enumerate(study.objectives)}  # variants in the study's order
    logs = logs.assign(_order=logs["objective"].map(order)).sort_values(["_order", "seed", "epoch", "step"],
                                                                         kind="stable").drop(columns="_order")
    long = logs.melt(id_vars=["objective", "seed", "epoch", "step"], value_vars=terms, var_name="term",
                     value_name="value")
    long["cumulative"] = long["value"].fillna(0.0).groupby([long["objective"], long["seed"], long["term"]],
                                                          sort=False).cumsum()
    return long.reset_index(drop=True)


def _heldout_per_seed(by_step: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, seed): every term's sum over training, the terms' shares of the total, and the
    linearisation check (sum a_update / sum observed_change, their correlation over steps)."""
    rows = []
    for (objective, seed), frame in by_step.groupby(["objective", "seed"], sort=False):
        total = frame.groupby("term", sort=False)["value"].sum(min_count=1)
        wide = frame.pivot_table(index="step", columns="term", values="value", aggfunc="sum")
        row = {"objective": objective, "seed": seed, **{t: float(v) for t, v in total.items()}}
        denom = row.get("a_total", row["a_target"] + row["a_dark"])
        for term in ("target", "dark"):
            row[f"share_{term}"] = row[f"a_{term}"] / denom if denom else math.nan
        if {"a_update", "observed_change"} <= set(wide.columns):
            obs = row["observed_change"]
            row["linearisation_ratio"] = row["a_update"] / obs if obs else math.nan
            pair = wide[["a_update", "observed_change"]].dropna()
            varies = len(pair) >= 2 and pair.std().gt(0).all()
            row["linearisation_corr"] = float(np.corrcoef(pair.to_numpy().T)[0, 1]) if varies else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def heldout_attribution_summary(by_step: pd.DataFrame) -> pd.DataFrame:
    """Per variant and quantity: mean over seeds with a 95% t-interval across seeds.

    Quantities: each term's cumulative sum over training (a_target, a_dark, a_total, a_update,
    observed_change, group terms), share_target and share_dark (the term's sum / the sum of
    a_total), linearisation_ratio (sum a_update / sum observed_change; 1 when the first-order
    picture is exact) and linearisation_corr (per-step correlation of a_update and observed_change).

    Returns:
        objective, quantity, mean, sd, n, ci_low, ci_high; empty for empty input.
    """
    if by_step.empty:
        return pd.DataFrame()
    per_seed = _heldout_per_seed(by_step)
    quantities = [c for c in per_seed.columns if c not in ("objective", "seed")]
    long = per_seed.melt(id_vars=["objective", "seed"], value_vars=quantities, var_name="quantity")
    order = {q: i for i, q in enumerate(quantities)}
    out = _seed_band(long.dropna(subset=["value"]), ["objective", "quantity"], "value")
    variants = {o: i for i, o in enumerate(dict.fromkeys(per_seed["objective"]))}
    out = out.sort_values(["objective", "quantity"], key=lambda c: c.map(variants if c.name == "objective" else order))
    return out.reset_index(drop=True)

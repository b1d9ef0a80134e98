"""With label noise: do students fit the clean labels their teacher's noisy labels hide?

Two sources, both optional (a study without label noise has neither, and the report says so):

- ``gen-<k>/metrics.csv`` columns ``train_acc_clean`` (accuracy against the clean training labels)
  and ``memorised`` (share of the flipped training samples predicted as their noisy label), from
  the training steps of each epoch. The final epoch of each student is compared with its seed's
  teacher (gen 0), paired by seed.
- per-sample ``logit_split`` rows with ``label_noisy`` and ``clean_target``: per epoch, on noisy
  and on clean training samples, the student's probability of the training label (``q_label``)
  against the teacher's (``p_label``), and the share of samples whose teacher argmax (and, when
  logged, ``student_argmax``) is the clean label.

Differences are in points (fractions x 100), student - teacher: above 0 on ``train_acc_clean`` and
below 0 on ``memorised`` mean the student fits the clean labels better than its teacher.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ban_analysis import stats
from ban_analysis.layout import TEACHER
from ban_analysis.report.gradients import seed_band
from ban_analysis.report.load import POINTS, Study, load_hook, load_metrics

__all__ = ["NOISE_METRICS", "SAMPLE_QUANTITIES", "noise_comparisons", "noise_metrics", "noisy_vs_clean_by_epoch",
           "noisy_vs_clean_summary"]

NOISE_METRICS = ("train_acc_clean", "memorised")
_SAMPLE_COLUMNS = ["label_noisy", "clean_target", "teacher_argmax", "q_label", "p_label", "student_argmax"]
# What noisy_vs_clean_by_epoch computes per group, in report order (those whose inputs were logged).
SAMPLE_QUANTITIES = ("q_label", "p_label", "q_minus_p", "teacher_predicts_clean", "student_predicts_clean",
                     "clean_gain")


def noise_metrics(study: Study, gen: int = 1) -> pd.DataFrame:
    """Final-epoch ``train_acc_clean`` / ``memorised`` of every student (gen ``gen``) and teacher (gen 0).

    Returns:
        seed, objective (variant or "teacher"), gen, epoch and the noise columns present; empty
        when no metrics.csv has them.
    """
    metrics = load_metrics(study, gen, columns=NOISE_METRICS)
    present = [c for c in NOISE_METRICS if c in metrics.columns]
    if metrics.empty or not present:
        return pd.DataFrame()
    metrics = metrics.dropna(subset=present, how="all")
    if metrics.empty:
        return pd.DataFrame()
    last = metrics.loc[metrics.groupby(["seed", "objective"], sort=False)["epoch"].idxmax()]
    return last.reset_index(drop=True)


def noise_comparisons(final: pd.DataFrame, variants: list[str], *, rng: np.random.Generator,
                      n_boot: int = 10000) -> pd.DataFrame:
    """Each variant vs its teacher on each noise metric, paired by seed (points).

    Holm is applied within each metric over the variants. Returns metric, variant, n, teacher_mean,
    variant_mean, mean_diff, ci_low, ci_high, ci_method, p_ttest, p_holm.
    """
    if final.empty:
        return pd.DataFrame()
    blocks = []
    for metric in (m for m in NOISE_METRICS if m in final.columns):
        wide = final.pivot_table(index="seed", columns="objective", values=metric) * POINTS
        if TEACHER not in wide.columns:
            continue
        rows = []
        for v in (v for v in variants if v in wide.columns):
            pair = wide[[v, TEACHER]].dropna()
            row = {"metric": metric, "variant": v, "n": len(pair), "teacher_mean": float(pair[TEACHER].mean()),
                   "variant_mean": float(pair[v].mean()), "mean_diff": float((pair[v] - pair[TEACHER]).mean()),
                   "ci_low": math.nan, "ci_high": math.nan, "ci_method": "", "p_ttest": math.nan}
            if len(pair) >= 2 and np.ptp(pair[v] - pair[TEACHER]) > 0:
                r = stats.paired_comparison(pair[v].to_numpy(), pair[TEACHER].to_numpy(), rng=rng, n_boot=n_boot)
                row.update(ci_low=r.ci_low, ci_high=r.ci_high, ci_method=r.ci_method, p_ttest=r.p_ttest)
            rows.append(row)
        block = pd.DataFrame(rows)
        if block.empty:
            continue
        block["p_holm"] = math.nan
        ok = block["p_ttest"].notna()
        if ok.any():
            block.loc[ok, "p_holm"] = stats.holm(block.loc[ok, "p_ttest"].to_numpy())
        blocks.append(block)
    return pd.concat(blocks, ignore_index=True) if blocks else pd.DataFrame()


def _matches(pred: pd.Series, clean: pd.Series) -> pd.Series:
    """1.0 where ``pred`` is the clean label, 0.0 where not, NaN where nothing was predicted (no teacher)."""
    return pd.Series(np.where(pred.isna(), np.nan, pred == clean), index=pred.index, dtype=float)


def noisy_vs_clean_by_epoch(study: Study, gen: int = 1) -> pd.DataFrame:
    """Per (variant, seed, epoch, group in {noisy, clean}): means over the logged training samples.

    Returns:
        objective, seed, epoch, group, samples, q_label, p_label, q_minus_p, teacher_predicts_clean
        and, with a ``student_argmax`` column, student_predicts_clean and clean_gain (student -
        teacher); empty without label-noise columns in the logit_split logs. Rows without a teacher
        (a label-only variant logs no teacher columns) give NaN for the teacher's quantities.
    """
    logs = load_hook(study, "logit_split", gens=(gen,), columns=_SAMPLE_COLUMNS)
    if logs.empty or not {"label_noisy", "clean_target"} <= set(logs.columns):
        return pd.DataFrame()
    frame = logs.assign(group=np.where(logs["label_noisy"].astype(bool), "noisy", "clean"))
    if "teacher_argmax" in frame.columns:
        frame["teacher_predicts_clean"] = _matches(frame["teacher_argmax"], frame["clean_target"])
    if "student_argmax" in frame.columns:
        frame["student_predicts_clean"] = _matches(frame["student_argmax"], frame["clean_target"])
    if {"q_label", "p_label"} <= set(frame.columns):
        frame["q_minus_p"] = frame["q_label"] - frame["p_label"]
    if {"teacher_predicts_clean", "student_predicts_clean"} <= set(frame.columns):
        frame["clean_gain"] = frame["student_predicts_clean"] - frame["teacher_predicts_clean"]
    values = [c for c in SAMPLE_QUANTITIES if c in frame.columns]
    keys = ["objective", "seed", "epoch", "group"]
    out = frame.groupby(keys, sort=False)[values].mean()
    out.insert(0, "samples", frame.groupby(keys, sort=False).size())
    return out.reset_index()


def noisy_vs_clean_summary(by_epoch: pd.DataFrame) -> pd.DataFrame:
    """Last logged epoch per variant: each quantity's mean over seeds with a 95% t-interval, per group.

    Returns:
        objective, group, epoch, quantity, mean, sd, n, ci_low, ci_high.
    """
    if by_epoch.empty:
        return pd.DataFrame()
    last = by_epoch[by_epoch["epoch"] == by_epoch.groupby("objective")["epoch"].transform("max")]
    quantities = [c for c in SAMPLE_QUANTITIES if c in last.columns]
    long = last.melt(id_vars=["objective", "seed", "epoch", "group"], value_vars=quantities, var_name="quantity")
    return seed_band(long.dropna(subset=["value"]), ["objective", "group", "epoch", "quantity"], "value")

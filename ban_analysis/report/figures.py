"""Seaborn figures for studies. Each function takes DataFrames and returns a matplotlib Figure.

Figures are built on ``matplotlib.figure.Figure`` directly, never through pyplot: nothing is shown,
no global figure registry fills up, and any backend (Agg on a headless machine) works. Callers
save them (``fig.savefig(path)``). Accuracies arrive as fractions and are drawn in points (x 100);
differences arrive in points (the ``ban_analysis.report.attribution`` tables). Everything random
in a figure (seaborn's bootstrap bands, the accuracy strip's jitter) draws from the ``seed``
argument, never from NumPy's global generator, so the same data and seed give the same picture.

Empty input raises ValueError (the report checks for missing logs before asking for a figure).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ban_analysis.layout import TEACHER
from ban_analysis.report.load import POINTS

logger = logging.getLogger(__name__)

VERDICT_COLORS = {"improves": "#1b7837", "worse": "#b2182b", "equivalent": "#2166ac",
                  "inconclusive": "#7f7f7f", "untestable": "#bbbbbb"}


def _require(frame: pd.DataFrame, columns: list[str], what: str) -> None:
    if frame is None or len(frame) == 0:
        raise ValueError(f"{what}: no data to plot (empty table)")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what}: table lacks columns {missing}; needs {columns}")


def _order(objectives) -> list[str]:
    """Teacher first, then objectives in order of first appearance."""
    seen = list(dict.fromkeys(objectives))
    return ([TEACHER] if TEACHER in seen else []) + [o for o in seen if o != TEACHER]


# Strip of per-seed dots in the accuracy figure: jitter half-width (in category units, split over
# the generations) and the dodge of the mean markers, which the dots share.
_JITTER = 0.15
_DODGE = 0.55


def _strip(ax, data: pd.DataFrame, order: list[str], hue_order: list[str], rng: np.random.Generator) -> None:
    """Per-seed dots at each (objective, generation) position, jittered with ``rng`` (not np.random)."""
    palette = dict(zip(hue_order, sns.color_palette(n_colors=len(hue_order))))
    n = len(hue_order)
    offsets = np.linspace(-_DODGE / 2, _DODGE / 2, n) if n > 1 else np.zeros(1)
    jitter = _JITTER / n
    for (objective, gen), frame in data.groupby(["objective", "gen"], sort=False):
        x = order.index(objective) + offsets[hue_order.index(gen)]
        xs = x + rng.uniform(-jitter, jitter, size=len(frame)) if len(frame) > 1 else np.full(len(frame), x)
        ax.scatter(xs, frame["value"], color=palette[gen], alpha=0.45, s=16, linewidths=0, zorder=1)


def accuracy_by_objective(results: pd.DataFrame, metric: str = "test_acc", *, seed: int = 0) -> Figure:
    """Accuracy by variant and generation: per-seed points and the mean with a bootstrap 95% CI.

    Args:
        results: results.csv rows (seed, objective, gen, kind, metric); ensembles are left out.
        seed: seeds both the dots' jitter (np.random.default_rng(seed)) and seaborn's bootstrap.
    """
    _require(results, ["seed", "objective", "gen", "kind", metric], "accuracy_by_objective")
    data = results[(results["kind"] == "model") & ((results["objective"] == TEACHER) | (results["gen"] >= 1))]
    data = data.assign(value=data[metric] * POINTS, gen=data["gen"].astype(str))
    order = _order(data["objective"])
    fig = Figure(figsize=(1.3 * len(order) + 2.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    hue_order = sorted(data["gen"].unique(), key=int)
    _strip(ax, data, order, hue_order, np.random.default_rng(seed))
    sns.pointplot(data=data, x="objective", y="value", hue="gen", order=order, hue_order=hue_order,
                  dodge=_DODGE if len(hue_order) > 1 else False, linestyle="none", errorbar=("ci", 95),
                  seed=seed, markers="D", capsize=0.08, ax=ax)
    ax.set_xlabel("variant")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title("Accuracy per seed (dots) and mean with 95% bootstrap CI")
    ax.legend(title="generation", loc="best", fontsize="small")
    return fig


def paired_slopes(matrix: pd.DataFrame, students: list[str] | None = None) -> Figure:
    """Teacher -> student accuracy per seed, one panel per student; green up, red down.

    Args:
        matrix: (seeds, students) accuracy fractions with a "teacher" column (report.load.seed_matrix).
        students: columns to show (default: every column without a space, i.e. generation-1 students).
    """
    _require(matrix, [TEACHER], "paired_slopes")
    students = students or [c for c in matrix.columns if c != TEACHER and " " not in c]
    if not students:
        raise ValueError("paired_slopes: no student columns to plot")
    fig = Figure(figsize=(2.3 * len(students) + 0.8, 3.8), layout="constrained")
    axes = fig.subplots(1, len(students), sharey=True, squeeze=False)[0]
    for ax, student in zip(axes, students):
        pair = matrix[[TEACHER, student]].dropna() * POINTS
        for t, s in pair.to_numpy():
            ax.plot([0, 1], [t, s], color="#1b7837" if s > t else "#b2182b" if s < t else "#7f7f7f",
                    alpha=0.6, marker="o", markersize=3)
        ax.plot([0, 1], pair.mean().to_numpy(), color="black", linewidth=2.5, marker="D", label="mean")
        ax.set_xticks([0, 1], [TEACHER, student])
        ax.set_xlim(-0.3, 1.3)
        up = int((pair[student] > pair[TEACHER]).sum())
        ax.set_title(f"{student}: {up}/{len(pair)} seeds up", fontsize="medium")
    axes[0].set_ylabel("test accuracy (%)")
    return fig


def forest_plot(comparisons: pd.DataFrame, margin: float) -> Figure:
    """Paired differences (points) with their 95% CIs, the TOST margin band, coloured by verdict.

    Args:
        comparisons: attribution comparisons table (family, comparison, mean_diff, ci_low, ci_high, verdict_kind).
        margin: equivalence margin in points (the shaded band is [-margin, +margin]).
    """
    _require(comparisons, ["family", "comparison", "mean_diff", "ci_low", "ci_high", "verdict_kind"], "forest_plot")
    rows = comparisons.reset_index(drop=True)
    fig = Figure(figsize=(7.5, 0.38 * len(rows) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    ax.axvspan(-margin, margin, color="#2166ac", alpha=0.12, label=f"equivalence margin ±{margin:g}")
    ax.axvline(0, color="black", linewidth=0.8)
    for yi, (_, r) in zip(y, rows.iterrows()):
        color = VERDICT_COLORS.get(r["verdict_kind"], "#7f7f7f")
        if np.isfinite(r["ci_low"]) and np.isfinite(r["ci_high"]):
            ax.plot([r["ci_low"], r["ci_high"]], [yi, yi], color=color, linewidth=2)
        ax.plot([r["mean_diff"]], [yi], "o", color=color)
    ax.set_yticks(y, [f"{f}: {c}" for f, c in zip(rows["family"], rows["comparison"])])
    for kind, color in VERDICT_COLORS.items():
        if kind in set(rows["verdict_kind"]):
            ax.plot([], [], "o-", color=color, label=kind)
    ax.set_xlabel("paired difference, accuracy points (a - b), 95% bootstrap CI")
    ax.legend(loc="best", fontsize="small")
    return fig


def update_share_over_training(share: pd.DataFrame, *, seed: int = 0) -> Figure:
    """Target and dark-knowledge shares of the update by epoch per objective, 95% CI bands across seeds.

    Args:
        share: gradients.update_share_by_epoch output (objective, seed, epoch, share_target, share_dark).
    """
    _require(share, ["objective", "seed", "epoch", "share_target", "share_dark"], "update_share_over_training")
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, column, title in zip(axes, ("share_target", "share_dark"), ("target term", "dark-knowledge term")):
        sns.lineplot(data=share, x="epoch", y=column, hue="objective", errorbar=("ci", 95), seed=seed,
                     marker="o", ax=ax, legend=ax is axes[1])
        ax.set_title(f"share of the update: {title}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("share")
    return fig


def confidence_vs_term_sizes(terms: pd.DataFrame, *, gridsize: int = 25) -> Figure:
    """Hexbin of teacher confidence (p_max) vs per-sample term sizes, one row per objective.

    Args:
        terms: gradients.term_sizes output (objective, p_max, target_size, g_dark_norm).
    """
    _require(terms, ["objective", "p_max", "target_size", "g_dark_norm"], "confidence_vs_term_sizes")
    objectives = list(dict.fromkeys(terms["objective"]))
    fig = Figure(figsize=(9, 2.6 * len(objectives) + 0.5), layout="constrained")
    axes = fig.subplots(len(objectives), 2, sharex=True, squeeze=False)
    collections = []
    for row, objective in zip(axes, objectives):
        frame = terms[terms["objective"] == objective]
        for ax, column, label in zip(row, ("target_size", "g_dark_norm"), ("|target term|", "|dark term|")):
            collections.append(ax.hexbin(frame["p_max"], frame[column], gridsize=gridsize, mincnt=1, cmap="viridis"))
            ax.set_ylabel(f"{objective}: {label}")
    # One log colour scale for every panel, so densities compare across objectives (and one colorbar
    # instead of one per panel keeps constrained layout cheap).
    vmax = max(float(np.max(c.get_array())) if c.get_array().size else 1.0 for c in collections)
    norm = LogNorm(vmin=1, vmax=max(vmax, 2.0))
    for c in collections:
        c.set_norm(norm)
    fig.colorbar(collections[0], ax=axes.ravel().tolist(), label="samples per hexagon (log)")
    for ax in axes[-1]:
        ax.set_xlabel("teacher confidence (max probability)")
    return fig


def param_cosine_over_epochs(cos: pd.DataFrame, *, seed: int = 0) -> Figure:
    """Per-sample cosine between the target and dark terms' parameter gradients, by epoch.

    Args:
        cos: gradients.param_cos_by_epoch output (objective, seed, epoch, param_cos); bands are
            95% CIs across seeds.
    """
    _require(cos, ["objective", "seed", "epoch", "param_cos"], "param_cosine_over_epochs")
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    sns.lineplot(data=cos, x="epoch", y="param_cos", hue="objective", errorbar=("ci", 95), seed=seed,
                 marker="o", ax=ax)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cos(target grad, dark grad), per sample")
    ax.set_title("Do the two terms pull the parameters the same way?")
    return fig


def generations_curve(results: pd.DataFrame, objective: str, metric: str = "test_acc",
                      *, seed: int = 0) -> Figure:
    """Accuracy by generation (teacher = 0) for single models and for ensembles of generations 1..k.

    Args:
        results: results.csv rows; ensembles are drawn at the generation of their last member.
        objective: the variant whose chain is drawn (the report passes the reference).
    """
    _require(results, ["seed", "objective", "gen", "kind", metric], "generations_curve")
    chain = results[(results["objective"] == objective) & (results["gen"] >= 1)]
    if chain.empty:
        raise ValueError(f"generations_curve: no rows for objective {objective!r}")
    teacher = results[results["objective"] == TEACHER].assign(kind="model")
    models = chain[chain["kind"] == "model"]
    # Ensembles of generations 1..k (teacher not a member), anchored at generation 1 = one member.
    ens = chain[(chain["kind"] == "ensemble") & chain["members"].astype(str).str.startswith("1")]
    parts = [teacher, models]
    if not ens.empty:
        parts += [models[models["gen"] == 1].assign(kind="ensemble 1..k"), ens.assign(kind="ensemble 1..k")]
    data = pd.concat(parts, ignore_index=True)
    data = data.assign(value=data[metric] * POINTS)
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    for s, frame in data[data["kind"] == "model"].groupby("seed"):
        ax.plot(frame["gen"], frame["value"], color="grey", alpha=0.25, linewidth=0.8)
    sns.lineplot(data=data, x="gen", y="value", hue="kind", errorbar=("ci", 95), seed=seed, marker="o", ax=ax)
    ax.set_xticks(sorted(data["gen"].unique()))
    ax.set_xlabel("generation (0 = teacher; ensembles: members 1..k)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{objective}: generations and ensembles (grey: single seeds)")
    return fig


def improvement_matrix(a12: pd.DataFrame) -> Figure:
    """Heatmap of the within-seed probability that the row beats the column (0.5 = no preference)."""
    if a12 is None or a12.empty:
        raise ValueError("improvement_matrix: no data to plot (empty table)")
    fig = Figure(figsize=(1.0 * len(a12) + 2.5, 0.8 * len(a12) + 1.5), layout="constrained")
    ax = fig.add_subplot()
    sns.heatmap(a12.astype(float), annot=True, fmt=".2f", vmin=0, vmax=1, center=0.5, cmap="RdBu_r",
                square=True, cbar_kws={"label": "P(row > column) over seeds"}, ax=ax)
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    ax.set_title("Probability of improvement (within seed)")
    return fig


def fix_rate_by_confidence(bins: pd.DataFrame, column_label: str = "teacher confidence", *, seed: int = 0) -> Figure:
    """Share of the teacher's test mistakes each student fixes, per bin of a teacher feature.

    Args:
        bins: gradients.fix_rate_by_bin output (objective, seed, bin_mid, fix_rate); bands are 95% CIs
            across seeds.
    """
    _require(bins, ["objective", "seed", "bin_mid", "fix_rate"], "fix_rate_by_confidence")
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    sns.lineplot(data=bins, x="bin_mid", y="fix_rate", hue="objective", errorbar=("ci", 95), seed=seed,
                 marker="o", ax=ax)
    ax.set_xlabel(f"{column_label} on the sample (bin centre)")
    ax.set_ylabel("fraction of teacher mistakes fixed")
    ax.set_title("Which teacher mistakes do students fix?")
    return fig


HELDOUT_LINES = (("a_target", "target term", "#1f77b4"), ("a_dark", "dark-knowledge term", "#d62728"))


def _t_band(frame: pd.DataFrame) -> pd.DataFrame:
    """Per step: mean of ``cumulative`` over seeds and its 95% t-interval (NaN below 2 seeds)."""
    import scipy.stats

    g = frame.groupby("step")["cumulative"].agg(["mean", "std", "count"])
    half = scipy.stats.t.ppf(0.975, np.maximum(g["count"] - 1, 1)) * g["std"] / np.sqrt(g["count"])
    half[g["count"] < 2] = np.nan
    return g.assign(low=g["mean"] - half, high=g["mean"] + half)


def cumulative_heldout_attribution(frame: pd.DataFrame) -> Figure:
    """Cumulative first-order change of the held-out loss from each term, by step, one panel per variant.

    Args:
        frame: gradients.heldout_attribution_by_step output (objective, seed, step, term,
            cumulative). Lines: mean over seeds; bands: mean ± the 95% t-interval across seeds
            (deterministic, so no seed is needed). Below 0 the term lowered the held-out loss.
    """
    _require(frame, ["objective", "seed", "step", "term", "cumulative"], "cumulative_heldout_attribution")
    data = frame[frame["term"].isin([t for t, _, _ in HELDOUT_LINES])]
    if data.empty:
        raise ValueError("cumulative_heldout_attribution: no data to plot (no a_target / a_dark rows)")
    variants = list(dict.fromkeys(data["objective"]))
    fig = Figure(figsize=(3.4 * len(variants) + 0.8, 3.8), layout="constrained")
    axes = fig.subplots(1, len(variants), sharey=True, squeeze=False)[0]
    for ax, variant in zip(axes, variants):
        for term, label, color in HELDOUT_LINES:
            band = _t_band(data[(data["objective"] == variant) & (data["term"] == term)])
            if band.empty:
                continue
            ax.plot(band.index, band["mean"], color=color, label=label)
            ax.fill_between(band.index, band["low"], band["high"], color=color, alpha=0.2, linewidth=0)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(variant, fontsize="medium")
        ax.set_xlabel("optimizer step")
    axes[0].set_ylabel("cumulative change of held-out loss")
    axes[-1].legend(loc="best", fontsize="small")
    return fig

"""Every figure renders headless (Agg) from a synthetic study folder and draws the study's numbers."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless, as on a cluster node; the figures must not need a display

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_study import write_synthetic_study  # noqa: E402

from ban_analysis import report as A  # noqa: E402
from ban_analysis.report import figures as F  # noqa: E402


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return A.load_study(write_synthetic_study(tmp_path_factory.mktemp("study"), n_seeds=6, n_test=1000,
                                                    epochs=2, steps_per_epoch=3, seed=1))


@pytest.fixture(scope="module")
def tables(study):
    att = A.attribute(study, n_boot=1000)
    fix = A.fixes(study)
    return {"results": study.results, "att": att, "share": A.update_share_by_epoch(study),
            "terms": A.term_sizes(study), "cos": A.param_cos_by_epoch(study),
            "bins": A.fix_rate_by_bin(fix), "heldout": A.heldout_attribution_by_step(study)}


BUILDERS = {
    "accuracy_by_objective": lambda t: F.accuracy_by_objective(t["results"]),
    "paired_slopes": lambda t: F.paired_slopes(t["att"].matrix),
    "forest_plot": lambda t: F.forest_plot(t["att"].comparisons, t["att"].margin),
    "update_share_over_training": lambda t: F.update_share_over_training(t["share"]),
    "confidence_vs_term_sizes": lambda t: F.confidence_vs_term_sizes(t["terms"]),
    "param_cosine_over_epochs": lambda t: F.param_cosine_over_epochs(t["cos"]),
    "generations_curve": lambda t: F.generations_curve(t["results"], "ban"),
    "improvement_matrix": lambda t: F.improvement_matrix(t["att"].a12),
    "fix_rate_by_confidence": lambda t: F.fix_rate_by_confidence(t["bins"]),
    "cumulative_heldout_attribution": lambda t: F.cumulative_heldout_attribution(t["heldout"]),
}


def _has_data(ax) -> bool:
    return bool(ax.lines or ax.collections or ax.patches or ax.images)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_figure_renders_headless_with_data(name, tables):
    fig = BUILDERS[name](tables)
    assert isinstance(fig, Figure)
    data_axes = [ax for ax in fig.axes if _has_data(ax)]
    assert data_axes, f"{name}: no axes with data"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_public_figure_is_covered():
    public = {n for n, f in vars(F).items() if callable(f) and getattr(f, "__module__", "") == F.__name__
              and not n.startswith("_")}
    assert public == set(BUILDERS)


@pytest.mark.parametrize("name", ["accuracy_by_objective", "forest_plot", "update_share_over_training",
                                  "param_cosine_over_epochs", "fix_rate_by_confidence", "improvement_matrix",
                                  "cumulative_heldout_attribution"])
def test_empty_input_is_a_clear_error(name):
    empty = {"results": pd.DataFrame(), "share": pd.DataFrame(), "terms": pd.DataFrame(), "cos": pd.DataFrame(),
             "bins": pd.DataFrame(), "heldout": pd.DataFrame(), "att": A.Attribution(matrix=pd.DataFrame(), accuracy=pd.DataFrame(),
                                                          comparisons=pd.DataFrame(), fractions=pd.DataFrame(),
                                                          answer={}, a12=pd.DataFrame(), margin=0.5,
                                                          threshold=0.5, alpha=0.05)}
    with pytest.raises(ValueError, match="no data"):
        BUILDERS[name](empty)


def test_paired_slopes_draws_each_seed_and_the_means(study, tables):
    fig = F.paired_slopes(tables["att"].matrix, ["ban"])
    ax = fig.axes[0]
    raw = study.results
    teacher = raw[raw["objective"] == "teacher"].set_index("seed")["test_acc"] * 100
    ban = raw[(raw["objective"] == "ban") & (raw["gen"] == 1) & (raw["kind"] == "model")].set_index("seed")["test_acc"] * 100
    seed_lines = [line for line in ax.lines if line.get_label() != "mean"]
    assert len(seed_lines) == len(teacher)
    drawn = sorted(tuple(np.round(line.get_ydata(), 9)) for line in seed_lines)
    expected = sorted(tuple(np.round([teacher[s], ban[s]], 9)) for s in teacher.index)
    assert drawn == expected
    mean_line = next(line for line in ax.lines if line.get_label() == "mean")
    np.testing.assert_allclose(mean_line.get_ydata(), [teacher.mean(), ban.mean()])


def test_forest_plot_points_are_the_mean_differences(tables):
    comps = tables["att"].comparisons
    fig = F.forest_plot(comps, 0.5)
    ax = fig.axes[0]
    points = [line for line in ax.lines if line.get_marker() == "o" and len(line.get_xdata()) == 1]
    xs = sorted(float(line.get_xdata()[0]) for line in points)
    np.testing.assert_allclose(xs, sorted(comps["mean_diff"]))
    band = [p for p in ax.patches if p.get_label().startswith("equivalence margin")]
    assert len(band) == 1
    x0, x1 = band[0].get_x(), band[0].get_x() + band[0].get_width()
    assert (x0, x1) == pytest.approx((-0.5, 0.5))


def test_improvement_matrix_annotations_match_within_seed_wins(study, tables):
    fig = F.improvement_matrix(tables["att"].a12)
    matrix = tables["att"].matrix
    wins = float(np.mean(matrix["ban"] > matrix["teacher"]) + 0.5 * np.mean(matrix["ban"] == matrix["teacher"]))
    labels = list(tables["att"].a12.index)
    i, j = labels.index("ban"), labels.index("teacher")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts[i * len(labels) + j] == f"{wins:.2f}"


def test_accuracy_figure_is_reproducible_and_leaves_numpy_rng_alone(tables):
    """The strip jitter is seeded per call: same data, same PNG bytes; the global RNG is untouched."""
    def png():
        buf = io.BytesIO()
        F.accuracy_by_objective(tables["results"]).savefig(buf, format="png", dpi=60)
        return buf.getvalue()

    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = png()
    np.random.random(1000)  # move the global stream: the figure must not depend on it
    assert png() == first
    np.random.seed(123)
    png()
    assert np.array_equal(np.random.get_state()[1], before)


def _strip_offsets(fig) -> np.ndarray:
    """x positions of the accuracy figure's per-seed dots (its scatter collections), in drawing order."""
    return np.concatenate([c.get_offsets()[:, 0] for c in fig.axes[0].collections])


def test_accuracy_jitter_follows_the_seed_argument_not_the_global_rng(tables):
    """Same seed: same dots; another seed: other dots; NumPy's global stream is neither read nor moved."""
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    first = _strip_offsets(F.accuracy_by_objective(tables["results"], seed=0))
    assert np.array_equal(np.random.get_state()[1], before)  # drawing consumed nothing from np.random
    np.random.random(100)
    again = _strip_offsets(F.accuracy_by_objective(tables["results"], seed=0))
    other = _strip_offsets(F.accuracy_by_objective(tables["results"], seed=1))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    # the jitter stays within its category: every dot is within 0.5 of an integer position
    assert np.all(np.abs(first - np.round(first)) < 0.5)
    n_dots = int(((tables["results"]["kind"] == "model") & ((tables["results"]["gen"] >= 1)
                                                             | (tables["results"]["objective"] == "teacher"))).sum())
    assert first.size == n_dots


def _t_band_independent(values: pd.Series) -> tuple[float, float, float]:
    import scipy.stats

    n = values.size
    half = scipy.stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / np.sqrt(n)
    return values.mean(), values.mean() - half, values.mean() + half


def _heldout_raw(study) -> pd.DataFrame:
    """Every heldout_attribution row of generation 1, read with plain pandas."""
    raw = []
    for path in sorted(study.root.glob("runs/seed-*/*/gen-1/hooks/heldout_attribution/epoch-*.parquet")):
        raw.append(pd.read_parquet(path).assign(seed=int(path.parents[4].name.split("-")[1]),
                                                variant=path.parents[3].name))
    return pd.concat(raw).sort_values(["variant", "seed", "step"])


def test_cumulative_heldout_figure_draws_the_seed_means_and_t_bands(study, tables):
    """Lines and bands recomputed from the Parquet files with plain pandas."""
    raw = _heldout_raw(study)
    fig = F.cumulative_heldout_attribution(tables["heldout"])
    axes = {ax.get_title(): ax for ax in fig.axes if ax.lines}
    assert set(axes) == set(raw["variant"])
    for variant, ax in axes.items():
        frame = raw[raw["variant"] == variant]
        for column, label in (("a_target", "target term"), ("a_dark", "dark-knowledge term")):
            cum = frame.assign(c=frame.groupby("seed")[column].cumsum())
            line = next(line for line in ax.lines if line.get_label() == label)
            steps = sorted(cum["step"].unique())
            np.testing.assert_allclose(line.get_xdata(), steps)
            expected = [_t_band_independent(cum.loc[cum["step"] == s, "c"]) for s in steps]
            np.testing.assert_allclose(line.get_ydata(), [e[0] for e in expected], rtol=1e-12)
            rgb = matplotlib.colors.to_rgb(line.get_color())
            band = next(c for c in ax.collections if np.allclose(c.get_facecolor()[0][:3], rgb))
            verts = band.get_paths()[0].vertices
            for s, (_, lo, hi) in zip(steps, expected):
                ys = verts[np.isclose(verts[:, 0], s), 1]
                assert ys.min() == pytest.approx(lo, rel=1e-9) and ys.max() == pytest.approx(hi, rel=1e-9)


def test_heldout_summary_table_matches_pandas(study, tables):
    """Sums over training, shares of the total and the linearisation check, per seed then across seeds."""
    import scipy.stats

    raw = _heldout_raw(study)
    summary = A.heldout_attribution_summary(tables["heldout"]).set_index(["objective", "quantity"])
    by_step = tables["heldout"]
    last = by_step.groupby(["objective", "seed", "term"])["cumulative"].last()
    for variant, frame in raw.groupby("variant"):
        sums = frame.groupby("seed")[["a_target", "a_dark", "a_total", "a_update", "observed_change",
                                      "a_target_teacher_wrong"]].sum()
        np.testing.assert_allclose(last.loc[variant, :, "a_dark"].to_numpy(), sums["a_dark"].to_numpy())
        per_seed = {
            "a_target": sums["a_target"], "a_dark": sums["a_dark"], "a_target_teacher_wrong": sums["a_target_teacher_wrong"],
            "share_target": sums["a_target"] / sums["a_total"], "share_dark": sums["a_dark"] / sums["a_total"],
            "linearisation_ratio": sums["a_update"] / sums["observed_change"],
            "linearisation_corr": frame.groupby("seed").apply(
                lambda f: np.corrcoef(f["a_update"], f["observed_change"])[0, 1], include_groups=False)}
        for quantity, values in per_seed.items():
            row = summary.loc[(variant, quantity)]
            half = scipy.stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
            assert row["n"] == len(values) == 6
            assert row["mean"] == pytest.approx(values.mean(), rel=1e-9)
            assert row["ci_low"] == pytest.approx(values.mean() - half, rel=1e-9)
    # planted: the dark term lowers BAN's held-out loss more than its target term does, CWTM's less
    assert summary.loc[("ban", "share_dark"), "ci_low"] > 0.5 > summary.loc[("cwtm", "share_dark"), "ci_high"]
    assert summary.loc[("ban", "linearisation_ratio"), "mean"] == pytest.approx(1, abs=0.1)

"""The report writes every file, its numbers are right, and its words follow the written rules."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import scipy.stats  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_study import NULL_EFFECTS, PLANTED_EFFECTS, write_synthetic_study  # noqa: E402

from ban_analysis import report as A  # noqa: E402
from ban_analysis.report import write_report  # noqa: E402

COMMAND = "ban-analysis report STUDY"


def _strict_json(path: Path) -> dict:
    def reject(token):
        raise AssertionError(f"stats.json holds {token}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=reject)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = write_synthetic_study(tmp_path_factory.mktemp("planted"), effects=PLANTED_EFFECTS, seed=3, n_test=1000,
                                 epochs=2, steps_per_epoch=3)
    out = write_report(root, command=COMMAND)
    return root, out, _strict_json(out / "stats.json")


def _row(stats: dict, family: str, comparison: str) -> dict:
    return next(r for r in stats["comparisons"] if r["family"] == family and r["comparison"] == comparison)


def _per_seed(root: Path) -> pd.DataFrame:
    """Independent read of results.csv: generation-1 models and the teacher, points, one column each."""
    raw = pd.read_csv(root / "results.csv")
    raw = raw[(raw["kind"] == "model") & (raw["gen"] <= 1)]
    return raw.pivot(index="seed", columns="objective", values="test_acc") * 100


def test_report_writes_every_file(planted):
    root, out, stats = planted
    assert out == root / "report"
    for name in ("index.md", "report.html", "stats.json"):
        assert (out / name).stat().st_size > 0
    expected = {"accuracy", "paired_slopes", "forest", "improvement_matrix", "generations", "update_share",
                "confidence_vs_term_sizes", "param_cosine", "fix_rate_by_teacher_confidence",
                "fix_rate_by_teacher_nontarget_entropy"}
    written = {p.stem for p in (out / "figures").glob("*.png")}
    assert written == expected
    assert {Path(f).stem for f in stats["figures"]} == expected
    for png in (out / "figures").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    index = (out / "index.md").read_text()
    for name in expected:
        assert f"figures/{name}.png" in index


def test_html_is_self_contained(planted):
    _, out, stats = planted
    page = (out / "report.html").read_text()
    sources = re.findall(r'\bsrc\s*=\s*["\']([^"\']*)', page, flags=re.I)
    assert len(sources) == len(stats["figures"])
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"\bhref\s*=", page, flags=re.I)
    assert not re.search(r"<(link|script|iframe)\b", page, flags=re.I)
    assert "url(" not in page and "@import" not in page


def test_stats_json_matches_an_independent_recomputation(planted):
    """BAN vs DKPP (family B) recomputed from results.csv with scipy and statsmodels."""
    from statsmodels.stats.multitest import multipletests
    from statsmodels.stats.power import TTestPower
    from statsmodels.stats.weightstats import ttost_paired

    root, _, stats = planted
    acc = _per_seed(root)
    row = _row(stats, "B", "BAN vs DKPP")
    d = acc["ban"] - acc["dkpp"]
    assert row["n"] == len(acc) == 10
    assert row["mean_diff"] == pytest.approx(d.mean(), abs=1e-9)
    assert row["sd_diff"] == pytest.approx(d.std(ddof=1), abs=1e-9)
    assert row["p_ttest"] == pytest.approx(scipy.stats.ttest_rel(acc["ban"], acc["dkpp"]).pvalue, rel=1e-9)
    assert row["ci_low"] < d.mean() < row["ci_high"]
    probes = ["cwtm", "dkpp", "tmls", "ce"]  # family B in its documented order
    raw_p = [scipy.stats.ttest_rel(acc["ban"], acc[p]).pvalue for p in probes]
    holm = multipletests(raw_p, method="holm")[1]
    assert row["p_holm"] == pytest.approx(holm[probes.index("dkpp")], rel=1e-9)
    margin = stats["study"]["equivalence_margin_points"]
    assert margin == pytest.approx(0.5)
    tost = [ttost_paired(acc["ban"].to_numpy(), acc[p].to_numpy(), -margin, margin)[0] for p in probes]
    assert row["p_tost"] == pytest.approx(tost[1], rel=1e-6)
    assert row["p_tost_holm"] == pytest.approx(multipletests(tost, method="holm")[1][1], rel=1e-6)
    effect = TTestPower().solve_power(nobs=10, alpha=0.05 / 4, power=0.8, alternative="two-sided")
    assert row["mde"] == pytest.approx(effect * d.std(ddof=1), rel=1e-3)
    frac = next(r for r in stats["gain_fractions"] if r["probe"] == "dkpp")
    gain = (acc["dkpp"] - acc["teacher"]).mean() / (acc["ban"] - acc["teacher"]).mean()
    assert frac["estimate"] == pytest.approx(gain, rel=1e-9)


def test_planted_effect_gets_the_documented_words(planted):
    _, out, stats = planted
    row = _row(stats, "B", "BAN vs DKPP")
    assert row["verdict_kind"] == "improves"
    assert row["verdict"].startswith("BAN improves on DKPP by +")
    assert _row(stats, "A", "BAN vs teacher")["verdict_kind"] == "improves"
    fractions = {r["probe"]: r for r in stats["gain_fractions"]}
    assert fractions["cwtm"]["verdict_kind"] == "most" and fractions["cwtm"]["ci_low"] > 0.5
    assert fractions["cwtm"]["verdict"].startswith("CWTM recovers most of BAN's gain")
    assert fractions["dkpp"]["verdict_kind"] == "less" and fractions["dkpp"]["ci_high"] < 0.5
    assert stats["answer"]["per_probe"] == {"cwtm": "explains", "dkpp": "does not explain"}
    assert stats["answer"]["headline"].startswith("Yes for CWTM: explains most of BAN's gain; no for DKPP")
    index = (out / "index.md").read_text()
    # The answer opens the report, before any evidence.
    assert index.index(stats["answer"]["headline"]) < index.index("## Evidence")
    assert row["verdict"] in index and fractions["cwtm"]["verdict"] in index


def test_methods_state_n_pairing_tests_versions_and_command(planted):
    _, out, stats = planted
    methods = stats["methods"]["text"]
    for needle in ("10 seeds", "share their initial weights and data order", "paired t-test", "Wilcoxon",
                   "permutation", "Holm", "TOST", "±0.50 points", "gain_fraction_threshold = 0.5", COMMAND):
        assert needle in methods
    for package in ("python", "torch", "numpy", "scipy", "pandas", "ban_analysis"):
        assert package in stats["methods"]["versions"]
        assert f"{package} {stats['methods']['versions'][package]}" in methods
    assert methods in (out / "index.md").read_text()


def _rule_kind(row: dict, alpha: float = 0.05) -> str:
    """VERDICT_RULES written out again, independently of the library's code."""
    if row["n"] < 2:
        return "untestable"
    if row["p_holm"] < alpha and (row["ci_low"] > 0 or row["ci_high"] < 0):
        return "improves" if row["mean_diff"] > 0 else "worse"
    if row["p_tost_holm"] < alpha:
        return "equivalent"
    return "inconclusive"


@pytest.mark.parametrize("noise_sd, expected", [(0.15, "equivalent"), (0.8, "inconclusive")])
def test_null_study_is_equivalent_or_inconclusive_by_the_rules(tmp_path, noise_sd, expected):
    root = write_synthetic_study(tmp_path, effects=NULL_EFFECTS, noise_sd=noise_sd, hooks=False, seed=5)
    att = A.attribute(A.load_study(root), n_boot=2000)
    rows = att.comparisons.to_dict("records")
    for row in rows:
        assert row["verdict_kind"] == _rule_kind(row), row["comparison"]
    ban_dkpp = next(r for r in rows if r["comparison"] == "BAN vs DKPP")
    assert ban_dkpp["verdict_kind"] == expected
    if expected == "equivalent":
        assert ban_dkpp["verdict"].startswith("BAN and DKPP are equivalent within ±0.50 points")
    else:
        assert ban_dkpp["verdict"].startswith("inconclusive: difference")
        assert f"could detect ≥ {ban_dkpp['mde']:.2f} points" in ban_dkpp["verdict"]
    ban = next(r for r in rows if r["comparison"] == "BAN vs teacher")
    assert ban["verdict_kind"] in ("equivalent", "inconclusive")
    undefined = "BAN itself shows no detectable gain over its teacher, so the fraction is undefined"
    assert set(att.fractions["verdict"]) == {undefined}
    assert att.answer["headline"].startswith("There is no gain to explain")
    how = {"equivalent": "are equivalent to their teachers within the margin",
           "inconclusive": "show no detectable gain over their teachers"}[ban["verdict_kind"]]
    assert f"BAN's students {how} (" in att.answer["headline"]


def test_headline_says_worse_when_ban_is_worse(tmp_path):
    """A BAN student significantly below its teacher is called worse, not 'no detectable gain'."""
    effects = {**NULL_EFFECTS, "ban": -0.6}
    root = write_synthetic_study(tmp_path, effects=effects, noise_sd=0.1, hooks=False, seed=3)
    att = A.attribute(A.load_study(root), n_boot=2000)
    ban = next(r for r in att.comparisons.to_dict("records") if r["comparison"] == "BAN vs teacher")
    assert ban["verdict_kind"] == "worse"
    assert att.answer["headline"].startswith("There is no gain to explain: BAN's students are worse than their teachers (-0.")


def test_verdict_rules_on_hand_made_rows():
    base = {"a": "ban", "b": "dkpp", "n": 10, "mean_diff": 0.3, "ci_low": 0.1, "ci_high": 0.5, "p_holm": 0.01,
            "p_permutation_holm": 0.01, "p_tost_holm": 0.5, "mde": 0.25, "margin": 0.5}
    assert A.verdict(base) == ("improves", "BAN improves on DKPP by +0.30 points (95% CI [+0.10, +0.50])")
    kind, text = A.verdict({**base, "p_permutation_holm": 0.2})
    assert kind == "improves" and "not confirmed by the sign-flip permutation test" in text
    assert A.verdict({**base, "mean_diff": -0.3, "ci_low": -0.5, "ci_high": -0.1})[0] == "worse"
    # Significant t but a CI touching 0: not "improves" (both must agree), and not equivalent either.
    assert A.verdict({**base, "ci_low": 0.0})[0] == "inconclusive"
    assert A.verdict({**base, "p_holm": 0.2, "p_tost_holm": 0.01})[0] == "equivalent"
    kind, text = A.verdict({**base, "p_holm": 0.2})
    assert kind == "inconclusive" and text.endswith("the study could detect ≥ 0.25 points")
    kind, text = A.verdict({**base, "p_holm": 0.2, "mde": float("nan")})
    assert kind == "inconclusive" and text.endswith("the detectable effect could not be computed")
    assert A.verdict({**base, "n": 1, "p_holm": float("nan")})[0] == "untestable"
    frac = {"probe": "cwtm", "estimate": 0.9, "ci_low": 0.6, "ci_high": 1.2}
    assert A.fraction_verdict(frac, "improves", 0.5)[0] == "most"
    assert A.fraction_verdict({**frac, "ci_low": 0.4}, "improves", 0.5)[0] == "inconclusive"
    assert A.fraction_verdict({**frac, "ci_low": -0.2, "ci_high": 0.3}, "improves", 0.5)[0] == "less"
    assert A.fraction_verdict(frac, "inconclusive", 0.5)[0] == "undefined"


def test_missing_pieces_degrade_to_stated_notes(tmp_path):
    """Two seeds, no hook logs, no CWTM, one missing run: the report is written and says what is missing."""
    root = write_synthetic_study(tmp_path, n_seeds=2, objectives=("ce", "ban", "dkpp"), hooks=False,
                                 ban_generations=1, seed=7)
    results = pd.read_csv(root / "results.csv")
    results = results[~((results["objective"] == "dkpp") & (results["seed"] == 1))]
    results.to_csv(root / "results.csv", index=False)
    (root / "study.json").unlink()
    out = write_report(root)
    stats = _strict_json(out / "stats.json")
    index = (out / "index.md").read_text()
    for needle in ("Only 2 seed(s)", "Objective 'cwtm' is not in this study", "study.json is missing",
                   "No update_share logs", "No param_split logs", "Some runs are missing (dkpp)",
                   "CWTM is not in this study"):
        assert needle in index, needle
    assert _row(stats, "B", "BAN vs DKPP")["n"] == 1
    assert _row(stats, "B", "BAN vs DKPP")["verdict_kind"] == "untestable"
    assert (out / "report.html").is_file() and (out / "figures" / "accuracy.png").is_file()


def test_same_seed_same_numbers(tmp_path):
    root = write_synthetic_study(tmp_path, n_seeds=4, objectives=("ban", "dkpp"), hooks=False, seed=2)
    study = A.load_study(root)
    first = A.attribute(study, n_boot=500, seed=11).comparisons
    again = A.attribute(study, n_boot=500, seed=11).comparisons
    pd.testing.assert_frame_equal(first, again)
    np.testing.assert_array_equal(first["n"], 4)

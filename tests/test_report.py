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
                "fix_rate_by_teacher_nontarget_entropy", "heldout_attribution"}
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


# ----------------------------------------------------------------------------- roles, not names

RENAMED = {"ban": "kd_T4", "cwtm": "cwtc_x", "dkpp": "dkpp_y", "tmls": "ls_z", "ce": "labels"}


def _rename_text(text: str) -> str:
    for old, new in RENAMED.items():
        text = re.sub(rf"\b{old.upper()}\b", new.upper(), text)
    return text


@pytest.mark.parametrize("probes", [["cwtc_x", "dkpp_y"], ["cwtc_x"]])
def test_renamed_variants_with_a_roles_table_get_the_same_numbers(tmp_path, probes):
    """The same data under other variant names, with [roles] saying who is who: the same verdicts.

    With one probe the other one becomes a control: family B keeps its members and order.
    """
    kwargs = dict(effects=PLANTED_EFFECTS, n_seeds=8, hooks=False, seed=4, n_test=1000)
    default = A.attribute(A.load_study(write_synthetic_study(tmp_path / "default", **kwargs)), n_boot=1000)
    roles = {"reference": "kd_T4", "probes": probes, "label_only": "labels"}
    study = A.load_study(write_synthetic_study(tmp_path / "renamed", names=RENAMED, roles=roles, **kwargs))
    assert "variants" in study.config and study.config["objectives"] == []
    assert study.roles == {**roles, "controls": [v for v in ("dkpp_y", "ls_z") if v not in probes]}
    renamed = A.attribute(study, n_boot=1000)
    numbers = ["n", "mean_diff", "sd_diff", "ci_low", "ci_high", "p_ttest", "p_wilcoxon", "p_permutation", "d_z",
               "a12", "p_tost", "p_holm", "p_permutation_holm", "p_tost_holm", "mde", "verdict_kind", "family"]
    pd.testing.assert_frame_equal(default.comparisons[numbers], renamed.comparisons[numbers])
    assert [_rename_text(v) for v in default.comparisons["verdict"]] == list(renamed.comparisons["verdict"])
    cols = ["n", "probe_gain", "reference_gain", "estimate", "ci_low", "ci_high", "verdict_kind"]
    pd.testing.assert_frame_equal(default.fractions[cols], renamed.fractions[cols])
    assert list(renamed.fractions["probe"]) == [RENAMED[p] for p in default.fractions["probe"]]
    expected = {RENAMED[p]: v for p, v in default.answer["per_probe"].items()}
    assert renamed.answer["per_probe"] == {p: expected[p] for p in probes}
    if len(probes) == 2:
        assert renamed.answer["headline"] == _rename_text(default.answer["headline"])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("variant", "label", "verdict", "vs_reference")}  # noqa: E731
                          for r in rows]
    assert strip(renamed.components["rows"]) == strip(default.components["rows"])


def test_roles_defaults_match_the_study_planner_and_old_study_json(tmp_path):
    from ban_analysis.study.plan import DEFAULT_ROLES, StudyConfig

    from ban_analysis import roles

    assert roles.DEFAULT_ROLES == DEFAULT_ROLES
    # an old study.json (no variants, no roles) gets the defaults
    study = A.load_study(write_synthetic_study(tmp_path / "old", n_seeds=2, hooks=False, seed=1))
    assert "roles" not in study.config and "variants" not in study.config
    assert study.roles == {"reference": "ban", "probes": ["cwtm", "dkpp"], "controls": ["tmls"], "label_only": "ce"}
    assert study.components == {"confidence": ["cwtm"], "nontarget_mass": ["dkpp", "tmls"]}
    # the loader resolves roles as the planner does, from asdict(StudyConfig)
    table = {"objectives": ["ce", {"name": "kd_T4", "objective": "kd"}],
             "variants": [{"name": "cw", "objective": "cwtc"}, {"name": "perm", "objective": "dkpp"},
                          {"name": "smooth", "objective": "tmls"}, {"name": "ce2", "objective": "ce"}],
             "roles": {"reference": "kd_T4", "probes": ["cw", "perm"]}}
    cfg = StudyConfig(**table)
    names = [v.name for v in cfg.variant_list()]
    assert roles.variant_names(table) == names
    assert roles.resolve_roles(table, names) == cfg.resolved_roles()
    assert roles.components(table, cfg.resolved_roles(), names) == {"confidence": ["cw"],
                                                                     "nontarget_mass": ["perm", "smooth"]}
    given = {**table, "roles": {**table["roles"], "components": {"confidence": ["smooth"], "nontarget_mass": []}}}
    assert roles.components(given, roles.resolve_roles(given, names), names) == {"confidence": ["smooth"],
                                                                                 "nontarget_mass": []}


def test_report_logic_names_no_objective():
    """Objective names live in report/roles.py's defaults only; the rest of report/ reads roles."""
    root = Path(A.__file__).parent
    literal = re.compile(r"""["'](ban|ban_l|kd|ce|cwtm|cwtc|dkpp|tmls)["']""")
    offenders = [f"{p.name}:{i}" for p in root.glob("*.py") if p.name != "roles.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert offenders == []


# ----------------------------------------------------------------------------- components


def test_components_are_fractions_of_the_reference_gain(planted):
    root, out, stats = planted
    acc = _per_seed(root)
    comp = stats["components"]
    assert comp["members"] == {"confidence": ["cwtm"], "nontarget_mass": ["dkpp", "tmls"]}
    rows = {(r["component"], r["variant"]): r for r in comp["rows"]}
    ref_gain = (acc["ban"] - acc["teacher"]).mean()
    for (component, variant), row in rows.items():
        part = acc["ban"] - acc[variant] if component == "structure" else acc[variant] - acc["teacher"]
        assert row["estimate"] == pytest.approx(part.mean() / ref_gain, rel=1e-9)
        assert row["ci_low"] <= row["estimate"] <= row["ci_high"]
        assert row["n"] == 10
    assert rows[("confidence", "cwtm")]["verdict_kind"] == "most"
    assert rows[("nontarget_mass", "dkpp")]["verdict_kind"] == "less"
    assert rows[("structure", "dkpp")]["verdict_kind"] == "most"
    best = max(("dkpp", "tmls"), key=lambda v: rows[("nontarget_mass", v)]["estimate"])
    assert [v for (c, v), r in rows.items() if c == "structure" and r["best"]] == [best]
    assert rows[("structure", "dkpp")]["vs_reference_kind"] == _row(stats, "B", "BAN vs DKPP")["verdict_kind"]
    index = (out / "index.md").read_text()
    assert index.index("## Which part of the teacher's signal carries the gain") < index.index("## Evidence")
    assert rows[("confidence", "cwtm")]["verdict"] in index
    # 10 seeds are enough for every family here: no note asks for more
    assert all(f["enough"] for f in comp["seeds_needed"]) and comp["notes"] == []


def test_seeds_needed_for_the_exact_sign_flip_test():
    assert [A.seeds_needed(0.05, m) for m in (1, 2, 3, 4, 5)] == [6, 7, 7, 8, 8]  # 2/2^n < alpha/m
    for m in range(1, 8):
        n = A.seeds_needed(0.05, m)
        assert 2 / 2 ** n < 0.05 / m <= 2 / 2 ** (n - 1)


def test_few_seeds_say_how_many_are_needed(tmp_path):
    root = write_synthetic_study(tmp_path, n_seeds=5, hooks=False, seed=2, effects=PLANTED_EFFECTS)
    att = A.attribute(A.load_study(root), n_boot=500)
    needed = {f["family"]: f for f in att.components["seeds_needed"]}
    assert needed["B"]["family_size"] == 4 and needed["B"]["seeds_needed"] == 8 and not needed["B"]["enough"]
    assert needed["B"]["min_p_sign_flip"] == pytest.approx(2 / 2 ** 5)
    assert any("Families B, C, D (m = 4)" in n and "at least 8 seeds" in n for n in att.notes)


def test_roles_components_table_chooses_the_carriers(tmp_path):
    roles = {"reference": "ban", "probes": ["cwtm", "dkpp"],
             "components": {"confidence": ["tmls"], "nontarget_mass": ["dkpp"]}}
    root = write_synthetic_study(tmp_path, n_seeds=4, hooks=False, seed=2, roles=roles)
    att = A.attribute(A.load_study(root), n_boot=500)
    assert att.components["members"] == {"confidence": ["tmls"], "nontarget_mass": ["dkpp"]}
    assert [(r["component"], r["variant"]) for r in att.components["rows"]] == [
        ("confidence", "tmls"), ("nontarget_mass", "dkpp"), ("structure", "dkpp")]


# ----------------------------------------------------------------------------- label noise


def test_label_noise_students_vs_teacher_paired_by_seed(tmp_path):
    root = write_synthetic_study(tmp_path, n_seeds=6, epochs=2, steps_per_epoch=3, seed=8, label_noise=0.3,
                                 n_test=500)
    study = A.load_study(root)
    final = A.noise_metrics(study)
    comps = A.noise_comparisons(final, study.objectives, rng=np.random.default_rng(0), n_boot=1000)
    for metric in ("train_acc_clean", "memorised"):
        last = {}
        for path in root.glob("runs/seed-*/*/gen-*/metrics.csv"):
            if path.parent.name in ("gen-0", "gen-1"):
                last[(int(path.parents[2].name.split("-")[1]), path.parents[1].name)] = pd.read_csv(path).iloc[-1]
        teacher = pd.Series({s: r[metric] for (s, v), r in last.items() if v == "teacher"}) * 100
        raw_p = []
        for variant in study.objectives:
            student = pd.Series({s: r[metric] for (s, v), r in last.items() if v == variant}) * 100
            row = comps[(comps["metric"] == metric) & (comps["variant"] == variant)].iloc[0]
            assert row["mean_diff"] == pytest.approx((student - teacher).mean(), abs=1e-9)
            assert row["p_ttest"] == pytest.approx(scipy.stats.ttest_rel(student, teacher).pvalue, rel=1e-9)
            raw_p.append(row["p_ttest"])
        holm = comps[comps["metric"] == metric]["p_holm"].to_numpy()
        from statsmodels.stats.multitest import multipletests
        np.testing.assert_allclose(holm, multipletests(raw_p, method="holm")[1], rtol=1e-9)
    mem = comps[comps["metric"] == "memorised"].set_index("variant")
    assert mem.loc["ban", "ci_high"] < 0  # planted: BAN memorises 6 points less than its teacher
    by_epoch = A.noisy_vs_clean_by_epoch(study)
    logs = pd.concat(pd.read_parquet(p).assign(seed=int(p.parents[4].name.split("-")[1]), objective=p.parents[3].name)
                     for p in root.glob("runs/seed-*/*/gen-1/hooks/logit_split/epoch-*.parquet"))
    noisy = logs[logs["label_noisy"]]
    expected = noisy.groupby(["objective", "seed", "epoch"]).apply(
        lambda f: (f["student_argmax"] == f["clean_target"]).mean(), include_groups=False)
    got = by_epoch[by_epoch["group"] == "noisy"].set_index(["objective", "seed", "epoch"])["student_predicts_clean"]
    pd.testing.assert_series_equal(got.sort_index(), expected.sort_index(), check_names=False)
    assert by_epoch[(by_epoch["objective"] == "ce")]["teacher_predicts_clean"].isna().all()
    out = write_report(root)
    index = (out / "index.md").read_text()
    assert "### Noisy and clean training labels" in index and "memorised" in index
    assert _strict_json(out / "stats.json")["label_noise"]["final_epoch"]


def test_without_label_noise_or_heldout_logs_the_report_says_so(tmp_path):
    root = write_synthetic_study(tmp_path, n_seeds=3, epochs=1, steps_per_epoch=2, seed=1, heldout=False,
                                 n_test=300)
    out = write_report(root)
    index = (out / "index.md").read_text()
    assert "No label-noise measurements" in index and "No heldout_attribution logs" in index
    assert not (out / "figures" / "heldout_attribution.png").exists()
    stats = _strict_json(out / "stats.json")
    assert stats["label_noise"] == {} and "heldout_attribution" not in stats["hooks"]

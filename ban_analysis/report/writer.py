"""The scripted study report: the answer first, then the evidence, then the methods.

``write_report(study_dir)`` reads only the study folder and writes ``study_dir/report/``
(``ban_analysis.layout.StudyLayout.report``): index.md, a self-contained report.html (figures as
base64 PNG, no external resources), stats.json (every number the report shows, full precision,
NaN/inf -> null) and figures/*.png. Verdict words come from the rule tables of
``ban_analysis.report.rules``, which the report prints too. Who is the reference, a probe or a
control comes from study.json's roles. Missing pieces (no hook logs, a variant absent, few seeds)
become stated notes, not crashes.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
from pathlib import Path

import numpy as np
import pandas as pd

import ban_analysis
from ban_analysis.layout import RunLayout
from ban_analysis.report import attribution as att_mod, figures as F, load as load_mod, sections
from ban_analysis.report.document import Doc, add_figure, ci, num, to_jsonable
from ban_analysis.report.rules import display_name

logger = logging.getLogger(__name__)

N_BOOT = 10000  # resamples per interval: over 10 generator seeds the BAN-vs-DKPP CI ends moved <= 0.005 points (synthetic study, sd of differences 0.16)
SOFTWARE = ("torch", "numpy", "scipy", "pandas", "seaborn", "matplotlib")

__all__ = ["N_BOOT", "to_jsonable", "write_report"]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "ban_analysis": ban_analysis.__version__}
    for name in SOFTWARE:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _run_commits(study: load_mod.Study) -> list[str]:
    """Git commits the runs recorded in their manifests (the code that trained them)."""
    commits = set()
    for _, seed_dir in study.layout.seeds_on_disk():
        for run_dir in sorted(p for p in seed_dir.iterdir() if p.is_dir()):
            try:
                commit = json.loads(RunLayout(run_dir).manifest.read_text()).get("git_commit")
            except (OSError, json.JSONDecodeError):
                continue
            if commit:
                commits.add(str(commit))
    return sorted(commits)


def _roles_text(roles: dict) -> str:
    names = lambda vs: ", ".join(display_name(v) for v in vs) or "none"  # noqa: E731
    return (f"reference {display_name(roles.get('reference')) if roles.get('reference') else 'none'}; "
            f"probes {names(roles.get('probes', []))}; controls {names(roles.get('controls', []))}; "
            f"label-only retrain {display_name(roles['label_only']) if roles.get('label_only') else 'none'}")


def _epoch_text(report_epoch: str) -> str:
    """Which epoch's model every number is (study.json report_epoch)."""
    if report_epoch == "best":
        return ("The accuracies, NLLs and ECEs of results.csv are those of each generation's "
                "best-validation-accuracy epoch (report_epoch = \"best\" in study.json; ties keep the earlier "
                "epoch), ensembles averaging those epochs.")
    return ("The accuracies, NLLs and ECEs of results.csv are those of each generation's last-epoch model "
            "(report_epoch = \"last\" in study.json).")


def _methods(study: load_mod.Study, att: att_mod.Attribution, versions: dict, commits: list[str], command: str | None,
             ci_methods: list[str], seed: int) -> str:
    seeds = study.seeds
    families = "; ".join(f"{k}: {v}" for k, v in att_mod.FAMILIES.items())
    software = ", ".join(f"{k} {v}" for k, v in versions.items())
    ref = display_name(att.roles.get("reference"))
    return (
        f"We analysed {len(seeds)} seeds ({', '.join(map(str, seeds))}) from `{study.root}`. Roles (study.json "
        f"[roles], defaults where absent): {_roles_text(att.roles)}. Pairing: each seed "
        "trains one teacher that every variant shares, and students of the same (seed, generation) share their "
        "initial weights and data order across variants, so every comparison is a paired difference over seeds. "
        "\"The student\" of a variant is its generation 1; later generations and ensembles (softmax averages of "
        "generations 1..k, eq. 4) are reported separately (family D). "
        + _epoch_text(study.config.get("report_epoch", "last")) + " Each comparison gives the mean paired "
        f"difference in test-accuracy points with a 95% bootstrap CI ({'/'.join(ci_methods) or 'BCa'}, {N_BOOT:,} "
        "resamples), two-sided p-values of the paired t-test, the exact Wilcoxon signed-rank test and the "
        "sign-flip permutation test (exact up to 16 seeds, Monte Carlo beyond), Cohen's d_z and the within-seed "
        "probability of improvement A12. Holm's "
        f"step-down correction is applied within each family ({families}) to the t-test p-values that the verdicts "
        "use, and separately to the permutation and TOST p-values. Equivalence is tested by TOST (two one-sided "
        f"paired t-tests) with margin ±{att.margin:.2f} points (equivalence_margin = {study.equivalence_margin} in "
        f"study.json, fixed before the runs). The fraction of {ref}'s gain a probe recovers, and each part of "
        f"the teacher's signal, is mean(part) / mean({ref} − teacher) with a paired bootstrap CI (unbounded when "
        f"{ref}'s own gain CI contains 0), judged against gain_fraction_threshold = {att.threshold}. Minimum "
        "detectable effects (MDE) are for the paired t-test at 80% power and level α/m (Holm's first step; m = "
        f"family size) from the observed sd of the differences. α = {att.alpha}. All bootstraps of the "
        f"comparisons, fractions and parts draw from one numpy Generator seeded {seed} (the label-noise "
        "comparisons from a second one with the same seed). "
        f"Software: {software}. Runs' recorded git commits: {', '.join(commits) or 'not recorded'}. "
        f"Command: `{command or 'ban_analysis.report.write_report (no command given)'}`.")


def _answer(doc: Doc, study: load_mod.Study, att: att_mod.Attribution) -> None:
    roles, comps = att.roles, att.comparisons
    probes = ", ".join(display_name(p) for p in study.declared_roles["probes"]) or "none"
    doc.p(f"**Question:** do the probes ({probes}) explain the gains of the reference "
          f"({display_name(study.declared_roles['reference'])}) over its teacher: is it the teacher's confidence "
          "acting as a per-sample weight, or the dark knowledge in its non-target probabilities?")
    doc.h(2, "Answer")
    doc.p(f"**{att.answer['headline']}**")
    doc.items(att.answer["sentences"])
    power = comps[comps["family"] == "B"] if not comps.empty else comps
    if len(power):
        doc.p("Uncertainty: n = " + f"{len(study.seeds)} seeds; with the observed spread the study could detect "
              "(80% power, Holm level) differences of at least " + ", ".join(
                  f"{c} {num(m)} points" if np.isfinite(m) else f"{c} (not computable)"
                  for c, m in zip(power["comparison"], power["mde"])) + ".")
    if not roles.get("reference"):
        doc.p("The reference has no results in this study, so no part of its gain is attributed.")


def _evidence(doc: Doc, study: load_mod.Study, att: att_mod.Attribution, fig, seed: int) -> None:
    comps, ref = att.comparisons, att.roles.get("reference")
    doc.h(2, "Evidence")
    doc.h(3, "Accuracy")
    acc = att.accuracy
    doc.table(pd.DataFrame({"student": acc["student"], "n": acc["n"], "mean (%)": [num(x) for x in acc["mean"]],
                            "sd": [num(x) for x in acc["sd"]],
                            "95% CI": [ci(lo, hi, False) for lo, hi in zip(acc["ci_low"], acc["ci_high"])]}))
    fig("accuracy", lambda: F.accuracy_by_objective(study.results, seed=seed),
        "Test accuracy per seed (dots) and mean with 95% bootstrap CI, by variant and generation.")
    fig("paired_slopes", lambda: F.paired_slopes(att.matrix),
        "Teacher -> generation-1 student per seed (green: student better).")
    doc.h(3, "Paired comparisons")
    if comps.empty:
        doc.p("No paired comparisons are possible (teacher or students missing).")
    for family, description in att_mod.FAMILIES.items():
        rows = comps[comps["family"] == family] if not comps.empty else comps
        if len(rows):
            doc.h(4, f"Family {family}: {description} (Holm within family, m = {len(rows)})")
            doc.table(sections.comparison_table(rows))
    if not comps.empty:
        fig("forest", lambda: F.forest_plot(comps, att.margin),
            f"Paired differences with 95% CIs, coloured by verdict; shaded: the equivalence margin ±{att.margin:.2f} points.")
    fig("improvement_matrix", lambda: F.improvement_matrix(att.a12),
        "Within-seed probability that the row beats the column.")
    if ref:
        fig("generations", lambda: F.generations_curve(study.results, ref, seed=seed),
            f"{display_name(ref)} (the reference) generations and ensembles of generations 1..k; grey: single seeds.")
    fr = att.fractions
    if len(fr):
        name = display_name(ref)
        doc.h(3, f"Fraction of the reference's ({name}) gain over the teacher each variant recovers")
        doc.table(pd.DataFrame({"probe": fr["probe"], "n": fr["n"],
                                "probe gain (pts)": [num(x, signed=True) for x in fr["probe_gain"]],
                                f"{name} gain (pts)": [num(x, signed=True) for x in fr["reference_gain"]],
                                "fraction": [num(x) for x in fr["estimate"]],
                                "95% CI": [ci(lo, hi, False) for lo, hi in zip(fr["ci_low"], fr["ci_high"])],
                                "verdict": fr["verdict"]}))


def _stats(study: load_mod.Study, att: att_mod.Attribution, name: str, seed: int) -> dict:
    comps = att.comparisons
    return {"study": {"dir": str(study.root), "name": name, "seeds": study.seeds, "n_seeds": len(study.seeds),
                      "objectives": study.objectives, "variant_objectives": study.variant_objectives,
                      "roles": att.roles, "declared_roles": study.declared_roles, "metric": "test_acc",
                      "units": "accuracy points (test accuracy x 100)", "equivalence_margin_points": att.margin,
                      "equivalence_margin": study.equivalence_margin, "gain_fraction_threshold": att.threshold,
                      "alpha": att.alpha, "power": att_mod.POWER, "seed": seed, "n_boot": N_BOOT},
            "answer": att.answer, "notes": att.notes, "accuracy": att.accuracy, "comparisons": comps,
            "gain_fractions": att.fractions,
            "a12": {} if att.a12.empty else att.a12.to_dict(orient="index"), "hooks": {}, "label_noise": {},
            "rules": {"verdict": att_mod.VERDICT_RULES, "fraction": att_mod.FRACTION_RULES,
                      "answer": att_mod.ANSWER_RULES, "families": att_mod.FAMILIES}}


def write_report(study_dir: str | Path, command: str | None = None, *, seed: int = 0) -> Path:
    """Write study_dir/report/{index.md, report.html, stats.json, figures/*.png}.

    Args:
        study_dir: a study folder (study.json, results.csv, runs/).
        command: the command line that produced the report, quoted in Methods.
        seed: seeds every bootstrap and subsample (same folder + seed -> same report).

    Returns:
        The report folder.
    """
    study = load_mod.load_study(study_dir)
    att = att_mod.attribute(study, seed=seed, n_boot=N_BOOT)
    out = study.layout.report
    (out / "figures").mkdir(parents=True, exist_ok=True)
    name = study.config.get("name") or Path(study_dir).resolve().name
    stats = _stats(study, att, name, seed)
    doc, listing = Doc(), []
    fig = lambda name, make, caption: add_figure(doc, out, listing, name, make, caption)  # noqa: E731
    doc.h(1, f"Study report: {name}")
    _answer(doc, study, att)
    sections.components_section(doc, att, stats)
    if att.notes:
        doc.h(2, "Notes on this study")
        doc.items(att.notes)
    _evidence(doc, study, att, fig, seed)
    sections.hook_sections(doc, study, fig, stats, seed)
    sections.noise_section(doc, study, stats, np.random.default_rng(seed), N_BOOT)
    stats["figures"] = listing

    doc.h(2, "Verdict rules (checked in order; the first that holds decides)")
    doc.table(pd.DataFrame(att_mod.VERDICT_RULES, columns=["verdict", "rule", "wording"]))
    doc.table(pd.DataFrame(att_mod.FRACTION_RULES, columns=["fraction verdict", "rule", "wording"]))
    doc.table(pd.DataFrame(att_mod.ANSWER_RULES, columns=["answer per probe", "rule"]))
    doc.h(2, "Methods")
    versions, commits = _versions(), _run_commits(study)
    ci_methods = sorted(set(att.comparisons["ci_method"]) - {""}) if not att.comparisons.empty else []
    methods = _methods(study, att, versions, commits, command, ci_methods, seed)
    doc.p(methods)
    stats["methods"] = {"text": methods, "versions": versions, "git_commits": commits, "command": command,
                        "ci_methods": ci_methods}

    (out / "index.md").write_text(doc.markdown())
    (out / "report.html").write_text(doc.html(f"Study report: {name}"))
    (out / "stats.json").write_text(json.dumps(to_jsonable(stats), indent=2, allow_nan=False) + "\n")
    logger.info("report written to %s", out)
    return out

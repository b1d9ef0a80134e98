"""The scripted study report: the answer first, then the evidence, then the methods.

``write_report(study_dir)`` reads only the study folder and writes ``study_dir/report/``:
index.md, a self-contained report.html (figures as base64 PNG, no external resources),
stats.json (every number the report shows, full precision, NaN/inf -> null) and figures/*.png.
Verdict words come from ban_analysis.analysis's rule tables, which the report prints too.
Missing pieces (no hook logs, an objective absent, few seeds) become stated notes, not crashes.
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import io
import json
import logging
import math
import platform
from pathlib import Path

import numpy as np
import pandas as pd

import ban_analysis
from ban_analysis.report import attribution as att_mod, figures as F, gradients as grads, load as load_mod

logger = logging.getLogger(__name__)

FIGURE_DPI = 110
N_BOOT = 10000  # resamples per interval: over 10 generator seeds the BAN-vs-DKPP CI ends moved <= 0.005 points (synthetic study, sd of differences 0.16)
SOFTWARE = ("torch", "numpy", "scipy", "pandas", "seaborn", "matplotlib")


# ----------------------------------------------------------------------------- formatting


def _num(x, digits: int = 2, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a" if x is None or math.isnan(x) else ("∞" if x > 0 else "-∞")
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _p(x) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.1e}" if x < 1e-3 else f"{x:.3f}"


def _ci(lo, hi, signed=True, digits=2) -> str:
    return f"[{_num(lo, digits, signed)}, {_num(hi, digits, signed)}]"


def to_jsonable(obj):
    """Plain JSON types; NaN and ±inf become null (JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, pd.DataFrame):
        return to_jsonable(obj.to_dict("records"))
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


# ----------------------------------------------------------------------------- document model


class _Doc:
    """Blocks rendered to Markdown and HTML alike, so both say the same thing."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def items(self, items: list[str]):
        if items:
            self.blocks.append(("list", list(items)))

    def table(self, frame: pd.DataFrame):
        if frame is not None and len(frame):
            self.blocks.append(("table", frame.astype(str)))

    def figure(self, name: str, png: bytes, caption: str):
        self.blocks.append(("fig", name, png, caption))

    def markdown(self) -> str:
        out = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                out.append("#" * block[1] + " " + block[2])
            elif kind == "p":
                out.append(block[1])
            elif kind == "list":
                out.append("\n".join(f"- {item}" for item in block[1]))
            elif kind == "table":
                frame = block[1]
                cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
                lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |",
                         "|" + "---|" * len(frame.columns)]
                lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
                out.append("\n".join(lines))
            elif kind == "fig":
                out.append(f"![{block[3]}](figures/{block[1]}.png)\n\n*{block[3]}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        esc = html.escape
        body = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                body.append(f"<h{block[1]}>{esc(block[2])}</h{block[1]}>")
            elif kind == "p":
                text = esc(block[1]).replace("**", "")
                body.append(f"<p>{text}</p>")
            elif kind == "list":
                body.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in block[1]) + "</ul>")
            elif kind == "table":
                frame = block[1]
                head = "".join(f"<th>{esc(str(c))}</th>" for c in frame.columns)
                rows = "".join("<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in r) + "</tr>"
                               for r in frame.itertuples(index=False))
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "fig":
                data = base64.b64encode(block[2]).decode("ascii")
                body.append(f'<figure><img alt="{esc(block[3])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{esc(block[3])}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45;padding:0 1em}"
                 "table{border-collapse:collapse;font-size:0.85em;margin:1em 0}"
                 "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}"
                 "img{max-width:100%}figcaption{font-style:italic;color:#444}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIGURE_DPI)
    return buf.getvalue()


def _add_figure(doc: _Doc, out: Path, listing: list, name: str, make, caption: str) -> None:
    """Draw, save to out/figures/<name>.png and place in the document; a figure with nothing to draw
    (an objective or log absent) becomes a one-line note instead."""
    try:
        fig = make()
    except ValueError as err:
        doc.p(f"Figure '{name}' is not shown: {err}.")
        return
    png = _png(fig)
    (out / "figures" / f"{name}.png").write_bytes(png)
    doc.figure(name, png, caption)
    listing.append(f"figures/{name}.png")


# ----------------------------------------------------------------------------- tables


def _comparison_table(rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "comparison": rows["comparison"], "n": rows["n"],
        "diff (pts)": [_num(x, signed=True) for x in rows["mean_diff"]],
        "95% CI": [_ci(lo, hi) for lo, hi in zip(rows["ci_low"], rows["ci_high"])],
        "p t": [_p(x) for x in rows["p_ttest"]], "p Wilcoxon": [_p(x) for x in rows["p_wilcoxon"]],
        "p perm": [_p(x) for x in rows["p_permutation"]], "Holm p (t)": [_p(x) for x in rows["p_holm"]],
        "Holm p (TOST)": [_p(x) for x in rows["p_tost_holm"]], "d_z": [_num(x) for x in rows["d_z"]],
        "A12": [_num(x) for x in rows["a12"]], "MDE (pts)": [_num(x) for x in rows["mde"]],
        "verdict": rows["verdict"]})


def _epoch_mean_table(rows: pd.DataFrame, column: str, label: str, signed: bool) -> pd.DataFrame:
    """A hook summary (objective, epoch, n, ``column``, ci_low, ci_high) as a table, 3 decimals."""
    return pd.DataFrame({
        "objective": rows["objective"], "epoch": rows["epoch"], "n": rows["n"],
        label: [_num(x, 3, signed) for x in rows[column]],
        "95% CI": [_ci(lo, hi, signed, 3) for lo, hi in zip(rows["ci_low"], rows["ci_high"])],
    })


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "ban_analysis": ban_analysis.__version__}
    for name in SOFTWARE:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _run_commits(study_dir: Path) -> list[str]:
    """Git commits the runs recorded in their manifests (the code that trained them)."""
    commits = set()
    for path in study_dir.glob("runs/seed-*/*/manifest.json"):
        try:
            commit = json.loads(path.read_text()).get("git_commit")
        except (OSError, json.JSONDecodeError):
            continue
        if commit:
            commits.add(str(commit))
    return sorted(commits)


def _methods(study: load_mod.Study, att: att_mod.Attribution, versions: dict, commits: list[str], command: str | None,
             ci_methods: list[str], seed: int) -> str:
    seeds = study.seeds
    families = "; ".join(f"{k}: {v}" for k, v in att_mod.FAMILIES.items())
    software = ", ".join(f"{k} {v}" for k, v in versions.items())
    return (
        f"We analysed {len(seeds)} seeds ({', '.join(map(str, seeds))}) from `{study.root}`. Pairing: each seed "
        "trains one teacher that every objective shares, and students of the same (seed, generation) share their "
        "initial weights and data order across objectives, so every comparison is a paired difference over seeds. "
        "\"The student\" of an objective is its generation 1; later generations and ensembles (softmax averages of "
        "generations 1..k, eq. 4) are reported separately (family D). Each comparison gives the mean paired "
        f"difference in test-accuracy points with a 95% bootstrap CI ({'/'.join(ci_methods) or 'BCa'}, {N_BOOT:,} "
        "resamples), two-sided p-values of the paired t-test, the exact Wilcoxon signed-rank test and the "
        "sign-flip permutation test (exact up to 16 seeds, Monte Carlo beyond), Cohen's d_z and the within-seed probability of improvement A12. Holm's "
        f"step-down correction is applied within each family ({families}) to the t-test p-values that the verdicts "
        "use, and separately to the permutation and TOST p-values. Equivalence is tested by TOST (two one-sided "
        f"paired t-tests) with margin ±{att.margin:.2f} points (equivalence_margin = {study.equivalence_margin} in "
        "study.json, fixed before the runs). The fraction of BAN's gain a probe recovers is "
        "mean(probe − teacher) / mean(BAN − teacher) with a paired bootstrap CI (unbounded when BAN's own gain CI "
        f"contains 0), judged against gain_fraction_threshold = {att.threshold}. Minimum detectable effects (MDE) "
        f"are for the paired t-test at 80% power and level α/m (Holm's first step; m = family size) from the observed "
        f"sd of the differences. α = {att.alpha}. All bootstraps draw from one numpy Generator seeded {seed}. "
        f"Software: {software}. Runs' recorded git commits: {', '.join(commits) or 'not recorded'}. "
        f"Command: `{command or 'ban_analysis.report.write_report (no command given)'}`.")


# ----------------------------------------------------------------------------- the report


def _hook_sections(doc: _Doc, study: load_mod.Study, fig, stats: dict, seed: int) -> None:
    doc.h(3, "How the objectives teach (hook logs and test logits)")
    share = grads.update_share_by_epoch(study)
    if share.empty:
        doc.p("No update_share logs in this study: the dark term's share of the update is not shown.")
    else:
        summary = grads.update_share_summary(share)
        stats["hooks"]["update_share"] = summary
        doc.p("Share of the whole-network update carried by the dark-knowledge term (update_share hook), mean over "
              "seeds with a 95% t-interval across seeds, in the first and last logged epoch (generation 1).")
        doc.table(_epoch_mean_table(summary, "share_dark", "dark share", signed=False))
        fig("update_share", lambda: F.update_share_over_training(share, seed=seed),
                     "Share of the update carried by the target and dark terms over training; bands: 95% CI across seeds.")
    terms = grads.term_sizes(study, rng=np.random.default_rng(seed))
    if terms.empty:
        doc.p("No logit_split logs with teacher columns: the confidence-vs-term-size figure is not shown.")
    else:
        fig("confidence_vs_term_sizes", lambda: F.confidence_vs_term_sizes(terms),
                     "Teacher confidence vs per-sample size of the target and dark terms (logit_split), generation 1.")
    cos = grads.param_cos_by_epoch(study)
    if cos.empty:
        doc.p("No param_split logs: the per-sample parameter-gradient cosine is not shown.")
    else:
        summary = grads.param_cos_summary(cos)
        stats["hooks"]["param_cos"] = summary
        last = summary.loc[summary.groupby("objective", sort=False)["epoch"].idxmax()]
        doc.p("Per-sample cosine between the target and dark terms' parameter gradients (param_split, sampled), "
              "last logged epoch, mean over seeds with a 95% t-interval:")
        doc.table(_epoch_mean_table(last, "mean", "cosine", signed=True))
        fig("param_cosine", lambda: F.param_cosine_over_epochs(cos, seed=seed),
                     "Per-sample cosine between the two terms' parameter gradients by epoch; bands: 95% CI across seeds.")
    fix = grads.fixes(study)
    if fix.empty:
        doc.p("No test logits: which samples students fix is not shown.")
        return
    summary = grads.fixes_summary(fix)
    stats["hooks"]["fixes"] = summary
    doc.p("Test samples the students fix (teacher wrong, student right) and break (teacher right, student wrong), "
          "means over seeds (descriptive, no tests), with the teacher's mean confidence and non-target entropy "
          "on the teacher mistakes that students fixed vs kept wrong:")
    doc.table(pd.DataFrame({"objective": summary["objective"], "seeds": summary["n_seeds"],
                            "test n": summary["n_test"], "fixed": [_num(x, 1) for x in summary["fixed"]],
                            "broken": [_num(x, 1) for x in summary["broken"]],
                            "fix rate": [_num(x, 3) for x in summary["fix_rate"]],
                            "conf. fixed": [_num(x, 3) for x in summary["conf_fixed"]],
                            "conf. kept wrong": [_num(x, 3) for x in summary["conf_kept_wrong"]],
                            "entropy fixed": [_num(x, 3) for x in summary["entropy_fixed"]],
                            "entropy kept wrong": [_num(x, 3) for x in summary["entropy_kept_wrong"]]}))
    for column, label in (("teacher_confidence", "teacher confidence"),
                          ("teacher_nontarget_entropy", "teacher non-target entropy")):
        bins = grads.fix_rate_by_bin(fix, column)
        if not bins.empty:
            fig(f"fix_rate_by_{column}", lambda: F.fix_rate_by_confidence(bins, label, seed=seed),
                         f"Fraction of the teacher's test mistakes each student fixes, by {label} (quintiles); "
                         "bands: 95% CI across seeds.")


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
    out = Path(study_dir) / "report"
    (out / "figures").mkdir(parents=True, exist_ok=True)
    name = study.config.get("name") or Path(study_dir).resolve().name
    versions, commits = _versions(), _run_commits(Path(study_dir))
    comps = att.comparisons
    ci_methods = sorted(set(comps["ci_method"]) - {""}) if not comps.empty else []
    stats: dict = {"study": {"dir": str(study.root), "name": name, "seeds": study.seeds, "n_seeds": len(study.seeds),
                             "objectives": study.objectives, "metric": "test_acc",
                             "units": "accuracy points (test accuracy x 100)", "equivalence_margin_points": att.margin,
                             "equivalence_margin": study.equivalence_margin, "gain_fraction_threshold": att.threshold,
                             "alpha": att.alpha, "power": att_mod.POWER, "seed": seed, "n_boot": N_BOOT},
                   "answer": att.answer, "notes": att.notes, "accuracy": att.accuracy, "comparisons": comps,
                   "gain_fractions": att.fractions,
                   "a12": {} if att.a12.empty else att.a12.to_dict(orient="index"), "hooks": {},
                   "rules": {"verdict": att_mod.VERDICT_RULES, "fraction": att_mod.FRACTION_RULES, "answer": att_mod.ANSWER_RULES,
                             "families": att_mod.FAMILIES}}
    doc, listing = _Doc(), []
    fig = lambda name, make, caption: _add_figure(doc, out, listing, name, make, caption)  # noqa: E731
    doc.h(1, f"Study report: {name}")
    doc.p("**Question:** does CWTM confidence weighting or DKPP's permuted dark knowledge explain the students' "
          "gains over their teachers?")
    doc.h(2, "Answer")
    doc.p(f"**{att.answer['headline']}**")
    doc.items(att.answer["sentences"])
    power = comps[comps["family"] == "B"] if not comps.empty else comps
    if len(power):
        doc.p("Uncertainty: n = " + f"{len(study.seeds)} seeds; with the observed spread the study could detect "
              "(80% power, Holm level) differences of at least " + ", ".join(
                  f"{c} {_num(m)} points" if np.isfinite(m) else f"{c} (not computable)"
                  for c, m in zip(power["comparison"], power["mde"])) + ".")
    if att.notes:
        doc.h(2, "Notes on this study")
        doc.items(att.notes)

    doc.h(2, "Evidence")
    doc.h(3, "Accuracy")
    acc = att.accuracy
    doc.table(pd.DataFrame({"student": acc["student"], "n": acc["n"], "mean (%)": [_num(x) for x in acc["mean"]],
                            "sd": [_num(x) for x in acc["sd"]],
                            "95% CI": [_ci(lo, hi, False) for lo, hi in zip(acc["ci_low"], acc["ci_high"])]}))
    fig("accuracy", lambda: F.accuracy_by_objective(study.results, seed=seed),
        "Test accuracy per seed (dots) and mean with 95% bootstrap CI, by objective and generation.")
    fig("paired_slopes", lambda: F.paired_slopes(att.matrix),
        "Teacher -> generation-1 student per seed (green: student better).")
    doc.h(3, "Paired comparisons")
    if comps.empty:
        doc.p("No paired comparisons are possible (teacher or students missing).")
    for family, description in att_mod.FAMILIES.items():
        rows = comps[comps["family"] == family] if not comps.empty else comps
        if len(rows):
            doc.h(4, f"Family {family}: {description} (Holm within family, m = {len(rows)})")
            doc.table(_comparison_table(rows))
    if not comps.empty:
        fig("forest", lambda: F.forest_plot(comps, att.margin),
            f"Paired differences with 95% CIs, coloured by verdict; shaded: the equivalence margin ±{att.margin:.2f} points.")
    fig("improvement_matrix", lambda: F.improvement_matrix(att.a12),
        "Within-seed probability that the row beats the column.")
    fig("generations", lambda: F.generations_curve(study.results, seed=seed),
        "BAN generations and ensembles of generations 1..k; grey: single seeds.")
    fr = att.fractions
    if len(fr):
        doc.h(3, "Fraction of BAN's gain over the teacher each objective recovers")
        doc.table(pd.DataFrame({"probe": fr["probe"], "n": fr["n"], "probe gain (pts)": [_num(x, signed=True) for x in fr["probe_gain"]],
                                "BAN gain (pts)": [_num(x, signed=True) for x in fr["ban_gain"]],
                                "fraction": [_num(x) for x in fr["estimate"]],
                                "95% CI": [_ci(lo, hi, False) for lo, hi in zip(fr["ci_low"], fr["ci_high"])],
                                "verdict": fr["verdict"]}))
    _hook_sections(doc, study, fig, stats, seed)
    stats["figures"] = listing

    doc.h(2, "Verdict rules (checked in order; the first that holds decides)")
    doc.table(pd.DataFrame(att_mod.VERDICT_RULES, columns=["verdict", "rule", "wording"]))
    doc.table(pd.DataFrame(att_mod.FRACTION_RULES, columns=["fraction verdict", "rule", "wording"]))
    doc.table(pd.DataFrame(att_mod.ANSWER_RULES, columns=["answer per probe", "rule"]))
    doc.h(2, "Methods")
    methods = _methods(study, att, versions, commits, command, ci_methods, seed)
    doc.p(methods)
    stats["methods"] = {"text": methods, "versions": versions, "git_commits": commits, "command": command,
                        "ci_methods": ci_methods}

    (out / "index.md").write_text(doc.markdown())
    (out / "report.html").write_text(doc.html(f"Study report: {name}"))
    (out / "stats.json").write_text(json.dumps(to_jsonable(stats), indent=2, allow_nan=False) + "\n")
    logger.info("report written to %s", out)
    return out

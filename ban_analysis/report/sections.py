"""Sections of the report that read hook logs, metrics and the component split (see writer.py).

Each function appends blocks to a ``document.Doc``, records the numbers it shows in the
``stats`` dict that becomes stats.json, and says in one line what is missing instead of failing.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ban_analysis.report import figures as F, gradients as grads, noise
from ban_analysis.report.attribution import Attribution
from ban_analysis.report.document import Doc, ci, num, pval
from ban_analysis.report.load import Study
from ban_analysis.roles import COMPONENTS
from ban_analysis.report.rules import display_name, pct


def comparison_table(rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "comparison": rows["comparison"], "n": rows["n"],
        "diff (pts)": [num(x, signed=True) for x in rows["mean_diff"]],
        "95% CI": [ci(lo, hi) for lo, hi in zip(rows["ci_low"], rows["ci_high"])],
        "p t": [pval(x) for x in rows["p_ttest"]], "p Wilcoxon": [pval(x) for x in rows["p_wilcoxon"]],
        "p perm": [pval(x) for x in rows["p_permutation"]], "Holm p (t)": [pval(x) for x in rows["p_holm"]],
        "Holm p (TOST)": [pval(x) for x in rows["p_tost_holm"]], "d_z": [num(x) for x in rows["d_z"]],
        "A12": [num(x) for x in rows["a12"]], "MDE (pts)": [num(x) for x in rows["mde"]],
        "verdict": rows["verdict"]})


def _epoch_mean_table(rows: pd.DataFrame, column: str, label: str, signed: bool) -> pd.DataFrame:
    """A hook summary (objective, epoch, n, ``column``, ci_low, ci_high) as a table, 3 decimals."""
    return pd.DataFrame({
        "variant": rows["objective"], "epoch": rows["epoch"], "n": rows["n"],
        label: [num(x, 3, signed) for x in rows[column]],
        "95% CI": [ci(lo, hi, signed, 3) for lo, hi in zip(rows["ci_low"], rows["ci_high"])],
    })


# ----------------------------------------------------------------------------- components


def components_section(doc: Doc, att: Attribution, stats: dict) -> None:
    """Which part of the teacher's signal carries the reference's gain (components.component_analysis)."""
    comp = att.components
    stats["components"] = comp
    ref = display_name(comp.get("reference"))
    doc.h(2, "Which part of the teacher's signal carries the gain")
    members = comp.get("members", {})
    listed = "; ".join(f"{COMPONENTS[c]}: {', '.join(display_name(v) for v in members.get(c, [])) or 'none'}"
                       for c in COMPONENTS)
    doc.p(f"Each part of the teacher's signal as a fraction of {ref}'s gain over its teacher, "
          f"mean(part) / mean({ref} − teacher) over seeds, with a paired bootstrap 95% CI, judged against the "
          f"threshold {pct(att.threshold)} by the fraction rules. The confidence weight and the non-target mass "
          f"are each carried by a probe or control (their gain over the teacher); the structure of the dark "
          f"knowledge itself is what {ref} has and a non-target-mass probe lacks (the per-seed difference "
          f"{ref} − probe; * marks the non-target-mass probe that recovers most). Carriers: {listed}.")
    rows = comp.get("rows", [])
    if not rows:
        doc.p(f"No part can be estimated: the study lacks {ref}, its teachers, or a probe carrying a part.")
        return
    frame = pd.DataFrame(rows)
    names = {**COMPONENTS, "structure": "the structure of the dark knowledge itself"}
    doc.items([f"{names[r['component']][:1].upper()}{names[r['component']][1:]} ({r['label']}): {r['verdict']}."
               for r in rows])
    best = frame["best"] if "best" in frame.columns else pd.Series([None] * len(frame))
    doc.table(pd.DataFrame({
        "part": [names[c] for c in frame["component"]],
        "variant": [lab + (" *" if b is True else "") for lab, b in zip(frame["label"], best)],
        "n": frame["n"], "part (pts)": [num(x, signed=True) for x in frame["part_mean"]],
        f"{ref} gain (pts)": [num(x, signed=True) for x in frame["reference_gain"]],
        "fraction": [num(x) for x in frame["estimate"]],
        "95% CI": [ci(lo, hi, False) for lo, hi in zip(frame["ci_low"], frame["ci_high"])],
        f"{ref} vs variant (family B, Holm p)": [f"{k} ({pval(p)})" if k else "n/a" for k, p in
                                                 zip(frame["vs_reference_kind"], frame["vs_reference_p_holm"])]}))
    if any(not f["enough"] for f in comp.get("seeds_needed", [])):
        doc.p("Some Holm families have too few seeds for the exact sign-flip test to reach their level; the "
              "notes say how many seeds each would need.")


# ----------------------------------------------------------------------------- held-out attribution


def _heldout_tables(summary: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    cell = {(o, q): (m, lo, hi, n) for o, q, m, lo, hi, n in
            zip(summary["objective"], summary["quantity"], summary["mean"], summary["ci_low"], summary["ci_high"],
                summary["n"])}
    variants = list(dict.fromkeys(summary["objective"]))

    def show(o, q, digits=4, signed=True):
        if (o, q) not in cell:
            return "n/a"
        m, lo, hi, _ = cell[(o, q)]
        return f"{num(m, digits, signed)} {ci(lo, hi, signed, digits)}"

    main = pd.DataFrame({
        "variant": variants, "seeds": [int(cell[(o, "a_target")][3]) for o in variants],
        "Σ a_target": [show(o, "a_target") for o in variants], "Σ a_dark": [show(o, "a_dark") for o in variants],
        "target share": [show(o, "share_target", 2, False) for o in variants],
        "dark share": [show(o, "share_dark", 2, False) for o in variants],
        "Σ a_update / Σ observed": [show(o, "linearisation_ratio", 2, False) for o in variants],
        "corr(a_update, observed)": [show(o, "linearisation_corr", 2, True) for o in variants]})
    groups = sorted({q.split("_", 2)[2] for q in summary["quantity"] if q.startswith(("a_target_", "a_dark_"))})
    by_group = pd.DataFrame([{"variant": o, "group": g, "Σ a_target": show(o, f"a_target_{g}"),
                              "Σ a_dark": show(o, f"a_dark_{g}")} for o in variants for g in groups])
    return main, by_group


def heldout_section(doc: Doc, study: Study, fig, stats: dict) -> None:
    """Which term lowered the held-out loss (heldout_attribution hook), with the linearisation check."""
    by_step = grads.heldout_attribution_by_step(study)
    if by_step.empty:
        doc.p("No heldout_attribution logs in this study: which term lowered the held-out loss is not shown.")
        return
    summary = grads.heldout_attribution_summary(by_step)
    stats["hooks"]["heldout_attribution"] = summary
    main, by_group = _heldout_tables(summary)
    doc.p("Held-out attribution (heldout_attribution hook, generation 1): the first-order change of the held-out "
          "loss from each logged step's update, -lr <g_heldout, G_term>, summed over training (below 0: the term "
          "lowered the held-out loss); each term's share of the sum of a_total; and the linearisation check, the "
          "sum of the update's first-order prediction over the sum of the measured changes (1 when first order "
          "is exact) and their correlation over steps. Means over seeds with 95% t-intervals across seeds.")
    doc.table(main)
    if len(by_group):
        doc.p("The same sums by sample group:")
        doc.table(by_group)
    fig("heldout_attribution", lambda: F.cumulative_heldout_attribution(by_step),
        "Cumulative first-order change of the held-out loss from the target and dark terms by step; bands: mean "
        "± 95% t-interval across seeds.")


# ----------------------------------------------------------------------------- label noise


def noise_section(doc: Doc, study: Study, stats: dict, rng: np.random.Generator, n_boot: int) -> None:
    """Students vs teachers on the noisy and clean training labels (metrics.csv, logit_split columns)."""
    final = noise.noise_metrics(study)
    by_epoch = noise.noisy_vs_clean_by_epoch(study)
    if final.empty and by_epoch.empty:
        doc.p("No label-noise measurements (metrics.csv train_acc_clean / memorised, logit_split label_noisy): "
              "the noisy-vs-clean comparison is not shown.")
        return
    doc.h(3, "Noisy and clean training labels")
    if not final.empty:
        comps = noise.noise_comparisons(final, study.objectives, rng=rng, n_boot=n_boot)
        stats["label_noise"]["final_epoch"] = comps
        doc.p("Final epoch of each generation-1 student vs its seed's teacher, paired by seed (points; Holm within "
              "each metric): train_acc_clean is the accuracy against the clean training labels (higher: closer to "
              "the clean labels), memorised the share of flipped training samples predicted as their noisy label "
              "(lower: less noise fitted).")
        if len(comps):
            doc.table(pd.DataFrame({
                "metric": comps["metric"], "variant": [display_name(v) for v in comps["variant"]], "n": comps["n"],
                "teacher (%)": [num(x) for x in comps["teacher_mean"]],
                "student (%)": [num(x) for x in comps["variant_mean"]],
                "diff (pts)": [num(x, signed=True) for x in comps["mean_diff"]],
                "95% CI": [ci(lo, hi) for lo, hi in zip(comps["ci_low"], comps["ci_high"])],
                "p t": [pval(x) for x in comps["p_ttest"]], "Holm p": [pval(x) for x in comps["p_holm"]]}))
    if not by_epoch.empty:
        summary = noise.noisy_vs_clean_summary(by_epoch)
        stats["label_noise"]["per_sample"] = summary
        doc.p("Logged training samples (logit_split), last logged epoch, on noisy and on clean labels: the "
              "student's (q_label) and teacher's (p_label) probability of the training label and their difference "
              "(q_minus_p; below 0 on noisy samples: the student fits the noisy label less than its teacher), the "
              "share whose teacher, and (when logged) student, predicts the clean label, and the student's gain "
              "there over its teacher (clean_gain, per seed); means over seeds with 95% t-intervals.")
        doc.table(_noise_sample_table(summary, study.objectives))


def _noise_sample_table(summary: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """noisy_vs_clean_summary as one row per (variant, group), one column per quantity: mean [CI]."""
    cells = {(o, g, q): f"{num(m, 3)} {ci(lo, hi, True, 3)}" for o, g, q, m, lo, hi in
             zip(summary["objective"], summary["group"], summary["quantity"], summary["mean"], summary["ci_low"],
                 summary["ci_high"])}
    quantities = [q for q in noise.SAMPLE_QUANTITIES if q in set(summary["quantity"])]
    keys = sorted({(o, g) for o, g in zip(summary["objective"], summary["group"])},
                  key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k[1] != "noisy"))
    seeds = summary.groupby(["objective", "group"])["n"].max()
    return pd.DataFrame([{"variant": display_name(o), "group": g, "seeds": int(seeds[(o, g)]),
                          **{q: cells.get((o, g, q), "n/a") for q in quantities}} for o, g in keys])


# ----------------------------------------------------------------------------- hook logs and test logits


def _fixes_table(summary: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"variant": summary["objective"], "seeds": summary["n_seeds"],
                         "test n": summary["n_test"], "fixed": [num(x, 1) for x in summary["fixed"]],
                         "broken": [num(x, 1) for x in summary["broken"]],
                         "fix rate": [num(x, 3) for x in summary["fix_rate"]],
                         "conf. fixed": [num(x, 3) for x in summary["conf_fixed"]],
                         "conf. kept wrong": [num(x, 3) for x in summary["conf_kept_wrong"]],
                         "entropy fixed": [num(x, 3) for x in summary["entropy_fixed"]],
                         "entropy kept wrong": [num(x, 3) for x in summary["entropy_kept_wrong"]]})


def _update_share_and_terms(doc: Doc, study: Study, fig, stats: dict, seed: int) -> None:
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


def hook_sections(doc: Doc, study: Study, fig, stats: dict, seed: int) -> None:
    doc.h(3, "How the variants teach (hook logs and test logits)")
    _update_share_and_terms(doc, study, fig, stats, seed)
    heldout_section(doc, study, fig, stats)
    fix = grads.fixes(study)
    if fix.empty:
        doc.p("No test logits: which samples students fix is not shown.")
        return
    summary = grads.fixes_summary(fix)
    stats["hooks"]["fixes"] = summary
    doc.p("Test samples the students fix (teacher wrong, student right) and break (teacher right, student wrong), "
          "means over seeds (descriptive, no tests), with the teacher's mean confidence and non-target entropy "
          "on the teacher mistakes that students fixed vs kept wrong:")
    doc.table(_fixes_table(summary))
    for column, label in (("teacher_confidence", "teacher confidence"),
                          ("teacher_nontarget_entropy", "teacher non-target entropy")):
        bins = grads.fix_rate_by_bin(fix, column)
        if not bins.empty:
            fig(f"fix_rate_by_{column}", lambda bins=bins, label=label: F.fix_rate_by_confidence(bins, label, seed=seed),
                f"Fraction of the teacher's test mistakes each student fixes, by {label} (quintiles); "
                "bands: 95% CI across seeds.")

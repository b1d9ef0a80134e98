"""Write a realistic synthetic study folder from a seeded numpy Generator.

Used by the report and figure tests: everything analysis reads is written with the real layout
(every path comes from ``ban_analysis.layout``) and columns, and every accuracy in results.csv is
the accuracy of the logits written next to it, so a test can recompute any number from the files
alone.

Accuracies are planted per seed: teacher ~ 85% +- 0.3 points, each objective's generation-1 student
at teacher + ``effects[objective]`` points + N(0, ``noise_sd``) points (independent per objective,
so paired differences have sd ~ noise_sd * sqrt(2)). Later BAN generations add ``later_gen_gain``
points per generation. The test set has ``n_test`` samples, so accuracies lie on a 100 / n_test grid.

Options whose data are drawn from a second Generator (so turning them on leaves every number
above unchanged): ``names`` writes each objective's runs under another variant name (study.json
then lists ``variants`` tables and a ``roles`` table), ``heldout`` writes heldout_attribution logs,
``label_noise`` adds the noisy-label columns to logit_split and metrics.csv.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ban_analysis.layout import METRIC_COLUMNS, RESULT_COLUMNS, TEACHER, RunLayout, StudyLayout

OBJECTIVES = ("ce", "ban", "cwtm", "dkpp", "tmls")
# A realistic study: effects about the size of seed noise (the Fashion-MNIST pilot).
REALISTIC_EFFECTS = {"ce": 0.0, "ban": 0.1, "cwtm": 0.05, "dkpp": -0.05, "tmls": 0.0}
# BAN and CWTM gain 1.5 points, DKPP/TMLS/CE nothing: CWTM explains BAN's gain, DKPP does not.
PLANTED_EFFECTS = {"ce": 0.0, "ban": 1.5, "cwtm": 1.5, "dkpp": 0.0, "tmls": 0.0}
NULL_EFFECTS = {"ce": 0.0, "ban": 0.0, "cwtm": 0.0, "dkpp": 0.0, "tmls": 0.0}

# How much of the update the dark term carries at the start and end of training (update_share).
_DARK_SHARE = {"ce": (0.15, 0.45), "ban": (0.35, 0.65), "cwtm": (0.15, 0.45), "dkpp": (0.35, 0.55),
               "tmls": (0.3, 0.5)}
_LAYER_GROUPS = ("layer1", "head")
_TRAIN_SIZE = 5000
# heldout_attribution: mean first-order change of the held-out loss per step from each term
# (below 0: lowers it). BAN's dark term does most of the work, CWTM's target term, CE neither much.
HELDOUT_PER_STEP = {"ce": (-2e-3, -0.5e-3), "ban": (-1e-3, -3e-3), "cwtm": (-2.5e-3, -0.5e-3),
                    "dkpp": (-1e-3, -1e-3), "tmls": (-1.5e-3, -0.8e-3)}
# label noise: points by which a student's final memorised share lies below its teacher's, and
# its clean-label training accuracy above.
NOISE_GAIN = {"ce": 0.0, "ban": 6.0, "cwtm": 3.0, "dkpp": 1.0, "tmls": 2.0}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _logits_with_correct(target: np.ndarray, correct: np.ndarray, wrong_class: np.ndarray,
                         num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """(N, C) float32 logits whose argmax is the label where ``correct``, else ``wrong_class``."""
    n = target.size
    logits = rng.normal(0.0, 1.0, size=(n, num_classes))
    chosen = np.where(correct, target, wrong_class)
    # A positive margin over the row max makes the chosen class the argmax for sure.
    logits[np.arange(n), chosen] = logits.max(axis=1) + rng.exponential(2.0, size=n) + 1e-3
    return logits.astype(np.float32)


def _other_class(target: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return (target + rng.integers(1, num_classes, size=target.size)) % num_classes


def _metrics(logits: np.ndarray, target: np.ndarray) -> dict[str, float]:
    probs = _softmax(logits.astype(np.float64))
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == target
    bins = np.minimum((conf * 15).astype(int), 14)
    ece = sum(abs(conf[bins == b].sum() - correct[bins == b].sum()) for b in range(15)) / target.size
    nll = float(-np.mean(np.log(np.clip(probs[np.arange(target.size), target], 1e-12, None))))
    return {"test_acc": float(correct.mean()), "test_nll": nll, "test_ece": float(ece)}


def _student_correct(teacher_correct: np.ndarray, teacher_conf: np.ndarray, k_target: int,
                     rng: np.random.Generator, churn: float = 0.03) -> np.ndarray:
    """A correctness pattern near the teacher's with exactly ``k_target`` correct samples.

    Low-confidence teacher mistakes are fixed more often (weights 1 - confidence), as in practice.
    """
    n = teacher_correct.size
    right, wrong = np.flatnonzero(teacher_correct), np.flatnonzero(~teacher_correct)
    delta = k_target - right.size
    n_break = int(min(right.size, max(0, round(churn * n / 2) - min(delta, 0))))
    n_fix = n_break + delta
    n_fix = int(np.clip(n_fix, 0, wrong.size))
    n_break = n_fix - delta
    w = 1.0 - teacher_conf[wrong] + 1e-3
    fix = rng.choice(wrong, size=n_fix, replace=False, p=w / w.sum())
    brk = rng.choice(right, size=n_break, replace=False)
    out = teacher_correct.copy()
    out[fix] = True
    out[brk] = False
    return out


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)


def _share_row(base: dict, mean_share: float, rng: np.random.Generator) -> dict:
    """One update_share row: the whole network and each layer group."""
    share_dark = float(np.clip(mean_share + rng.normal(0, 0.03), 0.01, 0.99))
    target_norm = float(rng.uniform(0.5, 2.0))
    row = {**base, "target_norm": target_norm, "dark_norm": target_norm * share_dark / (1 - share_dark),
           "cos_target_dark": float(rng.uniform(-0.6, 0.0)), "share_target": 1 - share_dark,
           "share_dark": share_dark}
    for group in _LAYER_GROUPS:
        g_dark = float(np.clip(share_dark + rng.normal(0, 0.05), 0.0, 1.0))
        row.update({f"{group}/target_norm": target_norm, f"{group}/dark_norm": g_dark,
                    f"{group}/cos_target_dark": -0.3, f"{group}/share_target": 1 - g_dark,
                    f"{group}/share_dark": g_dark})
    return row


def _hook_frames(objective: str, gen: int, epochs: int, steps_per_epoch: int, num_classes: int,
                 rng: np.random.Generator, extra: np.random.Generator,
                 label_noise: float = 0.0) -> dict[tuple[str, int], pd.DataFrame]:
    """One DataFrame per (hook, epoch) with the hooks' columns (README, Gradient hooks) plus gen/epoch/step.

    ``rng`` draws every column the hooks always had; ``extra`` only the label-noise columns.
    """
    frames: dict[tuple[str, int], pd.DataFrame] = {}
    total = epochs * steps_per_epoch
    start, end = _DARK_SHARE.get(objective, (0.3, 0.5))
    has_teacher = objective != "ce"
    for epoch in range(epochs):
        share_rows, logit_rows, head_rows, param_rows = [], [], [], []
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            base = {"gen": gen, "epoch": epoch, "step": step}
            share_rows.append(_share_row(base, start + (end - start) * step / max(total - 1, 1), rng))

            b = 16
            idx = rng.choice(_TRAIN_SIZE, size=b, replace=False)
            target = rng.integers(0, num_classes, size=b)
            p_max = rng.beta(5, 1.5, size=b)
            teacher_correct = rng.random(b) < p_max
            p_label = np.where(teacher_correct, p_max, p_max * rng.uniform(0, 0.5, size=b))
            q_label = np.clip(p_label + rng.normal(0, 0.1, size=b), 0.001, 0.999)
            g_target = q_label - (p_label if has_teacher else 1.0)
            g_dark = (1 - p_max) * rng.uniform(0.2, 1.0, size=b) + 0.02 * rng.random(b)
            nan = np.full(b, np.nan)
            logit_rows.append(pd.DataFrame({
                **base, "sample_index": idx, "target": target,
                "teacher_argmax": np.where(teacher_correct, target, (target + 1) % num_classes) if has_teacher else nan,
                "g_target": g_target, "g_dark_norm": g_dark, "g_norm": np.hypot(g_target, g_dark),
                "p_label": p_label if has_teacher else nan, "p_max": p_max if has_teacher else nan,
                "teacher_correct": teacher_correct.astype(float) if has_teacher else nan,
                "q_label": q_label, "cw_part": (p_max / p_max.sum()) if has_teacher else nan,
                "teacher_nontarget_entropy": rng.uniform(0.2, 2.0, size=b) if has_teacher else nan,
                "kl_teacher_student": rng.exponential(0.1, size=b) if has_teacher else nan,
            }))
            if label_noise > 0:
                _add_noise_columns(logit_rows[-1], objective, num_classes, label_noise, extra)
            head_rows.append(pd.DataFrame({
                **base, "sample_index": idx, "head_target_norm": np.abs(g_target) * 3,
                "head_dark_norm": g_dark * 3, "head_cos": rng.uniform(-1, 0.2, size=b)}))
            if i % 2 == 0:  # param_split is sampled: every other step, 4 samples
                m = 4
                cos_mean = -0.5 + 0.3 * step / max(total - 1, 1)
                param_rows.append(pd.DataFrame({
                    **base, "sample_index": idx[:m], "param_target_norm": rng.uniform(0.1, 1, m),
                    "param_dark_norm": rng.uniform(0.05, 0.8, m),
                    "param_cos": np.clip(cos_mean + rng.normal(0, 0.15, m), -1, 1),
                    "target_cos_batch": rng.uniform(0, 0.5, m), "dark_cos_batch": rng.uniform(0, 0.5, m)}))
        frames[("update_share", epoch)] = pd.DataFrame(share_rows)
        frames[("logit_split", epoch)] = pd.concat(logit_rows, ignore_index=True)
        frames[("head_split", epoch)] = pd.concat(head_rows, ignore_index=True)
        frames[("param_split", epoch)] = pd.concat(param_rows, ignore_index=True)
    return frames


def _add_noise_columns(frame: pd.DataFrame, objective: str, num_classes: int, rate: float,
                       extra: np.random.Generator) -> None:
    """logit_split's label-noise columns, in place: ``target`` is the (noisy) training label.

    On noisy samples the teacher predicts the clean label 40% of the time (else it memorised the
    noisy one); students predict it more often by NOISE_GAIN points and put less probability on
    the noisy label.
    """
    b = len(frame)
    noisy = extra.random(b) < rate
    target = frame["target"].to_numpy()
    clean = np.where(noisy, (target + extra.integers(1, num_classes, size=b)) % num_classes, target)
    gain = NOISE_GAIN.get(objective, 0.0) / 100
    teacher_clean = extra.random(b) < 0.4
    student_clean = extra.random(b) < 0.4 + gain * 4
    frame["label_noisy"] = noisy
    frame["clean_target"] = clean
    if objective != "ce":
        frame["teacher_argmax"] = np.where(noisy, np.where(teacher_clean, clean, target), frame["teacher_argmax"])
    frame["student_argmax"] = np.where(noisy, np.where(student_clean, clean, target), target)
    frame.loc[noisy, "q_label"] = np.clip(frame.loc[noisy, "q_label"] - gain * 4, 0.001, 0.999)


def _heldout_frames(objective: str, gen: int, epochs: int, steps_per_epoch: int, label_noise: float,
                    extra: np.random.Generator) -> dict[int, pd.DataFrame]:
    """heldout_attribution rows (one per step) per epoch, with teacher_wrong (and noisy/clean) groups."""
    mean_target, mean_dark = HELDOUT_PER_STEP.get(objective, (-1e-3, -1e-3))
    loss, out = 2.3, {}
    for epoch in range(epochs):
        rows = []
        for i in range(steps_per_epoch):
            a_target = mean_target * (1 + extra.normal(0, 0.4))
            a_dark = mean_dark * (1 + extra.normal(0, 0.4))
            a_update = (a_target + a_dark) * extra.uniform(0.8, 1.0)  # momentum and weight decay
            observed = a_update + extra.normal(0, 2e-4)  # plus the second-order rest
            row = {"gen": gen, "epoch": epoch, "step": epoch * steps_per_epoch + i, "a_target": a_target,
                   "a_dark": a_dark, "a_total": a_target + a_dark, "heldout_loss_before": loss,
                   "heldout_loss_after": loss + observed, "observed_change": observed, "a_update": a_update}
            wrong = extra.uniform(0.1, 0.3)
            row.update(a_target_teacher_wrong=a_target * wrong, a_dark_teacher_wrong=a_dark * wrong)
            if label_noise > 0:
                share = extra.uniform(0.5, 1.5) * label_noise
                row.update(a_target_noisy=a_target * share, a_dark_noisy=a_dark * share,
                           a_target_clean=a_target * (1 - share), a_dark_clean=a_dark * (1 - share))
            loss += observed
            rows.append(row)
        out[epoch] = pd.DataFrame(rows)
    return out


def _write_metrics(path: Path, epochs: int, noise_final: tuple[float, float] | None) -> None:
    """metrics.csv with METRIC_COLUMNS, plus train_acc_clean / memorised ramping to ``noise_final``."""
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.8 + 0.05 * e / epochs, "val_loss": 0.5,
               "val_acc": 0.85, "lr": 0.1, "seconds": 1.0}
        if noise_final is not None:
            clean, memorised = noise_final
            row.update(train_acc_clean=clean - 0.02 * (epochs - e), memorised=memorised * e / epochs)
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(METRIC_COLUMNS) + (["train_acc_clean", "memorised"] if noise_final is not None else [])
    pd.DataFrame(rows)[columns].to_csv(path, index=False)


def _study_config(n_seeds: int, objectives, generations: dict, names: dict, roles: dict | None,
                  equivalence_margin: float, gain_fraction_threshold: float) -> dict:
    cfg = {"name": "synthetic", "seeds": list(range(n_seeds)), "objectives": list(objectives),
           "generations": generations, "equivalence_margin": equivalence_margin,
           "gain_fraction_threshold": gain_fraction_threshold,
           "base": {"data": {"name": "synthetic"}, "model": {"arch": "mlp"}}}
    if names:  # the StudyConfig form: variants tables with their objectives, roles by name
        cfg.update(objectives=[], generations={}, roles=dict(roles or {}),
                   variants=[{"name": names.get(o, o), "objective": o, "params": {}, "generations": generations[o]}
                             for o in objectives])
    elif roles is not None:
        cfg["roles"] = dict(roles)
    return cfg


def _write_teacher(layout: StudyLayout, s: int, n_test: int, num_classes: int, rng: np.random.Generator):
    """The seed's teacher run: labels, logits, summary; returns (target, correct, wrong_class, conf, logits, row)."""
    target = rng.integers(0, num_classes, size=n_test).astype(np.int64)  # (N,)
    teacher_acc = 0.85 + rng.normal(0, 0.003)
    teacher_correct = np.zeros(n_test, bool)
    teacher_correct[rng.choice(n_test, size=int(round(teacher_acc * n_test)), replace=False)] = True
    teacher_wrong_class = _other_class(target, num_classes, rng)
    teacher_logits = _logits_with_correct(target, teacher_correct, teacher_wrong_class, num_classes, rng)
    teacher_conf = _softmax(teacher_logits.astype(np.float64)).max(axis=1)
    run = layout.run(s, TEACHER)
    run.gen_dir(0).mkdir(parents=True, exist_ok=True)
    np.save(run.logits(0, "test"), teacher_logits)
    np.save(run.targets("test"), target)
    m0 = _metrics(teacher_logits, target)
    run.summary.write_text(json.dumps(
        {"generations": [{"gen": 0, "objective": "ce", "arch": "mlp", "val_acc": m0["test_acc"], **m0}],
         "ensembles": []}))
    row = {"seed": s, "objective": TEACHER, "gen": 0, "kind": "model", "members": "0", **m0, "val_acc": m0["test_acc"]}
    return target, teacher_correct, teacher_wrong_class, teacher_conf, teacher_logits, row


def write_synthetic_study(root: str | Path, *, n_seeds: int = 10, objectives=OBJECTIVES,
                          effects: dict[str, float] | None = None, noise_sd: float = 0.15,
                          ban_generations: int = 3, later_gen_gain: float = 0.1, n_test: int = 2000,
                          num_classes: int = 10, epochs: int = 3, steps_per_epoch: int = 4,
                          hooks: bool = True, seed: int = 0, equivalence_margin: float = 0.005,
                          gain_fraction_threshold: float = 0.5, names: dict[str, str] | None = None,
                          roles: dict | None = None, heldout: bool = True, label_noise: float = 0.0) -> Path:
    """Write a study folder under ``root`` and return its path.

    Args:
        root: folder to create (must not hold another study).
        n_seeds: seeds 0..n_seeds-1.
        objectives: student objectives (gen 1 each; "ban" gets ``ban_generations`` generations).
        effects: objective -> planted mean gain of gen 1 over the teacher, accuracy points.
        noise_sd: per-(seed, objective) noise on the student accuracy, points.
        hooks: write hook Parquet files for the students' generations.
        seed: seed of the numpy Generator that makes every random choice.
        names: objective -> variant name (its run folder and results.csv label); study.json then has
            ``variants`` tables. The data are the same as without it.
        roles: study.json's ``roles`` table.
        heldout: with ``hooks``, also write heldout_attribution logs.
        label_noise: > 0 adds label_noisy / clean_target (logit_split) and train_acc_clean /
            memorised (metrics.csv), NOISE_GAIN planting the students' advantage.
    """
    root = Path(root)
    layout = StudyLayout(root)
    rng = np.random.default_rng(seed)
    extra = np.random.default_rng([seed, 1])  # everything the options add; rng's stream stays as it was
    effects = {**REALISTIC_EFFECTS, **(effects or {})}
    names = dict(names or {})
    generations = {o: (ban_generations if o == "ban" else 1) for o in objectives}
    root.mkdir(parents=True, exist_ok=True)
    layout.config.write_text(json.dumps(_study_config(n_seeds, objectives, generations, names, roles,
                                                      equivalence_margin, gain_fraction_threshold), indent=2))
    rows = []
    for s in range(n_seeds):
        target, teacher_correct, teacher_wrong_class, teacher_conf, teacher_logits, row = \
            _write_teacher(layout, s, n_test, num_classes, rng)
        rows.append(row)
        noise_teacher = (0.80 + extra.normal(0, 0.01), 0.60 + extra.normal(0, 0.02)) if label_noise > 0 else None
        _write_metrics(layout.run(s, TEACHER).metrics(0), epochs, noise_teacher)
        for objective in objectives:
            run = layout.run(s, names.get(objective, objective))
            rows += _write_student(run, s, objective, generations[objective], effects, noise_sd, later_gen_gain,
                                   target, teacher_correct, teacher_wrong_class, teacher_conf, teacher_logits,
                                   rng, extra, dict(hooks=hooks, heldout=heldout, label_noise=label_noise,
                                                    epochs=epochs, steps=steps_per_epoch, classes=num_classes,
                                                    noise_teacher=noise_teacher))
    frame = pd.DataFrame(rows)
    frame["objective"] = frame["objective"].map(lambda o: names.get(o, o))
    frame[list(RESULT_COLUMNS)].to_csv(layout.results, index=False)
    return root


def _write_student(run: RunLayout, s: int, objective: str, n_gens: int, effects: dict, noise_sd: float,
                   later_gen_gain: float, target, teacher_correct, teacher_wrong_class, teacher_conf,
                   teacher_logits, rng: np.random.Generator, extra: np.random.Generator, opt: dict) -> list[dict]:
    """One variant's run folder for seed ``s``; returns its results.csv rows (objective = the objective)."""
    run.path.mkdir(parents=True, exist_ok=True)
    np.save(run.targets("test"), target)
    gens, ens, member_logits, rows = [], [], [], []
    n_test = target.size
    for gen in range(1, n_gens + 1):
        gain = effects.get(objective, 0.0) + later_gen_gain * (gen - 1) + rng.normal(0, noise_sd)
        k = int(round((teacher_correct.mean() + gain / 100) * n_test))
        correct = _student_correct(teacher_correct, teacher_conf, k, rng)
        logits = _logits_with_correct(target, correct, teacher_wrong_class, opt["classes"], rng)
        run.gen_dir(gen).mkdir(parents=True, exist_ok=True)
        np.save(run.logits(gen, "test"), logits)
        member_logits.append(logits)
        m = _metrics(logits, target)
        val = m["test_acc"] + rng.normal(0, 0.002)
        gens.append({"gen": gen, "objective": objective, "arch": "mlp", "val_acc": val, **m})
        rows.append({"seed": s, "objective": objective, "gen": gen, "kind": "model",
                     "members": str(gen), **m, "val_acc": val})
        if opt["hooks"]:
            for (hook, epoch), frame in _hook_frames(objective, gen, opt["epochs"], opt["steps"], opt["classes"],
                                                     rng, extra, opt["label_noise"]).items():
                _write_parquet(run.hook_file(gen, hook, epoch), frame)
            if opt["heldout"]:
                for epoch, frame in _heldout_frames(objective, gen, opt["epochs"], opt["steps"], opt["label_noise"],
                                                    extra).items():
                    _write_parquet(run.hook_file(gen, "heldout_attribution", epoch), frame)
        noise_final = None
        if opt["noise_teacher"] is not None:
            clean, memorised = opt["noise_teacher"]
            lift = NOISE_GAIN.get(objective, 0.0) / 100
            noise_final = (clean + lift / 2 + extra.normal(0, 0.01), memorised - lift + extra.normal(0, 0.01))
        _write_metrics(run.metrics(gen), opt["epochs"], noise_final)
        if gen >= 2:  # BAN ensemble of generations 1..gen (eq. 4): mean of softmax outputs
            probs = np.mean([_softmax(z.astype(np.float64)) for z in member_logits], axis=0)
            me = _metrics(np.log(probs), target)
            members = "+".join(str(g) for g in range(1, gen + 1))
            ens.append({"members": list(range(1, gen + 1)), "with_teacher": False, **me,
                        "agreement_with_teacher": float(np.mean(probs.argmax(1) == teacher_logits.argmax(1)))})
            rows.append({"seed": s, "objective": objective, "gen": gen, "kind": "ensemble",
                         "members": members, **me, "val_acc": np.nan})
    run.summary.write_text(json.dumps({"generations": gens, "ensembles": ens}))
    return rows

"""Write a realistic synthetic study folder (spec sections 7, 8, 10) from a seeded numpy Generator.

Used by the report and figure tests: everything analysis reads is written with the real layout and
columns, and every accuracy in results.csv is the accuracy of the logits written next to it, so a
test can recompute any number from the files alone.

Accuracies are planted per seed: teacher ~ 85% +- 0.3 points, each objective's generation-1 student
at teacher + ``effects[objective]`` points + N(0, ``noise_sd``) points (independent per objective,
so paired differences have sd ~ noise_sd * sqrt(2)). Later BAN generations add ``later_gen_gain``
points per generation. The test set has ``n_test`` samples, so accuracies lie on a 100 / n_test grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

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


def _hook_frames(objective: str, gen: int, epochs: int, steps_per_epoch: int, num_classes: int,
                 rng: np.random.Generator) -> dict[tuple[str, int], pd.DataFrame]:
    """One DataFrame per (hook, epoch) with the spec's columns (section 10) plus gen/epoch/step."""
    frames: dict[tuple[str, int], pd.DataFrame] = {}
    total = epochs * steps_per_epoch
    start, end = _DARK_SHARE.get(objective, (0.3, 0.5))
    has_teacher = objective != "ce"
    for epoch in range(epochs):
        share_rows, logit_rows, head_rows, param_rows = [], [], [], []
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            base = {"gen": gen, "epoch": epoch, "step": step}
            share_dark = float(np.clip(start + (end - start) * step / max(total - 1, 1)
                                       + rng.normal(0, 0.03), 0.01, 0.99))
            target_norm = float(rng.uniform(0.5, 2.0))
            row = {**base, "target_norm": target_norm, "dark_norm": target_norm * share_dark / (1 - share_dark),
                   "cos_target_dark": float(rng.uniform(-0.6, 0.0)), "share_target": 1 - share_dark,
                   "share_dark": share_dark}
            for group in _LAYER_GROUPS:
                g_dark = float(np.clip(share_dark + rng.normal(0, 0.05), 0.0, 1.0))
                row.update({f"{group}/target_norm": target_norm, f"{group}/dark_norm": g_dark,
                            f"{group}/cos_target_dark": -0.3, f"{group}/share_target": 1 - g_dark,
                            f"{group}/share_dark": g_dark})
            share_rows.append(row)

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


def write_synthetic_study(root: str | Path, *, n_seeds: int = 10, objectives=OBJECTIVES,
                          effects: dict[str, float] | None = None, noise_sd: float = 0.15,
                          ban_generations: int = 3, later_gen_gain: float = 0.1, n_test: int = 2000,
                          num_classes: int = 10, epochs: int = 3, steps_per_epoch: int = 4,
                          hooks: bool = True, seed: int = 0, equivalence_margin: float = 0.005,
                          gain_fraction_threshold: float = 0.5) -> Path:
    """Write a study folder under ``root`` and return its path.

    Args:
        root: folder to create (must not hold another study).
        n_seeds: seeds 0..n_seeds-1.
        objectives: student objectives (gen 1 each; "ban" gets ``ban_generations`` generations).
        effects: objective -> planted mean gain of gen 1 over the teacher, accuracy points.
        noise_sd: per-(seed, objective) noise on the student accuracy, points.
        hooks: write hook Parquet files for the students' generations.
        seed: seed of the numpy Generator that makes every random choice.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    effects = {**REALISTIC_EFFECTS, **(effects or {})}
    generations = {o: (ban_generations if o == "ban" else 1) for o in objectives}
    study_cfg = {"name": "synthetic", "seeds": list(range(n_seeds)), "objectives": list(objectives),
                 "generations": generations, "equivalence_margin": equivalence_margin,
                 "gain_fraction_threshold": gain_fraction_threshold,
                 "base": {"data": {"name": "synthetic"}, "model": {"arch": "mlp"}}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(json.dumps(study_cfg, indent=2))

    rows = []
    for s in range(n_seeds):
        target = rng.integers(0, num_classes, size=n_test).astype(np.int64)  # (N,)
        teacher_acc = 0.85 + rng.normal(0, 0.003)
        teacher_correct = np.zeros(n_test, bool)
        teacher_correct[rng.choice(n_test, size=int(round(teacher_acc * n_test)), replace=False)] = True
        teacher_wrong_class = _other_class(target, num_classes, rng)
        teacher_logits = _logits_with_correct(target, teacher_correct, teacher_wrong_class, num_classes, rng)
        teacher_conf = _softmax(teacher_logits.astype(np.float64)).max(axis=1)
        teacher_dir = root / "runs" / f"seed-{s}" / "teacher"
        (teacher_dir / "gen-0").mkdir(parents=True, exist_ok=True)
        np.save(teacher_dir / "gen-0" / "test_logits.npy", teacher_logits)
        np.save(teacher_dir / "test_targets.npy", target)
        m0 = _metrics(teacher_logits, target)
        (teacher_dir / "summary.json").write_text(json.dumps(
            {"generations": [{"gen": 0, "objective": "ce", "arch": "mlp", "val_acc": m0["test_acc"], **m0}],
             "ensembles": []}))
        rows.append({"seed": s, "objective": "teacher", "gen": 0, "kind": "model", "members": "0", **m0,
                     "val_acc": m0["test_acc"]})

        for objective in objectives:
            run = root / "runs" / f"seed-{s}" / objective
            run.mkdir(parents=True, exist_ok=True)
            np.save(run / "test_targets.npy", target)
            gens, ens, member_logits = [], [], []
            for gen in range(1, generations[objective] + 1):
                gain = effects.get(objective, 0.0) + later_gen_gain * (gen - 1) + rng.normal(0, noise_sd)
                k = int(round((teacher_correct.mean() + gain / 100) * n_test))
                correct = _student_correct(teacher_correct, teacher_conf, k, rng)
                logits = _logits_with_correct(target, correct, teacher_wrong_class, num_classes, rng)
                (run / f"gen-{gen}").mkdir(parents=True, exist_ok=True)
                np.save(run / f"gen-{gen}" / "test_logits.npy", logits)
                member_logits.append(logits)
                m = _metrics(logits, target)
                val = m["test_acc"] + rng.normal(0, 0.002)
                gens.append({"gen": gen, "objective": objective, "arch": "mlp", "val_acc": val, **m})
                rows.append({"seed": s, "objective": objective, "gen": gen, "kind": "model",
                             "members": str(gen), **m, "val_acc": val})
                if hooks:
                    for (hook, epoch), frame in _hook_frames(objective, gen, epochs, steps_per_epoch,
                                                             num_classes, rng).items():
                        _write_parquet(run / f"gen-{gen}" / "hooks" / hook / f"epoch-{epoch}.parquet", frame)
                if gen >= 2:  # BAN ensemble of generations 1..gen (eq. 4): mean of softmax outputs
                    probs = np.mean([_softmax(z.astype(np.float64)) for z in member_logits], axis=0)
                    me = _metrics(np.log(probs), target)
                    members = "+".join(str(g) for g in range(1, gen + 1))
                    ens.append({"members": list(range(1, gen + 1)), "with_teacher": False, **me,
                                "agreement_with_teacher": float(np.mean(probs.argmax(1) == teacher_logits.argmax(1)))})
                    rows.append({"seed": s, "objective": objective, "gen": gen, "kind": "ensemble",
                                 "members": members, **me, "val_acc": np.nan})
            (run / "summary.json").write_text(json.dumps({"generations": gens, "ensembles": ens}))
    cols = ["seed", "objective", "gen", "kind", "members", "test_acc", "test_nll", "test_ece", "val_acc"]
    pd.DataFrame(rows)[cols].to_csv(root / "results.csv", index=False)
    return root

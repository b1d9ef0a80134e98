"""summary.json from a run folder's files alone: per-generation test metrics (last and best epoch),
the cumulative ensembles of the generations (eq. 4), the test scoring, and warnings.

Split from ``chain.py`` (the training): it reads only files, so a summary can be rebuilt for a
run trained elsewhere.
"""

from __future__ import annotations

import logging
import math

from ban_analysis.config import RunConfig
from ban_analysis.engine.runs import RunDir

logger = logging.getLogger("ban_analysis.engine.chain")  # the name users filter on

__all__ = ["summarize"]


def summarize(run: RunDir, cfg: RunConfig) -> dict:
    """summary.json from the run folder's files: per-generation metrics and cumulative ensembles.

    The plain keys (``val_acc``, ``test_acc``, ...) are the last epoch's model; ``best_*`` are the
    best-validation epoch's (``train.track_best``), scored the same way, None without a record.
    """
    import numpy as np

    from ban_analysis.engine.metrics import ensemble_metrics, logit_metrics

    test_targets = np.load(run.layout.targets("test"))
    val_targets = np.load(run.layout.targets("val"))
    manifest_gens = run.manifest().get("generations", {})
    generations, test_logits, best_logits, warnings = [], {}, {}, []
    for gen in range(cfg.ban.generations + 1):
        test_logits[gen] = _scored(run.load_logits(gen, "test"), test_targets, cfg.data.test_scoring)
        warnings += _unpredicted_classes(test_logits[gen], test_targets, gen, cfg.data.test_scoring)
        val_logits = run.load_logits(gen, "val")
        # the arch is in the manifest; reading it there spares loading every checkpoint
        arch = manifest_gens.get(str(gen), {}).get("arch") or run.load_checkpoint(gen)["arch"]
        val_acc = float((val_logits.argmax(1) == val_targets).mean()) if len(val_targets) else None
        m = logit_metrics(test_logits[gen], test_targets)
        objective = "ce" if gen == 0 else cfg.ban.objective
        best, best_logits[gen] = _best_of_gen(run, gen, manifest_gens.get(str(gen), {}), test_targets,
                                              val_targets, cfg.data.test_scoring)
        generations.append({"gen": gen, "objective": objective, "arch": arch,
                            "val_acc": _finite_or_none(val_acc), "test_acc": m["acc"],
                            "test_nll": m["nll"], "test_ece": m["ece"], **best})
    ensembles = []
    first_options = [1] + ([0] if cfg.ban.ensemble_with_teacher else [])
    for first in first_options:
        for last in range(2, cfg.ban.generations + 1):
            members = list(range(first, last + 1))
            m = ensemble_metrics([test_logits[g] for g in members], test_targets,
                                 teacher_logits=test_logits[0])
            row = {"members": members, "with_teacher": first == 0, "test_acc": m["acc"],
                   "test_nll": m["nll"], "test_ece": m["ece"], "agreement_with_teacher": m["agreement"]}
            best = dict.fromkeys(("best_test_acc", "best_test_nll", "best_test_ece", "best_agreement_with_teacher"))
            if all(best_logits[g] is not None for g in members):  # the members' best epochs
                b = ensemble_metrics([best_logits[g] for g in members], test_targets, teacher_logits=best_logits[0])
                best.update(best_test_acc=b["acc"], best_test_nll=b["nll"], best_test_ece=b["ece"],
                            best_agreement_with_teacher=b.get("agreement"))
            ensembles.append({**row, **best})
    out = {"generations": generations, "ensembles": ensembles}
    if cfg.data.test_scoring != "all":
        out["test_scoring"] = cfg.data.test_scoring
    if warnings:
        out["warnings"] = warnings
    return out


BEST_KEYS = ("best_epoch", "best_val_acc", "best_test_acc", "best_test_nll", "best_test_ece")


def _best_of_gen(run: RunDir, gen: int, manifest_gen: dict, test_targets, val_targets, scoring: str):
    """({best_* of one generation}, its scored best test logits) from best_*_logits.npy; Nones without them."""
    from ban_analysis.engine.metrics import logit_metrics

    if not run.layout.best_logits(gen, "test").exists():
        return dict.fromkeys(BEST_KEYS), None
    test = _scored(run.load_logits(gen, "test", best=True), test_targets, scoring)
    val = run.load_logits(gen, "val", best=True)
    epoch = manifest_gen.get("best_epoch")
    if epoch is None:  # the manifest spares loading the checkpoint
        epoch = (run.load_checkpoint(gen).get("best") or {}).get("epoch")
    val_acc = float((val.argmax(1) == val_targets).mean()) if len(val_targets) else None
    m = logit_metrics(test, test_targets)
    return {"best_epoch": epoch, "best_val_acc": _finite_or_none(val_acc), "best_test_acc": m["acc"],
            "best_test_nll": m["nll"], "best_test_ece": m["ece"]}, test


def _scored(logits, target, scoring: str):
    """Test logits as scored: with "present_classes", classes absent from the test split get -inf
    (probability 0), so accuracy, NLL and ECE are those of a classifier over the present classes."""
    import numpy as np

    if scoring == "all":
        return logits
    absent = np.ones(logits.shape[1], dtype=bool)
    absent[np.unique(target)] = False
    logits = logits.astype(np.float64, copy=True)
    logits[:, absent] = -np.inf
    return logits


def _unpredicted_classes(logits, target, gen: int, scoring: str) -> list[str]:
    """A warning when some class of the test split is never predicted (a 0% accuracy is then not noise)."""
    import numpy as np

    present = np.unique(target)
    never = np.setdiff1d(present, np.unique(logits.argmax(1)))
    if len(never) == 0:
        return []
    message = (f"gen {gen}: {len(never)} of the test split's {len(present)} classes are never predicted "
               f"(classes {never.tolist()[:10]}{' ...' if len(never) > 10 else ''}); test scoring {scoring!r}"
               + ("; data.test_scoring = 'present_classes' scores only the classes the test split holds"
                  if scoring == "all" else ""))
    logger.warning(message)
    return [message]


def _finite_or_none(x):
    return None if x is None or not math.isfinite(x) else float(x)

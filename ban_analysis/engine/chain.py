"""The BAN chain: generation 0 on labels (or imported), then generations 1..K each taught by the last.

``run_chain`` trains (or resumes) a chain into a run folder and writes ``summary.json``;
``summarize`` rebuilds that summary from the folder's files alone.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn as nn

from ban_analysis.config import RunConfig
from ban_analysis.data import DatasetBundle
from ban_analysis.engine.loop import build_model, predict, train_generation
from ban_analysis.engine.runs import RunDir
from ban_analysis.losses import get_objective
from ban_analysis.models import create_model

logger = logging.getLogger(__name__)


def objective_for_gen(cfg: RunConfig, gen: int):
    """Generation 0 learns from labels; every later generation uses the configured objective."""
    return get_objective("ce") if gen == 0 else get_objective(cfg.ban.objective, **cfg.ban.params)


def arch_for_gen(cfg: RunConfig, gen: int) -> tuple[str, dict]:
    if gen == 0 and cfg.teacher.arch:
        return cfg.teacher.arch, dict(cfg.teacher.params)
    return cfg.model.arch, dict(cfg.model.params)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported; allowed: cpu, cuda, auto")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device here; use --device cpu")
    return torch.device(name)


def state_for_arch(arch: str, params: dict) -> dict[str, Any]:
    return {"arch": arch, "arch_params": params}


# ---- the BAN chain -------------------------------------------------------------------------------

def _load_model(state: dict, bundle: DatasetBundle, device: torch.device) -> nn.Module:
    model = create_model(state["arch"], num_classes=bundle.num_classes, input_shape=bundle.input_shape,
                         **state.get("arch_params", {}))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"checkpoint does not fit architecture {state['arch']!r}: "
                         f"{str(err).splitlines()[0]}") from None
    return model.to(device)


def _completed_state(run: RunDir, gen: int) -> dict | None:
    """The checkpoint of a finished generation (loaded once, reused as the next teacher), else None."""
    if not run.checkpoint_path(gen).exists() or not (run.gen_dir(gen) / "test_logits.npy").exists():
        return None
    state = run.load_checkpoint(gen)
    return state if state.get("complete", False) else None


def _import_teacher(cfg: RunConfig, run: RunDir, bundle: DatasetBundle, device: torch.device) -> nn.Module:
    """Generation 0 from an existing checkpoint (a study's shared teacher, or any trained model)."""
    from ban_analysis.engine.runs import load_checkpoint_file, sha256_file

    state = load_checkpoint_file(cfg.teacher.checkpoint)
    if "arch" not in state:
        raise ValueError(f"teacher.checkpoint {cfg.teacher.checkpoint}: no 'arch' recorded in it")
    model = _load_model(state, bundle, device)
    state = {**state, "complete": True, "source": str(cfg.teacher.checkpoint)}
    run.save_checkpoint(0, state)
    if "metrics" in state:
        run.write_metrics(0, state["metrics"])
    run.update_manifest(generations={"0": {"arch": state["arch"],
                                           "source_checkpoint": str(cfg.teacher.checkpoint),
                                           "source_sha256": sha256_file(cfg.teacher.checkpoint)}})
    return model


def run_chain(cfg: RunConfig, out_dir, *, device: str | None = "cpu", until_gen: int | None = None,
              progress: bool = True) -> dict | None:
    """Train (or resume) the whole chain into the run folder ``out_dir``; returns summary.json's dict.

    Generation 0 is trained on labels (objective "ce"), or imported from ``teacher.checkpoint``;
    generations 1..K are fresh students, each taught by the previous generation. ``until_gen``
    stops after that generation (a study's executor schedules one generation per task); the
    summary is written only once every generation is complete (None is returned before).
    """
    from ban_analysis.data import load_dataset
    from ban_analysis.engine.runs import atomic_save_npy, now, sha256_file

    run = RunDir(out_dir)
    resuming = run.check_config(cfg.to_dict())
    last_gen = cfg.ban.generations if until_gen is None else min(until_gen, cfg.ban.generations)
    if resuming and run.is_complete():
        logger.info("%s is complete; nothing to do", run.path)
        return run.summary()
    torch_device = resolve_device(device)
    d = cfg.data
    bundle = load_dataset(d.name, root=d.root or None, val_size=d.val_size, val_seed=d.val_seed,
                          train_subset=d.train_subset, image_size=d.image_size or None,
                          cache_dir=d.cache_dir or None, device=torch_device)
    run.bind_config(cfg.to_dict())  # only now: a run that cannot start leaves no folder behind
    run.start_manifest(cfg.seed, describe_device(torch_device))
    for split in ("val", "test"):
        labels = getattr(bundle, split).y.cpu().numpy().astype("int64")
        atomic_save_npy(run.path / f"{split}_targets.npy", labels)
    hook_runner = None
    if cfg.hooks:
        from ban_analysis.instrument.hooks import HookRunner

        # fuse_backward: update_share and param_split reuse the trainer's own backward pass
        # (about one backward pass less per call; benchmarks/README.md, Hooks)
        hook_runner = HookRunner(cfg.hooks, seed=cfg.seed, train_size=len(bundle.train.index),
                                 train_index=bundle.train.index, fuse_backward=True)

    teacher = None
    for gen in range(last_gen + 1):
        arch, params = arch_for_gen(cfg, gen)
        state = _completed_state(run, gen)
        if state is not None:
            teacher = freeze(_load_model(state, bundle, torch_device))
            continue
        if gen == 0 and cfg.teacher.checkpoint:
            teacher = freeze(_import_teacher(cfg, run, bundle, torch_device))
            run.save_logits(0, "val", predict(teacher, bundle.val, bundle, cfg.train.eval_batch_size))
            run.save_logits(0, "test", predict(teacher, bundle.test, bundle, cfg.train.eval_batch_size))
            continue
        objective = objective_for_gen(cfg, gen)
        parent_sha = sha256_file(run.checkpoint_path(gen - 1)) if gen > 0 else None
        run.update_manifest(generations={str(gen): {"arch": arch, "objective": objective.name,
                                                    "parent_sha256": parent_sha, "started": now()}})
        model = build_model(arch, params, bundle, cfg.seed, gen).to(torch_device)
        logger.info("gen %d: %s (%d parameters), objective %s", gen, arch,
                    sum(p.numel() for p in model.parameters()), objective.name)
        result = train_generation(model, objective, bundle, cfg.train, gen=gen, seed=cfg.seed,
                                  teacher=teacher if objective.needs_teacher else None, run=run,
                                  hooks=hook_runner, augment=cfg.data.augment, pad=cfg.data.pad,
                                  progress=progress, arch_info=state_for_arch(arch, params))
        run.save_logits(gen, "val", result.val_logits)
        run.save_logits(gen, "test", result.test_logits)
        run.update_manifest(generations={str(gen): {
            "arch": arch, "objective": objective.name, "parent_sha256": parent_sha,
            "checkpoint_sha256": sha256_file(run.checkpoint_path(gen)), "finished": now()}})
        teacher = freeze(model)
    if hook_runner is not None:
        run.update_manifest(hooks=hook_runner.info())
    if last_gen < cfg.ban.generations:
        return None
    summary = summarize(run, cfg)
    run.write_summary(summary)
    run.update_manifest(finished=now())
    return summary


def summarize(run: RunDir, cfg: RunConfig) -> dict:
    """summary.json from the run folder's files: per-generation metrics and cumulative ensembles."""
    import numpy as np

    from ban_analysis.engine.metrics import ensemble_metrics, logit_metrics

    test_targets = np.load(run.layout.targets("test"))
    val_targets = np.load(run.layout.targets("val"))
    manifest_gens = run.manifest().get("generations", {})
    generations, test_logits, warnings = [], {}, []
    for gen in range(cfg.ban.generations + 1):
        test_logits[gen] = _scored(run.load_logits(gen, "test"), test_targets, cfg.data.test_scoring)
        warnings += _unpredicted_classes(test_logits[gen], test_targets, gen, cfg.data.test_scoring)
        val_logits = run.load_logits(gen, "val")
        # the arch is in the manifest; reading it there spares loading every checkpoint
        arch = manifest_gens.get(str(gen), {}).get("arch") or run.load_checkpoint(gen)["arch"]
        val_acc = float((val_logits.argmax(1) == val_targets).mean()) if len(val_targets) else None
        m = logit_metrics(test_logits[gen], test_targets)
        objective = "ce" if gen == 0 else cfg.ban.objective
        generations.append({"gen": gen, "objective": objective, "arch": arch,
                            "val_acc": _finite_or_none(val_acc), "test_acc": m["acc"],
                            "test_nll": m["nll"], "test_ece": m["ece"]})
    ensembles = []
    first_options = [1] + ([0] if cfg.ban.ensemble_with_teacher else [])
    for first in first_options:
        for last in range(2, cfg.ban.generations + 1):
            members = list(range(first, last + 1))
            m = ensemble_metrics([test_logits[g] for g in members], test_targets,
                                 teacher_logits=test_logits[0])
            ensembles.append({"members": members, "with_teacher": first == 0, "test_acc": m["acc"],
                              "test_nll": m["nll"], "test_ece": m["ece"],
                              "agreement_with_teacher": m["agreement"]})
    out = {"generations": generations, "ensembles": ensembles}
    if cfg.data.test_scoring != "all":
        out["test_scoring"] = cfg.data.test_scoring
    if warnings:
        out["warnings"] = warnings
    return out


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

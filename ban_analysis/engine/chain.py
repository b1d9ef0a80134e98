"""The BAN chain: generation 0 on labels (or imported), then generations 1..K each taught by the last.

``run_chain`` trains (or resumes) a chain into a run folder and writes ``summary.json``;
``summarize`` rebuilds that summary from the folder's files alone.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ban_analysis.config import RunConfig
from ban_analysis.data import DatasetBundle
from ban_analysis.engine.loop import build_model, eval_batch_size, predict, train_generation
from ban_analysis.engine.runs import RunDir
from ban_analysis.engine.summary import summarize  # noqa: F401  (re-exported: the chain writes it)
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
    if not run.checkpoint_path(gen).exists() or not run.layout.logits(gen, "test").exists():
        return None
    state = run.load_checkpoint(gen)
    return state if state.get("complete", False) else None


def _import_teacher(cfg: RunConfig, run: RunDir, bundle: DatasetBundle, device: torch.device) -> nn.Module:
    """Generation 0 from an existing checkpoint (a study's shared teacher, or any trained model)."""
    from ban_analysis.engine.files import sha256_file
    from ban_analysis.engine.runs import load_checkpoint_file

    state = load_checkpoint_file(cfg.teacher.checkpoint)
    if "arch" not in state:
        raise ValueError(f"teacher.checkpoint {cfg.teacher.checkpoint}: no 'arch' recorded in it")
    model = _load_model(state, bundle, device)
    state = {**state, "complete": True, "source": str(cfg.teacher.checkpoint)}
    run.save_checkpoint(0, state)
    if "metrics" in state:
        run.write_metrics(0, state["metrics"])
    best = _imported_best(state, cfg.teacher.checkpoint, bundle)
    if best is not None and getattr(run, "writable", True):
        run.save_logits(0, "val", best["val_logits"], best=True)
        run.save_logits(0, "test", best["test_logits"], best=True)
    run.update_manifest(generations={"0": {"arch": state["arch"],
                                           "source_checkpoint": str(cfg.teacher.checkpoint),
                                           "source_sha256": sha256_file(cfg.teacher.checkpoint),
                                           "best_epoch": best["epoch"] if best is not None else None}})
    return model


def _imported_best(state: dict, checkpoint, bundle: DatasetBundle) -> dict | None:
    """The best-epoch record an imported checkpoint brings, if it is about this run's splits.

    Its logits are of the source run's val and test splits; they are kept only when the
    checkpoint lies in a run folder (``<run>/gen-<k>/checkpoint.pt``, a study's teacher) whose
    saved targets equal this run's, label for label.
    """
    import numpy as np

    from ban_analysis.layout import RunLayout

    best = state.get("best")
    if not best:
        return None
    source = RunLayout(Path(checkpoint).resolve().parent.parent)
    for split in ("val", "test"):
        path = source.targets(split)
        labels = getattr(bundle, split).y.cpu().numpy()
        if not path.is_file() or not np.array_equal(np.load(path), labels) \
                or tuple(best[f"{split}_logits"].shape) != (len(labels), bundle.num_classes):
            return None
    return best


def _noisy_labels(cfg: RunConfig, bundle: DatasetBundle):
    """The bundle with ``data.label_noise`` applied to its train split, and the record of it.

    Drawn from ``data.label_noise.seed`` alone (not the run seed), so the teacher and every
    student of a run folder, and every seed and objective of a study, train on the same labels.
    """
    from ban_analysis.config import ConfigError
    from ban_analysis.data.label_noise import check_class_map, noisy_train_split

    noise = cfg.data.label_noise
    try:  # the class count is known only now for image folders
        check_class_map(noise.class_map, bundle.num_classes, key="data.label_noise.class_map")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return noisy_train_split(bundle, noise.rate, noise.kind, noise.seed, noise.class_map)


def _normalised_split(split, bundle: DatasetBundle, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of a whole split as the model sees it in evaluation: float32, normalised, no augmentation."""
    from ban_analysis.data import iterate_batches

    xs = [x for x, _, _ in iterate_batches(split, batch_size, shuffle=False, augment="none",
                                           mean=bundle.mean, std=bundle.std)]
    x = torch.cat(xs) if xs else torch.empty(0, *bundle.input_shape, device=split.x.device)
    return x, split.y


def _legacy_eval_batch_size(run: RunDir, cfg: RunConfig) -> RunConfig:
    """A run folder written before ``train.eval_batch_size = 0`` ("auto") existed holds the old default,
    1024: a config that leaves the key unset resumes it with 1024, so the folder continues with the
    batches it started with instead of being refused as another config."""
    import dataclasses

    from ban_analysis.engine.files import read_json

    if cfg.train.eval_batch_size != 0 or not run.layout.config.exists():
        return cfg
    stored = read_json(run.layout.config).get("train", {}).get("eval_batch_size")
    if stored != 1024:
        return cfg
    logger.info("%s was started with train.eval_batch_size = 1024 (the default before 'auto'); keeping it", run.path)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_batch_size=1024))


def run_chain(cfg: RunConfig, out_dir, *, device: str | None = "cpu", until_gen: int | None = None,
              progress: bool = True) -> dict | None:
    """Train (or resume) the whole chain into the run folder ``out_dir``; returns summary.json's dict.

    The whole call holds the folder's lock (``RunDir.lock``; rank 0's under torchrun): a second
    process on the same folder gets a RunFolderError naming the holder's pid, and a folder left
    by a killed process resumes as usual. See :func:`_run_chain` for what it does.
    """
    from ban_analysis.engine import distributed

    lock = RunDir(out_dir).lock() if distributed.env_world().is_main else contextlib.nullcontext()
    with lock:
        return _run_chain(cfg, out_dir, device=device, until_gen=until_gen, progress=progress)


def _run_chain(cfg: RunConfig, out_dir, *, device: str | None = "cpu", until_gen: int | None = None,
               progress: bool = True) -> dict | None:
    """Train (or resume) the whole chain into the run folder ``out_dir``; returns summary.json's dict.

    Generation 0 is trained on labels (objective "ce"), or imported from ``teacher.checkpoint``;
    generations 1..K are fresh students, each taught by the previous generation. ``until_gen``
    stops after that generation (a study's executor schedules one generation per task); the
    summary is written only once every generation is complete (None is returned before).
    """
    from ban_analysis.data import load_dataset
    from ban_analysis.engine import distributed
    from ban_analysis.engine.files import now

    # under torchrun, rank 0 alone writes the folder (engine/distributed.py)
    run = distributed.run_dir_for(out_dir, distributed.env_world())
    cfg = _legacy_eval_batch_size(run, cfg)
    resuming = run.check_config(cfg.to_dict())
    last_gen = cfg.ban.generations if until_gen is None else min(until_gen, cfg.ban.generations)
    if resuming and run.is_complete():
        logger.info("%s is complete; nothing to do", run.path)
        return run.summary()
    # under torchrun: join the process group, and this rank's device
    world, torch_device = distributed.setup(resolve_device(device))
    d = cfg.data
    bundle = load_dataset(d.name, root=d.root or None, val_size=d.val_size, val_seed=d.val_seed,
                          train_subset=d.train_subset, image_size=d.image_size or None,
                          cache_dir=d.cache_dir or None, device=torch_device)
    bundle, clean_by_id = _prepare_folder(cfg, run, bundle, world, torch_device)
    hook_runner = _hook_runner(cfg, bundle, world, torch_device, clean_by_id)
    teacher = None
    for gen in range(last_gen + 1):
        distributed.barrier(world)  # rank 0 has written the previous generation's files
        arch, params = arch_for_gen(cfg, gen)
        state = _completed_state(run, gen)
        if state is not None:
            teacher = freeze(_load_model(state, bundle, torch_device))
            continue
        if gen == 0 and cfg.teacher.checkpoint:
            teacher = freeze(_import_teacher(cfg, run, bundle, torch_device))
            eval_bs = eval_batch_size(cfg.train, torch_device)
            run.save_logits(0, "val", predict(teacher, bundle.val, bundle, eval_bs))
            run.save_logits(0, "test", predict(teacher, bundle.test, bundle, eval_bs))
            continue
        model = _train_gen(cfg, run, gen, arch, params, bundle, teacher, hook_runner, clean_by_id, world,
                           torch_device, progress)
        teacher = freeze(model)
    if hook_runner is not None:
        run.update_manifest(hooks=hook_runner.info())
    if last_gen < cfg.ban.generations:
        return None
    distributed.barrier(world)  # rank 0 has written every generation's files
    if world.is_main:
        summary = summarize(run, cfg)
        run.write_summary(summary)
        run.update_manifest(finished=now())
    distributed.barrier(world)  # and the summary
    return summary if world.is_main else run.summary()


def _prepare_folder(cfg: RunConfig, run: RunDir, bundle: DatasetBundle, world, torch_device):
    """Label noise applied, the folder bound to the config, the manifest started, the targets and the
    noise record written; returns the bundle and the clean labels by sample id (None without noise)."""
    from ban_analysis.engine import distributed
    from ban_analysis.engine.files import atomic_save_npy

    d = cfg.data
    noise = None
    if d.label_noise.rate > 0:  # rate 0: not a single random number drawn, the bundle untouched
        bundle, noise = _noisy_labels(cfg, bundle)
    distributed.barrier(world)  # every rank has read the folder before rank 0 writes to it
    run.bind_config(cfg.to_dict())  # only now: a run that cannot start leaves no folder behind
    run.start_manifest(cfg.seed, describe_device(torch_device))
    for split in ("val", "test"):
        labels = getattr(bundle, split).y.cpu().numpy().astype("int64")
        if world.is_main:
            atomic_save_npy(run.layout.targets(split), labels)
    clean_by_id = None  # with label noise: sample id -> clean label (-1 off the train split)
    if noise is not None:
        from ban_analysis.engine.files import atomic_save_npz

        if world.is_main:
            atomic_save_npz(run.layout.label_noise, noise.arrays())
        run.update_manifest(label_noise=noise.info)
        clean_by_id = torch.full((int(bundle.train.index.max()) + 1,), -1, dtype=torch.long, device=torch_device)
        clean_by_id[bundle.train.index] = torch.from_numpy(noise.clean).to(torch_device)
    return bundle, clean_by_id


def _hook_runner(cfg: RunConfig, bundle: DatasetBundle, world, torch_device, clean_by_id):
    """The run's HookRunner (None without hooks), with the held-out rows its hooks need."""
    if not cfg.hooks:
        return None
    from ban_analysis.instrument.hooks import HookRunner

    # fuse_backward: update_share and param_split reuse the trainer's own backward pass
    # (about one backward pass less per call; benchmarks/README.md, Hooks). Not under
    # torchrun: there .grad after the backward is the all-reduced gradient of every rank,
    # while the hooks measure this rank's shard.
    # defer: logit_split and head_split gather their rows per step and compute their columns at
    # each epoch's end (train_generation flushes the runner before writing the epoch's files);
    # not under torchrun, whose writer orders the ranks' rows by each block's first step.
    hook_runner = HookRunner(cfg.hooks, seed=cfg.seed, train_size=len(bundle.train.index),
                             train_index=bundle.train.index, fuse_backward=not world.enabled,
                             clean_labels=clean_by_id, defer=not world.enabled)
    if hook_runner.heldout_hooks():  # heldout_attribution: its fixed rows of the validation split
        hook_runner.set_heldout(*_normalised_split(bundle.val, bundle, eval_batch_size(cfg.train, torch_device)))
    return hook_runner


def _train_gen(cfg: RunConfig, run: RunDir, gen: int, arch: str, params: dict, bundle: DatasetBundle, teacher,
               hook_runner, clean_by_id, world, torch_device, progress: bool) -> nn.Module:
    """Train generation ``gen`` into the folder (manifest before and after, logits); returns the model."""
    from ban_analysis.engine.files import now, sha256_file

    objective = objective_for_gen(cfg, gen)
    parent_sha = sha256_file(run.checkpoint_path(gen - 1)) if gen > 0 and world.is_main else None
    run.update_manifest(generations={str(gen): {"arch": arch, "objective": objective.name,
                                                "parent_sha256": parent_sha, "started": now()}})
    model = build_model(arch, params, bundle, cfg.seed, gen).to(torch_device)
    logger.info("gen %d: %s (%d parameters), objective %s", gen, arch,
                sum(p.numel() for p in model.parameters()), objective.name)
    result = train_generation(model, objective, bundle, cfg.train, gen=gen, seed=cfg.seed,
                              teacher=teacher if objective.needs_teacher else None, run=run,
                              hooks=hook_runner, augment=cfg.data.augment, pad=cfg.data.pad,
                              progress=progress and world.is_main, arch_info=state_for_arch(arch, params),
                              clean_targets=clean_by_id, tensorboard=cfg.log.tensorboard)
    if result.best is not None and world.is_main:  # before test_logits.npy, which marks the gen complete
        run.save_logits(gen, "val", result.best["val_logits"], best=True)
        run.save_logits(gen, "test", result.best["test_logits"], best=True)
    run.save_logits(gen, "val", result.val_logits)
    run.save_logits(gen, "test", result.test_logits)
    if world.is_main:
        run.update_manifest(generations={str(gen): {
            "arch": arch, "objective": objective.name, "parent_sha256": parent_sha,
            "checkpoint_sha256": sha256_file(run.checkpoint_path(gen)), "finished": now(),
            "best_epoch": result.best["epoch"] if result.best is not None else None}})
    return model

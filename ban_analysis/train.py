"""Training: one generation (`train_generation`) and the BAN chain over generations (`run_chain`).

Reproducibility. Every random stream of a generation is derived from (run seed, purpose, gen):
the student's initial weights ("init"), the data order and augmentation ("data"), the
objective's randomness such as DKPP's permutations ("objective") and the global torch stream
used by dropout ("torch"). None depends on the objective, so in a study the students of the same
(seed, gen) start from the same weights and see the same batches whatever they are trained on:
comparisons between objectives are paired. The streams' states are saved in every checkpoint,
so a resumed run continues exactly where the interrupted one was (same numbers on CPU).

Model selection. The generation's model is its final-epoch model; the validation split is
evaluated every epoch for monitoring and for choosing hyperparameters, never for picking epochs
(early stopping per generation would add a noisy selection step to every comparison).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ban_analysis.config import RunConfig, TrainConfig
from ban_analysis.data import DatasetBundle, Split, iterate_batches
from ban_analysis.losses import get_objective
from ban_analysis.models import create_model
from ban_analysis.runs import HookWriter, RunDir

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops with a diagnosis instead of training on NaN."""


def derive_seed(seed: int, purpose: str, gen: int) -> int:
    """A 63-bit seed for one stream; stable across machines and Python versions."""
    digest = hashlib.sha256(f"ban_analysis/{seed}/{purpose}/{gen}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_generator(seed: int, purpose: str, gen: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, purpose, gen))
    return g


def build_model(arch: str, params: dict, bundle: DatasetBundle, seed: int, gen: int) -> nn.Module:
    """A fresh model whose initial weights come from (seed, "init", gen) only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init", gen))
        return create_model(arch, num_classes=bundle.num_classes, input_shape=bundle.input_shape, **params)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate for 0-based ``epoch`` (set once per epoch, which keeps resume trivial)."""
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / cfg.epochs))
    passed = sum(epoch >= round(m * cfg.epochs) for m in cfg.milestones)
    return cfg.lr * cfg.gamma ** passed


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)


def autocast_context(amp: str, device: torch.device):
    """bf16 autocast where asked for (or 'auto' on a GPU that has bf16); plain float32 otherwise."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if amp == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def predict(model: nn.Module, split: Split, bundle: DatasetBundle, batch_size: int,
            amp: str = "off", channels_last: bool = False) -> torch.Tensor:
    """(N, C) float32 logits of ``split`` in its stored order, model in eval mode, no augmentation."""
    was_training = model.training
    model.eval()
    device = split.x.device
    chunks = []
    with torch.inference_mode():
        for x, _, _ in iterate_batches(split, batch_size, shuffle=False, augment="none",
                                       mean=bundle.mean, std=bundle.std):
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_context(amp, device):
                chunks.append(model(x).float())
    model.train(was_training)
    if not chunks:
        return torch.empty(0, bundle.num_classes, device=device)
    return torch.cat(chunks).clone()  # clone outside inference mode: a normal tensor autograd may use


@dataclass
class GenerationResult:
    gen: int
    metrics: list[dict] = field(default_factory=list)  # one row per epoch (runs.METRIC_COLUMNS)
    val_logits: torch.Tensor | None = None
    test_logits: torch.Tensor | None = None


def _check_finite(loss: torch.Tensor, student_logits: torch.Tensor, *, gen: int, epoch: int,
                  step: int, lr: float) -> None:
    if torch.isfinite(loss):
        return
    biggest = student_logits.detach().float().abs().nan_to_num(float("inf")).max().item()
    raise TrainingDiverged(
        f"gen {gen} epoch {epoch + 1} step {step}: loss is {loss.item()} (largest |student logit| "
        f"{biggest:.3g}, lr {lr:g}); the run diverged: lower train.lr, or set train.amp=off")


def train_generation(model: nn.Module, objective, bundle: DatasetBundle, cfg: TrainConfig, *,
                     gen: int, seed: int, teacher: nn.Module | None = None, run: RunDir | None = None,
                     hooks=None, augment: str = "none", pad: int = 4, progress: bool = True,
                     arch_info: dict | None = None) -> GenerationResult:
    """Train one generation: ``model`` from scratch with ``objective``, taught by ``teacher``.

    Args:
        model: a freshly initialised student (see :func:`build_model`), on the data's device.
        objective: from :func:`ban_analysis.losses.get_objective`; never special-cased by name.
        bundle: the dataset; training uses ``bundle.train``, monitoring ``bundle.val``.
        teacher: frozen, evaluated in eval mode under ``torch.inference_mode``; None for "ce".
        run: where checkpoints, metrics and hook output go; with a checkpoint of this generation
            there, training resumes after its last completed epoch.
        hooks: a :class:`ban_analysis.hooks.HookRunner` or None.
    Returns:
        A GenerationResult with the per-epoch metrics and final val/test logits.
    """
    if objective.needs_teacher and teacher is None:
        raise ValueError(f"objective {objective.name!r} needs a teacher; generation {gen} has none")
    device = bundle.train.x.device
    optimizer = make_optimizer(model, cfg)
    data_gen = seeded_generator(seed, "data", gen, device)
    objective_gen = seeded_generator(seed, "objective", gen, device)
    torch_state = _seeded_cpu_state(derive_seed(seed, "torch", gen))
    start_epoch, metrics = 0, []
    if run is not None and run.checkpoint_path(gen).exists():
        state = run.load_checkpoint(gen)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        data_gen.set_state(state["rng"]["data"])
        objective_gen.set_state(state["rng"]["objective"])
        torch_state = state["rng"]["torch"]
        start_epoch, metrics = state["epoch"], list(state["metrics"])
        logger.info("gen %d: resuming after epoch %d of %d", gen, start_epoch, cfg.epochs)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if cfg.compile else model

    teacher_train_logits, row_of = None, None
    if teacher is not None and augment == "none":
        # Without augmentation the teacher sees each training image unchanged, so its logits are
        # computed once instead of once per step: the BAN step then costs what the CE step costs.
        teacher_train_logits = predict(teacher, bundle.train, bundle, cfg.eval_batch_size, cfg.amp,
                                       cfg.channels_last)
        row_of = torch.full((int(bundle.train.index.max()) + 1,), -1, dtype=torch.long, device=device)
        row_of[bundle.train.index] = torch.arange(len(bundle.train.index), device=device)

    steps_per_epoch = math.ceil(len(bundle.train.y) / cfg.batch_size)
    writer = HookWriter(run, gen) if (run is not None and hooks is not None) else None
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(torch_state)
        for epoch in range(start_epoch, cfg.epochs):
            lr = lr_at(cfg, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            started = time.perf_counter()
            loss_sum, correct, seen = 0.0, 0, 0
            bar = tqdm(total=steps_per_epoch, desc=f"gen {gen} epoch {epoch + 1}/{cfg.epochs}",
                       leave=False, disable=not progress, unit="batch")
            batches = iterate_batches(bundle.train, cfg.batch_size, shuffle=True, generator=data_gen,
                                      augment=augment, pad=pad, mean=bundle.mean, std=bundle.std)
            for i, (x, target, index) in enumerate(batches):
                step = epoch * steps_per_epoch + i
                if cfg.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                teacher_logits = None
                if objective.needs_teacher:
                    if teacher_train_logits is not None:
                        teacher_logits = teacher_train_logits[row_of[index]]
                    else:
                        with torch.inference_mode(), autocast_context(cfg.amp, device):
                            teacher_logits = teacher(x).float()
                        teacher_logits = teacher_logits.clone()  # leave inference mode for autograd
                capture = hooks.capture(model, step) if hooks is not None else contextlib.nullcontext()
                with capture, autocast_context(cfg.amp, device):
                    student_logits = forward(x)
                try:
                    out = objective(student_logits, teacher_logits, target, generator=objective_gen)
                except ValueError:
                    # objectives refuse non-finite logits: that is divergence, diagnosed below
                    _check_finite(student_logits.detach().sum(), student_logits, gen=gen, epoch=epoch,
                                  step=step, lr=lr)
                    raise
                _check_finite(out.loss, student_logits, gen=gen, epoch=epoch, step=step, lr=lr)
                if hooks is not None:
                    _run_hooks(hooks, writer, model, gen, epoch, step, index, x, target,
                               student_logits, teacher_logits, out, capture)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                if hooks is not None:
                    # fused hooks read this backward's .grad: before the step, which changes nothing
                    fused = hooks.after_backward()
                    if fused and writer is not None:
                        writer.add(epoch, step, fused)
                optimizer.step()
                n = target.shape[0]
                loss_sum += out.loss.item() * n
                correct += (student_logits.detach().argmax(1) == target).sum().item()
                seen += n
                bar.update(1)
                if i % 20 == 0:
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
            bar.close()
            val_logits = predict(model, bundle.val, bundle, cfg.eval_batch_size, cfg.amp, cfg.channels_last)
            row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                   **_split_loss_acc(val_logits, bundle.val.y), "lr": lr,
                   "seconds": time.perf_counter() - started}
            metrics.append(row)
            logger.info("gen %d epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  (%.1fs)",
                        gen, epoch + 1, cfg.epochs, row["train_loss"], row["train_acc"],
                        row["val_loss"], row["val_acc"], row["seconds"])
            if run is not None:
                if writer is not None:
                    writer.flush(epoch)  # before the checkpoint: a crash in between redoes the epoch
                run.write_metrics(gen, metrics)
                last = epoch + 1 == cfg.epochs
                if last or (epoch + 1) % cfg.checkpoint_every == 0:
                    run.save_checkpoint(gen, {
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "epoch": epoch + 1, "complete": last, "metrics": metrics,
                        "rng": {"data": data_gen.get_state(), "objective": objective_gen.get_state(),
                                "torch": torch.get_rng_state()},
                        **(arch_info or {})})
    result = GenerationResult(gen=gen, metrics=metrics)
    result.val_logits = predict(model, bundle.val, bundle, cfg.eval_batch_size, cfg.amp, cfg.channels_last)
    result.test_logits = predict(model, bundle.test, bundle, cfg.eval_batch_size, cfg.amp, cfg.channels_last)
    return result


def _seeded_cpu_state(seed: int) -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed(seed)
    return g.get_state()


def _split_loss_acc(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    if logits.shape[0] == 0:
        return {"val_loss": float("nan"), "val_acc": float("nan")}
    return {"val_loss": F.cross_entropy(logits, target).item(),
            "val_acc": (logits.argmax(1) == target).float().mean().item()}


def _run_hooks(hooks, writer, model, gen, epoch, step, index, x, target, student_logits,
               teacher_logits, out, capture) -> None:
    from ban_analysis.hooks import StepContext

    ctx = StepContext(gen=gen, epoch=epoch, step=step, sample_index=index, inputs=x, target=target,
                      student_logits=student_logits, teacher_logits=teacher_logits, out=out,
                      model=model, captured=getattr(capture, "captured", {}) or {})
    outputs = hooks.run(ctx)
    if outputs and writer is not None:
        writer.add(epoch, step, outputs)


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
    from ban_analysis.runs import load_checkpoint_file, sha256_file

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
    from ban_analysis.runs import atomic_save_npy, now, sha256_file

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
        from ban_analysis.hooks import HookRunner

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

    from ban_analysis.metrics import ensemble_metrics, logit_metrics

    test_targets = np.load(run.path / "test_targets.npy")
    val_targets = np.load(run.path / "val_targets.npy")
    manifest_gens = run.manifest().get("generations", {})
    generations, test_logits = [], {}
    for gen in range(cfg.ban.generations + 1):
        test_logits[gen] = run.load_logits(gen, "test")
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
    return {"generations": generations, "ensembles": ensembles}


def _finite_or_none(x):
    return None if x is None or not math.isfinite(x) else float(x)

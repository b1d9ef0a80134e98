"""The generation loop: epochs of :func:`ban_analysis.engine.step.train_step`, with resume and checkpoints.

Reproducibility. Every random stream of a generation is derived from (run seed, purpose, gen):
the student's initial weights ("init"), the data order and augmentation ("data"), the
objective's randomness such as DKPP's permutations ("objective") and the global torch stream
used by dropout ("torch"). None depends on the objective, so in a study the students of the same
(seed, gen) start from the same weights and see the same batches whatever they are trained on:
comparisons between objectives are paired. The streams' states are saved in every checkpoint,
so a resumed run continues exactly where the interrupted one was (same numbers on CPU).

Model selection. The generation's model is its final-epoch model; the validation split is
evaluated every epoch for monitoring and for choosing hyperparameters, never for picking epochs
(early stopping per generation would add a noisy selection step to every comparison). Beside it,
with ``train.track_best`` (default on), the epoch with the best validation accuracy so far
(strictly greater: ties keep the earlier epoch) has its val and test logits kept, in the
checkpoint while training and as ``best_*_logits.npy`` at the end, so a study can report either
epoch (``report_epoch``); this costs one test-set prediction per improving epoch. Neither the
predictions nor the record touch a random stream: the training numbers are the same either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ban_analysis.config import TrainConfig
from ban_analysis.data import DatasetBundle, Split, iterate_batches
from ban_analysis.engine import distributed
from ban_analysis.engine.amp import make_scaler
from ban_analysis.engine.runs import RunDir
from ban_analysis.engine.step import autocast_context, train_step
from ban_analysis.models import create_model

logger = logging.getLogger(__name__)


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


# train.eval_batch_size = 0 ("auto"): on a GPU one large batch; on a CPU, where the measured
# optimum is 128-256 images per forward and 1024 runs ResNet-20 at half the speed (benchmarks/README.md,
# "Evaluation batch size"), twice the training batch, at most 256
AUTO_EVAL_BATCH = {"cuda": 1024, "cpu_max": 256}


def eval_batch_size(cfg: TrainConfig, device: str | torch.device) -> int:
    """``cfg.eval_batch_size``, or for 0 ("auto") the rule for ``device``: CUDA 1024; otherwise
    ``min(256, 2 * cfg.batch_size)``. Deterministic (no timing), so a config gives the same batches
    on every machine of a kind. Predictions do not depend on it except through float rounding."""
    if cfg.eval_batch_size:
        return cfg.eval_batch_size
    if torch.device(device).type == "cuda":
        return AUTO_EVAL_BATCH["cuda"]
    return min(AUTO_EVAL_BATCH["cpu_max"], 2 * cfg.batch_size)


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
    # the best-validation epoch (train.track_best): {"epoch", "val_acc", "val_logits", "test_logits"}
    best: dict | None = None
    # seconds of each epoch trained in this call spent evaluating (the validation prediction, and the
    # test prediction of an epoch that improves on the best); metrics.csv's "seconds" holds the former
    eval_seconds: list[float] = field(default_factory=list)
    final_eval_seconds: float = 0.0  # the final val/test predictions (0 where an epoch's are reused)


def train_generation(model: nn.Module, objective, bundle: DatasetBundle, cfg: TrainConfig, *,
                     gen: int, seed: int, teacher: nn.Module | None = None, run: RunDir | None = None,
                     hooks=None, augment: str = "none", pad: int = 4, progress: bool = True,
                     arch_info: dict | None = None, clean_targets: torch.Tensor | None = None,
                     tensorboard: bool = False) -> GenerationResult:
    """Train one generation: ``model`` from scratch with ``objective``, taught by ``teacher``.

    Args:
        model: a freshly initialised student (see :func:`build_model`), on the data's device.
        objective: from :func:`ban_analysis.losses.get_objective`; never special-cased by name.
        bundle: the dataset; training uses ``bundle.train``, monitoring ``bundle.val``.
        teacher: frozen, evaluated in eval mode under ``torch.inference_mode``; None for "ce".
        run: where checkpoints, metrics and hook output go; with a checkpoint of this generation
            there, training resumes after its last completed epoch.
        hooks: a :class:`ban_analysis.instrument.hooks.HookRunner` or None.
        clean_targets: with label noise, the clean label of each training sample by sample id
            ((max id + 1,) int64 on the data's device). The metrics rows then gain
            ``train_acc_clean`` (accuracy against the clean labels) and ``memorised`` (share of
            the noisy samples predicted as their noisy label), both from the training step's own
            logits over the epoch's batches, like ``train_acc``: no extra forward pass.
        tensorboard: also write each epoch's metrics and hook means as TensorBoard scalars under
            ``run.layout.tensorboard(gen)`` (:mod:`ban_analysis.engine.tracking`); needs ``run``.
    Returns:
        A GenerationResult with the per-epoch metrics, final val/test logits and, with
        ``cfg.track_best``, the best-validation epoch's record.
    """
    if objective.needs_teacher and teacher is None:
        raise ValueError(f"objective {objective.name!r} needs a teacher; generation {gen} has none")
    device = bundle.train.x.device
    eval_bs = eval_batch_size(cfg, device)  # train.eval_batch_size, 0 = auto for the device
    optimizer = make_optimizer(model, cfg)
    scaler = make_scaler(cfg.amp, device)  # fp16 autocast only (amp.py); None for bf16 and off
    world = distributed.current()  # a single process unless started by torchrun (distributed.py)
    data_gen = seeded_generator(seed, "data", gen, device)
    objective_gen = seeded_generator(seed, "objective", gen, device)
    torch_state = _seeded_cpu_state(derive_seed(seed, "torch", gen))
    start_epoch, metrics, track_best, best = 0, [], cfg.track_best, None
    if run is not None and run.checkpoint_path(gen).exists():
        start_epoch, metrics, track_best, best, torch_state = _resume(
            run.load_checkpoint(gen), gen, cfg, model, optimizer, scaler, data_gen, objective_gen)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trained, shard = model, None  # under torchrun: the DDP wrapper, and this rank's share of each batch
    if world.enabled:
        distributed.check_global_batches(len(bundle.train.y), cfg.batch_size, world)
        trained, shard = distributed.wrap_ddp(model, world, device, cfg.sync_batchnorm)
    forward = torch.compile(trained) if cfg.compile else trained

    teacher_train_logits, row_of = None, None
    if teacher is not None and augment == "none":
        teacher_train_logits, row_of = _cached_teacher_logits(teacher, bundle, eval_bs, cfg)

    steps_per_epoch = math.ceil(len(bundle.train.y) / cfg.batch_size)
    writer = distributed.hook_writer_for(run, gen, world) if (run is not None and hooks is not None) else None
    board = None  # TensorBoard, written where the run folder is (rank 0 under torchrun)
    if tensorboard and run is not None and getattr(run, "writable", True):
        from ban_analysis.engine.tracking import TensorBoardLog

        board = TensorBoardLog(run.layout.tensorboard(gen), start_epoch)
    last_eval, result_eval_seconds = None, []  # (epoch, val logits, test logits if predicted), seconds
    with torch.random.fork_rng(devices=[]), (contextlib.closing(board) if board else contextlib.nullcontext()):
        torch.set_rng_state(torch_state)
        for epoch in range(start_epoch, cfg.epochs):
            lr = lr_at(cfg, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            started = time.perf_counter()
            totals = _EpochTotals(clean_targets)
            bar = tqdm(total=steps_per_epoch, desc=f"gen {gen} epoch {epoch + 1}/{cfg.epochs}",
                       leave=False, disable=not progress, unit="batch")
            batches = iterate_batches(bundle.train, cfg.batch_size, shuffle=True, generator=data_gen,
                                      augment=augment, pad=pad, mean=bundle.mean, std=bundle.std)
            for i, (x, target, index) in enumerate(batches):
                step = epoch * steps_per_epoch + i
                if shard is not None:  # this rank's contiguous slice of the global batch
                    lo, hi = distributed.shard_bounds(target.shape[0], world)
                    shard.weight = (hi - lo) / target.shape[0]
                    x, target, index = x[lo:hi], target[lo:hi], index[lo:hi]
                if cfg.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                teacher_logits = None
                if objective.needs_teacher and teacher_train_logits is not None:
                    teacher_logits = teacher_train_logits[row_of[index]]
                result = train_step(model, objective, x, target, optimizer, teacher=teacher,
                                    teacher_logits=teacher_logits, hooks=hooks, step=step, gen=gen, epoch=epoch,
                                    sample_index=index, generator=objective_gen, amp=cfg.amp, scaler=scaler,
                                    forward=forward)
                if result.hook_rows and writer is not None:
                    writer.add(epoch, step, result.hook_rows)
                totals.add(result, target, index)
                bar.update(1)
                if i % 20 == 0:
                    bar.set_postfix(loss=f"{totals.loss_sum / totals.seen:.4f}",
                                    acc=f"{totals.correct / totals.seen:.4f}")
            bar.close()
            if hooks is not None and hasattr(hooks, "flush"):  # HookRunner(defer=True): the epoch's deferred rows
                deferred = hooks.flush()
                if deferred and writer is not None:
                    writer.add(epoch, epoch * steps_per_epoch, deferred)  # rows carry their own step
            if world.enabled:  # the epoch's sums over all ranks; rank 0's BatchNorm buffers everywhere
                totals.all_sum(world, device)
                distributed.broadcast_buffers(model, world)
            eval_started = time.perf_counter()
            val_logits = predict(model, bundle.val, bundle, eval_bs, cfg.amp, cfg.channels_last)
            eval_seconds = time.perf_counter() - eval_started
            row = {"epoch": epoch + 1, **totals.row(), **_split_loss_acc(val_logits, bundle.val.y), "lr": lr,
                   "seconds": time.perf_counter() - started}
            if clean_targets is not None:
                row.update(totals.noise_row())
            if scaler is not None:  # fp16: optimizer steps skipped for inf/NaN gradients this epoch
                row["skipped_steps"] = totals.skipped
            metrics.append(row)
            if track_best and row["val_acc"] > (best["val_acc"] if best else -math.inf):  # NaN: never
                eval_started = time.perf_counter()
                best_test = predict(model, bundle.test, bundle, eval_bs, cfg.amp, cfg.channels_last)
                eval_seconds += time.perf_counter() - eval_started
                best = {"epoch": epoch + 1, "val_acc": row["val_acc"], "val_logits": val_logits.float().cpu(),
                        "test_logits": best_test.float().cpu()}
            last_eval = (epoch, val_logits, best_test if best is not None and best["epoch"] == epoch + 1 else None)
            result_eval_seconds.append(eval_seconds)
            logger.info("gen %d epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  (%.1fs, %.1fs of it "
                        "evaluating at batch %d)", gen, epoch + 1, cfg.epochs, row["train_loss"], row["train_acc"],
                        row["val_loss"], row["val_acc"], row["seconds"], eval_seconds, eval_bs)
            if run is not None:
                hook_means = {}
                if writer is not None:  # before the checkpoint: a crash in between redoes the epoch
                    hook_means = writer.flush(epoch, means=True) if board is not None else writer.flush(epoch)
                if board is not None:  # also before it; a redone epoch's events replace these (purge_step)
                    board.log_epoch(row, hook_means or {})
                run.write_metrics(gen, metrics)
                last = epoch + 1 == cfg.epochs
                if last or (epoch + 1) % cfg.checkpoint_every == 0:
                    run.save_checkpoint(gen, {
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "epoch": epoch + 1, "complete": last, "metrics": metrics,
                        **({"best": best} if track_best else {}),  # absent: no record (resume keeps none)
                        "rng": {"data": data_gen.get_state(), "objective": objective_gen.get_state(),
                                "torch": torch.get_rng_state()},
                        **({"scaler": scaler.state_dict()} if scaler is not None else {}),
                        **(arch_info or {})})
    result = GenerationResult(gen=gen, metrics=metrics, best=best if track_best else None,
                              eval_seconds=result_eval_seconds)
    # The final model is the last epoch's: where that epoch ran in this call its predictions are
    # reused (the same model on the same rows gives the same logits), else computed now (a resume).
    eval_started = time.perf_counter()
    reuse = last_eval is not None and last_eval[0] == cfg.epochs - 1
    result.val_logits = last_eval[1] if reuse else predict(model, bundle.val, bundle, eval_bs, cfg.amp,
                                                           cfg.channels_last)
    result.test_logits = (last_eval[2] if reuse and last_eval[2] is not None
                          else predict(model, bundle.test, bundle, eval_bs, cfg.amp, cfg.channels_last))
    result.final_eval_seconds = time.perf_counter() - eval_started
    return result


def _resume(state: dict, gen: int, cfg: TrainConfig, model, optimizer, scaler, data_gen, objective_gen):
    """Load a generation's checkpoint into the training state; returns (start epoch, metrics rows,
    whether the best epoch is still tracked, the best record, the global torch RNG state)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    data_gen.set_state(state["rng"]["data"])
    objective_gen.set_state(state["rng"]["objective"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    start_epoch, track_best = state["epoch"], cfg.track_best
    if track_best and "best" not in state and start_epoch > 0:
        track_best = False  # a checkpoint of an older version: its earlier epochs' logits are gone
        logger.warning("gen %d: the checkpoint has no best-epoch record; this generation will have none", gen)
    logger.info("gen %d: resuming after epoch %d of %d", gen, start_epoch, cfg.epochs)
    return start_epoch, list(state["metrics"]), track_best, state.get("best"), state["rng"]["torch"]


def _cached_teacher_logits(teacher: nn.Module, bundle: DatasetBundle, eval_bs: int, cfg: TrainConfig):
    """The teacher's logits of every training image, and sample id -> row.

    Without augmentation the teacher sees each training image unchanged, so its logits are
    computed once instead of once per step: the BAN step then costs what the CE step costs.
    """
    device = bundle.train.x.device
    logits = predict(teacher, bundle.train, bundle, eval_bs, cfg.amp, cfg.channels_last)
    row_of = torch.full((int(bundle.train.index.max()) + 1,), -1, dtype=torch.long, device=device)
    row_of[bundle.train.index] = torch.arange(len(bundle.train.index), device=device)
    return logits, row_of


class _EpochTotals:
    """The epoch's running sums over the training steps (the metrics row's train columns)."""

    def __init__(self, clean_targets: torch.Tensor | None) -> None:
        self.loss_sum, self.correct, self.seen, self.skipped = 0.0, 0, 0, 0
        self.clean_targets = clean_targets
        # with label noise: predicted the clean label, noisy samples, noisy ones predicted as noisy
        self.noise_counts = (None if clean_targets is None
                             else torch.zeros(3, dtype=torch.long, device=clean_targets.device))

    def add(self, result, target: torch.Tensor, index: torch.Tensor) -> None:
        n = target.shape[0]
        self.skipped += result.skipped
        self.loss_sum += result.loss.item() * n
        self.correct += (result.student_logits.argmax(1) == target).sum().item()
        if self.clean_targets is not None:
            self.noise_counts += _noise_counts(result.student_logits, target, self.clean_targets[index])
        self.seen += n

    def all_sum(self, world, device) -> None:
        """The sums over every rank (torchrun)."""
        counts = self.noise_counts.tolist() if self.noise_counts is not None else []
        sums = distributed.all_sum([self.loss_sum, self.correct, self.seen, self.skipped, *counts], world, device)
        self.loss_sum, self.correct, self.seen, self.skipped = sums[0], *(int(v) for v in sums[1:4])
        if self.noise_counts is not None:
            self.noise_counts = torch.tensor([int(v) for v in sums[4:]], dtype=torch.long)

    def row(self) -> dict:
        return {"train_loss": self.loss_sum / self.seen, "train_acc": self.correct / self.seen}

    def noise_row(self) -> dict:
        """train_acc_clean (against the clean labels) and memorised (noisy samples fitted as labelled)."""
        clean_ok, noisy, memorised = self.noise_counts.tolist()
        return {"train_acc_clean": clean_ok / self.seen, "memorised": memorised / noisy if noisy else float("nan")}


def _noise_counts(logits: torch.Tensor, target: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """(3,) counts in one batch: predicted the clean label, noisy samples, noisy ones predicted as their noisy label."""
    pred = logits.argmax(1)
    noisy = target != clean
    return torch.stack([(pred == clean).sum(), noisy.sum(), (noisy & (pred == target)).sum()])


def _seeded_cpu_state(seed: int) -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed(seed)
    return g.get_state()


def _split_loss_acc(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    if logits.shape[0] == 0:
        return {"val_loss": float("nan"), "val_acc": float("nan")}
    return {"val_loss": F.cross_entropy(logits, target).item(),
            "val_acc": (logits.argmax(1) == target).float().mean().item()}

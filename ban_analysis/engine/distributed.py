"""Data-parallel training over several processes, started by ``torchrun``.

``torchrun --nproc_per_node=N -m ban_analysis run CONFIG ...`` starts N copies of the command;
torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each. When ``WORLD_SIZE > 1``,
:func:`setup` joins the process group (gloo on CPU, NCCL on CUDA with device
``cuda:LOCAL_RANK``), and the generation loop then:

* iterates the same *global* batches on every rank (``train.batch_size`` stays the global batch,
  drawn from the same seeded data generator), and each rank trains on a contiguous slice of
  each batch (:func:`shard_bounds`; rank r gets rows ``B*r//W .. B*(r+1)//W``);
* wraps the student in ``DistributedDataParallel``, whose gradient all-reduce is replaced by a
  weighted sum (:func:`weighted_allreduce_hook`): rank r's gradient, the mean over its n_r rows,
  is multiplied by n_r / B before the sum, so the update is the single-process update on the
  global batch (also for a last batch that does not split evenly), for models without
  BatchNorm, up to float reduction order. With BatchNorm each rank normalises with its own
  shard's statistics (``train.sync_batchnorm = true`` uses ``SyncBatchNorm``, CUDA only);
* sums the epoch's training loss and accuracy counts over the ranks, copies rank 0's BatchNorm
  buffers to every rank at the end of each epoch (so all ranks hold the same model, and the
  next generation's teacher is the same everywhere), and gathers the hook rows of all ranks
  to rank 0 at the end of each epoch (:class:`DistributedHookWriter`);
* writes the run folder on rank 0 only (:class:`ReadOnlyRunDir` on the others); every rank
  reads the same checkpoint on resume.

A rank that dies (kill -9, out of memory) makes torchrun's elastic agent stop the others and
exit non-zero; a rank that hangs is ended by the collective timeout, ``BAN_DDP_TIMEOUT``
seconds (default 600), given to ``init_process_group``.

Without torchrun (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``) nothing here runs: no process group,
no wrapper, the single-process numbers unchanged.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ban_analysis.engine.runs import HookWriter, RunDir

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_TIMEOUT_S", "DistributedHookWriter", "ReadOnlyRunDir", "TIMEOUT_ENV", "World",
           "all_sum", "barrier", "broadcast_buffers", "check_global_batches", "current", "setup",
           "shard_bounds", "shutdown", "timeout_seconds", "weighted_allreduce_hook", "wrap_ddp"]

TIMEOUT_ENV = "BAN_DDP_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class World:
    """Where this process stands: rank, world size and local rank (0, 1, 0 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def env_world() -> World:
    """The world torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK; a single process without them."""
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return SINGLE
    rank = _env_int("RANK", 0)
    return World(rank=rank, world_size=world_size, local_rank=_env_int("LOCAL_RANK", rank))


def current() -> World:
    """This process's world: the initialised process group's, else a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return World(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                     _env_int("LOCAL_RANK", torch.distributed.get_rank()))
    return SINGLE


def timeout_seconds() -> float:
    """The collective timeout: ``$BAN_DDP_TIMEOUT`` seconds, default 600."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw.strip():
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return value


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group when started by torchrun with WORLD_SIZE > 1; else change nothing.

    Returns the world and the device this rank trains on (``cuda:LOCAL_RANK`` on CUDA).
    """
    world = env_world()
    if not world.enabled:
        return current(), device
    if not torch.distributed.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {world.local_rank} but only {torch.cuda.device_count()} CUDA "
                             "device(s) here: --nproc_per_node must not exceed the GPUs per machine")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend,
                                             timeout=datetime.timedelta(seconds=timeout_seconds()))
        logger.info("rank %d of %d: process group up (%s, %s), timeout %gs", world.rank, world.world_size,
                    backend, device, timeout_seconds())
    return current(), device


def shutdown() -> None:
    """Leave the process group (if one was joined); a no-op for a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(world: World) -> None:
    if world.enabled:
        torch.distributed.barrier()


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """Element-wise sums over the ranks (float64); the values themselves for a single process."""
    if not world.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def broadcast_buffers(model: nn.Module, world: World) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank."""
    if not world.enabled:
        return
    for buf in model.buffers():
        torch.distributed.broadcast(buf, src=0)


# ---- the data: one global batch, one slice per rank ---------------------------------------------

def shard_bounds(batch: int, world: World) -> tuple[int, int]:
    """Rows [lo, hi) of a global batch of ``batch`` rows that this rank trains on."""
    return batch * world.rank // world.world_size, batch * (world.rank + 1) // world.world_size


def check_global_batches(n_train: int, batch_size: int, world: World) -> None:
    """Every global batch must give every rank at least one row."""
    if not world.enabled:
        return
    last = n_train % batch_size or batch_size
    smallest = min(batch_size, last) if n_train >= batch_size else n_train
    if smallest < world.world_size:
        raise ValueError(f"a global batch of {smallest} rows (train split {n_train}, train.batch_size "
                         f"{batch_size}) cannot be shared by {world.world_size} ranks; change "
                         "train.batch_size or data.train_subset so every batch has >= one row per rank")


# ---- the model ------------------------------------------------------------------------------------

class _ShardWeight:
    """The comm hook's state: this rank's share n_r / B of the current global batch."""

    def __init__(self, world: World):
        self.weight = 1.0 / world.world_size


def weighted_allreduce_hook(state: _ShardWeight, bucket):  # no return annotation: DDP checks a real one,
    # and this module's annotations are strings (from __future__ import annotations)
    """DDP comm hook: sum over ranks of (n_r / B) * (rank r's mean gradient) = the global-batch mean."""
    buf = bucket.buffer()
    buf.mul_(state.weight)
    fut = torch.distributed.all_reduce(buf, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap_ddp(model: nn.Module, world: World, device: torch.device, sync_batchnorm: bool = False):
    """``model`` in DistributedDataParallel with the weighted all-reduce; returns (ddp, shard weight state).

    ``sync_batchnorm`` converts BatchNorm layers to SyncBatchNorm in place (parameters and
    buffers kept, so the optimizer and the checkpoint keys are unchanged); torch supports it
    on CUDA only.
    """
    from torch.nn.parallel import DistributedDataParallel

    if sync_batchnorm:
        if device.type != "cuda":
            raise ValueError("train.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm does not run on "
                             "CPU); set train.sync_batchnorm = false")
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if converted is not model:  # only when the model itself is a BatchNorm layer
            raise ValueError("train.sync_batchnorm: the model is a single BatchNorm layer")
    # buffers (BatchNorm statistics) are synced from rank 0 at every forward: DDP's default
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    state = _ShardWeight(world)
    ddp.register_comm_hook(state, weighted_allreduce_hook)
    return ddp, state


# ---- the run folder ------------------------------------------------------------------------------

class ReadOnlyRunDir(RunDir):
    """The run folder as ranks other than 0 see it: they read it, rank 0 alone writes it."""

    writable = False

    def bind_config(self, config) -> bool:
        # checked before the barrier (run_chain); checking again here would race rank 0's writes
        return self.layout.config.exists()

    # the writers, as no-ops that take any arguments (RunDir's may grow options)
    def update_manifest(self, *args: Any, **kwargs: Any) -> dict:
        return self.manifest()

    def start_manifest(self, *args: Any, **kwargs: Any) -> None:
        return None

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        return None

    def write_metrics(self, *args: Any, **kwargs: Any) -> None:
        return None

    def save_logits(self, *args: Any, **kwargs: Any) -> None:
        return None

    def write_summary(self, *args: Any, **kwargs: Any) -> None:
        return None


def run_dir_for(path, world: World) -> RunDir:
    """A writing RunDir on rank 0 (and for a single process), a read-only one elsewhere."""
    return RunDir(path) if world.is_main else ReadOnlyRunDir(path)


class DistributedHookWriter(HookWriter):
    """A HookWriter whose epoch files hold every rank's rows: gathered to rank 0 at flush.

    Rows are ordered by step and, within a step, by rank, so a per-sample hook's file holds
    each sample of the global batch once, as a single process writes it. A per-step hook
    (``update_share``, ``heldout_attribution``) gets one row per rank and step, each about that
    rank's shard (same columns as single-process).
    """

    def __init__(self, run: RunDir, gen: int, world: World):
        super().__init__(run, gen)
        self.world = world

    def flush(self, epoch: int, means: bool = False) -> dict:
        gathered = [None] * self.world.world_size if self.world.is_main else None
        torch.distributed.gather_object(self._buffers, gathered, dst=0)
        if not self.world.is_main:
            self._buffers.clear()
            return {}
        merged: dict[str, list[dict[str, np.ndarray]]] = {}
        for rank, buffers in enumerate(gathered):
            for hook, blocks in buffers.items():
                merged.setdefault(hook, []).extend((int(b["step"][0]), rank, i, b) for i, b in enumerate(blocks))
        self._buffers = {hook: [b for *_, b in sorted(items, key=lambda t: t[:3])]
                         for hook, items in merged.items()}
        return super().flush(epoch, means)  # means: for TensorBoard (engine/tracking.py)


def hook_writer_for(run: RunDir, gen: int, world: World) -> HookWriter:
    return DistributedHookWriter(run, gen, world) if world.enabled else HookWriter(run, gen)

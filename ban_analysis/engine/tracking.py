"""TensorBoard event files beside a run folder's own files (``[log] tensorboard = true``).

Written by the run's writer side (:func:`ban_analysis.engine.loop.train_generation` calls
:meth:`TensorBoardLog.log_epoch` once per epoch), never by hooks. One TensorBoard run per
generation, ``<run>/tensorboard/gen-<k>/`` (:meth:`ban_analysis.layout.RunLayout.tensorboard`),
so ``tensorboard --logdir STUDY`` lists every (seed, variant, generation) of a study as its own
run. ``global_step`` is the 1-based epoch, as in metrics.csv.

Scalars per epoch: ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``lr`` (and
``train/acc_clean``, ``train/memorised`` with label noise), and ``hooks/<hook>/<column>``: the
mean over the epoch's rows of every floating-point column of each hook that ran that epoch.
Non-finite values (no validation split, no flipped label) are not written.

Resume: the writer is opened with ``purge_step`` = the first epoch this process trains, so the
events of epochs redone after a crash replace those the crashed process wrote (TensorBoard drops
an event file's steps >= ``purge_step`` written before it): no epoch appears twice.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

from ban_analysis.engine.files import write_error

__all__ = ["METRIC_TAGS", "TensorBoardLog", "open_log"]

# metrics.csv column -> scalar tag
METRIC_TAGS = {"train_loss": "train/loss", "train_acc": "train/acc", "val_loss": "val/loss", "val_acc": "val/acc",
               "lr": "lr", "train_acc_clean": "train/acc_clean", "memorised": "train/memorised"}


class TensorBoardLog:
    """One generation's event files; ``start_epoch`` = epochs already done (0-based next epoch)."""

    def __init__(self, log_dir: str | Path, start_epoch: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("log.tensorboard needs the tensorboard package: "
                             "pip install 'ban-analysis[tensorboard]'") from None
        self.log_dir = Path(log_dir)
        try:
            # purge_step always (also for epoch 1): a process killed after logging an epoch but
            # before checkpointing it redoes that epoch
            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=start_epoch + 1)
        except OSError as err:
            raise write_error(self.log_dir, err) from None

    def log_epoch(self, row: Mapping[str, float], hook_means: Mapping[str, Mapping[str, float]] | None = None) -> None:
        """Scalars of one metrics.csv ``row`` (its ``epoch`` is the step) and the epoch's hook means; flushed."""
        step = int(row["epoch"])
        try:
            for column, tag in METRIC_TAGS.items():
                if column in row:
                    self._scalar(tag, row[column], step)
            for hook, columns in (hook_means or {}).items():
                for column, value in columns.items():
                    self._scalar(f"hooks/{hook}/{column}", value, step)
            self._writer.flush()  # on disk before the epoch's checkpoint
        except OSError as err:
            raise write_error(self.log_dir, err) from None

    def _scalar(self, tag: str, value, step: int) -> None:
        value = float(value)
        if math.isfinite(value):
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        try:
            self._writer.close()
        except OSError as err:
            raise write_error(self.log_dir, err) from None


def open_log(enabled: bool, log_dir: str | Path, start_epoch: int) -> TensorBoardLog | None:
    """A :class:`TensorBoardLog` when ``enabled``, else None."""
    return TensorBoardLog(log_dir, start_epoch) if enabled else None

"""HookRunner: schedules the configured hooks per step and collects their columns for the run writer.

It turns the run config's ``[hooks.<name>]`` tables into due hooks per step, registers forward
hooks only on steps where a due hook needs activations, picks the samples each hook reports,
runs the pre-backward, post-backward (fused) and post-step phases, and adds the sample index
and, with label noise, the clean-label columns to per-sample rows. The hook classes are in
``hooks.py``, the forward-hook captures in ``capture.py``, the deferred hooks' buffer in
``deferred.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping

import torch
from torch import Tensor

from ban_analysis.instrument.base import HOOKS, Hook, StepContext
from ban_analysis.instrument.capture import ArmedCapture, CapturePlanner, StepCapture, StickyHooks
from ban_analysis.instrument.deferred import DeferredRows, LateRows, MemberMasks, member_rows, noise_columns
from ban_analysis.instrument.hook_config import Resolved, check_int, heldout_subset, resolve, seed_of

logger = logging.getLogger("ban_analysis.instrument.hooks")  # the name users filter on

__all__ = ["HookRunner"]

_MAX_PERIOD = 10_000  # schedules up to this period keep their due sets by phase
_NO_ROWS = object()  # a deferred hook's empty draw at a step: nothing to keep


def _sel(x: Tensor, rows: Tensor | None) -> Tensor:
    return x if rows is None else x[rows]


class HookRunner(CapturePlanner):
    """Runs the configured hooks at their steps.

    Args:
        hook_cfgs: hook name -> its TOML table (``every_n_steps``, ``samples``,
            ``sample_from`` and hook options; missing keys take the hook's defaults). A list
            of names means every named hook with its defaults.
        seed: the run seed; fixed subsets are drawn from a generator seeded by (seed, hook).
        train_size: number of training indices (subsets are drawn from range(train_size)).
        train_index: optional (N,) int64 indices of the training split; subsets are drawn
            from these (so a held-out validation index is never chosen).
        fuse_backward: the trainer promises to call :meth:`after_backward` after
            ``out.loss.backward()`` (``.grad`` zeroed before it) and before
            ``optimizer.step()``. ``update_share`` and ``param_split`` (contribution) then
            reuse the trainer's backward: one extra pass instead of two, and their columns
            come from ``after_backward`` instead of ``run``.
        clean_labels: with label noise, the clean label of each training sample by sample id
            ((max id + 1,) int64; ``run_chain`` builds it). Every per-sample hook's rows then gain
            ``clean_target`` (int64) and ``label_noisy`` (bool: the training label ``target``
            differs from the clean one, i.e. it was flipped). None: no such columns.
        heldout: ``(x, y)``, the held-out rows for hooks that measure a held-out loss
            (``heldout_attribution``): x (N, ...) normalised float inputs, y (N,) int64 labels;
            ``run_chain`` passes the validation split. Each such hook keeps ``samples`` rows drawn
            once from (seed, hook name) (:meth:`set_heldout`). Empty (N = 0): ValueError.
        defer: the trainer promises to call :meth:`flush` at the end of every epoch (``run_chain``
            does; the default False suits a loop of your own that reads ``hook_rows`` per step).
            ``logit_split`` and ``head_split`` then keep the step's tensors by reference (for
            ``head_split`` the norm of each row's head input, read from the logits' autograd graph
            where the logits are the head's own matmul) and compute their columns over many steps;
            with ``fuse_backward`` too, ``update_share`` (its dots) and ``param_split`` (a Linear model's
            row pieces) make their columns at :meth:`flush`. Those rows come from :meth:`flush`, each with its own
            ``step`` column, not from :meth:`run` or :meth:`after_backward`; the values are the per-step
            ones up to float rounding (tested to 1e-6 relative). Kept labels or ids changed in place
            raise at compute time. How and why: ``deferred.py``.
        defer_bytes: with ``defer``, the memory one deferred hook may hold before its waiting
            steps are computed and released (default 64 MiB: several Fashion-MNIST epochs of the
            MLP, about 20 steps of a 1000-class model at batch 256); the columns wait for
            :meth:`flush`.

    Hooks that measure after the optimizer step (``heldout_attribution``) are finished by
    :meth:`after_step`, which the trainer calls right after ``optimizer.step()``; their row for
    the step comes from there (``train_step`` merges it into ``hook_rows``).
    """

    def __init__(self, hook_cfgs: Mapping[str, Any] | list[str] | None, seed: int,
                 train_size: int, train_index: Tensor | None = None,
                 fuse_backward: bool = False, clean_labels: Tensor | None = None,
                 heldout: tuple[Tensor, Tensor] | None = None, defer: bool = False,
                 defer_bytes: int = 64 * 2**20) -> None:
        if isinstance(hook_cfgs, (list, tuple)):
            hook_cfgs = {name: {} for name in hook_cfgs}
        hook_cfgs = dict(hook_cfgs or {})
        for name, table in hook_cfgs.items():
            if table is not None and not isinstance(table, Mapping):
                raise ValueError(f"hooks.{name} must be a table of options, got {table!r}")
        pool = (torch.as_tensor(train_index).long().reshape(-1).cpu() if train_index is not None
                else torch.arange(check_int("train_size", train_size, 1)))
        self.seed = seed
        # Registry order, so update_share's batch gradients are cached before param_split.
        self.hooks = {name: resolve(name, HOOKS[name], hook_cfgs[name], seed, pool)
                      for name in HOOKS if name in hook_cfgs}
        unknown = sorted(set(hook_cfgs) - set(HOOKS))
        if unknown:
            raise ValueError(f"unknown hook(s) {unknown}; valid hooks: {', '.join(HOOKS)}")
        self._capture: tuple[int, StepCapture | ArmedCapture] | None = None
        self.fuse_backward = bool(fuse_backward)
        for r in self.hooks.values():
            r.hook.fused = self.fuse_backward and r.hook.can_fuse()
        self._pending: list[tuple[str, StepContext]] = []
        self._post: list[tuple[str, StepContext]] = []  # finished by after_step
        self.defer = bool(defer)
        self.defer_bytes = check_int("defer_bytes", defer_bytes, 1)
        for r in self.hooks.values():
            r.hook.deferred = self.defer and r.hook.deferrable
            r.hook.deferred_after = self.defer and r.hook.fused and r.hook.defers_after_backward
        self._late = LateRows()  # the deferred fused hooks' steps (update_share, param_split): rows at flush
        self.clean_labels = None if clean_labels is None else torch.as_tensor(clean_labels).long().reshape(-1)
        self._member_mask = MemberMasks(self.hooks)  # (name, device) -> bool mask over a fixed subset's ids
        self._deferred = DeferredRows(self.hooks, self.defer_bytes, self._member_mask,
                                      None if self.clean_labels is None else self._clean_labels_on)
        self._modules: tuple | None = None  # (weakref to the model, its named_modules dict) for capture
        self._every_step: tuple | None = None  # (weakref to the model, _every_step_modules)
        self._sticky: StickyHooks | None = None  # defer: hooks kept on the model until flush
        self._due_memo: dict = {}  # step % period -> the due hooks (see _due)
        self._due_last: tuple | None = None  # (step, due hooks) when the period is too long to keep
        self._period: int | None = None
        self._splits: dict = {}  # due hooks -> (deferred, others, the deferred items if fixed; see _split)
        # the hooks whose capture needs can change (Hook.capture_changed overridden)
        self._changers = tuple(n for n, r in self.hooks.items()
                               if type(r.hook).capture_changed is not Hook.capture_changed)
        self._uncaptured: dict = {}  # due hooks -> weak reference to the model they capture nothing of
        self._keeping: tuple | None = None  # (step, deferred items) that keeps_only announced for keep
        if heldout is not None:
            self.set_heldout(*heldout)

    def heldout_hooks(self) -> list[str]:
        """Configured hooks that need held-out data (``sample_from = "val"``)."""
        return [n for n, r in self.hooks.items() if r.sample_from == "val"]

    def set_heldout(self, x: Tensor, y: Tensor) -> None:
        """Attach the held-out rows: each held-out hook keeps its fixed subset of (x, y)."""
        x, y = torch.as_tensor(x), torch.as_tensor(y).long().reshape(-1)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"heldout x has {x.shape[0]} rows but y has {y.shape[0]}")
        for name in self.heldout_hooks():
            if y.numel() == 0:
                raise ValueError(f"hook {name!r} measures a held-out loss, but there is no validation "
                                 f"split (0 rows): set data.val_size > 0, or remove [hooks.{name}]")
            pos = heldout_subset(name, self.hooks[name].samples, self.seed, y.numel()).to(y.device)
            self.hooks[name].hook.set_heldout(x[pos].clone(), y[pos].clone())

    def due(self, step: int) -> list[str]:
        """Names of the hooks that run at this step (step % every_n_steps == 0)."""
        return [n for n, r in self.hooks.items() if step % r.every_n_steps == 0]

    def _due(self, step: int) -> tuple[str, ...]:
        """:meth:`due` as a tuple, looked up by the step's phase in the schedule's period (the
        least common multiple of the ``every_n_steps``; capture, idle and run all ask each step)."""
        if self._period is None:
            self._period = math.lcm(*(r.every_n_steps for r in self.hooks.values())) if self.hooks else 1
        if self._period > _MAX_PERIOD:  # a long period: computed per step, kept for the step
            if self._due_last is None or self._due_last[0] != step:
                self._due_last = (step, tuple(self.due(step)))
            return self._due_last[1]
        phase = step % self._period
        due = self._due_memo.get(phase)
        if due is None:
            due = self._due_memo[phase] = tuple(self.due(step))
        return due

    def idle(self, step: int) -> bool:
        """True when no hook is due at ``step``: the trainer may then skip :meth:`capture`, :meth:`run`,
        :meth:`after_backward` and :meth:`after_step` for the step (``train_step`` does: on the
        steps between sampled hooks those calls cost ~25 us a step on the MLP, about 1.5%)."""
        return not self._due(step)

    def keeps_only(self, step: int, model: torch.nn.Module) -> bool:
        """True when every hook due at ``step`` only keeps the step's tensors (deferred, no rows drawn
        now, no capture of ``model``, as an earlier :meth:`capture` found): the trainer may then skip
        :meth:`capture`, :meth:`after_backward` and :meth:`after_step` and call :meth:`keep` for
        :meth:`run`, with the same rows (``train_step`` does; benchmarks/README.md, "Fourth pass"). A
        subclass whose :meth:`run` does more should return False here."""
        due = self._due(step)
        if not due or self._pending or self._post:
            return False
        _, others, fixed_items = self._split(due)
        seen = self._uncaptured.get(due)
        if others or fixed_items is None or seen is None or seen() is not model:
            return False
        self._keeping = (step, fixed_items)
        return True

    def keep(self, ctx: StepContext) -> dict[str, dict[str, Tensor]]:
        """:meth:`run` for a step :meth:`keeps_only` said True of: ``{}`` (the deferred hooks' rows come
        from :meth:`flush`); a step it was not asked about goes the general way, :meth:`run`."""
        keeping, self._keeping = self._keeping, None
        if keeping is None or keeping[0] != ctx.step:
            return self.run(ctx)
        self._check_epoch(ctx)
        # not _keep_deferred: no capture needs can change here (keeps_only asks for a due set whose
        # capture was found empty for this model, so head_split reads the graph and probes nothing)
        self._deferred.add_step(ctx, keeping[1])
        return {}

    def _keep_deferred(self, ctx: StepContext, items: list) -> None:
        """The deferred hooks' share of a step (:meth:`run` and :meth:`keep`): their tensors kept, and
        the captures walked anew if a hook's needs changed."""
        self._deferred.add_step(ctx, items)
        if self._changers and any([self.hooks[name].hook.capture_changed() for name in self._changers]):
            self._recapture()

    def _check_epoch(self, ctx: StepContext) -> None:  # rows left from an earlier epoch: dropped
        at = self._deferred.at or self._late.at
        if at is not None and (at[0] != ctx.gen or at[1] != ctx.epoch):
            logger.warning("HookRunner.flush was not called at the end of gen %d epoch %d; dropping the "
                           "deferred rows of %s", *at, sorted({*self._deferred.names(), *self._late.kept}))
            self._drop_deferred()

    def _rows(self, name: str, r: Resolved, ctx: StepContext) -> Tensor | None:
        if r.samples == "all":
            return None
        device = ctx.sample_index.device
        if r.sample_from == "train":
            return member_rows(self._member_mask(name, ctx.sample_index.device), ctx.sample_index)
        batch = ctx.sample_index.shape[0]
        if r.samples >= batch:
            return None
        g = torch.Generator().manual_seed(seed_of(self.seed, name, ctx.gen, ctx.step))
        return torch.randperm(batch, generator=g)[:r.samples].sort().values.to(device)

    def run(self, ctx: StepContext) -> dict[str, dict[str, Tensor]]:
        """Run the hooks due at ``ctx.step``; returns hook name -> column -> tensor."""
        if self._pending:
            logger.warning("HookRunner.after_backward was not called after step %d; dropping %s",
                           self._pending[0][1].step, [n for n, _ in self._pending])
            self._drop_pending()
        if self._post:
            logger.warning("HookRunner.after_step was not called after step %d; dropping %s",
                           self._post[0][1].step, [n for n, _ in self._post])
            self._post = []
        due = self._due(ctx.step)
        if not due:
            return {}
        self._check_epoch(ctx)
        captured = ctx.captured
        if not captured and self._capture is not None and self._capture[0] == ctx.step:
            captured = self._capture[1].captured
        deferred, others, fixed_items = self._split(due)
        cache: dict = {}
        if self.clean_labels is not None and others:
            # (B,) bool: the batch's training label was flipped (heldout_attribution's groups)
            cache["label_noisy"] = self._noise_columns(dataclasses.replace(ctx, rows=None))["label_noisy"]
        results = {}
        try:
            if deferred:  # the batch's tensors now; the rows and their statistics at flush()
                dctx = ctx if captured is ctx.captured else dataclasses.replace(ctx, captured=captured)
                items = fixed_items
                if items is None:  # rows drawn at this step
                    items = [(name, self._defer_rows(name, dctx)) for name in deferred]
                    items = [(name, rows) for name, rows in items if rows is not _NO_ROWS]
                self._keep_deferred(dctx, items)
            if len(others) > 1:  # what the later hooks need, for an earlier one's backward (Hook.prepare)
                pctx = dataclasses.replace(ctx, captured=captured, cache=cache)
                for name in others:
                    self.hooks[name].hook.prepare(pctx)
            for name in others:
                r = self.hooks[name]
                rows = self._rows(name, r, ctx)
                if rows is not None and rows.numel() == 0:
                    continue
                hctx = dataclasses.replace(ctx, captured=captured, rows=rows, cache=cache)
                cols = r.hook(hctx)
                if cols is None:  # fused: finished by after_backward; else by after_step
                    (self._pending if r.hook.fused else self._post).append((name, hctx))
                    continue
                results[name] = self._finish(r, hctx, cols)
        finally:
            self._capture = None  # free the activations
        return results

    def _split(self, due: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...], list | None]:
        """(deferred, other) hooks among ``due``, in due order, and the deferred hooks' ``(name, None)``
        items when none of them draws rows per step (the same at every step; else None); kept per
        due set."""
        split = self._splits.get(due)
        if split is None:
            deferred = tuple(n for n in due if self.hooks[n].hook.deferred)
            fixed = None if any(self._draws_rows(n) for n in deferred) else [(n, None) for n in deferred]
            split = self._splits[due] = (deferred, tuple(n for n in due if not self.hooks[n].hook.deferred), fixed)
        return split

    def after_backward(self) -> dict[str, dict[str, Tensor]]:
        """Columns of the fused hooks of this step (only with ``fuse_backward=True``).

        Reads ``.grad`` and the layer-output gradients the trainer's backward produced; changes
        nothing. Returns ``{}`` when no fused hook was due.
        """
        if not self._pending:  # most steps: the try/finally below costs a few us a call here
            return {}
        results = {}
        try:
            for name, hctx in self._pending:
                r = self.hooks[name]
                if r.hook.deferred_after:  # its rows at flush
                    self._late.add(name, hctx, r.hook.keep_after_backward(hctx), self._finish(r, hctx, {}))
                    continue
                cols = r.hook.after_backward(hctx)
                if cols is None:  # measures after the optimizer step too
                    self._post.append((name, hctx))
                    continue
                results[name] = self._finish(r, hctx, cols)
        finally:
            self._drop_pending()
        return results

    def after_step(self) -> dict[str, dict[str, Tensor]]:
        """Columns of the hooks that measure after ``optimizer.step()`` (``heldout_attribution``).

        Call it right after the trainer's optimizer step (after ``after_backward`` where that is
        called). It reads the updated parameters and changes nothing. Returns ``{}`` when no such
        hook was due; a hook's columns here are its whole row for the step.
        """
        if not self._post:
            return {}
        results = {}
        try:
            for name, hctx in self._post:
                r = self.hooks[name]
                cols = r.hook.after_step(hctx)
                if cols is not None:
                    results[name] = self._finish(r, hctx, cols)
        finally:
            self._post = []
        return results

    def flush(self) -> dict[str, dict[str, Tensor]]:
        """The deferred hooks' rows since the last flush: hook -> column -> (N,) tensor (CPU).

        Columns as :meth:`run` would have returned them over those steps, concatenated in step
        order (and batch position within a step), with a ``step`` (int64) column first; the run
        writer uses it instead of one step per call. ``{}`` without deferred hooks or rows. Call it
        at the end of every epoch, before the epoch's hook files are written (``train_generation``
        does); rows left from an earlier epoch when the next one starts are dropped with a warning.
        """
        out = {**self._deferred.columns(), **self._late.columns(self.hooks)}
        self._drop_deferred()
        return out

    def _draws_rows(self, name: str) -> bool:
        """Whether hook ``name`` draws its rows at each step (``sample_from = "batch"``, a sample size)."""
        r = self.hooks[name]
        return not (r.samples == "all" or r.sample_from == "train")

    def _defer_rows(self, name: str, ctx: StepContext) -> Tensor | None:
        """The rows a deferred hook keeps of this step: None (every row, or a fixed subset's, selected
        at compute time over many steps at once), rows drawn now from (seed, hook, gen, step), or
        ``_NO_ROWS`` when the draw is empty."""
        if not self._draws_rows(name):
            return None
        rows = self._rows(name, self.hooks[name], ctx)
        return _NO_ROWS if rows is not None and rows.numel() == 0 else rows

    def _drop_deferred(self) -> None:
        if self._sticky is not None:  # the model is left without hooks of ours between epochs
            self._sticky.remove()
            self._sticky = None
        self._deferred.drop()
        self._late.drop()

    def _finish(self, r: Resolved, ctx: StepContext, cols: dict[str, Tensor]) -> dict[str, Tensor]:
        if r.hook.per_sample:
            cols = {"sample_index": _sel(ctx.sample_index, ctx.rows), **cols}
            if self.clean_labels is not None:
                cols.update(self._noise_columns(ctx))
        return {k: v.detach() if v.requires_grad else v for k, v in cols.items()}  # (a call saved per column)

    def _noise_columns(self, ctx: StepContext) -> dict[str, Tensor]:
        """``clean_target``, ``label_noisy`` and ``student_argmax`` of the reported rows."""
        return noise_columns(self._clean_labels_on(ctx.sample_index.device), _sel(ctx.sample_index, ctx.rows),
                             _sel(ctx.target, ctx.rows), _sel(ctx.student_logits, ctx.rows))

    def _clean_labels_on(self, device: torch.device) -> Tensor | None:
        """The clean labels by sample id on ``device`` (moved once per device), or None without noise."""
        if self.clean_labels is not None and self.clean_labels.device != device:
            self.clean_labels = self.clean_labels.to(device)
        return self.clean_labels

    def _drop_pending(self) -> None:
        for _, hctx in self._pending:
            if "fused_param_split" in hctx.cache:
                hctx.cache.pop("fused_param_split").cancel()
        self._pending = []

    def info(self) -> dict[str, Any]:
        """JSON-ready description of the hooks for the manifest (config and what ran)."""
        out = {}
        for name, r in self.hooks.items():
            out[name] = {"every_n_steps": r.every_n_steps, "samples": r.samples, "fused": r.hook.fused,
                         **({"deferred": True} if r.hook.deferred or r.hook.deferred_after else {}),
                         **({"sample_from": r.sample_from} if r.hook.per_sample else {}),
                         **r.hook.opts, **{k: v for k, v in r.hook.state.items() if not k.startswith("_")}}
        return out


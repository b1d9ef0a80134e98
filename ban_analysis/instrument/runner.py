"""HookRunner: schedules the configured hooks per step and collects their columns for the run writer.

It turns the run config's ``[hooks.<name>]`` tables into due hooks per step, registers forward
hooks only on steps where a due hook needs activations, picks the samples each hook reports,
runs the pre-backward, post-backward (fused) and post-step phases, and adds the sample index
and, with label noise, the clean-label columns to per-sample rows. Split from ``hooks.py``
(the hook classes) to keep both files short.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ban_analysis.instrument import param_grads as pg
from ban_analysis.instrument.base import HOOKS, StepContext
from ban_analysis.instrument.hook_config import Resolved, check_int, heldout_subset, resolve, seed_of

logger = logging.getLogger("ban_analysis.instrument.hooks")  # the name users filter on

__all__ = ["HookRunner"]


def _sel(x: Tensor, rows: Tensor | None) -> Tensor:
    return x if rows is None else x[rows]


class _Capture:
    """Context manager around the student forward; ``.captured`` is filled inside it."""

    def __init__(self, names: list[str], clone: bool, model: nn.Module) -> None:
        self.captured: dict[str, tuple[Tensor, Tensor]] = {}
        self._names, self._clone, self._model, self._cm = names, clone, model, None

    def __enter__(self) -> "_Capture":
        if self._names:
            self._cm = pg.capture_activations(self._model, self._names, clone_outputs=self._clone)
            self.captured = self._cm.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)
            self._cm = None


class HookRunner:
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

    Hooks that measure after the optimizer step (``heldout_attribution``) are finished by
    :meth:`after_step`, which the trainer calls right after ``optimizer.step()``; their row for
    the step comes from there (``train_step`` merges it into ``hook_rows``).
    """

    def __init__(self, hook_cfgs: Mapping[str, Any] | list[str] | None, seed: int,
                 train_size: int, train_index: Tensor | None = None,
                 fuse_backward: bool = False, clean_labels: Tensor | None = None,
                 heldout: tuple[Tensor, Tensor] | None = None) -> None:
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
        self._capture: tuple[int, _Capture] | None = None
        self.fuse_backward = bool(fuse_backward)
        for r in self.hooks.values():
            r.hook.fused = self.fuse_backward and r.hook.can_fuse()
        self._pending: list[tuple[str, StepContext]] = []
        self._post: list[tuple[str, StepContext]] = []  # finished by after_step
        self.clean_labels = None if clean_labels is None else torch.as_tensor(clean_labels).long().reshape(-1)
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

    def capture(self, model: nn.Module, step: int) -> _Capture:
        """Context manager for the student forward of ``step``.

        Registers forward hooks only for modules a due hook needs (head input for
        ``head_split``; Linear/Conv2d/norm layers for ``param_split`` in contribution mode,
        whose outputs are passed on as identical copies) and removes them on exit.
        ``.captured`` holds name -> (input, output) after the block.
        """
        names, clone = [], False
        for n in self.due(step):
            mods, c = self.hooks[n].hook.capture_modules(model)
            names += [m for m in mods if m not in names]
            clone = clone or c
        cap = _Capture(names, clone, model)
        self._capture = (step, cap) if names else None
        return cap

    def _rows(self, name: str, r: Resolved, ctx: StepContext) -> Tensor | None:
        if r.samples == "all":
            return None
        device = ctx.sample_index.device
        if r.sample_from == "train":
            if r.subset.device != device:  # moved once per device, not every step
                self.hooks[name] = r = dataclasses.replace(r, subset=r.subset.to(device))
            mask = torch.isin(ctx.sample_index, r.subset)
            return mask.nonzero().squeeze(1)
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
        due = self.due(ctx.step)
        if not due:
            return {}
        captured = ctx.captured
        if not captured and self._capture is not None and self._capture[0] == ctx.step:
            captured = self._capture[1].captured
        cache: dict = {}
        if self.clean_labels is not None:  # (B,) bool: the batch's training label was flipped
            cache["label_noisy"] = self._noise_columns(dataclasses.replace(ctx, rows=None))["label_noisy"]
        results = {}
        try:
            for name in due:
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

    def after_backward(self) -> dict[str, dict[str, Tensor]]:
        """Columns of the fused hooks of this step (only with ``fuse_backward=True``).

        Reads ``.grad`` and the layer-output gradients the trainer's backward produced; changes
        nothing. Returns ``{}`` when no fused hook was due.
        """
        results = {}
        try:
            for name, hctx in self._pending:
                r = self.hooks[name]
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

    def _finish(self, r: Resolved, ctx: StepContext, cols: dict[str, Tensor]) -> dict[str, Tensor]:
        if r.hook.per_sample:
            cols = {"sample_index": _sel(ctx.sample_index, ctx.rows), **cols}
            if self.clean_labels is not None:
                cols.update(self._noise_columns(ctx))
        return {k: v.detach() for k, v in cols.items()}

    def _noise_columns(self, ctx: StepContext) -> dict[str, Tensor]:
        """``clean_target``, ``label_noisy`` and ``student_argmax`` of the reported rows (clean-label lookup)."""
        if self.clean_labels.device != ctx.sample_index.device:  # moved once per device
            self.clean_labels = self.clean_labels.to(ctx.sample_index.device)
        clean = self.clean_labels[_sel(ctx.sample_index, ctx.rows)]
        # student_argmax: whether the student predicts the clean or the noisy label, per sample
        return {"clean_target": clean, "label_noisy": _sel(ctx.target, ctx.rows) != clean,
                "student_argmax": _sel(ctx.student_logits.detach().argmax(1), ctx.rows)}

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
                         **({"sample_from": r.sample_from} if r.hook.per_sample else {}),
                         **r.hook.opts, **{k: v for k, v in r.hook.state.items() if not k.startswith("_")}}
        return out


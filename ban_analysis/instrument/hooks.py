"""Instrumentation hooks: per-step observations of the gradient split, returned as tensors.

A hook is one class with one method, ``__call__(ctx) -> dict[str, Tensor]``, registered in
``HOOKS`` by name. It receives a :class:`StepContext` after the objective and before the
trainer's backward, and returns per-sample columns (n,) or per-step 0-d tensors. Hooks never
write files and never change parameters, buffers, ``.grad``, BatchNorm statistics, the
optimizer or any random stream: they differentiate the training graph with
``torch.autograd.grad(..., retain_graph=True)`` and read activations captured during the
training forward (no second forward in training mode).

:class:`HookRunner` turns the run config's ``[hooks.<name>]`` tables into due hooks per step,
registers forward hooks only on steps where a due hook needs activations, picks the samples
each hook reports, and collects ``{hook: {column: tensor}}`` for the run writer. The tables
are validated by ``hook_config.resolve``.

Per-sample gradients use the logit-gradient row of the sample times B (batch-mean factor
removed), split at the label: target part = the value at the label coordinate, dark part =
the rest (``decompose.split_logit_grad``). Every split hook takes the option ``anchor``:
``"label"`` (the default) or ``"teacher_argmax"`` (the target term is the coordinate of the
teacher's argmax; without a teacher, objective ``ce``, the label is used and the rows'
``anchor_teacher_argmax`` column says 0). The anchor in effect per generation is in ``info()``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ban_analysis.instrument import param_grads as pg
from ban_analysis.instrument.decompose import ANCHORS, anchor_index, per_sample_stats, split_logit_grad
from ban_analysis.instrument.base import HOOKS, Hook, StepContext, register_hook
from ban_analysis.instrument.hook_config import Resolved, check_int, heldout_subset, resolve, seed_of

logger = logging.getLogger(__name__)

__all__ = ["HOOKS", "Hook", "HookRunner", "StepContext", "register_hook"]


def _anchor(ctx: StepContext, anchor: str = "label") -> tuple[Tensor, str]:
    """(B,) coordinate the split is anchored at and the anchor in effect (cached per step)."""
    key = ("anchor", anchor)
    if key not in ctx.cache:
        ctx.cache[key] = anchor_index(ctx.target, ctx.teacher_logits, anchor)
    return ctx.cache[key]


def _anchor_cols(hook: Hook, ctx: StepContext) -> dict[str, Tensor]:
    """Rows' record of the anchor: none for ``"label"`` (rows as before the option existed);
    for ``"teacher_argmax"`` an int8 ``anchor_teacher_argmax`` (0 where it fell back to the
    label: no teacher), also kept per generation in the hook's ``info()``."""
    anchor = hook.opts.get("anchor", "label")
    if anchor == "label":
        return {}
    _, effective = _anchor(ctx, anchor)
    hook.state.setdefault("anchor_effective", {})[str(ctx.gen)] = effective
    return {"anchor_teacher_argmax": torch.tensor(int(effective == "teacher_argmax"), dtype=torch.int8)}


def _cotangents(ctx: StepContext, scale: bool, anchor: str = "label") -> dict[str, Tensor]:
    """Term cotangents from the logit gradient split at the anchor; ``scale``: times B."""
    key = ("cot", scale, anchor)
    if key not in ctx.cache:
        g = ctx.out.logit_grad.detach()  # (B, C)
        if scale:
            g = g * g.shape[0]
        target_part, dark_part = split_logit_grad(g, _anchor(ctx, anchor)[0])
        ctx.cache[key] = {"target": target_part, "dark": dark_part}
    return ctx.cache[key]


def _sel(x: Tensor, rows: Tensor | None) -> Tensor:
    return x if rows is None else x[rows]


def _head_name(model: nn.Module) -> str:
    """Name of the final linear layer: ``models.head_of`` if available, else the last Linear."""
    head = None
    try:
        from ban_analysis.models import head_of

        head = head_of(model)
    except (ImportError, ValueError, AttributeError, TypeError):
        head = None
    names = {id(m): n for n, m in model.named_modules()}
    if head is not None and id(head) in names:
        return names[id(head)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("head_split needs a model whose logits come from an nn.Linear head")
    return linears[-1]


def _trainable(model: nn.Module) -> tuple[list[str], list[Tensor]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def _term_grads(ctx: StepContext, batched: bool = False,
                anchor: str = "label") -> tuple[list[str], dict[str, list[Tensor]]]:
    """Batch gradient of each term over all trainable parameters (cached per step and anchor)."""
    key = ("term_grads", anchor)
    if key not in ctx.cache:
        names, params = _trainable(ctx.model)
        grads = pg.term_batch_grads(ctx.student_logits, params, _cotangents(ctx, False, anchor), batched)
        ctx.cache[key] = (names, grads)
    return ctx.cache[key]


@register_hook
class LogitSplit(Hook):
    """Per-sample logit-level split: ``decompose.per_sample_stats`` plus ``target``.

    Cost: a few elementwise ops on (B, C); no backward. With ``anchor = "teacher_argmax"``,
    ``g_target`` and ``g_dark_norm`` are split at the teacher's argmax (the other columns stay
    at the label).
    """

    name = "logit_split"
    options = {"anchor": "label"}
    choices = {"anchor": ANCHORS}

    def __call__(self, ctx: StepContext) -> dict[str, Tensor]:
        anchor = self.opts["anchor"]
        at = None if anchor == "label" else _anchor(ctx, anchor)[0]
        stats = per_sample_stats(ctx.student_logits.detach(), ctx.teacher_logits, ctx.target, ctx.out, anchor=at)
        cols = {"target": _sel(ctx.target, ctx.rows)}
        cols.update({k: _sel(v, ctx.rows) for k, v in stats.items()})
        cols.update(_anchor_cols(self, ctx))
        return cols


@register_hook
class HeadSplit(Hook):
    """Exact per-sample head-gradient norms of each term (closed form, outer product).

    Columns: ``head_target_norm, head_dark_norm, head_cos, feature_norm``. ``include_bias``
    (default true) counts the head bias in the norms. Cost: the head input is kept from the
    forward; O(B (C + D)) arithmetic, no backward.
    """

    name = "head_split"
    options = {"include_bias": True, "anchor": "label"}
    choices = {"anchor": ANCHORS}

    def capture_modules(self, model):
        if self.state.get("_model") != id(model):  # the module walk is cached per model
            self.state["head"], self.state["_model"] = _head_name(model), id(model)
        return [self.state["head"]], False

    def __call__(self, ctx):
        head = self.capture_modules(ctx.model)[0][0]
        if head not in ctx.captured:
            raise ValueError("head_split needs the student forward wrapped in runner.capture(model, step)")
        features = ctx.captured[head][0]  # (B, D)
        cols = pg.head_stats(features, _cotangents(ctx, True, self.opts["anchor"]), ctx.rows,
                             include_bias=self.opts["include_bias"])
        return {**cols, **_anchor_cols(self, ctx)}


@register_hook
class UpdateShare(Hook):
    """Per step: each term's batch gradient (one VJP each) and its share of the update.

    Columns (0-d): ``target_norm, dark_norm, grad_norm, cos_target_dark, share_target,
    share_dark`` over all trainable parameters, and ``<group>.<column>`` per layer group
    (first ``group_depth`` components of the module path, default 2: ``stages.0`` of a CIFAR
    ResNet, ``body.0`` of the MLP). G is the objective's gradient
    (no weight decay or momentum). Cost: about two backward passes per call.
    """

    name = "update_share"
    per_sample = False
    options = {"group_depth": 2, "batched": False, "anchor": "label"}
    choices = {"anchor": ANCHORS}

    def __call__(self, ctx):
        anchor = self.opts["anchor"]
        if self.fused:  # G_target now; G_dark = G - G_target once the trainer's backward ran
            names, params = _trainable(ctx.model)
            cot = _cotangents(ctx, False, anchor)
            # ("g_target", anchor) is also read by heldout_attribution (fused), due later this step
            ctx.cache[("g_target", anchor)] = pg.term_batch_grads(ctx.student_logits, params,
                                                                  {"target": cot["target"]})
            return None
        names, grads = _term_grads(ctx, batched=self.opts["batched"], anchor=anchor)
        cols = pg.update_share_stats(grads, pg.layer_groups(names, self.opts["group_depth"]))
        return {**cols, **_anchor_cols(self, ctx)}

    def can_fuse(self):
        return True

    def after_backward(self, ctx):
        names, params = _trainable(ctx.model)
        g_target = ctx.cache.pop(("g_target", self.opts["anchor"]))["target"]
        grads = {"target": g_target,
                 "dark": [_grad_of(p) - t for p, t in zip(params, g_target)]}
        cols = pg.update_share_stats(grads, pg.layer_groups(names, self.opts["group_depth"]))
        return {**cols, **_anchor_cols(self, ctx)}


@register_hook
class ParamSplit(Hook):
    """Per-sample parameter gradients of each term (sampled).

    Columns: ``param_target_norm, param_dark_norm, param_cos, target_cos_batch,
    dark_cos_batch``. Modes: ``contribution`` (default; each sample's contribution to the
    batch gradient from Linear/Conv2d/norm-layer activations, ~2 backward passes),
    ``exact`` (d loss_s / d theta with BatchNorm coupling, ~2 backward passes per sample),
    ``vmap`` (torch.func; no training-mode BN or dropout unless ``eval_mode = true``).
    By default it looks at ``samples`` rows drawn from each due step's batch
    (``sample_from = "batch"``), because a fixed subset of the training set is rarely in the
    batch of a sampled step.
    """

    name = "param_split"
    every_n_steps = 50
    samples = 32
    sample_from = "batch"
    options = {"mode": "contribution", "chunk_size": 16, "eval_mode": False, "exact_vjp": "auto",
               "anchor": "label"}
    # exact_vjp "auto": batched VJPs (is_grads_batched) on CUDA, a loop of VJPs on CPU, where
    # the batched form measured 1.2-3x slower than the loop (benchmarks/README.md).
    choices = {"mode": ("contribution", "exact", "vmap"), "exact_vjp": ("auto", "batched", "loop"),
               "anchor": ANCHORS}

    def capture_modules(self, model):
        if self.opts["mode"] != "contribution":
            return [], False
        return pg.covered_modules(model), True

    def __call__(self, ctx):
        cols = self._columns(ctx)
        return None if cols is None else {**cols, **_anchor_cols(self, ctx)}

    def _columns(self, ctx):
        mode, anchor = self.opts["mode"], self.opts["anchor"]
        cot = _cotangents(ctx, True, anchor)
        self.state["mode"] = mode
        if mode == "contribution":
            if not ctx.captured:
                raise ValueError("param_split mode 'contribution' needs the forward wrapped in "
                                 "runner.capture(model, step)")
            if self.fused:
                ctx.cache["fused_param_split"] = pg.FusedContribution(
                    ctx.student_logits, ctx.model, ctx.captured, cot, ctx.rows)
                return None
            cols, info = pg.contribution_stats(ctx.student_logits, ctx.model, ctx.captured, cot, ctx.rows)
            self.state.update(info)
            return cols
        names, grads = _term_grads(ctx, anchor=anchor)
        batch = [t + d for t, d in zip(grads["target"], grads["dark"])]
        n_params = sum(p.numel() for p in batch)
        self.state.update(covered_params=n_params, total_params=n_params)
        if mode == "exact":
            params = dict(zip(names, _trainable(ctx.model)[1]))
            choice = self.opts["exact_vjp"]
            batched = choice == "batched" or (choice == "auto" and ctx.student_logits.is_cuda)
            self.state["exact_vjp"] = "batched" if batched else "loop"
            return pg.exact_stats(ctx.student_logits, params, cot, ctx.rows, batched=batched,
                                  chunk_size=self.opts["chunk_size"], batch_grad=batch)
        eval_mode = self.opts["eval_mode"] and bool(pg.coupling_modules(ctx.model))
        self.state["eval_mode"] = eval_mode
        return pg.vmap_stats(ctx.model, ctx.inputs, cot, dict(zip(names, batch)), ctx.rows,
                             chunk_size=self.opts["chunk_size"], eval_mode=self.opts["eval_mode"])

    def can_fuse(self):
        return self.opts["mode"] == "contribution"

    def after_backward(self, ctx):
        cols, info = ctx.cache.pop("fused_param_split").finish()
        self.state.update(info)
        return {**cols, **_anchor_cols(self, ctx)}


def _grad_of(p: Tensor) -> Tensor:
    """The trainer's gradient of a parameter (read only); zeros where it got none."""
    return torch.zeros_like(p) if p.grad is None else p.grad


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


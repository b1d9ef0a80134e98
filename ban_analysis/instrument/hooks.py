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

import logging
import weakref
from types import SimpleNamespace

import torch
from torch import Tensor

from ban_analysis.instrument import param_grads as pg
from ban_analysis.instrument.decompose import ANCHORS, per_sample_stats, split_at
from ban_analysis.instrument.base import HOOKS, Hook, StepContext, register_hook
from ban_analysis.instrument.step_terms import (  # the helpers the hooks share (and heldout.py)
    _anchor,
    _anchor_cols,
    _cotangents,
    _sel,
    _plain,
    _note_anchor,
    _deferred_anchor,
    _head_name,
    _trainable,
    _term_grads,
    _grad_of,
)

logger = logging.getLogger(__name__)

__all__ = ["HOOKS", "Hook", "HookRunner", "StepContext", "register_hook"]


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

    deferrable = True

    def gather(self, ctx: StepContext) -> dict[str, Tensor]:
        _note_anchor(self, ctx)
        raw = {"student_logits": _plain(ctx.student_logits), "target": ctx.target,
               "logit_grad": _plain(ctx.out.logit_grad), "sample_weight": _plain(ctx.out.sample_weight)}
        if ctx.teacher_logits is not None:
            raw["teacher_logits"] = _plain(ctx.teacher_logits)
        return raw

    def compute(self, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        at, anchor_col = _deferred_anchor(self, raw)
        out = SimpleNamespace(logit_grad=raw["logit_grad"], sample_weight=raw["sample_weight"])
        stats = per_sample_stats(raw["student_logits"], raw.get("teacher_logits"), raw["target"], out,
                                 anchor=at, batch_size=raw["batch_size"])
        return {"target": raw["target"], **stats, **anchor_col}


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
            self.state["_graph"] = None  # unknown: probed at this model's first deferred step
        if self.deferred and self.state["_graph"]:
            return [], False  # the head input is read from the logits' autograd graph
        return [self.state["head"]], False

    def capture_changed(self):
        return self.state.pop("_changed", False)

    def _graph_input(self, ctx) -> Tensor | None:
        """The head's input as the autograd graph of the logits saved it, where the logits are the
        head's own ``addmm`` (``mm`` without a bias) of it with the head's weight; else None.

        A deferred step reads it there instead of from a forward hook on the head: the hook puts
        the head's call on ``Module.__call__``'s slow path, and the capture around the forward
        costs its own, together ~20 us a step on the MLP here. The first step of each model checks
        that it is the tensor the hook captured (``_graph``) and that the matmul's other operand is
        the head's weight; later steps check the op's type and the input's width. AMP (the matmul
        of cast copies) and ``torch.compile`` keep the hook.
        """
        fn = ctx.student_logits.grad_fn
        kept = self.state.get("_head_module")
        if kept is not None and kept[0]() is ctx.model and type(fn) is kept[2]:
            # checked in full at the probe; per step only the op and the input's width (the full
            # check reads a second saved tensor: 11.8 -> 5.4-6.4 us a call here without it)
            f = fn._saved_mat1 if kept[3] else fn._saved_self
            return f if f.ndim == 2 and f.shape[1] == kept[1].in_features else None
        kind = type(fn).__name__
        head = dict(ctx.model.named_modules())[self.state["head"]]
        w, bias = head.weight, head.bias
        if kind == "AddmmBackward0" and bias is not None:
            f, w_t = fn._saved_mat1, fn._saved_mat2
        elif kind == "MmBackward0" and bias is None:
            f, w_t = fn._saved_self, fn._saved_mat2
        else:
            return None
        if w_t.data_ptr() != w.data_ptr() or w_t.shape != (w.shape[1], w.shape[0]) or w_t.stride() != (1, w.shape[1]):
            return None
        self.state["_head_module"] = (weakref.ref(ctx.model), head, type(fn), bias is not None)
        return f

    def __call__(self, ctx):
        head = self.capture_modules(ctx.model)[0][0]
        if head not in ctx.captured:
            raise ValueError("head_split needs the student forward wrapped in runner.capture(model, step)")
        features = ctx.captured[head][0]  # (B, D)
        cols = pg.head_stats(features, _cotangents(ctx, True, self.opts["anchor"]), ctx.rows,
                             include_bias=self.opts["include_bias"])
        return {**cols, **_anchor_cols(self, ctx)}

    deferrable = True

    def gather(self, ctx):
        state = self.state
        in_graph = state.get("_model") == id(ctx.model) and state["_graph"]  # else ask capture_modules
        mods = () if in_graph else self.capture_modules(ctx.model)[0]
        head = state["head"]
        if head in ctx.captured:  # a forward hook's capture (this hook's, or param_split's, whose copy of
            # the head's output hides the head's matmul from the logits' graph at its steps)
            f = ctx.captured[head][0]
            if mods and self.state["_graph"] is None:  # a model's first step: probe the graph
                from_graph = self._graph_input(ctx)
                # (param_split's copy of the head's output hides the graph at its steps: asked again)
                if from_graph is not None or type(ctx.student_logits.grad_fn).__name__ != "CloneBackward0":
                    self.state["_graph"] = self.state["_changed"] = from_graph is f
        elif mods:
            raise ValueError("head_split needs the student forward wrapped in runner.capture(model, step)")
        else:
            f = self._graph_input(ctx)
            if f is None:
                raise RuntimeError(f"head_split (deferred): at step {ctx.step} the logits were not the head "
                                   f"layer's matmul of its input, as they were at this model's first step; "
                                   f"use HookRunner(defer=False) for a model whose last layer changes")
        _note_anchor(self, ctx)
        # the (B, D) head input enters the statistics only through its norm per row, so that is kept
        # instead of it: one pass over the features (12-17 us inside a step on the MLP here, half
        # of this gather); |f|^2 is its square (head_stats sums f * f: equal up to float rounding,
        # ~1e-7 relative)
        # detach, not torch.no_grad(): making and entering that context cost ~10 us a step here
        logit_grad = _plain(ctx.out.logit_grad)
        f = f.detach()
        if f.dtype != logit_grad.dtype:
            f = f.to(torch.promote_types(f.dtype, logit_grad.dtype))
        raw = {"feature_norm": torch.linalg.vector_norm(f, dim=1), "target": ctx.target,
               "logit_grad": logit_grad}
        if ctx.teacher_logits is not None and self.opts["anchor"] != "label":
            raw["teacher_logits"] = _plain(ctx.teacher_logits)
        return raw

    def compute(self, raw):
        at, anchor_col = _deferred_anchor(self, raw)
        g = raw["logit_grad"]
        g = g * raw["batch_size"].to(g.dtype).unsqueeze(1)  # as _cotangents(ctx, True, ...) scales by B
        target_part, dark_part = split_at(g, raw["target"] if at is None else at)
        fn = raw["feature_norm"]
        dtype = fn.dtype
        cols = pg.head_norm_stats(fn * fn, fn,
                                  {"target": target_part.to(dtype), "dark": dark_part.to(dtype)},
                                  include_bias=self.opts["include_bias"])
        return {**cols, **anchor_col}


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
            names, params = _trainable(ctx.model, ctx.cache)
            cot = _cotangents(ctx, False, anchor)["target"]
            # a fused param_split due this step wants the same backward's gradients at its layer
            # outputs (Hook.prepare): one backward for both (on the MLP ~0.35 ms every 50 steps)
            outs = ctx.cache.pop(("target_outputs", anchor), None) or []
            grads = pg.term_batch_grads(ctx.student_logits, [*params, *outs], {"target": cot})["target"]
            if outs:
                ctx.cache[("target_output_grads", anchor)] = grads[len(params):]
            # ("g_target", anchor) is also read by heldout_attribution (fused), due later this step
            ctx.cache[("g_target", anchor)] = {"target": grads[:len(params)]}
            return None
        names, grads = _term_grads(ctx, batched=self.opts["batched"], anchor=anchor)
        cols = pg.update_share_stats(grads, pg.layer_groups(names, self.opts["group_depth"]))
        return {**cols, **_anchor_cols(self, ctx)}

    def can_fuse(self):
        return True

    def after_backward(self, ctx):
        return {name: col[0] for name, col in self.columns_of([self.keep_after_backward(ctx)]).items()}

    defers_after_backward = True

    def keep_after_backward(self, ctx):
        """The step's (P, 3) dots of the term gradients (and its anchor record): all the columns need."""
        names, params = _trainable(ctx.model, ctx.cache)
        g_target = ctx.cache.pop(("g_target", self.opts["anchor"]))["target"]
        # one multi-tensor call for all parameters (the same subtraction, elementwise)
        dark = torch._foreach_sub([_grad_of(p) for p in params], g_target)
        groups = tuple(pg.layer_groups(names, self.opts["group_depth"]))  # the model's: kept with its step
        return {"dots": pg.term_dots(g_target, dark), "groups": groups, **_anchor_cols(self, ctx)}

    def columns_of(self, kept):
        groups = kept[0]["groups"]
        if any(k["groups"] != groups for k in kept):  # steps of models with other parameter groups: other columns
            raise ValueError("update_share (deferred): the kept steps' parameter groups differ; flush the runner "
                             "before training another model")
        cols = pg.update_share_columns(torch.stack([k["dots"] for k in kept]), groups)
        if "anchor_teacher_argmax" in kept[0]:
            cols["anchor_teacher_argmax"] = torch.stack([k["anchor_teacher_argmax"] for k in kept])
        return cols


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
                modules, info = self._walk(ctx.model)
                # the target term's output gradients, if update_share's backward gave them (see prepare),
                # are those of the unscaled cotangent: times B, as these cotangents are
                given = ctx.cache.pop(("target_output_grads", anchor), None)
                B = ctx.student_logits.shape[0]
                ctx.cache["fused_param_split"] = pg.FusedContribution(
                    ctx.student_logits, ctx.model, ctx.captured, cot, ctx.rows, named_modules=modules, info=info,
                    target_grads=None if given is None else [g * B for g in given])
                return None
            cols, info = pg.contribution_stats(ctx.student_logits, ctx.model, ctx.captured, cot, ctx.rows)
            self.state.update(info)
            return cols
        names, grads = _term_grads(ctx, anchor=anchor)
        batch = [t + d for t, d in zip(grads["target"], grads["dark"])]
        n_params = sum(p.numel() for p in batch)
        self.state.update(covered_params=n_params, total_params=n_params)
        if mode == "exact":
            params = dict(zip(names, _trainable(ctx.model, ctx.cache)[1]))
            choice = self.opts["exact_vjp"]
            batched = choice == "batched" or (choice == "auto" and ctx.student_logits.is_cuda)
            self.state["exact_vjp"] = "batched" if batched else "loop"
            return pg.exact_stats(ctx.student_logits, params, cot, ctx.rows, batched=batched,
                                  chunk_size=self.opts["chunk_size"], batch_grad=batch)
        eval_mode = self.opts["eval_mode"] and bool(pg.coupling_modules(ctx.model))
        self.state["eval_mode"] = eval_mode
        return pg.vmap_stats(ctx.model, ctx.inputs, cot, dict(zip(names, batch)), ctx.rows,
                             chunk_size=self.opts["chunk_size"], eval_mode=self.opts["eval_mode"])

    def prepare(self, ctx):
        if self.fused and self.opts["mode"] == "contribution" and ctx.captured:
            modules, _ = self._walk(ctx.model)
            ctx.cache[("target_outputs", self.opts["anchor"])] = pg.captured_outputs(
                ctx.model, ctx.captured, None, modules)[1]

    def _walk(self, model):
        """(``dict(model.named_modules())``, coverage info or None), kept per model: each walk is
        ~50 us inside a training step here. The info is kept once a call has given it."""
        kept = self.state.get("_walk")
        if kept is None or kept["model"]() is not model:
            kept = self.state["_walk"] = {"model": weakref.ref(model), "modules": dict(model.named_modules()),
                                          "info": None}
        return kept["modules"], kept["info"]

    def can_fuse(self):
        return self.opts["mode"] == "contribution"

    def after_backward(self, ctx):
        return {**self._finish(ctx, ctx.cache.pop("fused_param_split")), **_anchor_cols(self, ctx)}

    def _finish(self, ctx, fused):
        cols, info = fused.finish()
        kept = self.state.get("_walk")
        if kept is not None and kept["model"]() is ctx.model:
            kept["info"] = info
        self.state.update(info)
        return cols

    defers_after_backward = True

    def keep_after_backward(self, ctx):
        """A Linear model's rows of the step (``FusedContribution.linear_rows``), whose columns
        :meth:`columns_of` makes for many steps at once; other models (and a model's first step, which
        finds the coverage info) get their columns now."""
        fused = ctx.cache.pop("fused_param_split")
        kept = fused.linear_rows() if self._walk(ctx.model)[1] is not None else None
        if kept is None:
            kept = {"cols": self._finish(ctx, fused)}
        return {**kept, **_anchor_cols(self, ctx)}

    def columns_of(self, kept):
        linear = iter(pg.linear_columns([k for k in kept if "layers" in k]))  # the Linear steps, in one pass
        cols = [next(linear) if "layers" in k else k["cols"] for k in kept]
        for c, k in zip(cols, kept):
            if "anchor_teacher_argmax" in k:  # 0-d at its step: one a row here
                c["anchor_teacher_argmax"] = k["anchor_teacher_argmax"].expand(next(iter(c.values())).shape[0])
        return {c: torch.cat([col[c] for col in cols]) for c in cols[0]}


# The runner lives in runner.py; importable from here as before.
from ban_analysis.instrument.runner import HookRunner  # noqa: E402,F401

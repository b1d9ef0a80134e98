"""Held-out attribution: which term of the split lowered a held-out loss (RESEARCH.md section 8).

TracIn's first-order term (Pruthi et al., NeurIPS 2020) applied to the two terms of the split:
a step that moves the weights by -lr G changes a held-out loss L_val by about
-lr <g_val, G> (g_val = dL_val/dtheta), and with G = G_target + G_dark that splits exactly into
the two terms' shares ``a_target = -lr <g_val, G_target>`` and ``a_dark = -lr <g_val, G_dark>``.
Summed over training it says which term lowered the held-out loss.

The hook ``heldout_attribution`` logs, per due step (default every 25 steps), one row:

* ``a_target, a_dark, a_total``: -lr <g_val, G_x>, with G_x the term batch gradients that
  ``update_share`` computes (shared with it when it is on) and a_total = a_target + a_dark
  (fused: -lr <g_val, .grad>, with a_dark = a_total - a_target, as update_share's G_dark).
* ``heldout_loss_before``, ``heldout_loss_after``, ``observed_change`` (after - before): the
  held-out loss around the optimizer step, so the linearisation can be checked.
* ``a_update = <g_val, theta_after - theta_before>``: the first-order change from the update the
  optimizer really made, and ``a_momentum_wd = a_update - a_total``.

What a_* attribute is the plain-gradient part of the update: lr is ``param_groups[0]["lr"]``
and G the objective's gradient. With SGD momentum and weight decay the parameters move by
-lr (G + wd theta + momentum buffer) instead, so ``observed_change`` also holds the momentum
buffer and weight decay (and, for AdamW, the preconditioning): ``a_update`` matches it to first
order for any optimizer, and ``a_momentum_wd`` is the part a_total leaves out.

The held-out loss is label cross-entropy, averaged over a fixed subset of the validation split
(``samples`` rows, default 512, drawn once from (run seed, hook name)), with the model in eval
mode (no BatchNorm statistic moves, dropout off) and training flags restored after. The hook
changes no parameter, buffer, ``.grad`` or random stream. Cost per due step: one forward and
backward over the held-out rows (``eval_batch_size`` rows at a time), one forward after the
step, the two term VJPs (none extra when update_share ran; one when fused), a copy of the
parameters, and with ``groups = true`` two VJPs per group.

``groups = true`` splits a_target and a_dark by sample group: the teacher's argmax wrong vs
right (needs a teacher), and the label flipped vs clean (needs ``HookRunner(clean_labels=...)``).
A group's part is -lr <g_val, G_x,group>, G_x,group the VJP of the term's cotangent with the
other rows zeroed (the sum of the group's per-sample contributions -lr <g_val, g_x,s> / B);
the complement is the total minus the group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ban_analysis.instrument import param_grads as pg
from ban_analysis.instrument.base import Hook, StepContext, register_hook
from ban_analysis.instrument.decompose import ANCHORS, anchor_index
from ban_analysis.instrument import hooks as _hooks  # noqa: F401  registered first: update_share's G_target before this hook
from ban_analysis.instrument.step_terms import _anchor_cols, _cotangents, _grad_of, _term_grads, _trainable

__all__ = ["HeldoutAttribution"]


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """<a, b> over lists of tensors, in float64."""
    return torch.stack([torch.dot(x.reshape(-1).double(), y.reshape(-1).double()) for x, y in zip(a, b)]).sum()


@register_hook
class HeldoutAttribution(Hook):
    """Per step: each term's first-order effect on a held-out loss (see the module docstring).

    Columns (0-d float64): ``a_target, a_dark, a_total, heldout_loss_before,
    heldout_loss_after, observed_change, a_update, a_momentum_wd``; with ``groups = true``
    also ``a_target_<g>, a_dark_<g>`` for g in ``teacher_wrong, teacher_correct`` (with a
    teacher) and ``noisy, clean`` (with clean labels), and the counts ``n_teacher_wrong``,
    ``n_noisy``. Options: ``anchor`` (as every split hook), ``groups`` (false),
    ``eval_batch_size`` (256: held-out rows per forward).
    """

    name = "heldout_attribution"
    per_sample = False
    every_n_steps = 25
    samples = 512
    sample_from = "val"  # ``samples`` counts held-out rows (hook_config.heldout_subset)
    options = {"anchor": "label", "groups": False, "eval_batch_size": 256}
    choices = {"anchor": ANCHORS}

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self._x: Tensor | None = None
        self._y: Tensor | None = None

    def set_heldout(self, x: Tensor, y: Tensor) -> None:
        """The fixed held-out rows: x (n, ...) normalised float inputs, y (n,) int64 labels."""
        self._x, self._y = x, y
        self.state["heldout_rows"] = int(y.shape[0])

    def can_fuse(self) -> bool:
        return True

    # ---- the held-out loss ------------------------------------------------------------------

    def _rows(self, like: Tensor) -> tuple[Tensor, Tensor]:
        if self._x.device != like.device or self._x.dtype != like.dtype:  # moved once
            self._x, self._y = self._x.to(like.device, like.dtype), self._y.to(like.device)
        return self._x, self._y

    def _heldout(self, model: nn.Module, params: list[Tensor], grad: bool) -> tuple[Tensor, list[Tensor] | None]:
        """Mean label cross-entropy on the held-out rows (eval mode) and, if ``grad``, its gradient."""
        x, y = self._rows(params[0])
        n, chunk = y.shape[0], self.opts["eval_batch_size"]
        flags = {m: m.training for m in model.modules()}
        loss = torch.zeros((), dtype=torch.float64, device=x.device)
        g_val = [torch.zeros_like(p) for p in params] if grad else None
        try:
            model.eval()
            with torch.set_grad_enabled(grad):
                for start in range(0, n, chunk):
                    part = F.cross_entropy(model(x[start:start + chunk]).double(), y[start:start + chunk],
                                           reduction="sum") / n
                    if grad:
                        gs = torch.autograd.grad(part, params, allow_unused=True)
                        for acc, gi in zip(g_val, gs):
                            if gi is not None:
                                acc += gi
                    loss = loss + part.detach()
        finally:
            for m, flag in flags.items():
                m.training = flag
        return loss, g_val

    # ---- the protocol: __call__ (before backward), after_backward (fused), after_step ---------

    def __call__(self, ctx: StepContext) -> None:
        if self._x is None:
            raise ValueError(f"hook {self.name!r} has no held-out data: pass HookRunner(..., heldout=(x, y)) "
                             "(run_chain passes the validation split; set data.val_size > 0)")
        if ctx.lr is None:
            raise ValueError(f"hook {self.name!r} needs the step's learning rate in StepContext.lr "
                             "(train_step sets it from optimizer.param_groups[0]['lr'])")
        anchor = self.opts["anchor"]
        names, params = _trainable(ctx.model, ctx.cache)
        loss_before, g_val = self._heldout(ctx.model, params, grad=True)
        stash = {"lr": float(ctx.lr), "g_val": g_val, "loss_before": loss_before,
                 "theta": [p.detach().clone() for p in params]}
        if ("term_grads", anchor) in ctx.cache or not self.fused:  # shared with update_share
            _, grads = _term_grads(ctx, anchor=anchor)
            t, d = _dot(g_val, grads["target"]), _dot(g_val, grads["dark"])
            stash["dots"] = (t, d, t + d)
        else:  # fused: G_target now (update_share's when it ran), G = .grad after the backward
            g_target = ctx.cache.get(("g_target", anchor))
            if g_target is None:
                cot = _cotangents(ctx, False, anchor)
                g_target = pg.term_batch_grads(ctx.student_logits, params, {"target": cot["target"]})
            stash["g_target"] = g_target["target"]
        if self.opts["groups"]:
            stash["groups"] = self._group_dots(ctx, params, g_val, anchor)
        ctx.cache[("heldout", self.name)] = stash
        return None

    def after_backward(self, ctx: StepContext) -> None:
        stash = ctx.cache[("heldout", self.name)]
        if "dots" not in stash:
            _, params = _trainable(ctx.model, ctx.cache)
            t = _dot(stash["g_val"], stash.pop("g_target"))
            total = _dot(stash["g_val"], [_grad_of(p) for p in params])
            stash["dots"] = (t, total - t, total)
        return None  # finished by after_step

    def after_step(self, ctx: StepContext) -> dict[str, Tensor]:
        stash = ctx.cache.pop(("heldout", self.name))
        _, params = _trainable(ctx.model, ctx.cache)
        loss_after, _ = self._heldout(ctx.model, params, grad=False)
        a_update = torch.stack([torch.dot(g.reshape(-1).double(), (p.detach().double() - p0.double()).reshape(-1))
                                for g, p, p0 in zip(stash["g_val"], params, stash["theta"])]).sum()
        lr = stash["lr"]
        t, d, total = stash["dots"]
        cols = {"a_target": -lr * t, "a_dark": -lr * d, "a_total": -lr * total,
                "heldout_loss_before": stash["loss_before"], "heldout_loss_after": loss_after,
                "observed_change": loss_after - stash["loss_before"],
                "a_update": a_update, "a_momentum_wd": a_update + lr * total}
        for group, (gt, gd, count) in stash.get("groups", {}).items():
            other = {"teacher_wrong": "teacher_correct", "noisy": "clean"}[group]
            cols[f"a_target_{group}"], cols[f"a_dark_{group}"] = -lr * gt, -lr * gd
            cols[f"a_target_{other}"], cols[f"a_dark_{other}"] = -lr * (t - gt), -lr * (d - gd)
            cols[f"n_{group}"] = count
        return {**cols, **_anchor_cols(self, ctx)}

    def _group_dots(self, ctx: StepContext, params: list[Tensor], g_val: list[Tensor],
                    anchor: str) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """group -> (<g_val, G_target,group>, <g_val, G_dark,group>, rows in the group)."""
        masks = {}
        if ctx.teacher_logits is not None:
            masks["teacher_wrong"] = anchor_index(ctx.target, ctx.teacher_logits, "teacher_argmax")[0] != ctx.target
        if ctx.cache.get("label_noisy") is not None:  # HookRunner(clean_labels=...)
            masks["noisy"] = ctx.cache["label_noisy"]
        cot = _cotangents(ctx, False, anchor)
        out = {}
        for group, mask in masks.items():
            count = mask.sum()
            if int(count) == 0:  # no row in the group: nothing to differentiate
                zero = torch.zeros((), dtype=torch.float64, device=count.device)
                out[group] = (zero, zero.clone(), count)
                continue
            w = mask.to(cot["target"].dtype).unsqueeze(1)  # (B, 1)
            g = pg.term_batch_grads(ctx.student_logits, params, {"target": cot["target"] * w,
                                                                 "dark": cot["dark"] * w})
            out[group] = (_dot(g_val, g["target"]), _dot(g_val, g["dark"]), count)
        return out

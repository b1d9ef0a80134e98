"""What the hooks share about a step: the anchor of the split, the term cotangents, the trainable
parameters, the per-term batch gradients, cached in the step's ``ctx.cache``.

Split from ``hooks.py`` (which keeps the hook classes; these names stay importable from there).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ban_analysis.instrument import param_grads as pg
from ban_analysis.instrument.base import Hook, StepContext
from ban_analysis.instrument.decompose import anchor_index, split_at

__all__: list[str] = []  # internal to the instrument package


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
        if scale:  # the unscaled parts times B: the split copies values, so this is exactly the split of
            # B * g (one split a step when update_share and param_split are both due: ~80 us inside a step)
            parts = _cotangents(ctx, False, anchor)
            B = ctx.out.logit_grad.shape[0]
            ctx.cache[key] = {"target": parts["target"] * B, "dark": parts["dark"] * B}
            return ctx.cache[key]
        # unchecked: the labels passed the objective's checks, the teacher argmax is in range
        target_part, dark_part = split_at(_plain(ctx.out.logit_grad), _anchor(ctx, anchor)[0])
        ctx.cache[key] = {"target": target_part, "dark": dark_part}
    return ctx.cache[key]


def _sel(x: Tensor, rows: Tensor | None) -> Tensor:
    return x if rows is None else x[rows]


def _plain(t: Tensor) -> Tensor:
    """``t`` without autograd history (``detach`` only where there is one: a step pays per op)."""
    return t.detach() if t.requires_grad else t


def _note_anchor(hook: Hook, ctx: StepContext) -> None:
    """A deferred hook's record of the anchor in effect (``info()``), as ``_anchor_cols`` keeps it."""
    if hook.opts.get("anchor", "label") != "label":
        effective = "label" if ctx.teacher_logits is None else "teacher_argmax"
        hook.state.setdefault("anchor_effective", {})[str(ctx.gen)] = effective


def _deferred_anchor(hook: Hook, raw: dict[str, Tensor]) -> tuple[Tensor | None, dict[str, Tensor]]:
    """(anchor index or None for the label, the per-row ``anchor_teacher_argmax`` column if any)."""
    anchor = hook.opts.get("anchor", "label")
    if anchor == "label":
        return None, {}
    teacher = raw.get("teacher_logits")
    at, effective = anchor_index(raw["target"], teacher, anchor)
    flag = torch.full(raw["target"].shape, int(effective == "teacher_argmax"), dtype=torch.int8,
                      device=raw["target"].device)
    return at, {"anchor_teacher_argmax": flag}


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


def _trainable(model: nn.Module, cache: dict | None = None) -> tuple[list[str], list[Tensor]]:
    """(names, parameters) that require grad; kept in the step's ``cache`` if given (the module
    walk is ~50 us a call inside a training step here, and a due step asks two or three times)."""
    if cache is not None and "trainable" in cache:
        return cache["trainable"]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = [n for n, _ in named], [p for _, p in named]
    if cache is not None:
        cache["trainable"] = out
    return out


def _term_grads(ctx: StepContext, batched: bool = False,
                anchor: str = "label") -> tuple[list[str], dict[str, list[Tensor]]]:
    """Batch gradient of each term over all trainable parameters (cached per step and anchor)."""
    key = ("term_grads", anchor)
    if key not in ctx.cache:
        names, params = _trainable(ctx.model, ctx.cache)
        grads = pg.term_batch_grads(ctx.student_logits, params, _cotangents(ctx, False, anchor), batched)
        ctx.cache[key] = (names, grads)
    return ctx.cache[key]


def _grad_of(p: Tensor) -> Tensor:
    """The trainer's gradient of a parameter (read only); zeros where it got none."""
    return torch.zeros_like(p) if p.grad is None else p.grad

"""The gradient split of Furlanello et al. 2018, eqs. 5-9, at the logit level.

For soft-target cross-entropy the per-sample logit gradient is q_s - p_s (eq. 5). Split at one
coordinate per sample (the label * by default):

- target part: the gradient's value at the label coordinate, zero elsewhere;
- dark part: the gradient at every other coordinate (the "dark knowledge" term).

Summed over the batch the target part reads like label cross-entropy whose per-sample gradient
is scaled by the teacher's confidence p_{*,s} (eqs. 8-9). :func:`split_logit_grad` splits any
objective's ``logit_grad``; :func:`per_sample_stats` gives the per-sample quantities around it.
Head- and parameter-level splits live in ``ban_analysis.instrument.param_grads`` and are re-exported here.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from ban_analysis.losses.base import ObjectiveOutput

logger = logging.getLogger(__name__)

__all__ = ["ANCHORS", "STAT_KEYS", "anchor_index", "per_sample_stats", "split_at", "split_logit_grad"]

# Where the split is anchored: the label (eq. 6), or the teacher's argmax coordinate.
ANCHORS = ("label", "teacher_argmax")

# Columns returned by per_sample_stats, in order.
STAT_KEYS = (
    "g_target",
    "g_dark_norm",
    "g_norm",
    "p_label",
    "p_max",
    "teacher_correct",
    "teacher_argmax",
    "q_label",
    "cw_part",
    "teacher_nontarget_entropy",
    "kl_teacher_student",
    "sample_weight",
)


def _check_grid(what: str, x: object, shape: tuple[int, int] | None = None) -> None:
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        desc = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a floating point (B, C) tensor, got {desc}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(f"{what} shape {tuple(x.shape)} does not match student_logits shape {shape}")


def _check_index(what: str, index: object, B: int, C: int) -> None:
    if not isinstance(index, Tensor) or index.dtype != torch.int64 or tuple(index.shape) != (B,):
        desc = f"{index.dtype} tensor of shape {tuple(index.shape)}" if isinstance(index, Tensor) else type(index).__name__
        raise ValueError(f"{what} must be an int64 tensor of shape ({B},), got {desc}")
    if B and bool(((index < 0) | (index >= C)).any()):
        raise ValueError(f"{what} values must lie in [0, {C - 1}], got range [{int(index.min())}, {int(index.max())}]")


def split_logit_grad(logit_grad: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Split a logit gradient into its value at ``index[s]`` and the rest.

    Args:
        logit_grad: (B, C) gradient w.r.t. the logits (any objective's ``out.logit_grad``).
        index: (B,) int64 coordinate per sample: the label (eq. 6's target term) or e.g. the
            teacher argmax.

    Returns:
        ``(target_part, dark_part)``, both (B, C): ``target_part`` is zero except at
        ``index[s]`` where it equals ``logit_grad[s, index[s]]``; ``dark_part = logit_grad -
        target_part`` (zero at ``index[s]``). Their sum is exactly ``logit_grad``.

    Raises:
        ValueError: wrong shapes or dtypes, or ``index`` out of range.
    """
    _check_grid("logit_grad", logit_grad)
    B, C = logit_grad.shape
    _check_index("index", index, B, C)
    return split_at(logit_grad, index)


def split_at(logit_grad: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`split_logit_grad` without its checks, for callers whose index is known good (the hooks:
    the objective checked the labels; without the checks a hook's split went from 139 to 82-85 us a
    call inside a training step on this CPU)."""
    col = index.unsqueeze(1)  # (B, 1)
    target_part = torch.zeros_like(logit_grad).scatter_(1, col, logit_grad.gather(1, col))  # (B, C)
    return target_part, logit_grad - target_part


def anchor_index(target: Tensor, teacher_logits: Tensor | None, anchor: str = "label") -> tuple[Tensor, str]:
    """The coordinate per sample that the split is anchored at, and the anchor in effect.

    Args:
        target: (B,) int64 labels.
        teacher_logits: (B, C) or None (objective ``ce``).
        anchor: ``"label"`` (eq. 6) or ``"teacher_argmax"``: the teacher's argmax, taken from
            ``softmax(teacher_logits)`` exactly as ``per_sample_stats`` and DKPP take it (first
            index on ties). Without a teacher the argmax is undefined and the label is used.

    Returns:
        ``(index, effective)``: (B,) int64, and ``"label"`` or ``"teacher_argmax"``.
    """
    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {list(ANCHORS)}, got {anchor!r}")
    if anchor == "label" or teacher_logits is None:  # (before any no_grad: a context a call, 1.4 us out of a step)
        return target, "label"
    with torch.no_grad():
        return torch.softmax(teacher_logits.detach().float(), dim=1).argmax(dim=1), "teacher_argmax"


def _log_softmax_rows(x: Tensor) -> Tensor:
    """``torch.log_softmax(x, dim=1)`` of (N, C) rows, for few classes on CPU taken along dim 0 of
    the transpose: torch's CPU kernel over a short last dim is ~5x slower than over a long first
    one (5,000 x 10: 424 vs 85 us here; a deferred epoch's rows make N large), with the same
    values to float rounding (most rows bit-identical; in the quick experiment's hook files at most
    1.4e-7 relative for q_label, 2.6e-6 for a small KL); for C >= 32 the plain call is faster."""
    if x.shape[1] < 32 and x.device.type == "cpu" and x.shape[0] > x.shape[1]:
        return torch.log_softmax(x.t(), dim=0).t()  # a transposed view: the ops after it are as fast
    return torch.log_softmax(x, dim=1)


@torch.no_grad()
def per_sample_stats(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    target: Tensor,
    out: ObjectiveOutput,
    anchor: Tensor | None = None,
    batch_size: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-sample quantities around the logit-level split (Furlanello et al. 2018, eqs. 6-9).

    Per-sample gradients are rows of ``out.logit_grad`` times B: the batch-mean factor removed,
    so for CWTM the weights have mean 1 and a sample's value is comparable across objectives.
    Probabilities are at temperature 1 (p = softmax(teacher_logits), q = softmax(student_logits)).

    Args:
        student_logits: (B, C) student logits of the step (graph ignored).
        teacher_logits: (B, C) or None (objective ``ce``): teacher columns are then NaN, and
            ``teacher_argmax`` is -1 (int64 cannot hold NaN).
        target: (B,) int64 labels.
        out: the objective's output for these logits.
        anchor: (B,) int64 coordinate the split is anchored at (see :func:`anchor_index`);
            None = the label. Only ``g_target`` and ``g_dark_norm`` depend on it; the ``p_``,
            ``q_`` and entropy columns stay at the label.
        batch_size: (B,) float32, the size of the batch each row came from (its scale factor);
            None = B, the rows are one batch. Lets rows gathered from several steps be computed in
            one call (``HookRunner(defer=True)``) with the values each step would have given.

    Returns:
        dict of (B,) tensors (float32 unless noted), keys ``STAT_KEYS``:
            g_target: signed gradient value at the anchor (the label y_s by default),
                B * logit_grad[s, y_s].
            g_dark_norm: L2 norm of the rest of the row, B * |logit_grad[s, != y_s]|.
            g_norm: L2 norm of the row, B * |logit_grad[s]|.
            p_label, p_max: teacher probability at the label, and its maximum.
            teacher_correct: 1.0 if the teacher's argmax is the label else 0.0.
            teacher_argmax: int64 teacher argmax (first index on ties).
            q_label: student probability at the label.
            cw_part: p_label * (q_label - 1), the confidence-weighted label piece of eq. 8.
            teacher_nontarget_entropy: entropy of the teacher's distribution renormalised over
                the C - 1 non-label classes, divided by log(C - 1) so it lies in [0, 1]
                (0 for C = 2, where one class is left).
            kl_teacher_student: KL(p_s || q_s).
            sample_weight: B * out.sample_weight (mean 1; all ones except for CWTM).

    Raises:
        ValueError: inconsistent shapes or dtypes, or target out of range.
    """
    _check_grid("student_logits", student_logits)
    B, C = student_logits.shape
    _check_grid("out.logit_grad", out.logit_grad, (B, C))
    if teacher_logits is not None:
        _check_grid("teacher_logits", teacher_logits, (B, C))
    _check_index("target", target, B, C)
    if anchor is not None:
        _check_index("anchor", anchor, B, C)
    at = target if anchor is None else anchor  # the split's coordinate
    if batch_size is not None and tuple(batch_size.shape) != (B,):
        raise ValueError(f"batch_size must have shape ({B},), got {tuple(batch_size.shape)}")
    scale = B if batch_size is None else batch_size.float()  # per row: the same product as by the int

    g = out.logit_grad.detach().float() * (scale if batch_size is None else scale.unsqueeze(1))  # (B, C)
    col = target.unsqueeze(1)  # (B, 1)
    g_target = g.gather(1, at.unsqueeze(1)).squeeze(1)  # (B,)
    g_norm = torch.linalg.vector_norm(g, dim=1)  # (B,)
    # |dark|^2 = |g|^2 - g_y^2 would cancel catastrophically when the label term dominates.
    _, dark = split_logit_grad(g, at)
    g_dark_norm = torch.linalg.vector_norm(dark, dim=1)  # (B,)

    log_q = _log_softmax_rows(student_logits.detach().float())  # (B, C)
    q_label = log_q.gather(1, col).squeeze(1).exp()  # (B,)
    stats: dict[str, Tensor] = {"g_target": g_target, "g_dark_norm": g_dark_norm, "g_norm": g_norm}

    if teacher_logits is None:
        nan = torch.full((B,), math.nan, device=g.device)
        stats.update(p_label=nan, p_max=nan.clone(), teacher_correct=nan.clone(),
                     teacher_argmax=torch.full((B,), -1, dtype=torch.int64, device=g.device))
        stats.update(q_label=q_label, cw_part=nan.clone(), teacher_nontarget_entropy=nan.clone(),
                     kl_teacher_student=nan.clone())
    else:
        t = teacher_logits.detach().float()  # (B, C)
        log_p = _log_softmax_rows(t)  # (B, C)
        # softmax (not log_p.exp()) and argmax exactly as in dkpp, so near-ties resolve alike.
        p = torch.softmax(t, dim=1)  # (B, C)
        p_label = p.gather(1, col).squeeze(1)  # (B,)
        teacher_argmax = p.argmax(dim=1)  # (B,), first index on ties
        p_max = p.gather(1, teacher_argmax.unsqueeze(1)).squeeze(1)  # (B,)
        # Non-label distribution from the logits directly (log-space), so a teacher that puts
        # all float32 mass on the label still gets a well-defined entropy.
        # contiguous: the entropy's sum over each row then adds in the order it always did
        log_r = _log_softmax_rows(t.scatter(1, col, -math.inf)).contiguous()  # (B, C), -inf at label
        r = log_r.exp()
        h = -torch.where(r > 0, r * log_r, torch.zeros_like(r)).sum(dim=1)  # (B,)
        entropy = h / math.log(C - 1) if C > 2 else torch.zeros_like(h)
        stats.update(
            p_label=p_label,
            p_max=p_max,
            teacher_correct=(teacher_argmax == target).float(),
            teacher_argmax=teacher_argmax,
            q_label=q_label,
            cw_part=p_label * (q_label - 1.0),
            teacher_nontarget_entropy=entropy.clamp_(0.0, 1.0),
            kl_teacher_student=(p * (log_p - log_q)).sum(dim=1),
        )
    stats["sample_weight"] = out.sample_weight.detach().float() * scale
    return {k: stats[k] for k in STAT_KEYS}


# The head and parameter levels of the split, from param_grads (DESIGN.md: decompose holds all three).
from ban_analysis.instrument.param_grads import (  # noqa: E402
    contribution_stats,
    exact_stats,
    head_stats,
    term_batch_grads,
    update_share_stats,
    vmap_stats,
)

__all__ += ["term_batch_grads", "update_share_stats", "head_stats", "contribution_stats", "exact_stats",
            "vmap_stats"]

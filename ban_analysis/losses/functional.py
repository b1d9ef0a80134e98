"""Closed-form soft-target losses that every objective reduces to.

Notation: student logits z (B, C), q_T = softmax(z / T), label y, soft target r (B, C) with
rows summing to 1, per-sample weights w (B,). H(r, q) = -sum_c r_c log q_c.

1. ``soft_target_cross_entropy`` (ce, ban, cwtm, cwtc, dkpp, tmls):
       L = sum_s w_s H(r_s, q_T,s)
       dL/dz_s = w_s (q_T,s - r_s) / T                       (paper eq. 5 at T = 1)
2. ``label_and_soft_target_loss`` (kd, ban_l):
       L = (1/B) sum_s [ a H(onehot(y_s), q_1,s) + b S(r_s, q_T,s) ]
       dL/dz_s = (1/B) [ a (q_1,s - onehot(y_s)) + (b / T)(q_T,s - r_s) ]
   where the soft term S is the cross-entropy H(r, q_T) (BAN+L) or, given log r, the
   KL divergence KL(r || q_T) = H(r, q_T) - H(r) (KD); the two differ by a constant in z.

Each loss is a pure forward function, a pure backward function, one autograd.Function joining
them and a functional wrapper. The closed-form gradient is computed inside ``forward`` because
every caller needs it anyway (``ObjectiveOutput.logit_grad``); ``backward`` only scales it by
the incoming gradient. So ``loss.backward()`` and ``logit_grad`` are the same numbers, and the
soft target and weights (teacher side) never receive gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "LabelAndSoftTargetLoss",
    "SoftTargetCE",
    "label_and_soft_target_loss",
    "label_soft_backward",
    "label_soft_forward",
    "soft_target_ce_backward",
    "soft_target_ce_forward",
    "soft_target_cross_entropy",
]


def _scaled(student_logits: Tensor, temperature: float) -> Tensor:
    # Skip the division at T = 1: saves a (B, C) op on the default path of most objectives.
    return student_logits if temperature == 1.0 else student_logits / temperature


class _ClosedFormGrad(torch.autograd.Function):
    """Base of the two losses' autograd.Functions: the backward they share.

    A subclass's ``forward`` computes the loss and its closed-form logit gradient and ends with
    ``return _ClosedFormGrad.save_grad(ctx, loss, grad)``; ``backward`` then only scales the saved
    gradient. The student logits are always the first input; the others get no gradient.
    """

    @staticmethod
    def save_grad(ctx, loss: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
        """Save ``grad`` for backward and return ``(loss, grad)``, ``grad`` non-differentiable."""
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(grad)
        return loss, grad

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_of_grad):  # noqa: D102
        (grad,) = ctx.saved_tensors
        # One entry per forward input: the logits' gradient, then None for each other input.
        return (grad_loss * grad,) + (None,) * (len(ctx.needs_input_grad) - 1)


# ---------------------------------------------------------------- 1. soft-target cross-entropy


def soft_target_ce_forward(
    student_logits: Tensor, target_dist: Tensor, weight: Tensor | float, temperature: float
) -> tuple[Tensor, Tensor]:
    """Weighted soft-target cross-entropy.

    Args:
        student_logits: (B, C).
        target_dist: (B, C) soft target, rows summing to 1.
        weight: (B,) per-sample weights, or one float for equal weights (e.g. 1/B): the
            common case, which saves a broadcast and a reduction.
        temperature: T > 0 applied to the student logits.

    Returns:
        ``(loss, q)``: scalar ``sum_s w_s H(r_s, softmax(z_s / T))`` and q = softmax(z / T) (B, C).
    """
    log_q = torch.log_softmax(_scaled(student_logits, temperature), dim=1)  # (B, C), stable
    if isinstance(weight, Tensor):
        loss = torch.dot(weight, (target_dist * log_q).sum(dim=1)).neg_()
    else:
        loss = (target_dist * log_q).sum().mul_(-weight)
    return loss, log_q.exp_()


def soft_target_ce_backward(
    q: Tensor, target_dist: Tensor, weight: Tensor | float, temperature: float
) -> Tensor:
    """Closed-form gradient of :func:`soft_target_ce_forward` w.r.t. the student logits.

    Returns:
        (B, C) ``w_s (q_s - r_s) / T`` (a new tensor; ``q`` is not modified).
    """
    scale = weight if temperature == 1.0 else weight / temperature
    if isinstance(scale, Tensor):
        scale = scale.unsqueeze(1)  # (B, 1)
    return (q - target_dist).mul_(scale)


class SoftTargetCE(_ClosedFormGrad):
    """autograd.Function for :func:`soft_target_ce_forward`; returns ``(loss, logit_grad)``."""

    @staticmethod
    def forward(ctx, student_logits, target_dist, weight, temperature):  # noqa: D102
        loss, q = soft_target_ce_forward(student_logits, target_dist, weight, temperature)
        grad = soft_target_ce_backward(q, target_dist, weight, temperature)
        return _ClosedFormGrad.save_grad(ctx, loss, grad)


def soft_target_cross_entropy(
    student_logits: Tensor, target_dist: Tensor, weight: Tensor | float, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Weighted soft-target cross-entropy with closed-form backward.

    Args:
        student_logits: (B, C) float32/float64, may require grad.
        target_dist: (B, C) same dtype; detached (never receives gradient).
        weight: (B,) same dtype, detached; or a float, the same weight for every sample.
        temperature: T > 0.

    Returns:
        ``(loss, logit_grad)``: scalar loss with autograd graph to ``student_logits``, and the
        detached (B, C) closed-form gradient ``d loss / d student_logits``.
    """
    if isinstance(weight, Tensor):
        weight = weight.detach()
    else:
        weight = float(weight)
    return SoftTargetCE.apply(student_logits, target_dist.detach(), weight, float(temperature))


# ---------------------------------------------------- 2. label CE + temperature soft-target term


def label_soft_forward(
    student_logits: Tensor,
    target: Tensor,
    soft_target: Tensor,
    soft_log_target: Tensor | None,
    label_coef: float,
    soft_coef: float,
    temperature: float,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Label cross-entropy plus a soft-target term at temperature T, batch mean.

    Args:
        student_logits: (B, C).
        target: (B,) int64 labels.
        soft_target: (B, C) soft target r (teacher softmax at T).
        soft_log_target: (B, C) log r for a KL soft term, or None for a cross-entropy soft term.
        label_coef: a >= 0, weight of H(onehot(y), softmax(z)).
        soft_coef: b >= 0, weight of the soft term.
        temperature: T > 0.

    Returns:
        ``(loss, q_1, q_T)``: scalar loss, softmax(z) (None when a = 0) and softmax(z / T)
        (None when b = 0; the same tensor as q_1 when T = 1).
    """
    B = student_logits.shape[0]
    total = None  # sum over samples of the weighted terms; None until a term is added
    q1 = qT = None
    if label_coef != 0.0:
        log_q1 = torch.log_softmax(student_logits, dim=1)  # (B, C)
        total = log_q1.gather(1, target.unsqueeze(1)).sum().mul_(-label_coef)
        q1 = log_q1.exp()
    if soft_coef != 0.0:
        if temperature == 1.0 and q1 is not None:
            log_qT, qT = log_q1, q1
        else:
            log_qT = torch.log_softmax(_scaled(student_logits, temperature), dim=1)  # (B, C)
            qT = log_qT.exp()
        if soft_log_target is None:
            soft = (soft_target * log_qT).sum().neg_()  # sum_s H(r_s, q_T,s)
        else:
            soft = (soft_target * (soft_log_target - log_qT)).sum()  # sum_s KL(r_s || q_T,s)
        total = soft.mul_(soft_coef) if total is None else total.add_(soft, alpha=soft_coef)
    return total.div_(B), q1, qT


def label_soft_backward(
    q1: Tensor | None,
    qT: Tensor | None,
    target: Tensor,
    soft_target: Tensor,
    label_coef: float,
    soft_coef: float,
    temperature: float,
) -> Tensor:
    """Closed-form gradient of :func:`label_soft_forward` w.r.t. the student logits.

    Returns:
        (B, C) ``(1/B) [a (q_1 - onehot(y)) + (b / T)(q_T - r)]``.
    """
    B = (q1 if q1 is not None else qT).shape[0]
    if soft_coef != 0.0:
        grad = (qT - soft_target).mul_(soft_coef / (temperature * B))  # (B, C)
        if label_coef != 0.0:
            grad.add_(q1, alpha=label_coef / B)
    else:
        grad = q1.mul(label_coef / B)  # (B, C)
    if label_coef != 0.0:
        # Subtract a / B at each label coordinate: the one-hot part of the label gradient.
        grad.scatter_add_(1, target.unsqueeze(1), grad.new_full((B, 1), -label_coef / B))
    return grad


class LabelAndSoftTargetLoss(_ClosedFormGrad):
    """autograd.Function for :func:`label_soft_forward`; returns ``(loss, logit_grad)``."""

    @staticmethod
    def forward(ctx, student_logits, target, soft_target, soft_log_target, label_coef, soft_coef, temperature):  # noqa: D102
        loss, q1, qT = label_soft_forward(
            student_logits, target, soft_target, soft_log_target, label_coef, soft_coef, temperature
        )
        grad = label_soft_backward(q1, qT, target, soft_target, label_coef, soft_coef, temperature)
        return _ClosedFormGrad.save_grad(ctx, loss, grad)


def label_and_soft_target_loss(
    student_logits: Tensor,
    target: Tensor,
    soft_target: Tensor,
    label_coef: float,
    soft_coef: float,
    temperature: float = 1.0,
    soft_log_target: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``mean_s [a CE(z_s, y_s) + b S(r_s, softmax(z_s / T))]`` with closed-form backward.

    S is the cross-entropy H(r, q_T), or KL(r || q_T) when ``soft_log_target`` (log r) is given.

    Args:
        student_logits: (B, C) float32/float64, may require grad.
        target: (B,) int64 labels.
        soft_target: (B, C) same dtype as the logits; detached.
        label_coef: a >= 0.
        soft_coef: b >= 0.
        temperature: T > 0 for the soft term (the label term is always at T = 1).
        soft_log_target: (B, C) log r (KL soft term), or None (cross-entropy); detached.

    Returns:
        ``(loss, logit_grad)`` as in :func:`soft_target_cross_entropy`.
    """
    if label_coef == 0.0 and soft_coef == 0.0:
        raise ValueError("label_coef and soft_coef cannot both be 0; at least one term is needed")
    if soft_log_target is not None:
        soft_log_target = soft_log_target.detach()
    return LabelAndSoftTargetLoss.apply(
        student_logits, target, soft_target.detach(), soft_log_target,
        float(label_coef), float(soft_coef), float(temperature),
    )

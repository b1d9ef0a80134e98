"""``kd``: Hinton-style knowledge distillation (Hinton, Vinyals & Dean 2015; not an equation of
Furlanello et al. 2018, which uses it as the common alternative to eq. 2).

    p_T = softmax(t / T), q_T = softmax(z / T)
    L = (1/B) sum_s [ (1 - alpha) CE(z_s, y_s) + alpha T^2 KL(p_T,s || q_T,s) ]
    dL/dz_s = (1/B) [ (1 - alpha)(q_1,s - onehot(y_s)) + alpha T (q_T,s - p_T,s) ]

The KL includes the teacher-entropy constant, so the loss value is the textbook KD loss (zero
soft term when the student matches the teacher); the constant does not change the gradient.

``target_dist`` is the gradient-weighted mixture of the two targets,
``((1 - alpha) onehot(y) + alpha T p_T) / ((1 - alpha) + alpha T)``: the label term pulls with
weight (1 - alpha) and the soft term with alpha T. At T = 1 this is ``(1 - alpha) onehot + alpha p``
and ``logit_grad = (q - target_dist) / B`` exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Objective, ObjectiveOutput, check_number, register_objective
from .functional import label_and_soft_target_loss


@register_objective("kd")
class KnowledgeDistillation(Objective):
    """Hinton KD: ``(1 - alpha) CE(z, y) + alpha T^2 KL(softmax(t/T) || softmax(z/T))``.

    Args:
        alpha: weight of the distillation term, in [0, 1].
        temperature: T > 0.
    """

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0) -> None:
        alpha = check_number("kd alpha", alpha, 0.0, 1.0)
        temperature = check_number("kd temperature", temperature, 0.0, float("inf"), low_open=True)
        super().__init__(alpha=alpha, temperature=temperature)
        self.alpha = alpha
        self.temperature = temperature

    def compute(self, student_logits: Tensor, teacher_logits: Tensor | None, target: Tensor,
                generator: torch.Generator | None) -> ObjectiveOutput:
        B, C = student_logits.shape
        alpha, T = self.alpha, self.temperature
        log_p = torch.log_softmax(teacher_logits / T, dim=1)  # (B, C)
        p = log_p.exp()  # (B, C)
        # KL as sum p (log p - log q): log_p is finite for finite logits, so p = 0 entries give 0.
        loss, grad = label_and_soft_target_loss(
            student_logits, target, p, label_coef=1.0 - alpha, soft_coef=alpha * T * T,
            temperature=T, soft_log_target=log_p,
        )
        label_pull, soft_pull = 1.0 - alpha, alpha * T
        target_dist = p * (soft_pull / (label_pull + soft_pull))  # (B, C)
        if label_pull != 0.0:
            target_dist.scatter_add_(1, target.unsqueeze(1), p.new_full((B, 1), label_pull / (label_pull + soft_pull)))
        weight = student_logits.new_full((B,), 1.0 / B)  # (B,)
        return ObjectiveOutput(loss, grad, target_dist, weight)

"""``ban``: the Born-Again loss, Furlanello et al. 2018, eq. 2.

Cross-entropy from the student to the teacher's softmax, no label term. With a temperature T
both sides are softened (as in KD's soft term) and, unlike KD, the loss is NOT multiplied by
T^2: at the paper's T = 1 this makes no difference; at T != 1 the gradient shrinks by 1/T.

    p_T = softmax(t / T), q_T = softmax(z / T)
    L = (1/B) sum_s H(p_T,s, q_T,s)               dL/dz_s = (q_T,s - p_T,s) / (T B)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Objective, ObjectiveOutput, check_number, register_objective
from .functional import soft_target_cross_entropy


@register_objective("ban")
class BornAgain(Objective):
    """BAN loss (paper eq. 2): soft-target CE to the teacher's softmax at temperature T.

    Args:
        temperature: T > 0 (paper: 1).
    """

    def __init__(self, temperature: float = 1.0) -> None:
        temperature = check_number("ban temperature", temperature, 0.0, float("inf"), low_open=True)
        super().__init__(temperature=temperature)
        self.temperature = temperature

    def compute(self, student_logits: Tensor, teacher_logits: Tensor | None, target: Tensor,
                generator: torch.Generator | None) -> ObjectiveOutput:
        B = student_logits.shape[0]
        T = self.temperature
        target_dist = torch.softmax(teacher_logits if T == 1.0 else teacher_logits / T, dim=1)  # (B, C)
        weight = student_logits.new_full((B,), 1.0 / B)  # (B,)
        loss, grad = soft_target_cross_entropy(student_logits, target_dist, 1.0 / B, T)
        return ObjectiveOutput(loss, grad, target_dist, weight)

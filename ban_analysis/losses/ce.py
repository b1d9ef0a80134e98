"""``ce``: label cross-entropy, the teacher's own objective (Furlanello et al. 2018, eq. 1).

Used as the "label-only retrain" control: a second generation trained on labels alone with a
new seed, i.e. what a student gains from re-training without any teacher. The teacher logits
are ignored (``needs_teacher = False``).

    L = (1/B) sum_s -log softmax(z_s)[y_s]        dL/dz_s = (q_s - onehot(y_s)) / B
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Objective, ObjectiveOutput, register_objective
from .functional import soft_target_cross_entropy


@register_objective("ce")
class CrossEntropy(Objective):
    """Label cross-entropy (paper eq. 1); no hyperparameters, teacher ignored."""

    needs_teacher = False

    def __init__(self) -> None:
        super().__init__()

    def compute(self, student_logits: Tensor, teacher_logits: Tensor | None, target: Tensor,
                generator: torch.Generator | None) -> ObjectiveOutput:
        B, C = student_logits.shape
        # zeros + scatter_ rather than F.one_hot, which re-checks the range (a second sync).
        target_dist = student_logits.new_zeros(B, C).scatter_(1, target.unsqueeze(1), 1.0)  # (B, C)
        weight = student_logits.new_full((B,), 1.0 / B)  # (B,)
        loss, grad = soft_target_cross_entropy(student_logits, target_dist, 1.0 / B)
        return ObjectiveOutput(loss, grad, target_dist, weight)

"""``ban_l``: BAN+L, Furlanello et al. 2018 ("BAN+L" column of the CIFAR-100 table): the eq. 2
BAN loss plus the eq. 1 label cross-entropy. The paper gives no equation of its own for it.

    p_T = softmax(t / T), q_T = softmax(z / T)
    L = (1/B) sum_s [ label_weight CE(z_s, y_s) + teacher_weight H(p_T,s, q_T,s) ]
    dL/dz_s = (1/B) [ label_weight (q_1,s - onehot(y_s)) + teacher_weight (q_T,s - p_T,s) / T ]

Defaults ``label_weight = 1.0, teacher_weight = 1.0``: the paper adds the two cross-entropies
with no weighting it reports, so equal unit weights are the literal reading. The gradient at
T = 1 is then twice the size of BAN's; lower the learning rate or use weights 0.5/0.5 for the
same scale. As in ``ban`` there is no T^2 factor.

``target_dist`` is the gradient-weighted mixture
``(label_weight onehot(y) + (teacher_weight / T) p_T) / (label_weight + teacher_weight / T)``;
at T = 1, ``logit_grad = (label_weight + teacher_weight)(q - target_dist) / B``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Objective, ObjectiveOutput, check_number, register_objective
from .functional import label_and_soft_target_loss


@register_objective("ban_l")
class BornAgainWithLabels(Objective):
    """BAN+L: ``label_weight CE(z, y) + teacher_weight H(softmax(t/T), softmax(z/T))``.

    Args:
        label_weight: >= 0, weight of the label cross-entropy (default 1.0).
        teacher_weight: >= 0, weight of the BAN term (default 1.0); not both zero.
        temperature: T > 0 for the BAN term (default 1.0, the paper's).
    """

    def __init__(self, label_weight: float = 1.0, teacher_weight: float = 1.0, temperature: float = 1.0) -> None:
        label_weight = check_number("ban_l label_weight", label_weight, 0.0, float("inf"))
        teacher_weight = check_number("ban_l teacher_weight", teacher_weight, 0.0, float("inf"))
        if label_weight == 0.0 and teacher_weight == 0.0:
            raise ValueError("ban_l label_weight and teacher_weight cannot both be 0; at least one must be > 0")
        temperature = check_number("ban_l temperature", temperature, 0.0, float("inf"), low_open=True)
        super().__init__(label_weight=label_weight, teacher_weight=teacher_weight, temperature=temperature)
        self.label_weight = label_weight
        self.teacher_weight = teacher_weight
        self.temperature = temperature

    def compute(self, student_logits: Tensor, teacher_logits: Tensor | None, target: Tensor,
                generator: torch.Generator | None) -> ObjectiveOutput:
        B, C = student_logits.shape
        T = self.temperature
        p = torch.softmax(teacher_logits if T == 1.0 else teacher_logits / T, dim=1)  # (B, C)
        loss, grad = label_and_soft_target_loss(
            student_logits, target, p, label_coef=self.label_weight, soft_coef=self.teacher_weight,
            temperature=T,
        )
        label_pull, soft_pull = self.label_weight, self.teacher_weight / T
        target_dist = p * (soft_pull / (label_pull + soft_pull))  # (B, C)
        if label_pull != 0.0:
            target_dist.scatter_add_(1, target.unsqueeze(1), p.new_full((B, 1), label_pull / (label_pull + soft_pull)))
        weight = student_logits.new_full((B,), 1.0 / B)  # (B,)
        return ObjectiveOutput(loss, grad, target_dist, weight)

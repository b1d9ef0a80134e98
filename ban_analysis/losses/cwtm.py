"""``cwtm``: Confidence-Weighted by Teacher Max, Furlanello et al. 2018, eq. 10.

Label cross-entropy in which each sample is weighted by the teacher's confidence; the weights
carry no gradient:

    w_s = max_j p_js / sum_u max_j p_ju          (p = softmax(teacher_logits), sum_s w_s = 1)
    L = sum_s w_s CE(z_s, y_s)                    dL/dz_s = w_s (q_s - onehot(y_s))

Convention: the weights sum to 1 over the batch, so with a uniformly confident teacher
(all w_s = 1/B) ``cwtm`` equals ``ce`` exactly. The paper's eq. 10 carries an extra 1/b
(b = batch size) in front of the sum; that only divides the gradient by b, i.e. rescales
the learning rate, so we drop it to keep the loss on the same scale as every other objective.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Objective, ObjectiveOutput, register_objective
from .functional import soft_target_cross_entropy


def teacher_max_weights(teacher_logits: Tensor) -> Tensor:
    """CWTM sample weights ``max_j p_js / sum_u max_j p_ju``.

    Args:
        teacher_logits: (B, C).

    Returns:
        (B,) weights summing to 1, no gradient.
    """
    # softmax + amax: torch.logsumexp on CPU expands into ~10 kernels, softmax is one.
    p_max = torch.softmax(teacher_logits.detach(), dim=1).amax(dim=1)  # (B,)
    return p_max / p_max.sum()


@register_objective("cwtm")
class ConfidenceWeightedByTeacherMax(Objective):
    """CWTM (paper eq. 10): label CE weighted per sample by the teacher's max probability.

    Weights sum to 1 over the batch (the paper's extra 1/b is a learning-rate rescale, dropped).
    No hyperparameters.
    """

    def __init__(self) -> None:
        super().__init__()

    def compute(self, student_logits: Tensor, teacher_logits: Tensor | None, target: Tensor,
                generator: torch.Generator | None) -> ObjectiveOutput:
        B, C = student_logits.shape
        weight = teacher_max_weights(teacher_logits)  # (B,)
        target_dist = student_logits.new_zeros(B, C).scatter_(1, target.unsqueeze(1), 1.0)  # (B, C)
        loss, grad = soft_target_cross_entropy(student_logits, target_dist, weight)
        return ObjectiveOutput(loss, grad, target_dist, weight)

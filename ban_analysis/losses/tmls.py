"""``tmls``: teacher-matched label smoothing, a control of this toolkit (not in Furlanello et
al. 2018; it keeps the confidence weighting of their eq. 8 and drops the dark knowledge).

The one-hot label smoothed per sample by eps_s = 1 - p_{y,s}, spread uniformly over the other
C - 1 classes. It keeps the teacher's probability at the label (hence eq. 8's confidence
weighting of the label term) and drops all structure of the non-target mass:

    r_s = p_{y,s} on y_s,  (1 - p_{y,s}) / (C - 1) on every other class   (p = softmax(t))
    L = (1/B) sum_s H(r_s, q_s)                   dL/dz_s = (q_s - r_s) / B
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Objective, ObjectiveOutput, register_objective
from .functional import soft_target_cross_entropy


def teacher_matched_smoothing(teacher_logits: Tensor, target: Tensor) -> Tensor:
    """Smoothed one-hot target with the teacher's probability at the label.

    Args:
        teacher_logits: (B, C).
        target: (B,) int64.

    Returns:
        (B, C) target rows summing to 1.
    """
    B, C = teacher_logits.shape
    col = target.unsqueeze(1)  # (B, 1)
    # One fused softmax kernel; torch.logsumexp on CPU expands into ~10 kernels.
    p_label = torch.softmax(teacher_logits, dim=1).gather(1, col)  # (B, 1)
    smoothed = (1.0 - p_label).div_(C - 1).expand(B, C).contiguous()  # (B, C)
    return smoothed.scatter_(1, col, p_label)


@register_objective("tmls")
class TeacherMatchedLabelSmoothing(Objective):
    """Label smoothing with per-sample eps = 1 - teacher prob at the label; no hyperparameters."""

    def __init__(self) -> None:
        super().__init__()

    def compute(self, student_logits: Tensor, teacher_logits: Tensor | None, target: Tensor,
                generator: torch.Generator | None) -> ObjectiveOutput:
        B = student_logits.shape[0]
        target_dist = teacher_matched_smoothing(teacher_logits, target)  # (B, C)
        weight = student_logits.new_full((B,), 1.0 / B)  # (B,)
        loss, grad = soft_target_cross_entropy(student_logits, target_dist, 1.0 / B)
        return ObjectiveOutput(loss, grad, target_dist, weight)

"""``cwtc``: confidence weighted by the teacher's prob. of the true label, Tang et al. 2020.

Source: Tang et al., "Understanding and improving knowledge distillation" (arXiv 2002.03532),
who argue that the sample re-weighting KD performs goes by the teacher's probability of the
*true* label, not by its maximum (``cwtm``, Furlanello et al. 2018, eq. 10). Label
cross-entropy in which each sample is weighted by that probability; the weights carry no
gradient:

    w_s = p_{y_s,s} / sum_u p_{y_u,u}            (p = softmax(teacher_logits), sum_s w_s = 1)
    L = sum_s w_s CE(z_s, y_s)                    dL/dz_s = w_s (q_s - onehot(y_s))

Convention as in ``cwtm``: the weights sum to 1 over the batch, so a teacher that gives every
sample the same probability at its label (e.g. a uniform teacher) makes ``cwtc`` equal ``ce``
exactly. Per sample, ``cwtc`` and ``cwtm`` have the same numerator where the teacher's argmax is
the label (p_label = p_max) and differ where the teacher is wrong: ``cwtm`` still gives a
confidently wrong teacher's sample a large weight, ``cwtc`` a small one. In the decomposition
of KD of RESEARCH.md section 8, CWTC isolates the confidence re-weighting (TMLS the label
smoothing, BAN - DKPP the class relationships).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Objective, ObjectiveOutput, register_objective
from .functional import soft_target_cross_entropy


def teacher_label_weights(teacher_logits: Tensor, target: Tensor) -> Tensor:
    """CWTC sample weights ``p_{y_s,s} / sum_u p_{y_u,u}``.

    Computed as a softmax over the batch of ``log p_{y_s,s}`` (the same numbers, since
    ``exp(log p_s) / sum_u exp(log p_u) = p_s / sum_u p_u``), so that a batch in which the teacher
    gives every label a probability that underflows (a float32 p below ~1e-38 for each sample)
    still gets finite weights in the right ratios instead of 0 / 0.

    Args:
        teacher_logits: (B, C).
        target: (B,) int64.

    Returns:
        (B,) weights summing to 1, no gradient. A sample whose label probability is negligible
        next to the others' (below ~1e-38 of the largest in float32) gets weight exactly 0.
    """
    # One fused log_softmax kernel; torch.logsumexp on CPU expands into ~10 kernels.
    log_p_label = torch.log_softmax(teacher_logits.detach(), dim=1).gather(1, target.unsqueeze(1))  # (B, 1)
    return torch.softmax(log_p_label.squeeze(1), dim=0)


@register_objective("cwtc")
class ConfidenceWeightedByTeacherCorrect(Objective):
    """CWTC (Tang et al. 2020): label CE weighted per sample by the teacher's prob. of the label.

    Weights sum to 1 over the batch, as in ``cwtm`` (no 1/b factor). No hyperparameters.
    """

    def __init__(self) -> None:
        super().__init__()

    def compute(self, student_logits: Tensor, teacher_logits: Tensor | None, target: Tensor,
                generator: torch.Generator | None) -> ObjectiveOutput:
        B, C = student_logits.shape
        weight = teacher_label_weights(teacher_logits, target)  # (B,)
        target_dist = student_logits.new_zeros(B, C).scatter_(1, target.unsqueeze(1), 1.0)  # (B, C)
        loss, grad = soft_target_cross_entropy(student_logits, target_dist, weight)
        return ObjectiveOutput(loss, grad, target_dist, weight)

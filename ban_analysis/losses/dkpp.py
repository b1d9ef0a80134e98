"""``dkpp``: Dark Knowledge with Permuted Predictions, Furlanello et al. 2018, eq. 11.

Soft-target cross-entropy to the teacher's distribution with its argmax entry kept in place
and the other C - 1 entries permuted uniformly at random among the other classes,
independently for every sample and every call. No labels are used. The permutation keeps the
teacher's confidence, its non-target mass and that mass's entropy, but destroys which classes
the teacher found similar.

    p = softmax(t), r_s = p_s with entries off argmax_j p_js permuted by a fresh random pi_s
    L = (1/B) sum_s H(r_s, q_s)                   dL/dz_s = (q_s - r_s) / B

Ablation ``anchor="label"``: the teacher's max value is put at the label coordinate and the
remaining C - 1 values (including, when the teacher is wrong, its value at the label) are
permuted uniformly over the other classes.

Randomness comes only from the ``generator`` passed to the call; ``generator=None`` is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Objective, ObjectiveOutput, register_objective
from .functional import soft_target_cross_entropy

ANCHORS = ("argmax", "label")


def permute_dark_knowledge(
    teacher_probs: Tensor,
    anchor: Tensor,
    destination: Tensor,
    generator: torch.Generator,
) -> Tensor:
    """Move each row's anchor value to ``destination`` and permute the rest uniformly.

    Vectorised: one (B, C) random draw and one row-wise argsort, no loop over samples.
    Random keys with the destination's key forced below all others sort to an order whose
    first column is the destination and whose other C - 1 columns are a uniformly random
    ordering of the remaining columns (i.i.d. keys make every ordering equally likely as long
    as keys do not tie; with 62-bit integer keys a tie has probability < C^2 2^-63 per row.
    Integer keys also sort ~25% faster than float64 keys here). The source values are listed in
    a fixed order (anchor first, then the other columns by index) and written to those
    destinations, so every bijection of the C - 1 non-anchor values onto the C - 1
    non-destination classes is equally likely, independently per row.

    Args:
        teacher_probs: (B, C) rows to permute.
        anchor: (B,) int64 column whose value is kept (the teacher argmax).
        destination: (B,) int64 column that receives the anchor value (``anchor`` itself,
            or the label for ``anchor="label"``).
        generator: torch.Generator on ``teacher_probs``' device.

    Returns:
        (B, C) permuted rows; each row is a rearrangement of the input row (same values).
    """
    B, C = teacher_probs.shape
    device = teacher_probs.device
    keys = torch.randint(1, 2**62, (B, C), generator=generator, device=device)  # (B, C) int64
    keys.scatter_(1, destination.unsqueeze(1), 0)
    dest_order = keys.argsort(dim=1)  # (B, C); dest_order[:, 0] == destination
    cols = torch.arange(C - 1, device=device)  # (C-1,)
    others = cols + (cols >= anchor.unsqueeze(1))  # (B, C-1): columns != anchor, increasing
    src_order = torch.cat([anchor.unsqueeze(1), others], dim=1)  # (B, C)
    return torch.empty_like(teacher_probs).scatter_(1, dest_order, teacher_probs.gather(1, src_order))


@register_objective("dkpp")
class DarkKnowledgePermutedPredictions(Objective):
    """DKPP (paper eq. 11): CE to the teacher distribution with non-argmax entries permuted.

    Args:
        anchor: "argmax" (paper: the teacher's max stays at its argmax) or "label" (ablation:
            the teacher's max goes to the label, the rest are permuted over the other classes).
    """

    needs_generator = True

    def __init__(self, anchor: str = "argmax") -> None:
        if anchor not in ANCHORS:
            raise ValueError(f"dkpp anchor must be one of {', '.join(ANCHORS)}; got {anchor!r}")
        super().__init__(anchor=anchor)
        self.anchor = anchor

    def compute(self, student_logits: Tensor, teacher_logits: Tensor | None, target: Tensor,
                generator: torch.Generator | None) -> ObjectiveOutput:
        B = student_logits.shape[0]
        p = torch.softmax(teacher_logits, dim=1)  # (B, C)
        # torch.argmax returns the first maximal index on ties; any fixed choice is valid since
        # tied values are equal, and the rule is documented for reproducibility.
        argmax = p.argmax(dim=1)  # (B,)
        destination = argmax if self.anchor == "argmax" else target
        target_dist = permute_dark_knowledge(p, argmax, destination, generator)  # (B, C)
        weight = student_logits.new_full((B,), 1.0 / B)  # (B,)
        loss, grad = soft_target_cross_entropy(student_logits, target_dist, 1.0 / B)
        return ObjectiveOutput(loss, grad, target_dist, weight)

"""The per-sample gradient vectors of each term, for a few rows, for researchers' own analysis.

The hooks log statistics (norms, cosines, shares); this returns the vectors themselves. The
convention is the toolkit's one convention (``param_grads`` module docstring): the per-sample
gradient of sample s is d/dtheta <B * logit_grad_s, z_s(theta)>, which for a mean of per-sample
losses is exactly d loss_s / d theta; its target part uses only the anchor coordinate of the
logit-gradient row, its dark part the others, and target + dark = the per-sample gradient. With
training-mode BatchNorm the VJP includes every path through the batch statistics (like
``param_split`` mode "exact"). Batch-level quantities (``update_share``) are the gradients of the
batch-mean loss, i.e. the mean of these vectors over the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ban_analysis.instrument.decompose import split_logit_grad

__all__ = ["per_sample_term_grads"]


def per_sample_term_grads(model: nn.Module, student_logits: Tensor, logit_grad: Tensor, anchor: Tensor,
                          rows: Tensor | list[int]) -> dict[str, dict[str, Tensor]]:
    """Per-sample gradient vectors of the target and dark terms for ``rows``.

    Args:
        model: the model that produced ``student_logits`` (its trainable parameters are used).
        student_logits: (B, C) with the autograd graph to the parameters (retained).
        logit_grad: (B, C) d loss / d logits of the batch-mean loss (``out.logit_grad``).
        anchor: (B,) int64 coordinate of the target term (the labels, or the teacher's argmax).
        rows: batch positions to return (a few: each costs two backward passes).

    Returns:
        ``{"target": {param_name: (n, *param.shape)}, "dark": {...}}``; parameters the logits do
        not depend on get zeros.
    """
    rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    B = student_logits.shape[0]
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= B):
        raise ValueError(f"rows must be batch positions in [0, {B}), got {rows.tolist()}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    target_part, dark_part = split_logit_grad(logit_grad.detach() * B, anchor)  # per-sample scale
    out = {"target": {n: [] for n in names}, "dark": {n: [] for n in names}}
    for s in rows.tolist():
        for term, part in (("target", target_part), ("dark", dark_part)):
            cot = torch.zeros_like(student_logits)
            cot[s] = part[s].to(cot.dtype)
            grads = torch.autograd.grad(student_logits, params, grad_outputs=cot, retain_graph=True,
                                        allow_unused=True)
            for n, p, g in zip(names, params, grads):
                out[term][n].append(torch.zeros_like(p) if g is None else g.detach())
    return {term: {n: (torch.stack(v) if v else params[names.index(n)].new_zeros(0, *params[names.index(n)].shape))
                   for n, v in cols.items()} for term, cols in out.items()}

"""Which term moved the weights: ``update_share``'s statistics from the two term gradients.

Split from ``param_grads.py`` (which re-exports these names): :func:`term_dots` is what a step
needs of its gradients, :func:`update_share_columns` the columns of many steps from their dots
(a deferred ``update_share`` computes them at ``flush``), :func:`update_share_stats` both for one step.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["term_dots", "update_share_columns", "update_share_stats"]


def update_share_stats(
    term_grads: dict[str, list[Tensor]], groups: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """Which term moved the weights: norms, cosine and shares, in total and per group.

    With G = G_target + G_dark, ``share_x = <G_x, G> / |G|^2`` so the two shares sum to 1
    (a share can be negative or above 1 when the terms oppose each other).

    Args:
        term_grads: ``{"target": [...], "dark": [...]}`` from :func:`term_batch_grads`.
        groups: one group name per parameter (see :func:`layer_groups`); None = total only.

    Returns:
        0-d float64 tensors: ``target_norm, dark_norm, grad_norm, cos_target_dark,
        share_target, share_dark`` for all parameters, and ``<group>.<same>`` per group.
    """
    gt, gd = term_grads["target"], term_grads["dark"]
    if len(gt) != len(gd) or (groups is not None and len(groups) != len(gt)):
        raise ValueError("term_grads lists and groups must have one entry per parameter")
    cols = update_share_columns(term_dots(gt, gd).unsqueeze(0), groups)
    return {name: col[0] for name, col in cols.items()}  # 0-d views


_SHARE_NAMES = ("target_norm", "dark_norm", "grad_norm", "cos_target_dark", "share_target", "share_dark")


def term_dots(gt: Sequence[Tensor], gd: Sequence[Tensor]) -> Tensor:
    """(P, 3) float32: <T,T>, <D,D>, <T,D> of each parameter's two term gradients, in one stack (what
    :func:`update_share_columns` needs of a step; a deferred ``update_share`` keeps only this)."""
    # (one view per tensor, reused by its three dots: 30 calls instead of 54)
    ts, ds = [t.reshape(-1) for t in gt], [d.reshape(-1) for d in gd]
    return torch.stack([torch.dot(a, b) for t, d in zip(ts, ds) for a, b in ((t, t), (d, d), (t, d))]).view(-1, 3)


def update_share_columns(dots: Tensor, groups: Sequence[str] | None = None) -> dict[str, Tensor]:
    """:func:`update_share_stats`'s columns of S steps from their (S, P, 3) :func:`term_dots`: (S,) float64.

    The dots are converted to float64 exactly once; everything else follows from them. The sums per
    set (all parameters, then each group) and the statistics are float64 arithmetic on Python floats
    (IEEE double, as a float64 tensor's), which saves ~40 small tensor ops a step: inside a training
    step each costs ~10 us on this CPU (benchmarks/README.md, "Hook overhead on the MLP").
    """
    sets = {"": range(dots.shape[1])}
    if groups is not None:
        for i, g in enumerate(groups):
            sets.setdefault(g + ".", []).append(i)
    rows = []
    for flat in dots.double().reshape(dots.shape[0], -1).tolist():
        values = []
        for idx in sets.values():
            tt = dd = td = 0.0
            for i in idx:  # in parameter order (a tensor's sum may add in another order: a last-bit change)
                tt, dd, td = tt + flat[3 * i], dd + flat[3 * i + 1], td + flat[3 * i + 2]
            gg = tt + dd + 2 * td
            values += [math.sqrt(tt), math.sqrt(dd), math.sqrt(max(gg, 0.0)), _div(td, math.sqrt(tt * dd)),
                       _div(tt + td, gg), _div(dd + td, gg)]
        rows.append(values)
    cells = torch.tensor(rows, dtype=torch.float64, device=dots.device).reshape(dots.shape[0], -1).unbind(1)
    return {prefix + name: cells[i * len(_SHARE_NAMES) + j]
            for i, prefix in enumerate(sets) for j, name in enumerate(_SHARE_NAMES)}


def _div(a: float, b: float) -> float:
    """a / b with IEEE semantics, as tensors divide: +-inf for a nonzero over 0, NaN for 0 / 0."""
    if b == 0.0:
        return math.nan if a == 0.0 or math.isnan(a) else math.copysign(math.inf, a) * math.copysign(1.0, b)
    return a / b

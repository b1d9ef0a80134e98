"""Parameter-level gradient split: batch VJPs per term, update shares, per-sample gradients.

Everything here is generic: a function takes the student logits (with their autograd graph),
the parameters, and one cotangent per term (dict ``{"target": (B, C), "dark": (B, C)}``), and
never touches ``.grad``, BatchNorm statistics or any random stream. The hooks in
``ban_analysis.instrument.hooks`` build the cotangents from an objective's ``logit_grad``.

Scaling convention (shared with ``decompose.per_sample_stats``): a per-sample cotangent is row s
of ``out.logit_grad`` times B, i.e. the batch-mean factor removed, so "the gradient of sample s"
means d/dtheta <g_s, z_s(theta)> with g_s fixed. For an objective that is a mean of per-sample
losses this is exactly d loss_s / d theta (target + dark = the per-sample loss gradient).

Per-sample statistics, for the selected samples (``rows``, positions in the batch):
``param_target_norm, param_dark_norm, param_cos`` (target vs dark of the same sample) and
``target_cos_batch, dark_cos_batch`` (each term's cosine with the batch gradient
G = G_target + G_dark of the same parameters). Three ways to get them:

* :func:`contribution_stats` -- each sample's contribution to a term's batch gradient, from one
  backward pass per term plus captured activations (Linear, Conv2d, BatchNorm, LayerNorm,
  GroupNorm). Exact for any model; with training-mode BatchNorm the contributions sum to the
  batch gradient but a contribution is not d loss_s / d theta (other samples' losses reach
  sample s through the batch statistics).
* :func:`exact_stats` -- d loss_s / d theta with BatchNorm coupling, batched VJPs.
* :func:`vmap_stats` -- torch.func vmap over per-sample VJPs; no coupling allowed.
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from ban_analysis.instrument.capture import capture_activations
from ban_analysis.instrument.contrib import (
    DotAccumulator,
    captured_outputs,
    contribution_pieces,
    contribution_stats,
    coverage,
    covered_modules,
    output_grads,
)
from ban_analysis.instrument.fused import FusedContribution, linear_columns
from ban_analysis.instrument.shares import term_dots, update_share_columns, update_share_stats

logger = logging.getLogger(__name__)

__all__ = [
    "TERMS",
    "DotAccumulator",
    "FusedContribution",
    "linear_columns",
    "captured_outputs",
    "term_batch_grads",
    "layer_groups",
    "update_share_stats",
    "update_share_columns",
    "term_dots",
    "head_stats",
    "head_norm_stats",
    "contribution_stats",
    "contribution_pieces",
    "exact_stats",
    "vmap_stats",
    "capture_activations",
    "covered_modules",
    "coverage",
    "output_grads",
    "coupling_modules",
]

TERMS = ("target", "dark")


def _check_cotangents(student_logits: Tensor, cotangents: dict[str, Tensor]) -> None:
    if set(cotangents) != set(TERMS):
        raise ValueError(f"cotangents must have keys {list(TERMS)}, got {sorted(cotangents)}")
    for term, cot in cotangents.items():
        if cot.shape != student_logits.shape:
            raise ValueError(
                f"cotangent {term!r} shape {tuple(cot.shape)} != student_logits shape "
                f"{tuple(student_logits.shape)}"
            )


def term_batch_grads(
    student_logits: Tensor, params: Sequence[Tensor], cotangents: dict[str, Tensor],
    batched: bool = False,
) -> dict[str, list[Tensor]]:
    """Batch gradient of each term: one vector-Jacobian product per term.

    Args:
        student_logits: (B, C) with autograd graph to ``params``; the graph is retained so the
            caller's own backward still works.
        params: parameters to differentiate (any that the logits do not depend on get zeros).
        cotangents: term name -> (B, C) cotangent (e.g. the term's part of ``out.logit_grad``).
        batched: one vmapped backward for all terms (``is_grads_batched``) instead of a loop;
            measured slower on CPU (benchmarks/README.md), possibly faster on a GPU.

    Returns:
        term name -> list of gradients shaped like ``params`` (``.grad`` is never touched).
    """
    params = list(params)
    if batched:
        terms = list(cotangents)
        stacked = torch.stack([cotangents[t] for t in terms]).to(student_logits.dtype)  # (T, B, C)
        g = torch.autograd.grad(student_logits, params, grad_outputs=stacked, retain_graph=True,
                                allow_unused=True, is_grads_batched=True)
        g = [torch.zeros(len(terms), *p.shape, dtype=p.dtype, device=p.device) if x is None else x
             for p, x in zip(params, g)]
        return {t: [x[i] for x in g] for i, t in enumerate(terms)}
    grads = {}
    for term, cot in cotangents.items():
        g = torch.autograd.grad(
            student_logits, params, grad_outputs=cot.to(student_logits.dtype),
            retain_graph=True, allow_unused=True,
        )
        grads[term] = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)]
    return grads


def layer_groups(param_names: Iterable[str], depth: int = 1) -> list[str]:
    """Group name of each parameter: the first ``depth`` components of its module path.

    ``"layer1.0.conv1.weight"`` -> ``"layer1"`` at depth 1, ``"layer1.0"`` at depth 2; a
    parameter held by the root module is its own group.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"group depth must be an int >= 1, got {depth!r}")
    groups = []
    for name in param_names:
        parts = name.split(".")
        module = parts[:-1] or parts
        groups.append(".".join(module[:depth]))
    return groups


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _vdot(a: Tensor, b: Tensor) -> Tensor:
    return _dot(a, b).double()


def head_stats(
    features: Tensor, cotangents: dict[str, Tensor], rows: Tensor | None = None,
    include_bias: bool = True,
) -> dict[str, Tensor]:
    """Per-sample head-gradient split in closed form.

    The final linear layer's per-sample weight gradient of a term is the outer product
    ``cot_s f_s^T`` (plus bias gradient ``cot_s``), so its norm is
    ``|cot_s| * sqrt(|f_s|^2 + 1)`` and the dot product of two terms is
    ``<cotT_s, cotD_s> (|f_s|^2 + 1)`` (``+ 1`` only with the bias). For the split at the
    label the two logit parts have disjoint support, so ``head_cos`` is 0 up to rounding: it
    is a check, the information is in the norms.

    Args:
        features: (B, D) the head's input (penultimate features).
        cotangents: ``{"target": (B, C), "dark": (B, C)}`` per-sample logit cotangents.
        rows: (n,) batch positions to report; None = all.
        include_bias: count the bias gradient in the norms.

    Returns:
        ``head_target_norm, head_dark_norm, head_cos, feature_norm``, each (n,).
    """
    if features.ndim != 2:
        raise ValueError(f"head input must be (B, D), got shape {tuple(features.shape)}")
    f, ct, cd = features.detach(), cotangents["target"], cotangents["dark"]
    if rows is not None:
        f, ct, cd = f[rows], ct[rows], cd[rows]
    dtype = torch.promote_types(f.dtype, ct.dtype)
    f, ct, cd = f.to(dtype), ct.to(dtype), cd.to(dtype)
    return head_norm_stats((f * f).sum(1), f.norm(dim=1), {"target": ct, "dark": cd}, include_bias)


def head_norm_stats(feature_sq: Tensor, feature_norm: Tensor, cotangents: dict[str, Tensor],
                    include_bias: bool = True) -> dict[str, Tensor]:
    """:func:`head_stats` from the rows' features reduced to ``(f * f).sum(1)`` and ``f.norm(dim=1)``
    (both (n,), in the dtype the cotangents are promoted to): a deferred ``head_split`` keeps these
    two numbers per row instead of the (B, D) head input."""
    ct, cd = cotangents["target"], cotangents["dark"]
    ff = feature_sq + (1.0 if include_bias else 0.0)  # (n,)
    tt, dd, td = (ct * ct).sum(1) * ff, (cd * cd).sum(1) * ff, (ct * cd).sum(1) * ff
    return {
        "head_target_norm": tt.sqrt(),
        "head_dark_norm": dd.sqrt(),
        "head_cos": td / (tt * dd).sqrt(),
        "feature_norm": feature_norm,
    }


def _rows_or_all(rows: Tensor | None, batch: int, device) -> Tensor:
    if rows is None:
        return torch.arange(batch, device=device)
    rows = torch.as_tensor(rows, device=device).long().reshape(-1)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= batch):
        raise ValueError(f"rows must be batch positions in [0, {batch}), got {rows.tolist()}")
    return rows


def exact_stats(
    student_logits: Tensor, params: dict[str, Tensor], cotangents: dict[str, Tensor],
    rows: Tensor | None = None, chunk_size: int = 16, batched: bool = True,
    batch_grad: Sequence[Tensor] | None = None,
) -> dict[str, Tensor]:
    """Per-sample d loss_s / d theta of each term, BatchNorm coupling included.

    For each selected sample s and term x, the cotangent is zero except row s (= the term's
    row s); a batched VJP (``is_grads_batched=True``) through the training graph gives the
    gradient of the linearised loss ``<g_s, z_s>`` with every path through the batch
    statistics. Costs about one backward pass per sample and term; ``chunk_size`` samples
    (2 * chunk_size VJPs) are done per call to bound memory at 2 * chunk_size * P floats.

    Args:
        student_logits: (B, C) with graph; retained.
        params: name -> parameter (the set the statistics are over).
        cotangents: ``{"target": (B, C), "dark": (B, C)}``.
        rows: (n,) batch positions; None = all.
        chunk_size: samples per batched VJP.
        batched: False = a plain loop of VJPs (same result; for ops without batching rules).
        batch_grad: G over ``params`` if already computed (e.g. by update_share); else one VJP.

    Returns:
        the five per-sample columns, each (n,).
    """
    _check_cotangents(student_logits, cotangents)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    plist = list(params.values())
    B, _ = student_logits.shape
    rows = _rows_or_all(rows, B, student_logits.device)
    ct, cd = (cotangents[t].to(student_logits.dtype) for t in TERMS)
    if batch_grad is None:
        batch_grad = term_batch_grads(student_logits, plist, {"all": ct + cd})["all"]
    acc = DotAccumulator(rows.numel(), student_logits.device)
    acc.add_batch_norm2(sum(_vdot(g, g) for g in batch_grad))
    for start in range(0, rows.numel(), chunk_size):
        r = rows[start:start + chunk_size]
        k = r.numel()
        cots = student_logits.new_zeros(2 * k, *student_logits.shape)  # (2k, B, C)
        ar = torch.arange(k, device=r.device)
        cots[ar, r] = ct[r]
        cots[k + ar, r] = cd[r]
        if batched:
            grads = torch.autograd.grad(
                student_logits, plist, grad_outputs=cots, retain_graph=True,
                allow_unused=True, is_grads_batched=True,
            )
        else:
            per = [torch.autograd.grad(student_logits, plist, grad_outputs=c, retain_graph=True,
                                       allow_unused=True) for c in cots]
            grads = [None if per[0][j] is None else torch.stack([p[j] for p in per])
                     for j in range(len(plist))]
        for p, g, gb in zip(plist, grads, batch_grad):
            if g is None:
                continue
            g = g.reshape(2 * k, -1)
            acc.add(g[:k], g[k:], gb.reshape(-1), start)
    return acc.columns(student_logits.dtype)


def coupling_modules(model: nn.Module) -> list[str]:
    """Names of modules that make one sample's output depend on others or on a random draw.

    Training-mode BatchNorm (or BatchNorm without running statistics) couples the samples of
    a batch; active dropout draws a fresh mask per forward, so a per-sample re-forward would
    not be the function the batch saw.
    """
    names = []
    for name, m in model.named_modules():
        bn = isinstance(m, nn.modules.batchnorm._BatchNorm)
        if bn and (m.training or not m.track_running_stats):
            names.append(name)
        elif isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            names.append(name)
    return names


def vmap_stats(
    model: nn.Module, inputs: Tensor, cotangents: dict[str, Tensor],
    batch_grad: dict[str, Tensor], rows: Tensor | None = None, chunk_size: int = 32,
    eval_mode: bool = False,
) -> dict[str, Tensor]:
    """Per-sample gradients with ``torch.func``: vmap over one sample's forward and two VJPs.

    Each sample's loss is the linearised ``<stopgrad(g_s), f(theta, x_s)>``, whose gradient is
    the per-sample term gradient. The per-sample forward must equal the batch forward, so
    training-mode BatchNorm and active dropout raise ValueError, unless ``eval_mode=True``:
    then the model runs in eval mode for this call only (flags restored; BN uses running
    statistics, dropout is off) and the caller must record that the numbers are eval-mode.

    Args:
        model: the student; parameters and buffers are read, never written.
        inputs: (B, ...) the batch the logits came from.
        cotangents: ``{"target": (B, C), "dark": (B, C)}``.
        batch_grad: parameter name -> G (batch gradient of the objective); its keys select
            which parameters the statistics are over.
        rows: (n,) batch positions; None = all.
        chunk_size: samples per vmap call (memory: 2 * chunk_size * P floats).
        eval_mode: allow coupled/random models by evaluating them in eval mode.

    Returns:
        the five per-sample columns, each (n,).
    """
    from torch.func import functional_call, vjp, vmap

    coupled = coupling_modules(model)
    if coupled and not eval_mode:
        raise ValueError(
            f"vmap mode needs a model without training-mode BatchNorm or dropout, found "
            f"{coupled[:4]}; use mode 'exact' or 'contribution', or eval_mode = true"
        )
    named = dict(model.named_parameters())
    unknown = sorted(set(batch_grad) - set(named))
    if unknown:
        raise ValueError(f"batch_grad names unknown parameters {unknown[:4]}")
    rows = _rows_or_all(rows, inputs.shape[0], inputs.device)
    sel = {k: named[k].detach() for k in batch_grad}
    frozen = {k: v.detach() for k, v in named.items() if k not in sel}
    frozen.update({k: v for k, v in model.named_buffers()})

    def one_sample(p, x, c_t, c_d):
        def fwd(p_):
            return functional_call(model, {**p_, **frozen}, (x.unsqueeze(0),)).squeeze(0)
        z, pullback = vjp(fwd, p)
        return pullback(c_t.to(z.dtype))[0], pullback(c_d.to(z.dtype))[0]

    batched = vmap(one_sample, in_dims=(None, 0, 0, 0))
    acc = DotAccumulator(rows.numel(), inputs.device)
    acc.add_batch_norm2(sum(_vdot(g, g) for g in batch_grad.values()))
    flags = {m: m.training for m in model.modules()}
    try:
        if eval_mode:
            model.eval()
        for start in range(0, rows.numel(), chunk_size):
            r = rows[start:start + chunk_size]
            gt, gd = batched(sel, inputs[r], cotangents["target"][r], cotangents["dark"][r])
            for k, gb in batch_grad.items():
                acc.add(gt[k].reshape(r.numel(), -1), gd[k].reshape(r.numel(), -1),
                        gb.reshape(-1), start)
    finally:
        for m, flag in flags.items():
            m.training = flag
    return acc.columns(inputs.dtype if inputs.is_floating_point() else torch.float32)

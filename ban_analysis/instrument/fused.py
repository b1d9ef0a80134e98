"""Contribution statistics that reuse the trainer's backward (``param_split``, fused).

Split from ``contrib.py`` (the per-sample contribution arithmetic it calls).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ban_analysis.instrument.contrib import (DotAccumulator, captured_outputs, contribution_stats, linear_dots,
                                             linear_g_a, output_grads)

__all__ = ["FusedContribution", "linear_columns"]


class FusedContribution:
    """Contribution statistics that reuse the trainer's own backward pass.

    At construction (after the forward, before the trainer's backward): one output-only
    backward pass for the target term, and tensor hooks on the captured outputs that record
    the total output gradients when the trainer runs ``out.loss.backward()`` (they return
    None, so the gradients pass on unchanged). :meth:`finish` (after that backward) gets the
    dark term by linearity, dark = B * total - target, and G from the layers' ``.grad``:
    one extra backward pass in all instead of two plus the rebuilt weight gradients.

    Args: as :func:`contribution_stats`; the cotangents are B times the objective's parts,
        whose sum B * out.logit_grad is what the trainer backpropagates (times B).
        ``target_grads``: the target cotangent's gradients at :func:`captured_outputs`, if a
        backward already gave them (then no backward is run here).
    """

    def __init__(self, student_logits: Tensor, model: nn.Module, captured: dict,
                 cotangents: dict[str, Tensor], rows: Tensor | None = None,
                 named_modules: dict[str, nn.Module] | None = None, info: dict | None = None,
                 target_grads: list[Tensor] | None = None) -> None:
        self.args = (student_logits, model, captured, rows)
        self.named_modules, self.info = named_modules, info
        if target_grads is None:
            self.names, grads = output_grads(student_logits, model, captured, cotangents, None, ("target",),
                                             named_modules=named_modules)
            target_grads = grads["target"]
        else:  # the target term's output gradients, from a backward another hook ran (update_share's)
            self.names, _ = captured_outputs(model, captured, None, named_modules)
        self.target = dict(zip(self.names, target_grads))
        self.total: dict[str, Tensor] = {}

        def catch(name):
            def hook(grad):
                self.total[name] = grad
            return hook

        self.handles = [captured[n][1].register_hook(catch(n)) for n in self.names]

    def cancel(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def finish(self) -> tuple[dict[str, Tensor], dict[str, object]]:
        """The five columns and coverage info, once the trainer's backward has run."""
        self.cancel()
        student_logits, model, captured, rows = self.args
        missing = [n for n in self.names if n not in self.total]
        if len(missing) == len(self.names):
            raise ValueError("no gradient reached the captured layers: call after_backward after "
                             "out.loss.backward()")
        mods = dict(model.named_modules()) if self.named_modules is None else self.named_modules
        B = student_logits.shape[0]
        dark = {n: (self.total[n] * B).to(t.dtype) - t if n in self.total else -t
                for n, t in self.target.items()}

        def grad_of(p):
            if not isinstance(p, Tensor) or not p.requires_grad:
                return None
            return torch.zeros_like(p) if p.grad is None else p.grad

        layer_grads = {n: (grad_of(getattr(mods[n], "weight", None)), grad_of(getattr(mods[n], "bias", None)))
                       for n in self.names}
        return contribution_stats(student_logits, model, captured, {}, rows,
                                  deltas={"target": self.target, "dark": dark}, layer_grads=layer_grads,
                                  named_modules=mods, info=self.info)

    def linear_rows(self) -> dict | None:
        """The step's share of a deferred ``param_split`` when every covered module is a ``nn.Linear`` on
        (B, in) float32/64 inputs with a weight gradient, else None (then :meth:`finish` at the step).

        Per layer the reported rows' input, target and dark output gradients and G_w a_s + g_b, and
        |G|^2 (0-d float64): the small tensors ``contrib.linear_dots`` makes the five columns of, for
        many steps in one pass at the epoch's flush. The values are those :meth:`finish` gives: the same
        element-wise arithmetic on the same rows, summed the same way.
        """
        self.cancel()
        student_logits, model, captured, rows = self.args
        mods = dict(model.named_modules()) if self.named_modules is None else self.named_modules
        B = student_logits.shape[0]
        rows = torch.arange(B, device=student_logits.device) if rows is None else torch.as_tensor(rows).long()
        layers, squares = [], []
        for n in self.names:
            m, a, t = mods[n], captured[n][0], self.target[n]
            w, b = m.weight, m.bias
            if (not isinstance(m, nn.Linear) or a.ndim != 2 or n not in self.total or a.dtype != t.dtype
                    or t.dtype not in (torch.float32, torch.float64) or not w.requires_grad or w.grad is None
                    or (b is not None and b.requires_grad and b.grad is None)):
                return None
            gb = b.grad if b is not None and b.requires_grad else None
            a, dt = a[rows], t[rows]
            dd = (self.total[n][rows] * B).to(t.dtype) - dt  # as finish's dark, on the reported rows
            layers.append((a, dt, dd, linear_g_a(a, w.grad, gb), gb is not None))
            squares += [g.reshape(-1) for g in (w.grad, gb) if g is not None]
        gg = torch.stack([torch.dot(g, g) for g in squares]).double().sum()
        return {"layers": layers, "gg": gg}


def linear_columns(kept: list[dict]) -> list[dict[str, Tensor]]:
    """The five columns of each step of :meth:`FusedContribution.linear_rows`, in order: the steps whose
    pieces have the same shapes (a short last batch has fewer rows) stacked and computed in one pass,
    (5, S, n) float64 dots summed over the layers as ``contribution_stats`` sums them."""
    groups: dict = {}
    for pos, k in enumerate(kept):
        groups.setdefault(tuple(t.shape for layer in k["layers"] for t in layer[:4]), []).append(pos)
    out: list = [None] * len(kept)
    for positions in groups.values():
        steps = [kept[p] for p in positions]
        layers = range(len(steps[0]["layers"]))
        dots = torch.stack([linear_dots(*(torch.stack([k["layers"][i][j] for k in steps]) for j in range(4)),
                                        steps[0]["layers"][i][4]) for i in layers]).double().sum(0)
        gg = torch.stack([k["gg"] for k in steps]).unsqueeze(1)
        cols = DotAccumulator.columns_of(dots, gg, steps[0]["layers"][0][1].dtype)
        for s, p in enumerate(positions):
            out[p] = {c: v[s] for c, v in cols.items()}
    return out

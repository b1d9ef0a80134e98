"""Per-sample contributions to a term's batch gradient from captured activations.

Internal module of ``ban_analysis.instrument.param_grads`` (kept apart to keep files short). For a layer
with input a and output-gradient delta (from one backward pass of the term's cotangent), the
batch weight gradient is a sum over samples of per-sample pieces, as in BackPACK and Opacus:

* Linear:   dW = sum_s delta_s a_s^T  (sequence inputs: sum over positions too)
* Conv2d:   dW = sum_s delta_s unfold(a_s)^T
* BatchNorm / LayerNorm / GroupNorm affine: dgamma = sum_s sum_pos delta_s * xhat_s,
  dbeta = sum_s sum_pos delta_s (xhat from the batch or running statistics the forward used)

The pieces sum exactly to the batch gradient for any model. Where samples do not interact
they equal the per-sample gradients; with training-mode BatchNorm delta_s already contains
the other samples' pull through the batch statistics (a contribution, not d loss_s/dtheta).
Norms and dot products of 2-D Linear layers use the closed forms ``|a|^2 |delta|^2`` and
``(G a) . delta``; sequence Linear layers take the cheaper of a Gram form and
materialising; Conv2d pieces are materialised one layer and one row chunk at a time, so the
whole per-sample gradient never exists at once.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
SUPPORTED = (nn.Linear, nn.Conv2d) + _NORMS


class DotAccumulator:
    """Running per-sample dot products over parameter blocks, in float64.

    Keeps, per sample s: <T_s,T_s>, <D_s,D_s>, <T_s,D_s>, <T_s,G>, <D_s,G>, and |G|^2 once.
    """

    def __init__(self, n: int, device) -> None:
        self.dots = torch.zeros(5, n, dtype=torch.float64, device=device)  # (5, n)
        self.gg = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, gt: Tensor, gd: Tensor, gb: Tensor, start: int = 0) -> None:
        """Add one parameter block: gt, gd (k, m) per-sample pieces, gb (m,) batch gradient."""
        gb = gb.to(gt.dtype)
        self.add_dots(torch.stack([(gt * gt).sum(1), (gd * gd).sum(1), (gt * gd).sum(1),
                                   gt @ gb, gd @ gb]), start)

    def add_dots(self, dots: Tensor, start: int = 0) -> None:
        """Add precomputed (5, k) dots for samples start..start+k."""
        self.dots[:, start:start + dots.shape[1]] += dots.double()

    def add_batch_norm2(self, gg: Tensor) -> None:
        self.gg += gg.double()

    def columns(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """The five per-sample columns (NaN where a norm is 0)."""
        return self.columns_of(self.dots, self.gg, dtype)

    @staticmethod
    def columns_of(dots: Tensor, gg: Tensor, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """The columns of (5, ..., n) float64 dots and |G|^2 broadcast against (..., n): many steps at once."""
        tt, dd, td, tg, dg = dots
        g = gg.sqrt()
        out = {
            "param_target_norm": tt.sqrt(),
            "param_dark_norm": dd.sqrt(),
            "param_cos": td / (tt * dd).sqrt(),
            "target_cos_batch": tg / (tt.sqrt() * g),
            "dark_cos_batch": dg / (dd.sqrt() * g),
        }
        dtype = dtype if dtype == torch.float64 else torch.float32
        return {k: v.to(dtype) for k, v in out.items()}


def _module_params(m: nn.Module) -> list[Tensor]:
    return [p for p in (getattr(m, "weight", None), getattr(m, "bias", None))
            if isinstance(p, Tensor) and p.requires_grad]


def covered_modules(model: nn.Module) -> list[str]:
    """Names of modules whose weight/bias :func:`contribution_stats` handles."""
    return [n for n, m in model.named_modules() if isinstance(m, SUPPORTED) and _module_params(m)]


def coverage(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, int]:
    """Parameter counts: trainable in total, and covered by the contribution modules."""
    mods = dict(model.named_modules())
    names = covered_modules(model) if names is None else names
    covered = sum(p.numel() for n in names for p in _module_params(mods[n]))
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"covered_params": covered, "total_params": total}


def _normalised(m: nn.Module, x: Tensor) -> Tensor:
    """xhat exactly as the module's forward normalised x (batch or running statistics)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        use_batch = m.training or not m.track_running_stats
        # running stats are passed only when they are used; training=False never updates them.
        rm, rv = (None, None) if use_batch else (m.running_mean, m.running_var)
        return F.batch_norm(x, rm, rv, None, None, use_batch, 0.0, m.eps)
    if isinstance(m, nn.LayerNorm):
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
    return F.group_norm(x, m.num_groups, None, None, m.eps)


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    if m.padding_mode != "zeros":
        raise ValueError(f"Conv2d padding_mode {m.padding_mode!r} unsupported; only 'zeros'")
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError("Conv2d padding='same' with asymmetric padding is unsupported")
        return (total[0] // 2, total[1] // 2)
    return tuple(m.padding)


def _add_linear(a, dt, dd, gw, gb, has_bias):
    """Linear layer: closed forms for (n, in) inputs, Gram or materialised for sequences."""
    if a.ndim == 2:
        return _add_linear_2d(a, dt, dd, gw, gb if has_bias else None)
    n = a.shape[0]
    a, dt, dd = a.reshape(n, -1, a.shape[-1]), dt.reshape(n, -1, dt.shape[-1]), dd.reshape(n, -1, dd.shape[-1])
    length, d_in, d_out = a.shape[1], a.shape[2], dt.shape[2]
    ga = a @ gw.T  # (n, L, out): G applied to each input, gives <piece, G> without the piece
    if length == 1:
        aa = (a * a).sum((1, 2))
        dots = [aa * (dt * dt).sum((1, 2)), aa * (dd * dd).sum((1, 2)), aa * (dt * dd).sum((1, 2))]
    elif length * length * (d_in + d_out) <= length * d_in * d_out:
        aa = a @ a.transpose(1, 2)  # (n, L, L)
        dots = [(aa * (x @ y.transpose(1, 2))).sum((1, 2)) for x, y in ((dt, dt), (dd, dd), (dt, dd))]
    else:
        pt, pd = torch.einsum("nlo,nli->noi", dt, a).reshape(n, -1), torch.einsum("nlo,nli->noi", dd, a).reshape(n, -1)
        dots = [(pt * pt).sum(1), (pd * pd).sum(1), (pt * pd).sum(1)]
    dots += [(ga * dt).sum((1, 2)), (ga * dd).sum((1, 2))]
    acc_dots = torch.stack(dots)
    if has_bias:
        bt, bd = dt.sum(1), dd.sum(1)
        acc_dots += torch.stack([(bt * bt).sum(1), (bd * bd).sum(1), (bt * bd).sum(1), bt @ gb, bd @ gb])
    return acc_dots


def _add_linear_2d(a: Tensor, dt: Tensor, dd: Tensor, gw: Tensor, gb: Tensor | None) -> Tensor:
    """(5, n) dots of a Linear layer on (n, in) inputs, in ~15 tensor ops (each ~10 us inside a training
    step here). A sample's piece is delta_s a_s^T (+ delta_s for the bias), so
    <piece_x, piece_y> = (|a_s|^2 + 1) <delta_x, delta_y> and <piece_x, G> = delta_x . (G_w a_s + g_b)."""
    return linear_dots(a, dt, dd, linear_g_a(a, gw, gb), gb is not None)


def linear_g_a(a: Tensor, gw: Tensor, gb: Tensor | None) -> Tensor:
    """(n, out): G_w a_s + g_b, what <piece, G> needs of the batch gradient (a deferred param_split takes it
    at the step, where G is at hand)."""
    return a @ gw.t() if gb is None else torch.addmm(gb.to(a.dtype), a, gw.t())


def linear_dots(a: Tensor, dt: Tensor, dd: Tensor, ga: Tensor, bias: bool) -> Tensor:
    """(5, ..., n) dots <T,T>, <D,D>, <T,D>, <T,G>, <D,G> from (..., n, in) inputs, (..., n, out) output
    gradients and :func:`linear_g_a`: one step, or many steps stacked (a deferred param_split)."""
    pieces = torch.stack([dt, dd])  # (2, ..., n, out)
    aa = (a * a).sum(-1)  # (..., n)
    if bias:
        aa = aa + 1.0
    return torch.cat([(pieces * pieces).sum(-1) * aa, ((dt * dd).sum(-1) * aa).unsqueeze(0), (pieces * ga).sum(-1)])


def output_grads(student_logits, model, captured, cotangents, modules, terms=("target", "dark"),
                 named_modules=None):
    """One backward pass per term to the captured layer outputs only.

    Asking for output gradients alone lets autograd skip every weight-gradient product
    (measured: 0.67 of a full backward on ResNet-20, 0.13 on the MLP); the batch weight
    gradients are then rebuilt per layer from the activations (:func:`_layer_batch_grad`).

    Returns (module names, term -> [output grad per module]). ``named_modules``: as in
    :func:`contribution_stats`.
    """
    names, outs = captured_outputs(model, captured, modules, named_modules)
    grads = {}
    for term in terms:
        g = torch.autograd.grad(student_logits, outs, retain_graph=True, allow_unused=True,
                                grad_outputs=cotangents[term].to(student_logits.dtype))
        grads[term] = [torch.zeros_like(t) if x is None else x for t, x in zip(outs, g)]
    return names, grads


def captured_outputs(model: nn.Module, captured: dict, modules: Sequence[str] | None = None,
                     named_modules: dict | None = None) -> tuple[list[str], list[Tensor]]:
    """(names, outputs) of the covered modules (or ``modules``) in ``captured``, checked: supported
    types, outputs not changed in place since capture. What :func:`output_grads` differentiates."""
    mods = dict(model.named_modules()) if named_modules is None else named_modules
    if modules is None:
        modules = [n for n, m in mods.items() if isinstance(m, SUPPORTED) and _module_params(m)]  # covered_modules
    names = [n for n in modules if n in captured]
    if not names:
        raise ValueError("no captured Linear/Conv2d/norm module; wrap the forward in capture()")
    for n in names:
        if not isinstance(mods[n], SUPPORTED):
            raise ValueError(f"module {n!r} is {type(mods[n]).__name__}; supported: "
                             f"{[t.__name__ for t in SUPPORTED]}")
        if captured[n][1]._version != getattr(captured, "versions", {}).get(n, captured[n][1]._version):
            raise ValueError(f"output of {n!r} was changed in place after capture; "
                             "capture with clone_outputs=True")
    return names, [captured[n][1] for n in names]


def _work_dtype(t: Tensor) -> torch.dtype:
    """Half-precision activations (AMP) are upcast: the dot products sum many small terms."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _layer_batch_grad(m: nn.Module, x: Tensor, delta: Tensor,
                      xhat: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """Batch gradient (weight, bias) of one layer from its input and output gradient (all rows).

    ``xhat``: a norm layer's normalised input, if already computed.
    """
    w_on = isinstance(getattr(m, "weight", None), Tensor) and m.weight.requires_grad
    b_on = isinstance(getattr(m, "bias", None), Tensor) and m.bias.requires_grad
    if isinstance(m, nn.Linear):
        d2 = delta.reshape(-1, delta.shape[-1])
        gw = d2.T @ x.reshape(-1, x.shape[-1]) if w_on else None
        return gw, (d2.sum(0) if b_on else None)
    if isinstance(m, nn.Conv2d):
        gw = torch.nn.grad.conv2d_weight(x, m.weight.shape, delta, m.stride, _conv_padding(m),
                                         m.dilation, m.groups) if w_on else None
        return gw, (delta.sum((0, 2, 3)) if b_on else None)
    red = (0,) + _norm_reduce_dims(m, delta.ndim)
    xhat = _normalised(m, x) if xhat is None else xhat
    gw = (delta * xhat).sum(red).reshape(m.weight.shape) if w_on else None
    return gw, (delta.sum(red).reshape(m.bias.shape) if b_on else None)


def _sq(g: Tensor) -> Tensor:
    g = g.reshape(-1)
    return torch.dot(g, g)


def contribution_stats(
    student_logits: Tensor, model: nn.Module, captured: dict[str, tuple[Tensor, Tensor]],
    cotangents: dict[str, Tensor], rows: Tensor | None = None,
    modules: Sequence[str] | None = None, max_elems: int = 1 << 24,
    deltas: dict[str, dict[str, Tensor]] | None = None,
    layer_grads: dict[str, tuple[Tensor | None, Tensor | None]] | None = None,
    named_modules: dict[str, nn.Module] | None = None, info: dict[str, object] | None = None,
) -> tuple[dict[str, Tensor], dict[str, object]]:
    """Per-sample contributions of each term to the batch gradient: norms and cosines.

    One backward pass per term to the captured layer outputs (``torch.autograd.grad``,
    graph retained), the layers' batch gradient G rebuilt from activations, then per-layer
    arithmetic on the selected rows. About 1.5-2 backward passes in all (see
    benchmarks/README.md).

    Args:
        student_logits: (B, C) with graph; retained.
        model: the student (for module lookup and norm-layer settings; not modified).
        captured: name -> (input, output) from :func:`capture_activations` of this forward.
        cotangents: ``{"target": (B, C), "dark": (B, C)}``.
        rows: (n,) batch positions; None = all.
        modules: restrict to these module names (default: every covered module captured).
        max_elems: bound on the elements of one materialised per-sample block (Conv2d).
        deltas: term -> module name -> output gradient, if already known (then no backward
            pass is run and ``cotangents`` is unused; the modules are the keys).
        layer_grads: module name -> (weight, bias) batch gradient G, if already known (e.g.
            the ``.grad`` after the trainer's backward); else rebuilt from the activations.
        named_modules: ``dict(model.named_modules())`` if the caller keeps it; info: the
            coverage info of these modules if the caller keeps it (each walk of the model is
            ~50 us inside a training step here).

    Returns:
        (the five per-sample columns (n,), info with ``covered_params``, ``total_params``,
        ``modules`` used). Parameters outside the covered modules are excluded from every
        norm and cosine (G included); ``info`` says how many.
    """
    if deltas is None:
        names, grads = output_grads(student_logits, model, captured, cotangents, modules)
    else:
        names = list(deltas["target"])
        grads = {t: [deltas[t][n] for n in names] for t in ("target", "dark")}
    mods = dict(model.named_modules()) if named_modules is None else named_modules
    B = student_logits.shape[0]
    rows = torch.arange(B, device=student_logits.device) if rows is None else torch.as_tensor(rows).long()
    acc = DotAccumulator(rows.numel(), student_logits.device)
    n_r = rows.numel()
    linear_dots, squares = [], []  # added to acc at the end, in two ops instead of a few per layer
    for i, n in enumerate(names):
        m, inp = mods[n], captured[n][0]
        wd = _work_dtype(grads["target"][i])
        inp, d_t, d_d = inp.to(wd), grads["target"][i].to(wd), grads["dark"][i].to(wd)
        xhat = None if isinstance(m, (nn.Linear, nn.Conv2d)) else _normalised(m, inp)
        if layer_grads is None:
            gw, gb = _layer_batch_grad(m, inp, d_t + d_d, xhat)
        else:
            gw, gb = (None if g is None else g.to(wd) for g in layer_grads[n])
        squares += [_sq(g) for g in (gw, gb) if g is not None]
        dt, dd = d_t[rows], d_d[rows]
        if isinstance(m, nn.Linear):
            if gw is None:  # bias only: per-sample piece is the summed output gradient
                acc.add(dt.reshape(n_r, -1, dt.shape[-1]).sum(1), dd.reshape(n_r, -1, dd.shape[-1]).sum(1), gb)
                continue
            linear_dots.append(_add_linear(inp[rows], dt, dd, gw, gb, gb is not None))
        elif isinstance(m, nn.Conv2d):
            _add_conv(acc, m, inp[rows], dt, dd, gw, gb, gw is not None, gb is not None, max_elems)
        else:
            xhat = xhat[rows]
            red = _norm_reduce_dims(m, dt.ndim)
            if gw is not None:
                acc.add((dt * xhat).sum(red).reshape(n_r, -1), (dd * xhat).sum(red).reshape(n_r, -1), gw.reshape(-1))
            if gb is not None:
                acc.add(dt.sum(red).reshape(n_r, -1), dd.sum(red).reshape(n_r, -1), gb.reshape(-1))
    if linear_dots:  # float32 dots of each layer, summed in float64 (as acc.add_dots does one by one)
        acc.add_dots(torch.stack(linear_dots).double().sum(0))
    if squares:
        acc.add_batch_norm2(torch.stack(squares).double().sum())
    if info is None:
        info = coverage(model, names)
        info["modules"] = len(names)
    return acc.columns(student_logits.dtype), info


def _add_conv(acc, m, x, dt, dd, gw, gb, w_on, b_on, max_elems):
    """Conv2d: materialise per-sample weight pieces one row chunk at a time."""
    n = x.shape[0]
    g = m.groups
    if b_on:
        bt, bd = dt.sum((2, 3)), dd.sum((2, 3))
        acc.add(bt, bd, gb)
    if not w_on:
        return
    chunk = max(1, max_elems // max(1, gw.numel()))
    pad = _conv_padding(m)
    for s in range(0, n, chunk):
        xs = x[s:s + chunk]
        k = xs.shape[0]
        u = F.unfold(xs, m.kernel_size, m.dilation, pad, m.stride)  # (k, Cin*kh*kw, L)
        u = u.reshape(k, g, -1, u.shape[-1])  # (k, g, Cin/g*kh*kw, L)
        pieces = []
        for d in (dt[s:s + chunk], dd[s:s + chunk]):
            d = d.reshape(k, g, -1, d.shape[-2] * d.shape[-1])  # (k, g, Cout/g, L)
            pieces.append(torch.einsum("kgol,kgil->kgoi", d, u).reshape(k, -1))
        acc.add(pieces[0], pieces[1], gw.reshape(-1), s)


def _norm_reduce_dims(m: nn.Module, ndim: int) -> tuple[int, ...]:
    """Dims summed to get one sample's affine-parameter gradient of a norm layer."""
    if isinstance(m, nn.LayerNorm):
        return tuple(range(1, ndim - len(m.normalized_shape)))
    return tuple(range(2, ndim))


def contribution_pieces(
    student_logits: Tensor, model: nn.Module, captured: dict[str, tuple[Tensor, Tensor]],
    cotangents: dict[str, Tensor], modules: Sequence[str] | None = None,
) -> dict[str, dict[str, Tensor]]:
    """Materialised per-sample pieces, for tests and small models (memory B x P per term).

    Returns:
        term -> parameter name -> (B, *param.shape); summed over B they give the term's
        batch gradient of that parameter.
    """
    names, grads = output_grads(student_logits, model, captured, cotangents, modules)
    mods = dict(model.named_modules())
    out: dict[str, dict[str, Tensor]] = {}
    for term, gl in grads.items():
        out[term] = {}
        for i, n in enumerate(names):
            m, x, d = mods[n], captured[n][0], gl[i]
            x, b = x.to(d.dtype), d.shape[0]
            pieces = {}
            if isinstance(m, nn.Linear):
                a, dl = x.reshape(b, -1, x.shape[-1]), d.reshape(b, -1, d.shape[-1])
                pieces = {"weight": torch.einsum("blo,bli->boi", dl, a), "bias": dl.sum(1)}
            elif isinstance(m, nn.Conv2d):
                u = F.unfold(x, m.kernel_size, m.dilation, _conv_padding(m), m.stride)
                u = u.reshape(b, m.groups, -1, u.shape[-1])
                dl = d.reshape(b, m.groups, -1, d.shape[-2] * d.shape[-1])
                pieces = {"weight": torch.einsum("bgol,bgil->bgoi", dl, u), "bias": d.sum((2, 3))}
            else:
                red = _norm_reduce_dims(m, d.ndim)
                pieces = {"weight": (d * _normalised(m, x)).sum(red), "bias": d.sum(red)}
            for attr, piece in pieces.items():
                p = getattr(m, attr, None)
                if isinstance(p, Tensor) and p.requires_grad:
                    out[term][f"{n}.{attr}" if n else attr] = piece.reshape(b, *p.shape)
    return out

"""One training step, the public unit a researcher can call from their own loop.

``train_step``: teacher logits -> student forward -> objective -> hooks -> backward ->
(gradient scaler) -> optimizer step -> the hooks that measure after it (``HookRunner.after_step``).
It works with a registered objective (whose output carries a closed-form ``logit_grad``) and
with any loss callable
``loss_fn(student_logits, teacher_logits, target) -> scalar``: :func:`as_objective` wraps it and
takes ``logit_grad`` from ``torch.autograd.grad`` on the logits (one backward through the loss
only, not the model), so every hook instruments it as it instruments ours.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ban_analysis.instrument.base import StepContext
from ban_analysis.losses import Objective, ObjectiveOutput

__all__ = ["AutogradObjective", "StepOutput", "TrainingDiverged", "as_objective", "autocast_context",
           "teacher_forward", "train_step"]


_NO_CAPTURE = contextlib.nullcontext()  # reusable: it holds no state


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops with a diagnosis instead of training on NaN."""


def autocast_context(amp: str, device: torch.device):
    """Autocast for ``amp`` ("off", "bf16", "fp16", "auto"); "auto" is bf16 on a GPU that has it, fp16 on
    one that does not (then with a gradient scaler, see ``loop.make_scaler``), and off on CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if amp == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class AutogradObjective:
    """Any ``loss_fn(student_logits, teacher_logits, target) -> scalar`` as an objective.

    ``logit_grad`` is ``d loss / d student_logits`` from autograd; ``target_dist`` is the soft
    target implied by it, q - B * logit_grad, exact for every cross-entropy-type loss whose
    per-sample gradient is q_s - r_s (eq. 5); ``sample_weight`` is 1/B.
    """

    needs_generator = False

    def __init__(self, loss_fn: Callable[[Tensor, Tensor | None, Tensor], Tensor], needs_teacher: bool = True,
                 name: str | None = None) -> None:
        self.loss_fn = loss_fn
        self.needs_teacher = needs_teacher
        self.name = name or getattr(loss_fn, "__name__", type(loss_fn).__name__)

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor | None, target: Tensor,
                 generator: torch.Generator | None = None) -> ObjectiveOutput:
        loss = self.loss_fn(student_logits, teacher_logits, target)
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            raise ValueError(f"loss_fn {self.name!r} must return a scalar tensor, got "
                             f"{getattr(loss, 'shape', type(loss).__name__)}")
        (grad,) = torch.autograd.grad(loss, student_logits, retain_graph=True)  # (B, C)
        grad = grad.detach().float()
        B = student_logits.shape[0]
        target_dist = F.softmax(student_logits.detach().float(), dim=1) - B * grad
        weight = torch.full((B,), 1.0 / B, device=student_logits.device)
        return ObjectiveOutput(loss=loss, logit_grad=grad, target_dist=target_dist, sample_weight=weight)


def as_objective(objective: Any, needs_teacher: bool = True) -> Any:
    """An objective as it is; any other callable wrapped in :class:`AutogradObjective`.

    An objective is anything with the registered objectives' protocol: a ``needs_teacher``
    attribute and ``__call__(student_logits, teacher_logits, target, generator=...)`` returning an
    :class:`ObjectiveOutput` (so wrappers and proxies of our objectives pass through unchanged).
    """
    if isinstance(objective, (Objective, AutogradObjective)) or hasattr(objective, "needs_teacher"):
        return objective
    if not callable(objective):
        raise ValueError(f"objective must be a registered Objective or a loss callable, got {type(objective).__name__}")
    return AutogradObjective(objective, needs_teacher=needs_teacher)


def teacher_forward(teacher: nn.Module, x: Tensor, amp: str = "off") -> Tensor:
    """(B, C) float32 teacher logits, eval mode, no graph; cloned out of inference mode for autograd."""
    with torch.inference_mode(), autocast_context(amp, x.device):
        logits = teacher(x).float()
    return logits.clone()


@dataclass
class StepOutput:
    """What one step returns: the detached loss and logits, the objective's output, the hook rows."""

    loss: Tensor            # 0-d, detached
    student_logits: Tensor  # (B, C), detached
    out: Any                # the ObjectiveOutput (its loss still holds the graph until freed)
    hook_rows: dict = field(default_factory=dict)  # hook -> column -> tensor, for the run writer
    skipped: bool = False   # fp16 scaler found inf/NaN gradients and skipped the optimizer step


def check_finite(loss: Tensor, student_logits: Tensor, *, where: str, lr: float) -> None:
    if torch.isfinite(loss):
        return
    biggest = student_logits.detach().float().abs().nan_to_num(float("inf")).max().item()
    raise TrainingDiverged(
        f"{where}: loss is {loss.item()} (largest |student logit| {biggest:.3g}, lr {lr:g}); "
        "the run diverged: lower train.lr, or set train.amp=off")


def _merge_rows(rows: dict, more: dict) -> None:
    """Add a later phase's columns to the step's rows: one row per hook and step."""
    for hook, columns in more.items():
        rows[hook] = {**rows.get(hook, {}), **columns}


def train_step(model: nn.Module, objective: Any, x: Tensor, target: Tensor, optimizer: torch.optim.Optimizer, *,
               teacher: nn.Module | None = None, teacher_logits: Tensor | None = None, hooks: Any = None,
               step: int = 0, gen: int = 1, epoch: int = 0, sample_index: Tensor | None = None,
               generator: torch.Generator | None = None, amp: str = "off", scaler: Any = None,
               forward: Callable[[Tensor], Tensor] | None = None) -> StepOutput:
    """One optimizer step of ``model`` on the batch ``(x, target)``.

    Args:
        model: the student, in training mode.
        objective: a registered objective (``get_objective``) or any
            ``loss_fn(student_logits, teacher_logits, target) -> scalar`` (see :func:`as_objective`).
        x: (B, ...) inputs; target: (B,) int64 labels.
        teacher: used for ``teacher_logits`` when those are not given and the objective needs them.
        teacher_logits: (B, C), precomputed (e.g. cached for unaugmented data).
        hooks: a :class:`ban_analysis.instrument.HookRunner` or None.
        step, gen, epoch: where the step is (hooks' schedule and rows); sample_index: (B,) ids.
        generator: the objective's random stream (DKPP's permutations).
        amp: autocast mode; scaler: a ``torch.amp.GradScaler`` for fp16 (None otherwise).
        forward: the callable that runs the model (a ``torch.compile``'d model), default ``model``.

    Returns:
        StepOutput; ``hook_rows`` holds every due hook's columns (pre- and post-backward, and
        after the optimizer step), one row per hook.

    Raises:
        TrainingDiverged: the loss (or the logits) is not finite.
    """
    objective = as_objective(objective)
    lr = optimizer.param_groups[0]["lr"]
    where = f"gen {gen} epoch {epoch + 1} step {step}"
    if objective.needs_teacher and teacher_logits is None:
        if teacher is None:
            raise ValueError(f"objective {objective.name!r} needs teacher logits or a teacher; got neither")
        teacher_logits = teacher_forward(teacher, x, amp)
    if hooks is not None and getattr(hooks, "idle", None) is not None and hooks.idle(step):
        hooks = None  # nothing due: the step is a plain one (HookRunner.idle)
    # the due hooks only keep the step's tensors (HookRunner.keeps_only): no capture, keep() for run()
    keep = hooks is not None and getattr(hooks, "keeps_only", None) is not None and hooks.keeps_only(step, model)
    capture = hooks.capture(model, step) if hooks is not None and not keep else _NO_CAPTURE
    with capture, autocast_context(amp, x.device):
        # `is None`, not `or`: a torch.compile'd module's truth value calls len(), which a model refuses
        student_logits = (model if forward is None else forward)(x)
    try:
        out = objective(student_logits, teacher_logits, target, generator=generator)
    except ValueError:
        # objectives refuse non-finite logits: that is divergence, diagnosed here
        check_finite(student_logits.detach().sum(), student_logits, where=where, lr=lr)
        raise
    check_finite(out.loss, student_logits, where=where, lr=lr)
    rows = {}
    if hooks is not None:
        index = sample_index if sample_index is not None else torch.arange(len(target), device=target.device)
        ctx = StepContext(gen=gen, epoch=epoch, step=step, sample_index=index, inputs=x, target=target,
                          student_logits=student_logits, teacher_logits=teacher_logits, out=out,
                          model=model, captured=getattr(capture, "captured", {}) or {}, lr=lr)
        if keep:
            rows.update(hooks.keep(ctx))
            hooks = None  # nothing after the backward or the optimizer step either
        else:
            rows.update(hooks.run(ctx))
    optimizer.zero_grad(set_to_none=True)
    skipped = False
    if scaler is None:
        out.loss.backward()
        if hooks is not None:
            rows.update(hooks.after_backward())  # fused hooks read this backward's .grad
        optimizer.step()
        if hooks is not None:
            _merge_rows(rows, hooks.after_step())  # hooks that measure the updated model
    else:
        scaler.scale(out.loss).backward()
        scaler.unscale_(optimizer)  # fused hooks and the step see true gradients
        if hooks is not None:
            rows.update(hooks.after_backward())
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skipped when a gradient is inf/NaN
        scaler.update()
        skipped = scaler.get_scale() < scale
        if hooks is not None:
            _merge_rows(rows, hooks.after_step())
    return StepOutput(loss=out.loss.detach(), student_logits=student_logits.detach(), out=out,
                      hook_rows=rows, skipped=skipped)

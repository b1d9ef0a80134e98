"""What a hook is: the step context it sees, the base class, and the registry of hooks by name.

Split from ``hooks.py`` so that ``hook_config`` (which validates a hook's table against its class)
and ``hooks`` (the hook classes and the runner) both import it, without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from ban_analysis.registry import Registry

__all__ = ["HOOKS", "Hook", "StepContext", "register_hook"]


@dataclass
class StepContext:
    """What a hook sees at one training step (built by the trainer after the objective).

    Attributes:
        gen, epoch, step: generation, epoch, global optimizer step in the generation (0-based).
        sample_index: (B,) int64 index of each sample in the training set.
        inputs: (B, ...) float inputs the model saw (augmented, normalised).
        target: (B,) int64 labels.
        student_logits: (B, C) with autograd graph to the model parameters; hooks only call
            ``torch.autograd.grad(..., retain_graph=True)`` on it.
        teacher_logits: (B, C) detached, or None (objective ``ce``).
        out: the objective's ``ObjectiveOutput``.
        model: the student, in training mode.
        captured: module name -> (input, output) from ``HookRunner.capture`` (may be left
            empty: the runner then uses what its own capture of this step recorded).
        rows: set by the runner per hook: batch positions the hook reports (None = all).
        cache: shared by the hooks of one step (e.g. the per-term batch gradients).
        lr: the optimizer's learning rate at this step (``param_groups[0]["lr"]``, set by
            ``train_step``); None when the trainer did not say (hooks that need it raise).
    """

    gen: int
    epoch: int
    step: int
    sample_index: Tensor
    inputs: Tensor
    target: Tensor
    student_logits: Tensor
    teacher_logits: Tensor | None
    out: Any
    model: nn.Module
    captured: dict = field(default_factory=dict)
    rows: Tensor | None = None
    cache: dict = field(default_factory=dict)
    lr: float | None = None


class Hook:
    """Base class. Subclasses set the class attributes and implement ``__call__``.

    Class attributes: ``name``; ``per_sample`` (columns (n,) with ``sample_index`` added by
    the runner, or per-step 0-d tensors); defaults ``every_n_steps``, ``samples``,
    ``sample_from``; ``options`` = option -> default; ``choices`` = option -> allowed values;
    ``deferrable``: the hook implements :meth:`gather` and :meth:`compute` (per-sample hooks whose
    columns are row-wise functions of a few per-row tensors: ``logit_split``, ``head_split``).
    """

    name: ClassVar[str] = ""
    per_sample: ClassVar[bool] = True
    every_n_steps: ClassVar[int] = 1
    samples: ClassVar[Any] = "all"
    sample_from: ClassVar[str] = "train"
    options: ClassVar[dict] = {}
    choices: ClassVar[dict] = {}
    deferrable: ClassVar[bool] = False
    # a fused hook that implements keep_after_backward and columns_of (update_share, param_split)
    defers_after_backward: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        self.opts = {**self.options, **options}
        self.state: dict[str, Any] = {}  # what info() reports, filled while running
        # Set by HookRunner(fuse_backward=True) on hooks that can reuse the trainer's backward:
        # __call__ then prepares and returns None, and after_backward(ctx) returns the columns.
        self.fused = False
        # Set by HookRunner(defer=True) on deferrable hooks: the runner then calls gather(ctx) at each
        # due step instead of __call__, buffers what it returns, and compute(rows) makes the columns
        # of many steps' rows at once when the runner is flushed.
        self.deferred = False
        # Set by HookRunner(defer=True, fuse_backward=True) on fused hooks that can: the runner then calls
        # keep_after_backward(ctx) instead of after_backward at each due step, and columns_of(kept) over
        # the epoch's steps at flush.
        self.deferred_after = False

    def gather(self, ctx: StepContext) -> dict[str, Tensor]:
        """What :meth:`compute` needs, for every row of the batch: (B, ...) tensors of the step,
        detached and by reference (no copy, no indexing), so a step pays (almost) no tensor
        operation. Keep them narrow: a (B, D) activation held for many steps costs more in fresh
        memory than reducing it to the per-row numbers the statistics need (``head_split`` does).

        The runner keeps them (checking at compute time that none was changed in place), selects
        the reported rows (``samples`` / ``sample_from``) over many steps at once, and hands
        :meth:`compute` those rows concatenated along dim 0. ``ctx.rows`` is not set. Keys may differ
        between generations (``teacher_logits`` is absent without a teacher).
        """
        raise NotImplementedError

    def compute(self, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        """The columns (n,) of buffered rows from :meth:`gather`, concatenated over steps.

        ``raw`` also holds ``batch_size``: (n,) float32, the size of the batch each row came from.
        The columns are those ``__call__`` returns for the same rows (per-step 0-d columns given
        per row), equal up to float rounding.
        """
        raise NotImplementedError

    def can_fuse(self) -> bool:
        """Whether this hook has a cheaper path that reads the trainer's backward."""
        return False

    def after_backward(self, ctx: StepContext) -> dict[str, Tensor] | None:
        """Columns of a fused hook once the trainer's backward ran; None: finished by after_step."""
        raise NotImplementedError

    def keep_after_backward(self, ctx: StepContext) -> dict[str, Tensor]:
        """A deferred fused hook's share of :meth:`after_backward` at its step: the few small tensors
        :meth:`columns_of` needs (the rest of the statistics runs once an epoch, where it is cheap:
        inside a training step each small op costs several times its own time)."""
        raise NotImplementedError

    def columns_of(self, kept: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The columns of the steps whose :meth:`keep_after_backward` gave ``kept``, in step order: (S,)
        for S steps of a per-step hook, the steps' rows concatenated for a per-sample one; what
        :meth:`after_backward` returns at each, equal up to float rounding."""
        raise NotImplementedError

    def after_step(self, ctx: StepContext) -> dict[str, Tensor] | None:
        """Columns of a hook that measures after ``optimizer.step()`` (default: none).

        A hook whose ``__call__`` (or, fused, ``after_backward``) returns None and that is not
        fused is finished here: ``HookRunner.after_step`` calls it right after the trainer's
        optimizer step with the same context (``ctx.cache`` holds what ``__call__`` stashed), and
        what it returns is the hook's whole row for the step.
        """
        return None

    def capture_modules(self, model: nn.Module) -> tuple[list[str], bool]:
        """Modules whose (input, output) this hook needs, and whether outputs are differentiated."""
        return [], False

    def prepare(self, ctx: StepContext) -> None:
        """Before any due hook of the step runs: say in ``ctx.cache`` what this hook will need, so
        an earlier hook can compute it in the same pass (default: nothing). A fused ``param_split``
        puts its layer outputs under ``("target_outputs", anchor)``; a fused ``update_share``,
        whose target-term backward runs first, then returns their gradients too."""

    def capture_changed(self) -> bool:
        """True once after what :meth:`capture_modules` returns changed for the same model (a
        deferred ``head_split`` that found its input in the autograd graph); the runner then drops
        the forward hooks it kept for it."""
        return False

    def __call__(self, ctx: StepContext) -> dict[str, Tensor]:
        raise NotImplementedError


HOOKS: Registry[type[Hook]] = Registry("hook")


def register_hook(cls: type[Hook]) -> type[Hook]:
    """Class decorator: register a :class:`Hook` subclass under its ``name`` (non-empty, unique)."""
    HOOKS.register(cls.name, cls)
    return cls

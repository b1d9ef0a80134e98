"""The objective contract: output record, input validation, and the registry.

An objective is a small class registered under a name. Calling it validates the inputs, casts
half-precision logits up to float32, and returns an :class:`ObjectiveOutput` whose
``logit_grad`` is the closed-form gradient of ``loss`` with respect to the student logits.
The training loop never special-cases an objective by name; everything it needs is in the
output record and in the class attributes ``needs_teacher`` and ``needs_generator``.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from ban_analysis.registry import Registry

logger = logging.getLogger(__name__)

__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveOutput",
    "get_objective",
    "register_objective",
    "validate_inputs",
]

# Half types are cast up: softmax/log-softmax in bf16 loses ~3 significant digits, which is the
# same order as the dark-knowledge probabilities this toolkit measures.
_UPCAST = (torch.float16, torch.bfloat16)


@dataclass(slots=True)
class ObjectiveOutput:
    """What every objective returns.

    Attributes:
        loss: scalar, batch mean (CWTM, CWTC: weighted mean with weights summing to 1). Carries
            the autograd graph to ``student_logits``; the teacher never receives gradient.
        logit_grad: (B, C) exactly ``d loss / d student_logits`` in closed form, detached.
        target_dist: (B, C) the soft target the student is pulled toward (one-hot for ``ce``),
            detached. Rows sum to 1.
        sample_weight: (B,) weight of each sample in ``loss``, summing to 1 (1/B for every
            objective but ``cwtm`` and ``cwtc``), detached.
    """

    loss: Tensor
    logit_grad: Tensor
    target_dist: Tensor
    sample_weight: Tensor


def _check_logits(what: str, logits: Any, shape: tuple[int, ...] | None) -> None:
    """Type, rank, dtype and shape checks that need no device sync."""
    if not isinstance(logits, Tensor):
        raise ValueError(f"{what} must be a torch.Tensor of shape (B, C), got {type(logits).__name__}")
    if logits.ndim != 2:
        raise ValueError(f"{what} must have shape (B, C), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(
            f"{what} must be floating point (float16, bfloat16, float32 or float64), got {logits.dtype}"
        )
    if shape is not None and tuple(logits.shape) != shape:
        raise ValueError(
            f"{what} shape {tuple(logits.shape)} does not match student_logits shape {shape}"
        )


def validate_inputs(
    student_logits: Any,
    teacher_logits: Any,
    target: Any,
    needs_teacher: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Check an objective's inputs and cast them to the precision the objectives compute in.

    Args:
        student_logits: (B, C) floating point, finite, C >= 2, B >= 1.
        teacher_logits: (B, C) floating point and finite when ``needs_teacher``; otherwise
            ignored (may be None).
        target: (B,) int64 class indices in [0, C).
        needs_teacher: whether ``teacher_logits`` is required.

    Returns:
        ``(student_logits, teacher_logits, target)``: float16/bfloat16 logits cast up to
        float32 (float32 and float64 kept, so float64 gradcheck stays float64); the teacher
        cast to the student's dtype and detached; ``teacher_logits`` None when not needed.

    Raises:
        ValueError: naming the offending argument and what is allowed.
    """
    _check_logits("student_logits", student_logits, None)
    B, C = student_logits.shape
    if B < 1:
        raise ValueError("student_logits must hold at least one sample (B >= 1), got B=0")
    if C < 2:
        raise ValueError(f"student_logits must have at least 2 classes (C >= 2), got C={C}")
    if not isinstance(target, Tensor):
        raise ValueError(f"target must be a torch.Tensor of int64 class indices, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise ValueError(f"target must have dtype torch.int64 (class indices), got {target.dtype}")
    if tuple(target.shape) != (B,):
        raise ValueError(f"target must have shape (B,) = ({B},), got shape {tuple(target.shape)}")
    if target.device != student_logits.device:
        raise ValueError(f"target is on {target.device} but student_logits on {student_logits.device}")
    if needs_teacher:
        if teacher_logits is None:
            raise ValueError("teacher_logits is None but this objective needs a teacher; only 'ce' accepts None")
        _check_logits("teacher_logits", teacher_logits, (B, C))
        if teacher_logits.device != student_logits.device:
            raise ValueError(
                f"teacher_logits is on {teacher_logits.device} but student_logits on {student_logits.device}"
            )
    else:
        teacher_logits = None

    # Cheap value checks first: a sum is NaN/inf whenever any entry is, so one reduction per
    # tensor replaces isfinite + all; only when a sum is not finite (a bad entry, or an overflow
    # of the sum itself) do we run the exact check. Scalars are read with .item(): no kernel.
    # detach(): the check must not add a node to the student's autograd graph.
    if not math.isfinite(student_logits.detach().sum().item()) and not bool(torch.isfinite(student_logits).all()):
        raise ValueError("student_logits contains NaN or inf; logits must be finite")
    lo, hi = (int(v) for v in torch.aminmax(target))
    if lo < 0 or hi >= C:
        raise ValueError(f"target values must lie in [0, {C - 1}] for C={C} classes, got range [{lo}, {hi}]")
    if (teacher_logits is not None and not math.isfinite(teacher_logits.detach().sum().item())
            and not bool(torch.isfinite(teacher_logits).all())):
        raise ValueError("teacher_logits contains NaN or inf; logits must be finite")

    if student_logits.dtype in _UPCAST:
        student_logits = student_logits.float()
    if teacher_logits is not None:
        teacher_logits = teacher_logits.detach().to(student_logits.dtype)
    return student_logits, teacher_logits, target


class Objective:
    """Base class of a registered objective; subclasses implement :meth:`compute`.

    Class attributes:
        name: registry key (set by :func:`register_objective`).
        needs_teacher: False only for objectives that ignore the teacher (``ce``).
        needs_generator: True for objectives that draw random numbers (``dkpp``); these refuse
            ``generator=None`` because the project never uses the global RNG.
    """

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True
    needs_generator: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        self._params = dict(params)

    @property
    def params(self) -> dict[str, Any]:
        """The objective's hyperparameters (a copy), as passed to :func:`get_objective`."""
        return dict(self._params)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
        return f"{self.name}({args})"

    def __call__(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        target: Tensor,
        generator: torch.Generator | None = None,
    ) -> ObjectiveOutput:
        """Evaluate the objective.

        Args:
            student_logits: (B, C) floating point; float16/bfloat16 are cast up to float32.
            teacher_logits: (B, C) or None (only for objectives with ``needs_teacher=False``).
            target: (B,) int64 labels.
            generator: torch.Generator on the logits' device; required when
                ``needs_generator``, ignored otherwise.

        Returns:
            ObjectiveOutput with float32 (or float64 for float64 input) tensors.
        """
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if self.needs_generator:
            if generator is None:
                raise ValueError(
                    f"objective {self.name!r} draws random permutations and needs a torch.Generator; "
                    "generator=None is not allowed (the global RNG is never used)"
                )
            if isinstance(student_logits, Tensor) and generator.device.type != student_logits.device.type:
                raise ValueError(
                    f"generator is on {generator.device} but student_logits on {student_logits.device}"
                )
        student_logits, teacher_logits, target = validate_inputs(
            student_logits, teacher_logits, target, self.needs_teacher
        )
        return self.compute(student_logits, teacher_logits, target, generator)

    def compute(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        target: Tensor,
        generator: torch.Generator | None,
    ) -> ObjectiveOutput:
        """Objective-specific part on validated inputs; see :meth:`__call__`."""
        raise NotImplementedError


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: register an :class:`Objective` subclass under ``name``.

    The class's ``__init__`` keyword arguments are its hyperparameters; :func:`get_objective`
    checks requested parameters against them.
    """

    def decorate(cls: type[Objective]) -> type[Objective]:
        OBJECTIVES.register(name, cls)  # refuses an empty or duplicate name
        cls.name = name
        return cls

    return decorate


def objective_param_names(name: str) -> list[str]:
    """Hyperparameter names accepted by the registered objective ``name``."""
    sig = inspect.signature(OBJECTIVES[name])
    return [p for p in sig.parameters if p != "self"]


def get_objective(name: str, **params: Any) -> Objective:
    """Build a registered objective.

    Args:
        name: registry key, one of ``OBJECTIVES``.
        **params: hyperparameters of that objective (see each objective's docstring).

    Raises:
        ValueError: unknown name (lists valid names), unknown parameter (lists valid ones),
            or an invalid parameter value.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid objectives: {', '.join(sorted(OBJECTIVES))}")
    allowed = objective_param_names(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        valid = ", ".join(allowed) if allowed else "none"
        raise ValueError(f"objective {name!r} got unknown parameter(s) {', '.join(unknown)}; valid parameters: {valid}")
    obj = OBJECTIVES[name](**params)
    logger.debug("built objective %r", obj)
    return obj


def check_number(name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    """Validate a scalar hyperparameter: finite real number in [low, high] (or (low, high])."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must lie in {bracket}{low}, {high}], got {value}")
    return value

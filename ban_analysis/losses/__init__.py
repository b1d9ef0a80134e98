"""Distillation objectives with closed-form backward, found by name.

    from ban_analysis.losses import get_objective, OBJECTIVES, ObjectiveOutput
    obj = get_objective("kd", alpha=0.9, temperature=4.0)
    out = obj(student_logits, teacher_logits, target, generator=g)
    out.loss, out.logit_grad, out.target_dist, out.sample_weight

Registry keys: ce, kd, ban, ban_l, cwtm, cwtc, dkpp, tmls. Adding an objective is one file
with a class decorated by ``@register_objective(name)`` plus its import below; the tests run
every registered objective automatically.
"""

from .base import OBJECTIVES, Objective, ObjectiveOutput, get_objective, register_objective, validate_inputs

# Imported for their registration side effect (the registry is filled at package import).
# Order = registry order = the order tables and tests list them in.
from . import ce, kd, ban, ban_l, cwtm, cwtc, dkpp, tmls  # noqa: E402,F401  isort: skip

__all__ = ["OBJECTIVES", "Objective", "ObjectiveOutput", "get_objective", "register_objective", "validate_inputs"]

"""Instrumentation: the split of the student's gradient and the hooks that log it.

``decompose`` splits the logit gradient at the anchor coordinate (eqs. 6-7) and gives the
per-sample statistics; ``param_grads`` and ``contrib`` carry that split into parameter space
(head outer products, per-term batch gradients, per-sample contributions, torch.func);
``base`` defines the step context and the hook base class; ``hooks`` holds the hooks and the
runner that schedules them; ``heldout`` the held-out attribution hook (TracIn's first-order
term per split term), registered after them. Hooks observe and return tensors; the engine's writer does the I/O.
"""

from ban_analysis.instrument.base import HOOKS, Hook, StepContext, register_hook
from ban_analysis.instrument.decompose import per_sample_stats, split_logit_grad
from ban_analysis.instrument.hooks import HookRunner
from ban_analysis.instrument import heldout  # noqa: F401  registers heldout_attribution after the split hooks
from ban_analysis.instrument.vectors import per_sample_term_grads

__all__ = ["HOOKS", "Hook", "HookRunner", "StepContext", "per_sample_stats", "per_sample_term_grads", "register_hook",
           "split_logit_grad"]

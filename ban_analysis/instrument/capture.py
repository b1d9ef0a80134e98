"""Forward hooks around the student forward: what the due hooks need of the activations.

:class:`StepCapture` registers hooks for one step and removes them on exit; a deferred runner
keeps the hooks of the modules captured at every step without copies registered through an
epoch (:class:`StickyHooks`), and a step it serves only arms them (:class:`ArmedCapture`), which
saves most of a capture's cost. Split from ``runner.py`` (the scheduling).
"""

from __future__ import annotations

import weakref

from torch import Tensor, nn

from ban_analysis.instrument import param_grads as pg
from ban_analysis.instrument.contrib import _Captured

__all__ = ["ArmedCapture", "StepCapture", "StickyHooks"]


class StepCapture:
    """Context manager around the student forward; ``.captured`` is filled inside it."""

    def __init__(self, names: list[str], clone: bool, model: nn.Module, modules: dict | None = None) -> None:
        self.captured: dict[str, tuple[Tensor, Tensor]] = {}
        self._names, self._clone, self._model, self._cm, self._modules = names, clone, model, None, modules

    def __enter__(self) -> "StepCapture":
        if self._names:
            self._cm = pg.capture_activations(self._model, self._names, clone_outputs=self._clone,
                                              modules=self._modules)
            self.captured = self._cm.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)
            self._cm = None


class StickyHooks:
    """Forward hooks a deferred runner keeps registered through an epoch (removed by ``flush``): a step
    that needs just these modules, outputs not copied (``head_split``'s head input), arms them
    instead of registering and removing hooks again, which is most of a capture's cost."""

    def __init__(self, model: nn.Module, names: list[str], modules: dict) -> None:
        self.model, self.names = weakref.ref(model), names
        self.dues: set[tuple[str, ...]] = set()  # the sets of due hooks this capture serves
        self.captured: _Captured | None = None  # the armed step's record; None: the hooks do nothing
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module, args, output):  # as capture_activations' hook, with clone_outputs=False
            captured = self.captured
            if captured is None:
                return None
            if name in captured:
                raise ValueError(f"module {name!r} was called twice in one forward; "
                                 "per-sample contributions need one call per module")
            if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
                captured[name] = (args[0], output)
                captured.versions[name] = output._version
            return None
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class ArmedCapture:
    """The capture of a step served by a :class:`StickyHooks`: arms its hooks inside the block."""

    def __init__(self, sticky: StickyHooks) -> None:
        self._sticky, self.captured = sticky, {}

    def __enter__(self) -> "ArmedCapture":
        self.captured = self._sticky.captured = _Captured()
        return self

    def __exit__(self, *exc) -> None:
        self._sticky.captured = None

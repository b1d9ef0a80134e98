"""Forward hooks around the student forward: what the due hooks need of the activations.

:func:`capture_activations` records the (input, output) of named modules inside a block (moved
here from ``contrib.py``; ``param_grads`` re-exports it).

:class:`StepCapture` registers hooks for one step and removes them on exit; a deferred runner
keeps the hooks of the modules captured at every step without copies registered through an
epoch (:class:`StickyHooks`), and a step it serves only arms them (:class:`ArmedCapture`), which
saves most of a capture's cost. Split from ``runner.py`` (the scheduling).
"""

from __future__ import annotations

import weakref
from typing import Mapping, Sequence

from torch import Tensor, nn

__all__ = ["ArmedCapture", "CapturePlanner", "StepCapture", "StickyHooks", "capture_activations"]


class _Captured(dict):
    """name -> (input, output); ``versions`` keeps each output's version at capture time."""

    def __init__(self) -> None:
        super().__init__()
        self.versions: dict[str, int] = {}


def _record(captured: _Captured, name: str, args: tuple, output) -> bool:
    """Put a forward hook's (input, output) into ``captured``; False for a non-tensor call."""
    if name in captured:
        raise ValueError(f"module {name!r} was called twice in one forward; "
                         "per-sample contributions need one call per module")
    if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
        return False
    captured[name] = (args[0], output)
    # The version counter tells an in-place change after capture (clone_outputs=False).
    captured.versions[name] = output._version
    return True


def capture_activations(
    model: nn.Module, names: Sequence[str], clone_outputs: bool = True,
    modules: Mapping[str, nn.Module] | None = None,
) -> "_ActivationCapture":
    """Record (input, output) of the named modules during the forward run inside the block.

    With ``clone_outputs`` the forward hook hands the rest of the network a copy of the
    output and keeps the original: an in-place op downstream (``ReLU(inplace=True)``) would
    otherwise rewrite the captured tensor and its autograd history. The copy has the same
    values and an identity backward, so the forward and every gradient stay bit-identical.
    ``modules``: ``dict(model.named_modules())`` if the caller keeps it (the runner does, per
    model: the walk is a fixed cost of every captured step).

    Yields:
        dict name -> (input, output), filled by the forward; a module called more than once
        raises ValueError at the second call (weight sharing is not supported).
    """
    mods = dict(model.named_modules()) if modules is None else modules
    missing = [n for n in names if n not in mods]
    if missing:
        raise ValueError(f"no module named {missing[:4]} in the model")
    return _ActivationCapture([(n, mods[n]) for n in names], clone_outputs)


class _ActivationCapture:
    """The context manager :func:`capture_activations` returns (a class, not a generator: it is
    entered at every captured training step)."""

    def __init__(self, modules: list[tuple[str, nn.Module]], clone_outputs: bool) -> None:
        self._modules, self._clone = modules, clone_outputs
        self.captured = _Captured()
        self._handles: list = []

    def _hook(self, name: str):
        captured, clone = self.captured, self._clone

        def hook(module, args, output):
            recorded = _record(captured, name, args, output)
            return output.clone() if clone and recorded else None
        return hook

    def __enter__(self) -> "_Captured":
        try:
            for name, module in self._modules:
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.__exit__()
            raise
        return self.captured

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class StepCapture:
    """Context manager around the student forward; ``.captured`` is filled inside it."""

    def __init__(self, names: list[str], clone: bool, model: nn.Module, modules: dict | None = None) -> None:
        self.captured: dict[str, tuple[Tensor, Tensor]] = {}
        self._names, self._clone, self._model, self._cm, self._modules = names, clone, model, None, modules

    def __enter__(self) -> "StepCapture":
        if self._names:
            self._cm = capture_activations(self._model, self._names, clone_outputs=self._clone,
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
        self.armed = ArmedCapture(self)  # one for every step it serves (a step's objects cost here)

    def _hook(self, name: str):
        def hook(module, args, output):  # as capture_activations' hook, with clone_outputs=False
            if self.captured is not None:  # armed
                _record(self.captured, name, args, output)
            return None
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class ArmedCapture:
    """The capture of a step served by a :class:`StickyHooks`: arms its hooks inside the block.

    One instance serves every step; ``captured`` is emptied when the next step enters (what a
    step's hooks read of it, they read within that step)."""

    def __init__(self, sticky: StickyHooks) -> None:
        self._sticky, self.captured = sticky, _Captured()

    def __enter__(self) -> "ArmedCapture":
        captured = self.captured
        captured.clear()
        captured.versions.clear()
        self._sticky.captured = captured
        return self

    def __exit__(self, *exc) -> None:
        self._sticky.captured = None


class CapturePlanner:
    """The :class:`HookRunner`'s side of the captures: which modules a step's due hooks need and
    how they are hooked (moved here from ``runner.py``). It uses the runner's ``hooks``,
    ``defer``, ``_due``, ``_sticky``, ``_modules``, ``_every_step`` and ``_uncaptured``."""

    def capture(self, model: nn.Module, step: int) -> StepCapture | ArmedCapture:
        """Context manager for the student forward of ``step``.

        Registers forward hooks only for modules a due hook needs (head input for
        ``head_split``; Linear/Conv2d/norm layers for ``param_split`` in contribution mode,
        whose outputs are passed on as identical copies) and removes them on exit.
        ``.captured`` holds name -> (input, output) after the block.
        """
        due = self._due(step)
        sticky = self._sticky
        if sticky is not None and due in sticky.dues and sticky.model() is model:  # as at an earlier step
            cap = sticky.armed
            self._capture = (step, cap)
            return cap
        if due in self._uncaptured and self._uncaptured[due]() is model:  # these hooks need no module
            self._capture = None
            return _NO_CAPTURE
        names, clone = [], False
        for n in due:
            mods, c = self.hooks[n].hook.capture_modules(model)
            names += [m for m in mods if m not in names]
            clone = clone or c
        modules = None
        if names:  # the module walk, once per model (a weak reference: a new model is walked anew)
            if self._modules is None or self._modules[0]() is not model:
                self._modules = (weakref.ref(model), dict(model.named_modules()))
            modules = self._modules[1]
        if names and not clone and self.defer and set(names) == set(self._every_step_modules(model)):
            sticky = self._sticky
            if sticky is None or sticky.model() is not model:
                if sticky is not None:
                    sticky.remove()
                self._sticky = sticky = StickyHooks(model, names, modules)
            sticky.dues.add(due)
            cap = sticky.armed
            self._capture = (step, cap)
            return cap
        if not names:
            self._uncaptured[due] = weakref.ref(model)
            self._capture = None
            return _NO_CAPTURE
        cap = StepCapture(names, clone, model, modules)
        self._capture = (step, cap)
        return cap

    def _every_step_modules(self, model: nn.Module) -> list[str]:
        """Modules the hooks due at every step capture without copying outputs (kept hooked by a
        deferred runner through an epoch)."""
        if self._every_step is None or self._every_step[0]() is not model:
            names = []
            for r in self.hooks.values():
                if r.every_n_steps == 1:
                    mods, clone = r.hook.capture_modules(model)
                    names += [] if clone else [m for m in mods if m not in names]
            self._every_step = (weakref.ref(model), names)
        return self._every_step[1]

    def _recapture(self) -> None:
        """Forget the kept forward hooks and which modules are captured at every step: a hook's
        needs changed (``Hook.capture_changed``); the next step's capture walks them anew."""
        if self._sticky is not None:
            self._sticky.remove()
            self._sticky = None
        self._every_step = None
        self._uncaptured.clear()


_NO_CAPTURE = StepCapture([], False, None)  # the capture of a step whose hooks need no module (shared)

"""One Registry class behind objectives, models, hooks and datasets: same rules for all four."""

from __future__ import annotations

import pytest

from ban_analysis.data import DATASETS
from ban_analysis.instrument import HOOKS
from ban_analysis.losses import OBJECTIVES
from ban_analysis.models import MODELS
from ban_analysis.registry import Registry, UnknownNameError

REGISTRIES = {"objective": OBJECTIVES, "model": MODELS, "hook": HOOKS, "dataset": DATASETS}


@pytest.mark.parametrize("kind", REGISTRIES)
def test_every_registry_is_a_registry_with_entries(kind):
    registry = REGISTRIES[kind]
    assert isinstance(registry, Registry) and registry.kind == kind and len(registry) > 0
    assert list(registry) == registry.names() and all(name in registry for name in registry)


@pytest.mark.parametrize("kind", REGISTRIES)
def test_unknown_name_lists_the_allowed_ones(kind):
    registry = REGISTRIES[kind]
    with pytest.raises(ValueError) as err:
        registry["no-such-name"]
    assert isinstance(err.value, KeyError) and isinstance(err.value, UnknownNameError)
    message = str(err.value)
    assert f"unknown {kind} 'no-such-name'" in message and all(name in message for name in registry)
    with pytest.raises(ValueError):
        registry.get("no-such-name")


@pytest.mark.parametrize("kind", REGISTRIES)
@pytest.mark.parametrize("bad", ["", "   ", " padded", None, 3])
def test_empty_or_non_string_names_are_refused(kind, bad):
    before = len(REGISTRIES[kind])
    with pytest.raises(ValueError, match="non-empty string"):
        REGISTRIES[kind].register(bad, object())
    assert len(REGISTRIES[kind]) == before


@pytest.mark.parametrize("kind", REGISTRIES)
def test_a_name_registered_twice_is_refused(kind):
    registry = REGISTRIES[kind]
    existing = registry.names()[0]
    entry = registry[existing]
    with pytest.raises(ValueError, match="already registered"):
        registry.register(existing, object())
    assert registry[existing] is entry


def test_register_as_decorator_and_mapping_is_read_only():
    registry = Registry("thing")

    @registry.register("a")
    def make_a():
        return 1

    assert registry["a"] is make_a and dict(registry) == {"a": make_a}
    with pytest.raises(TypeError):
        registry["b"] = make_a  # no item assignment: register is the one way in


def test_decorators_of_each_kind_refuse_duplicates():
    from ban_analysis.instrument.base import Hook, register_hook
    from ban_analysis.losses.base import Objective, register_objective
    from ban_analysis.models import register_model

    with pytest.raises(ValueError, match="already registered"):
        register_objective(OBJECTIVES.names()[0])(type("Dup", (Objective,), {}))
    with pytest.raises(ValueError, match="already registered"):
        register_model(MODELS.names()[0])(lambda num_classes, input_shape: None)
    dup = type("DupHook", (Hook,), {"name": HOOKS.names()[0]})
    with pytest.raises(ValueError, match="already registered"):
        register_hook(dup)
    with pytest.raises(ValueError, match="non-empty string"):
        register_hook(type("NoName", (Hook,), {"name": ""}))

"""Reading one ``[hooks.<name>]`` table of a run config into a validated hook schedule.

:func:`resolve` checks the table against the hook class (the common keys ``every_n_steps``,
``samples``, ``sample_from``, then the hook's own ``options`` and ``choices``), fills in the
class defaults, builds the hook, and draws the fixed subset of training indices a hook with
``sample_from = "train"`` reports on. :class:`ban_analysis.instrument.hooks.HookRunner` calls it once
per configured hook; split from hooks.py to keep that file short (it has no other user).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from ban_analysis.instrument.base import Hook

# The hooks' logger: this is the hooks' set-up, and a user filtering on that name expects it.
logger = logging.getLogger("ban_analysis.instrument.hooks")


def seed_of(*parts: Any) -> int:
    """A stable 63-bit seed from the parts (Python's hash() differs between processes)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_int(what: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an int >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class Resolved:
    """A configured hook and when and on which samples it runs."""

    hook: Hook
    every_n_steps: int
    samples: Any  # "all" or int
    sample_from: str
    subset: Tensor | None  # sorted fixed subset of train indices (sample_from "train", n given)


def resolve(name: str, cls: type[Hook], table: Mapping[str, Any] | None, seed: int, pool: Tensor) -> Resolved:
    """Validate hook ``name``'s table and build it.

    Args:
        name: the hook's registry name (used in messages and in the subset's seed).
        cls: its ``Hook`` class.
        table: the ``[hooks.<name>]`` table; missing keys take the class defaults.
        seed: the run seed; the fixed subset is drawn from a generator seeded by (seed, name).
        pool: (N,) int64 training indices the subset is drawn from.
    """
    table = dict(table or {})
    # A per-step hook with sample_from "val" (heldout_attribution) takes ``samples`` as the
    # number of held-out rows; it is drawn by :func:`heldout_subset` once the data is attached.
    heldout = not cls.per_sample and cls.sample_from == "val"
    common = ["every_n_steps", "samples"] + (["sample_from"] if cls.per_sample else [])
    valid = common + list(cls.options)
    unknown = sorted(set(table) - set(valid))
    if unknown:
        raise ValueError(f"hook {name!r}: unknown option(s) {unknown}; valid options: {', '.join(valid)}")
    every = check_int(f"hooks.{name}.every_n_steps", table.pop("every_n_steps", cls.every_n_steps), 1)
    samples = table.pop("samples", cls.samples if (cls.per_sample or heldout) else "all")
    if samples != "all":
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"hooks.{name}.samples must be 'all' or an int >= 1, got {samples!r}")
        if not cls.per_sample and not heldout:
            raise ValueError(f"hooks.{name}.samples must be 'all' (it is a per-step hook), got {samples!r}")
    sample_from = table.pop("sample_from", cls.sample_from)
    if sample_from not in ("train", "batch") and not heldout:
        raise ValueError(f"hooks.{name}.sample_from must be 'train' or 'batch', got {sample_from!r}")
    for key, value in table.items():
        default = cls.options[key]
        if type(value) is not type(default):
            raise ValueError(f"hooks.{name}.{key} must be {type(default).__name__}, got {value!r}")
        if key in cls.choices and value not in cls.choices[key]:
            raise ValueError(f"hooks.{name}.{key} must be one of {list(cls.choices[key])}, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool):
            check_int(f"hooks.{name}.{key}", value, 1)
    subset = None
    if samples != "all" and sample_from == "train":
        if samples > pool.numel():
            logger.warning("hooks.%s.samples = %d exceeds the %d training samples; using all",
                           name, samples, pool.numel())
        g = torch.Generator().manual_seed(seed_of(seed, name))
        subset = pool[torch.randperm(pool.numel(), generator=g)[:samples]].sort().values
    return Resolved(cls(**table), every, samples, sample_from, subset)


def heldout_subset(name: str, samples: Any, seed: int, n: int) -> Tensor:
    """Sorted positions of the held-out rows hook ``name`` uses, out of ``n`` validation rows.

    ``samples`` rows ("all": every row) drawn once from a generator seeded by (seed, name), as
    the training subsets are; more than ``n`` asked: all ``n``, with a warning.
    """
    if samples == "all" or samples >= n:
        if samples != "all" and samples > n:
            logger.warning("hooks.%s.samples = %d exceeds the %d held-out rows; using all", name, samples, n)
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed_of(seed, name))
    return torch.randperm(n, generator=g)[:samples].sort().values

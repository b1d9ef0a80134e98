"""One registry class for everything found by name: objectives, models, hooks, datasets.

A :class:`Registry` is a read-only mapping name -> entry with one way in (:meth:`register`,
usable as a decorator) and one way out (:meth:`get`, or ``registry[name]``). It refuses an
empty or non-string name and a name registered twice, and a lookup of an unknown name raises
a ``ValueError`` (also a ``KeyError``) that lists the allowed names. Tests iterate the
registries, so a new entry is tested the moment it is registered.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "UnknownNameError"]


class UnknownNameError(ValueError, KeyError):
    """A name that is not registered; the message lists the allowed names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Registry(Mapping[str, T], Generic[T]):
    """Entries of one kind by name, in registration order.

    Args:
        kind: what the entries are, in words ("objective", "model", "hook", "dataset"); used in
            error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None):
        """Add ``entry`` under ``name``; without ``entry``, a decorator that adds what it decorates.

        Raises:
            ValueError: ``name`` is empty, not a string, or already registered.
        """
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ValueError(f"a {self.kind} name must be a non-empty string without surrounding spaces, "
                             f"got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if entry is None:
            def decorate(obj: T) -> T:
                self.register(name, obj)
                return obj
            return decorate
        self._entries[name] = entry
        return entry

    def get(self, name: str, default=None) -> T:  # type: ignore[override]
        """The entry ``name``. Unlike ``dict.get`` an unknown name raises :class:`UnknownNameError`
        (a silent default would hide a typo in a config); ``default`` exists for Mapping's signature."""
        return self[name]

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(self._entries))}") \
                from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


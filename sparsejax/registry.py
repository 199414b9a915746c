"""Named plug-ins: one `Registry` per kind of extension point (criterion, schedule, router, ...).

A plug-in is one object registered under a name, usually by decorating it where it is
defined::

    from sparsejax.sparsity.criteria import CRITERIA

    @CRITERIA.register("my_score")
    class MyScore(Criterion):
        '''One line that `sparsejax list` prints.'''

Config refers to plug-ins by name (`MaskedPruningMethod.criterion = 'my_score'`); the code
that consumes a setting looks the name up with `REGISTRY.get(name, setting=...)`, which
raises a `ValueError` naming the setting, the bad value and every valid name. A module
outside the package registers the same way and is imported with `sparsejax train
--import=MODULE` (before any gin file is parsed).
"""
from __future__ import annotations

import inspect
from typing import Any, Generic, Iterator, TypeVar

T = TypeVar("T")

REGISTRIES: dict[str, "Registry"] = {}  # kind -> registry, in creation order


class Registry(Generic[T]):
    """A name -> plug-in table of one `kind` (e.g. 'criterion')."""

    def __init__(self, kind: str):
        if kind in REGISTRIES:
            raise ValueError(f"a registry of kind {kind!r} already exists")
        self.kind = kind
        self._entries: dict[str, T] = {}
        REGISTRIES[kind] = self

    def register(self, name: str, obj: T | None = None) -> Any:
        """Registers `obj` under `name`; without `obj`, returns a decorator that does."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def add(o: T) -> T:
            if name in self._entries and self._entries[name] is not o:
                raise ValueError(f"{self.kind} {name!r} is already registered (by "
                                 f"{_where(self._entries[name])}); pick another name")
            self._entries[name] = o
            return o

        return add if obj is None else add(obj)

    def get(self, name: Any, setting: str | None = None) -> T:
        """The plug-in called `name`; a ValueError naming `setting` if there is none."""
        if isinstance(name, str) and name in self._entries:
            return self._entries[name]
        label = setting or self.kind
        raise ValueError(f"{label}={name!r} is not a registered {self.kind}; valid: "
                         f"{self.names()}")

    def name_of(self, obj: Any) -> str | None:
        """The name `obj` is registered under (None if it is not)."""
        return next((n for n, o in self._entries.items() if o is obj), None)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def describe(self) -> dict[str, str]:
        """{name: the first line of the plug-in's docstring}."""
        return {n: describe(self._entries[n]) for n in self.names()}

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def describe(obj: Any) -> str:
    """First line of `obj`'s docstring ('' without one)."""
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def registered(kind: str) -> Registry:
    """The registry of `kind` (after the package has been imported)."""
    if kind not in REGISTRIES:
        raise ValueError(f"no registry of kind {kind!r}; kinds: {sorted(REGISTRIES)}")
    return REGISTRIES[kind]



"""Implementations that register themselves by name: the engines (runtime/engines), the distance backends
(runtime/search). A registry's ``names`` is the one list that configs and command lines take their choices from."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Factories of one kind by name, in the order they registered."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator: ``@REGISTRY.register("name")`` above a factory adds it under ``name``."""

        def add(factory: T) -> T:
            self._factories[name] = factory
            return factory

        return add

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._factories)

    def __getitem__(self, name: str) -> T:
        """The factory registered as ``name``; a ValueError naming the known ones for any other name."""
        if name not in self._factories:
            raise ValueError(f"{self.kind} {name!r}: expected one of {', '.join(self._factories)}")
        return self._factories[name]

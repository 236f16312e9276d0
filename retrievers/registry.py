"""A name -> factory registry, one per pipeline stage.

Lives in the bottom layer (``retrievers`` imports nothing from the rest of the project) so that every
stage can share it. Error messages are built from the registered keys, so they never go stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories (classes or functions) for one kind of component.

    Args:
        kind: What is registered, used in error messages ("retriever", "order policy", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a second registration of a name is an error."""

        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the entry for ``name``.

        Raises:
            KeyError: ``name`` is unknown; the message lists every valid choice.
        """
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} '{name}'; choose one of: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

"""A small name -> object registry, used for stages, rewards, evals, losses and estimators.

Registering a second, different object under a taken name is an error; a failed lookup lists
the valid names and the closest match.
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


def closest(name: str, choices) -> str | None:
    """The closest valid name to `name`, or None when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return match[0] if match else None


def did_you_mean(name: str, choices) -> str:
    """' (did you mean 'x'?)' or '' -- appended to error messages."""
    best = closest(name, choices)
    return f" (did you mean '{best}'?)" if best else ""


class Registry(Generic[T]):
    """Maps names to objects of one kind (e.g. all reward functions)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            taken = self._items.get(name)
            if taken is not None and taken is not obj and _qualname(taken) != _qualname(obj):
                raise ValueError(f"{self.kind} '{name}' is already registered ({_qualname(taken)})")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._items)}; "
                f"known: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    @contextmanager
    def override(self, name: str, obj: T) -> Iterator[T]:
        """Temporarily register `obj` under `name` (tests); restores the registry on exit."""
        missing = object()
        old = self._items.get(name, missing)
        self._items[name] = obj
        try:
            yield obj
        finally:
            if old is missing:
                del self._items[name]
            else:
                self._items[name] = old  # type: ignore[assignment]


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"

"""One registry per extension point (advantage estimators, rewards, rollout engines, policy backends,
data sources). Config names select entries; nothing else in the code branches on those names."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown name was asked of a registry; the message lists the allowed names."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain sentence.
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str, key: str | None = None) -> T:
        """Look up `name`; `key` is the config key that chose it, named in the error."""
        if name not in self._entries:
            where = f"{key}={name!r}" if key else repr(name)
            raise RegistryError(f"unknown {self.kind} {where}; allowed values: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

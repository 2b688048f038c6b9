"""Name -> (class, typed options dataclass) registries through which cores and learners plug in."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from rlmem.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    cls: type[T]
    options: type
    summary: str


class Registry(Generic[T]):
    """A named collection of components, each with the dataclass that declares its options."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, options: type) -> Callable[[type[T]], type[T]]:
        if not dataclasses.is_dataclass(options):
            raise TypeError(f"options for {self.kind} {name!r} must be a dataclass")

        def decorate(cls: type[T]) -> type[T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            self._entries[name] = Entry(name, cls, options, summary)
            return cls

        return decorate

    def get(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(sorted(self._entries))}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries[n] for n in self.names())


def build_options(options_cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate an options dataclass from a plain dict, naming unknown keys and valid ones."""
    fields = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"unknown key {where}.{unknown[0]}; valid keys: {', '.join(sorted(fields))}"
        )
    try:
        return options_cls(**values)
    except TypeError as err:  # a missing required field
        raise ConfigError(f"{where}: {err}") from None

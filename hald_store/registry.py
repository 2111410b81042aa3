"""Registries of extension classes by name (value codecs, phase kinds): an extension is one
class with a ``name``, registered with the registry's decorator."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Mapping[str, T], Generic[T]):
    """A read-only mapping ``name -> class``, in registration order; :meth:`register` adds one."""

    def __init__(self, what: str) -> None:
        self.what = what  # "value codec": how errors name an entry
        self._classes: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Class decorator: make ``cls`` the entry named ``cls.name`` (a second one with that name is refused)."""
        if cls.name in self._classes:
            raise ValueError(f"a {self.what} named {cls.name!r} is already registered "
                             f"({self._classes[cls.name].__name__})")
        self._classes[cls.name] = cls
        return cls

    def __getitem__(self, name: str) -> T:
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

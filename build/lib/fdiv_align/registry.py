"""Name → builder registries: divergences, tasks and baselines are looked up the same way.

``registry.build(name, **params)`` calls the builder registered under ``name``; an unknown name is a
ValueError listing the known ones, parameters the builder does not take a ValueError naming them.
``registry.register(name)`` is a decorator (or ``register(name, builder)`` a call) adding a builder;
registering another builder under a taken name is refused.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["Registry"]


class Registry:
    """``kind``: what is registered, as error messages name it (``"divergence"``, ``"task"``);
    ``params``: what the builder's keyword arguments are called there (``"arguments"``, ``"parameters"``)."""

    def __init__(self, kind: str, builders: dict[str, Callable] | None = None, params: str = "arguments"):
        self.kind, self.params = kind, params
        self._builders: dict[str, Callable] = dict(builders or {})

    def register(self, name: str, builder: Callable | None = None, check: Callable[[Callable], None] | None = None):
        """Add ``builder`` under ``name`` (used as a decorator when ``builder`` is None); ``check(builder)``
        may refuse it by raising."""
        def add(builder):
            if check is not None:
                check(builder)
            if name in self._builders and self._builders[name] is not builder:
                raise ValueError(f"{self.kind} {name!r} is already registered ({getattr(self._builders[name], '__name__', '?')})")
            self._builders[name] = builder
            return builder

        return add if builder is None else add(builder)

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name in self._builders

    def __getitem__(self, name: str) -> Callable:
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; expected one of {', '.join(self.names())}")
        return self._builders[name]

    def build(self, name: str, **params):
        """The object ``name``'s builder makes with ``params``."""
        builder = self[name]
        try:
            return builder(**params)
        except TypeError as exc:
            raise ValueError(f"{self.kind} {name!r} does not accept {self.params} {params}: {exc}") from None

    def copy(self) -> "Registry":
        return Registry(self.kind, self._builders, self.params)

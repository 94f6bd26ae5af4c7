"""Registries of the pluggable parts: PEFT variants, methods and datasets.

A part registers itself, in its own module, with the registry of its kind,
under the name the run config selects it by and with its own config model::

    @PEFT_VARIANTS.register("prompt", PromptConfig)
    class PromptPeft(PeftVariant): ...

Each registry knows the modules of the built-in parts (one line per part,
below) and imports them the first time it is asked for its contents, so that
reading the registry's names, or the run config's schema, never needs a
caller to import every part first. A part of one's own (a test's toy variant,
a user's method) registers the same way, from any module that is imported
before the run config is parsed.

Pure library code: no Flower and no torch imports.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered part: its name, what implements it, and its config model (or None)."""

    name: str
    impl: T
    config: type | None

    @property
    def field(self) -> str:
        """The part's name as a Python identifier (its field in the run config's section)."""
        return self.name.replace("-", "_")


class Registry(Generic[T]):
    """Name -> :class:`Entry`, filled by :meth:`register` and the built-in modules."""

    def __init__(self, kind: str, builtins: tuple[str, ...]) -> None:
        self.kind = kind
        self._builtins = builtins
        self._entries: dict[str, Entry[T]] = {}
        self._loaded = False
        self._lock = threading.RLock()
        #: Bumped on every change, so that models built from the registry can be cached.
        self.version = 0

    def register(self, name: str, config: type | None = None) -> Callable[[T], T]:
        """Decorator: register the decorated class (or function) as ``name`` with ``config``."""
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r}: use lowercase words joined by '-' (e.g. 'fed-grab')")

        def add(impl: T) -> T:
            with self._lock:
                known = self._entries.get(name)
                if known is not None and known.impl is not impl:
                    raise ValueError(f"{self.kind} {name!r} is already registered (by {known.impl!r})")
                self._entries[name] = Entry(name, impl, config)
                self.version += 1
            return impl

        return add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests that register a part of their own)."""
        with self._lock:
            if self._entries.pop(name, None) is not None:
                self.version += 1

    def _load(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if not self._loaded:
                for module in self._builtins:
                    importlib.import_module(module)
                self._loaded = True

    def entries(self) -> tuple[Entry[T], ...]:
        """Every registered part, built-ins first, in registration order."""
        self._load()
        return tuple(self._entries.values())

    def names(self) -> tuple[str, ...]:
        return tuple(entry.name for entry in self.entries())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __getitem__(self, name: str) -> Entry[T]:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of {sorted(self._entries)}") from None

    def get(self, name: str) -> Any:
        """What implements ``name``."""
        return self[name].impl


# The built-in parts: one module each. A new one is its module plus one line here.
PEFT_VARIANTS: Registry[Any] = Registry(
    "PEFT variant",
    (
        "fedpurel_app.peft.prompt",
        "fedpurel_app.peft.adapter",
        "fedpurel_app.peft.lora",
    ),
)
METHODS: Registry[Any] = Registry(
    "method",
    (
        "fedpurel_app.methods.promptfl",
        "fedpurel_app.methods.logit_adjustment",
        "fedpurel_app.methods.fedpurel",
        "fedpurel_app.methods.finetune",
        "fedpurel_app.methods.promptfolio",
        "fedpurel_app.methods.fedgrab",
    ),
)
DATASETS: Registry[Any] = Registry(
    "dataset",
    (
        "fedpurel_app.data.embedded",
        "fedpurel_app.data.cifar",
        "fedpurel_app.data.folder",
    ),
)

__all__ = ["DATASETS", "METHODS", "PEFT_VARIANTS", "Entry", "Registry"]

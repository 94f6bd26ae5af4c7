"""Registries of the pluggable parts: PEFT variants, methods and datasets.

A part registers itself, in its own module, with the registry of its kind,
under the name the run config selects it by and with its own config model::

    @PEFT_VARIANTS.register("prompt", PromptConfig)
    class PromptPeft(PeftVariant): ...

Each registry knows the names of the built-in parts and their modules (one
line per part, below): their names are known without importing anything, and
a part's module is imported the first time the part itself (or the run
config's schema, which holds every part's config) is asked for. A part of one's own (a test's toy variant,
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

    def __init__(self, kind: str, builtins: dict[str, str]) -> None:
        self.kind = kind
        self._builtins = dict(builtins)  # name -> the module that registers it
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
        """Remove ``name`` (for tests that register a part of their own; not a built-in)."""
        if name in self._builtins:
            raise ValueError(f"{self.kind} {name!r} is built in")
        with self._lock:
            if self._entries.pop(name, None) is not None:
                self.version += 1

    def _load(self, name: str | None = None) -> None:
        """Import the module of the built-in ``name`` (of every built-in when None)."""
        if self._loaded or (name is not None and (name in self._entries or name not in self._builtins)):
            return
        with self._lock:
            for module in sorted(set(self._builtins.values()) if name is None else {self._builtins[name]}):
                importlib.import_module(module)
            if name is None:
                self._loaded = True

    def entries(self) -> tuple[Entry[T], ...]:
        """Every part: the built-ins in the order of their lines below, then the others as registered."""
        self._load()
        return tuple(self._entries[name] for name in self.names())

    def names(self) -> tuple[str, ...]:
        """Every part's name, without importing any (built-ins first)."""
        return (*self._builtins, *(name for name in self._entries if name not in self._builtins))

    def __contains__(self, name: object) -> bool:
        return name in self._builtins or name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __getitem__(self, name: str) -> Entry[T]:
        self._load(name)
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of {sorted(self.names())}") from None

    def get(self, name: str) -> Any:
        """What implements ``name``."""
        return self[name].impl


# The built-in parts: name -> the module that registers it. A new part is its module plus one line here.
PEFT_VARIANTS: Registry[Any] = Registry(
    "PEFT variant",
    {
        "prompt": "fedpurel_app.peft.prompt",
        "adapter": "fedpurel_app.peft.adapter",
        "lora": "fedpurel_app.peft.lora",
    },
)
METHODS: Registry[Any] = Registry(
    "method",
    {
        "zero-shot": "fedpurel_app.methods.promptfl",
        "promptfl": "fedpurel_app.methods.promptfl",
        "promptfl-la": "fedpurel_app.methods.logit_adjustment",
        "fedpurel-kl": "fedpurel_app.methods.fedpurel",
        "fedpurel": "fedpurel_app.methods.fedpurel",
        "pft": "fedpurel_app.methods.finetune",
        "lp-ft": "fedpurel_app.methods.finetune",
        "promptfolio": "fedpurel_app.methods.promptfolio",
        "fed-grab": "fedpurel_app.methods.fedgrab",
    },
)
DATASETS: Registry[Any] = Registry(
    "dataset",
    {
        "mnist": "fedpurel_app.data.embedded",
        "mnist-animals": "fedpurel_app.data.embedded",
        "mnist-animals-blur": "fedpurel_app.data.shifted",
        "cifar10-lt": "fedpurel_app.data.cifar",
        "cifar100-lt": "fedpurel_app.data.cifar",
        "imagenet-lt": "fedpurel_app.data.folder",
        "places-lt": "fedpurel_app.data.folder",
    },
)

__all__ = ["DATASETS", "METHODS", "PEFT_VARIANTS", "Entry", "Registry"]

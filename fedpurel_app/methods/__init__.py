"""Federated methods: FedPuReL and the baselines it is compared with, one module each.

``method`` in the run config names one of :data:`METHODS`; :func:`build_method`
makes it for a run. A new method is one module with a :class:`Method` subclass
plus one line here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .base import Method
from .fedgrab import FedGraB
from .fedpurel import FedPuReL, FedPuReLKL
from .finetune import LPFT, PFT
from .logit_adjustment import PromptFLLA
from .promptfl import PromptFL, ZeroShot
from .promptfolio import PromptFolio

if TYPE_CHECKING:  # pragma: no cover
    from ..config import RunConfig

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (ZeroShot, PromptFL, PromptFLLA, FedPuReLKL, FedPuReL, PFT, LPFT, PromptFolio, FedGraB)
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def build_method(cfg: RunConfig, class_counts: np.ndarray | None = None) -> Method:
    """The run's method; ``class_counts``: the global prior, for methods that need it."""
    return method_class(cfg.method)(cfg, class_counts)


__all__ = ["METHODS", "Method", "build_method", "method_class"]

"""FedPuReL as a library: the method's math, data protocol, model and local loops.

Nothing here imports Flower; ``client_app`` and ``server_app`` move records
in and out and call these functions.

Public API (plain tensors in, tensors out):

- :func:`solve_temperature` -- per-row tau with H(softmax(logits / tau)) = H*.
- :func:`temperature_aligned_kl` -- mean KL(softmax(z / tau_z) || softmax(f / tau_f)).
- :func:`purify_gradients` -- drop the task gradient's component that conflicts
  with the alignment gradient.
- :func:`residual_loss` / :func:`fuse_logits` -- Stage-2 personalization.
- :func:`parse_run_config` -- the validated run config.

The names are imported on first use, so that ``import fedpurel_app.config``
(the run config's schema) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "ConfigError": "errors",
    "UserError": "errors",
    "RunConfig": "config",
    "parse_run_config": "config",
    "PurificationStats": "purification",
    "purify_gradients": "purification",
    "purify_gradients_with_stats": "purification",
    "fuse_logits": "residual",
    "residual_loss": "residual",
    "aligned_temperatures": "tkl",
    "entropy": "tkl",
    "solve_temperature": "tkl",
    "temperature_aligned_kl": "tkl",
}

__all__ = sorted(_API)

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

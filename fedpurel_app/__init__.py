"""FedPuReL as a library: the method's math, data protocol, model and local loops.

Nothing here imports Flower; ``client_app`` and ``server_app`` move records
in and out and call these functions.

Public API (plain tensors in, tensors out):

- :func:`solve_temperature` -- per-row tau with H(softmax(logits / tau)) = H*.
- :func:`temperature_aligned_kl` -- mean KL(softmax(z / tau_z) || softmax(f / tau_f)).
- :func:`purify_gradients` -- drop the task gradient's component that conflicts
  with the alignment gradient.
- :func:`residual_loss` / :func:`fuse_logits` -- Stage-2 personalization.
"""

from .config import ConfigError, RunConfig, parse_run_config
from .purification import PurificationStats, purify_gradients, purify_gradients_with_stats
from .residual import fuse_logits, residual_loss
from .tkl import aligned_temperatures, entropy, solve_temperature, temperature_aligned_kl

__all__ = [
    "ConfigError",
    "PurificationStats",
    "RunConfig",
    "aligned_temperatures",
    "entropy",
    "fuse_logits",
    "parse_run_config",
    "purify_gradients",
    "purify_gradients_with_stats",
    "residual_loss",
    "solve_temperature",
    "temperature_aligned_kl",
]

__version__ = "0.1.0"

"""PromptFL with logit adjustment by the global class prior (``promptfl-la``).

Source: Menon et al., "Long-tail learning via logit adjustment", ICLR 2021,
the logit-adjusted loss (their eq. 10):

    L_task = CE(f(x) + tau * log pi, y)

with pi the global class prior (the long-tailed train counts, normalised) and
``tau = method.promptfl-la.tau`` (1 in the paper). At test time the plain logits f(x) are
used, so the model learns to predict as if the training set were balanced.
The server sends the global class counts with every train message (``needs_prior``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..config import MethodConfig, knob
from ..registry import METHODS
from .promptfl import PromptFL


class LogitAdjustmentConfig(MethodConfig):
    """PromptFL with the logit-adjusted loss CE(f + tau log pi, y)."""

    tau: float = knob(1.0, "tau of the logit-adjusted loss", role="training", ge=0.0)


def log_prior(class_counts: np.ndarray) -> torch.Tensor:
    """log pi_c = log(n_c / sum n); a class without samples gets the log of half a sample."""
    counts = np.maximum(np.asarray(class_counts, dtype=np.float64), 0.5)
    return torch.as_tensor(np.log(counts / counts.sum()), dtype=torch.float32)


def logit_adjusted_loss(logits: torch.Tensor, labels: torch.Tensor, log_pi: torch.Tensor, tau: float) -> torch.Tensor:
    """CE(logits + tau * log pi, y), batch mean (Menon et al. 2021, eq. 10)."""
    return F.cross_entropy(logits + tau * log_pi.to(logits.device, logits.dtype), labels)


@METHODS.register("promptfl-la", LogitAdjustmentConfig)
class PromptFLLA(PromptFL):
    needs_prior = True

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return logit_adjusted_loss(logits, labels, log_prior(self.prior()), self.options.tau)

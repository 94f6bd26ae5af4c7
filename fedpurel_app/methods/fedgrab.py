"""Fed-GraB: a self-adjusting gradient balancer for federated long-tailed learning.

Source: Xiao et al., "Fed-GraB: Federated Long-tailed Learning with
Self-Adjusting Gradient Balancer", NeurIPS 2023. Stage 1 is FedAvg of phi_g
(as PromptFL) with the task gradient re-weighted class by class on each
client; one global model (GM).

**Self-adjusting gradient balancer (SGB).** For the softmax cross entropy,
the gradient on logit j of a sample is p_j - 1 when y = j (a *positive*
gradient of class j) and p_j otherwise (a *negative* one). Each client
accumulates, over all its local steps and rounds, the magnitudes of the
re-weighted positive and negative gradients of every class, P_j and N_j.
A PID controller drives their ratio to balance for the tail classes:

    e_j = 1 - P_j / N_j
    u_j = clip(Kp e_j + Ki sum_t e_j + Kd (e_j - e_j^prev), 0, u_max)
    w+_j = 1 + u_j,   w-_j = 1 / (1 + u_j)

and the step uses the gradient w+_j (p_j - 1) on positives and w-_j p_j on
negatives (a tail class's positive gradients are amplified and the
negative gradients that other classes put on it are damped until they
balance). Head classes keep weight 1.

**Prior.** Fed-GraB's direct prior analyzer (DPA) estimates the global class
prior from the norms of the classifier's weight vectors. CLIP's classifier
is made of L2-normalised text embeddings, whose norms carry no prior, so the
server sends the global class counts instead (the quantity the DPA
estimates); the tail classes are those with a prior below uniform, 1/C.

Hyper-parameters: ``method.fed-grab.kp``, ``.ki``, ``.kd`` (controller gains),
u_max = 10. The controller state (P, N, the integral and the last error) is
private client state, kept across rounds like phi_k.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..config import MethodConfig, knob
from ..registry import METHODS
from .promptfl import PromptFL

U_MAX = 10.0
STATE_KEYS = ("positive", "negative", "integral", "error")


def tail_classes(class_counts: np.ndarray) -> torch.Tensor:
    """Boolean mask [C] of the classes whose prior n_c / sum(n) is below uniform 1/C."""
    counts = np.asarray(class_counts, dtype=np.float64)
    return torch.as_tensor(counts / counts.sum() < 1.0 / len(counts))


def gradient_parts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class positive and negative CE gradient magnitudes of a batch, each [C].

    positive_j = sum over samples of class j of (1 - p_j);
    negative_j = sum over samples of other classes of p_j.
    """
    probs = F.softmax(logits.detach().float(), dim=-1)
    onehot = F.one_hot(labels, probs.shape[-1]).to(probs.dtype)
    return ((1.0 - probs) * onehot).sum(0), (probs * (1.0 - onehot)).sum(0)


def pid_weights(
    error: torch.Tensor,
    integral: torch.Tensor,
    previous: torch.Tensor,
    kp: float,
    ki: float,
    kd: float,
    tail: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w+, w-) [C] from the controller: u = clip(Kp e + Ki I + Kd (e - e_prev), 0, u_max) on tail classes."""
    u = (kp * error + ki * integral + kd * (error - previous)).clamp(0.0, U_MAX) * tail.to(error.dtype)
    return 1.0 + u, 1.0 / (1.0 + u)


def balanced_ce(logits: torch.Tensor, labels: torch.Tensor, w_pos: torch.Tensor, w_neg: torch.Tensor) -> torch.Tensor:
    """A loss whose value is CE(logits, y) and whose gradient on the logits is the re-weighted one.

    d/dz_ij = [w+_j (p_ij - 1) if y_i = j else w-_j p_ij] / B.
    """
    ce = F.cross_entropy(logits, labels)
    probs = F.softmax(logits.detach(), dim=-1)
    onehot = F.one_hot(labels, logits.shape[-1]).to(probs.dtype)
    grad = (w_pos * (probs - 1.0) * onehot + w_neg * probs * (1.0 - onehot)) / logits.shape[0]
    surrogate = (grad.to(logits.dtype) * logits).sum()
    return ce.detach() + surrogate - surrogate.detach()


class FedGraBConfig(MethodConfig):
    """Fed-GraB: PID gains of the self-adjusting gradient balancer."""

    kp: float = knob(1.0, "proportional gain", role="training", ge=0.0)
    ki: float = knob(0.01, "integral gain", role="training", ge=0.0)
    kd: float = knob(0.1, "derivative gain", role="training", ge=0.0)


@METHODS.register("fed-grab", FedGraBConfig)
class FedGraB(PromptFL):
    needs_prior = True

    def __init__(self, cfg, class_counts=None) -> None:
        super().__init__(cfg, class_counts)
        self.tail: torch.Tensor | None = None  # the tail-class mask, set at the first step
        self.state: dict[str, torch.Tensor] = {}

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        device = logits.device
        if self.tail is None:  # once per client and message, on the logits' device
            self.tail = tail_classes(self.prior()).to(device)
            self.state = {
                key: self.state[key].to(device)
                if key in self.state and self.state[key].shape == self.tail.shape
                else torch.zeros(self.tail.shape, dtype=torch.float64, device=device)
                for key in STATE_KEYS
            }
        s, gains = self.state, self.options
        error = torch.where(s["negative"] > 0, 1.0 - s["positive"] / s["negative"].clamp_min(1e-12), 0.0)
        s["integral"] += error
        w_pos, w_neg = pid_weights(error, s["integral"], s["error"], gains.kp, gains.ki, gains.kd, self.tail)
        s["error"] = error
        positive, negative = gradient_parts(logits, labels)
        s["positive"] += w_pos * positive.double()
        s["negative"] += w_neg * negative.double()
        return balanced_ce(logits, labels, w_pos.to(logits.dtype), w_neg.to(logits.dtype))

    def private_state(self) -> dict[str, torch.Tensor]:
        return {f"grab.{key}": value.detach().cpu().clone() for key, value in self.state.items()}

    def load_private_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = {
            key: torch.as_tensor(state[f"grab.{key}"], dtype=torch.float64).clone()
            for key in STATE_KEYS
            if f"grab.{key}" in state
        }

"""Personalized residual learning, docs/METHOD.md "Stage 2".

phi_g is frozen; client k trains a private residual phi_k. With
``l_G`` the (scaled) logits of the global model and ``l_P`` those of the
private residual:

* personalized prediction: ``l_final = l_G + l_P``;
* loss: ``(1 - lam) * CE(l_G + l_P, y) + lam * CE(l_P, y)``, with ``l_G``
  a constant (no gradient).

Half-precision logits are promoted to float32 for the loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fuse_logits", "residual_loss"]


def _check_same_shape(global_logits: Tensor, private_logits: Tensor) -> None:
    if global_logits.shape != private_logits.shape:
        raise ValueError(
            f"global and private logits must have the same shape, got "
            f"{tuple(global_logits.shape)} and {tuple(private_logits.shape)}"
        )


def fuse_logits(global_logits: Tensor, private_logits: Tensor) -> Tensor:
    """Personalized prediction ``l_final = l_G + l_P`` (sum of scaled logits).

    Args:
        global_logits: ``l_G``, ``[B, C]`` logits of the model with phi_g.
        private_logits: ``l_P``, ``[B, C]`` logits of the model with phi_k.

    Returns:
        ``[B, C]`` fused logits (gradient flows to both inputs; detach
        ``l_G`` upstream when phi_g is frozen).
    """
    _check_same_shape(global_logits, private_logits)
    return global_logits + private_logits


def residual_loss(global_logits: Tensor, private_logits: Tensor, labels: Tensor, lam: float) -> Tensor:
    """Stage-2 loss ``(1 - lam) * CE(l_G + l_P, y) + lam * CE(l_P, y)``.

    ``l_G`` is detached (phi_g frozen), so gradient reaches ``l_P`` only.
    CE is the batch-mean cross entropy.

    Args:
        global_logits: ``l_G``, ``[B, C]``.
        private_logits: ``l_P``, ``[B, C]``.
        labels: ``[B]`` integer class labels.
        lam: weight of the private-only term, in [0, 1] (paper 0.9,
            reference code 0.99).

    Returns:
        Scalar loss (float32 for half-precision input).

    Raises:
        ValueError: if ``lam`` is not in [0, 1] or shapes mismatch.
    """
    lam = float(lam)
    if not (math.isfinite(lam) and 0.0 <= lam <= 1.0):
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    _check_same_shape(global_logits, private_logits)
    if labels.shape != private_logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits batch shape {tuple(private_logits.shape[:-1])}"
        )
    dtype = private_logits.dtype if private_logits.dtype in (torch.float32, torch.float64) else torch.float32
    l_p = private_logits.to(dtype)
    l_g = global_logits.detach().to(device=l_p.device, dtype=dtype)
    y = labels.to(device=l_p.device, dtype=torch.long)
    ce_fused = F.cross_entropy(fuse_logits(l_g, l_p), y)
    ce_private = F.cross_entropy(l_p, y)
    return (1.0 - lam) * ce_fused + lam * ce_private

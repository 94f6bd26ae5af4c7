"""FedPuReL (TKL) and its KL ablation: purified Stage 1, private residual Stage 2.

Source: "Fine-Tuning Impairs the Balancedness of Foundation Models in
Long-tailed Personalized Federated Learning" (CVPR 2026), METHOD.md.

- Stage 1: the task gradient loses its component that conflicts with the
  gradient of TKL(z || l_G) (``fedpurel``) or of plain KL (``fedpurel-kl``).
- Stage 2: phi_g frozen, each client trains a residual phi_k with
  (1 - lam) CE(l_G + l_P, y) + lam CE(l_P, y); PM uses l_G + l_P.

Hyper-parameters: ``lr``, ``local-epochs``, ``tau-*`` (Stage 1);
``personal-lr``, ``personal-epochs``, ``personal-rounds``, ``lam`` (Stage 2).
"""

from __future__ import annotations

import torch

from ..training import train_private
from .base import Method


class FedPuReL(Method):
    name = "fedpurel"
    align = "tkl"
    personal_phase = True
    interleavable = True

    def personalize(self, peft, data, generator: torch.Generator, first: bool, precision: str) -> float:
        cfg = self.cfg
        return train_private(
            peft, data, cfg.lam, cfg.personal_lr, cfg.personal_epochs, cfg.batch_size, generator, precision
        )


class FedPuReLKL(FedPuReL):
    """The paper's ablation: purification against plain KL(z || l_G) instead of TKL."""

    name = "fedpurel-kl"
    align = "kl"

"""FedPuReL (TKL) and its KL ablation: purified Stage 1, private residual Stage 2.

Source: "Fine-Tuning Impairs the Balancedness of Foundation Models in
Long-tailed Personalized Federated Learning" (CVPR 2026); docs/METHOD.md.

- Stage 1: the task gradient loses its component that conflicts with the
  gradient of TKL(z || l_G) (``fedpurel``) or of plain KL (``fedpurel-kl``).
- Stage 2: phi_g frozen, each client trains a residual phi_k with
  (1 - lam) CE(l_G + l_P, y) + lam CE(l_P, y); PM uses l_G + l_P.

Own knobs (``method.fedpurel.*``, the same under ``method.fedpurel-kl.*``):
``lam``, ``granularity`` and ``schedule``: ``"post"`` (the paper's two stages,
``personalize.rounds`` rounds on all clients after Stage 1) or
``"interleaved"`` (the reference code: every sampled client personalizes
against the fresh phi_g after each aggregation).
Shared knobs: ``peft.<variant>.lr``, ``train.*``, ``tkl.*`` (Stage 1);
``peft.<variant>.personal-lr``, ``personalize.*`` (Stage 2).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..config import MethodConfig, knob
from ..plan import RoundPlan, standard_plan
from ..registry import METHODS
from ..training import train_private
from .base import Method


class FedPuReLConfig(MethodConfig):
    """FedPuReL: TKL purification in Stage 1, the private residual in Stage 2."""

    lam: float = knob(
        0.9,
        "Stage 2: (1 - lam) CE(l_G + l_P) + lam CE(l_P); the reference code uses 0.99",
        role="training",
        ge=0.0,
        le=1.0,
    )
    granularity: Literal["tensor", "flat"] = knob(
        "tensor", "purification per parameter tensor | 'flat' over all of phi_g", role="training"
    )
    schedule: Literal["post", "interleaved"] = knob(
        "post", "'post': personalize.rounds rounds after Stage 1 | 'interleaved' (reference code)", role="training"
    )


@METHODS.register("fedpurel", FedPuReLConfig)
class FedPuReL(Method):
    align = "tkl"
    personal_phase = True

    def plan(self) -> RoundPlan:
        cfg, interleaved = self.cfg, self.options.schedule == "interleaved"
        personal = 0 if interleaved else cfg.personalize.rounds
        return standard_plan(cfg.train.rounds, personal, cfg.eval_every, interleaved=interleaved)

    def granularity(self) -> str:
        return self.options.granularity

    def personalize(self, peft, data, generator: torch.Generator, first: bool, precision: str) -> float:
        cfg = self.cfg
        return train_private(
            peft,
            data,
            self.options.lam,
            cfg.peft.options.personal_lr,
            cfg.personalize.epochs,
            cfg.train.batch_size,
            generator,
            precision,
        )


@METHODS.register("fedpurel-kl", FedPuReLConfig)
class FedPuReLKL(FedPuReL):
    """The paper's ablation: purification against plain KL(z || l_G) instead of TKL."""

    align = "kl"

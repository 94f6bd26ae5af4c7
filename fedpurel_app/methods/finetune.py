"""Post-hoc personalized fine-tuning of the final global model: ``pft`` and ``lp-ft``.

Both take PromptFL's Stage 1 (FedAvg of phi_g with plain CE, the usual
"global training stage" of post-hoc personalization), then each client
personalizes a private copy phi_k of the final phi_g on its own data for
``personalize.rounds`` rounds of ``personalize.epochs`` epochs. GM is PromptFL's
global model; PM uses the client's fine-tuned copy.

- ``pft``: plain fine-tuning of the copy with CE (SGD with Stage 1's learning rate,
  ``train.momentum`` and ``train.weight-decay``: the same parameters, the same optimizer).
- ``lp-ft`` (Kumar et al., "Fine-Tuning can Distort Pretrained Features and
  Underperform Out-of-Distribution", ICLR 2022; in FL: "A Closer Look at
  Personalized Fine-Tuning in Heterogeneous Federated Learning"): first
  linear probing, then full fine-tuning. The head is a linear map W [C, D]
  on the image embedding, added to CLIP's class embeddings and starting at
  zero, so that linear probing starts from the zero-shot head of the copy:

      logits = exp(t) * e_k(x) @ (T_k + W).T

  The first ``method.lp-ft.lp-rounds`` personalization rounds train W only (with
  ``peft.<variant>.personal-lr``), later rounds train W and phi_k together (with
  Stage 1's ``peft.<variant>.lr``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..config import MethodConfig, knob
from ..registry import METHODS
from ..training import autocast, sgd_epochs
from .promptfl import PromptFL


class LPFTConfig(MethodConfig):
    """LP-FT: linear probing, then fine-tuning of the head and the copy."""

    lp_rounds: int = knob(1, "personalization rounds of linear probing before fine-tuning", role="training", ge=0)


@METHODS.register("pft")
class PFT(PromptFL):
    reports = ("gm", "pm")
    personal_phase = True

    def personal_logits(self, peft, x: torch.Tensor) -> torch.Tensor:
        return peft.private_logits(x)

    def personalize(self, peft, data, generator: torch.Generator, first: bool, precision: str) -> float:
        if first:
            peft.load_private_state(peft.global_state())
        cfg = self.cfg
        return self._fine_tune(
            peft,
            peft.private_parameters(),
            cfg.peft.options.lr,
            cfg.train.momentum,
            cfg.train.weight_decay,
            data,
            generator,
            precision,
        )

    def _fine_tune(self, peft, params, lr, momentum, weight_decay, data, generator, precision) -> float:
        """CE on the personalized logits, ``personalize.epochs`` epochs of SGD on ``params``."""
        device = data.features.device

        def batch_loss(idx: torch.Tensor) -> torch.Tensor:
            with autocast(device, precision):
                logits = self.personal_logits(peft, data.features[idx])
            return F.cross_entropy(logits.float(), data.labels[idx])

        cfg = self.cfg
        return sgd_epochs(
            params,
            batch_loss,
            data,
            cfg.personalize.epochs,
            cfg.train.batch_size,
            generator,
            lr,
            momentum,
            weight_decay,
            precision,
        )


@METHODS.register("lp-ft", LPFTConfig)
class LPFT(PFT):
    def __init__(self, cfg, class_counts=None) -> None:
        super().__init__(cfg, class_counts)
        self.head: torch.Tensor | None = None
        self.rounds_done = 0

    def personal_logits(self, peft, x: torch.Tensor) -> torch.Tensor:
        classes = peft.class_embeddings(peft.phi_k)
        if self.head is not None:
            classes = classes + self.head.to(classes)
        return peft.logit_scale * peft.branch_embedding(peft.phi_k, x) @ classes.T

    def personalize(self, peft, data, generator: torch.Generator, first: bool, precision: str) -> float:
        cfg = self.cfg
        if first or self.head is None:
            peft.load_private_state(peft.global_state())
            with torch.no_grad():
                shape = peft.class_embeddings(peft.phi_k).shape
            self.head = torch.zeros(shape, device=data.features.device, requires_grad=True)
            self.rounds_done = 0
        elif self.head.device != data.features.device:  # restored from CPU state
            self.head = self.head.detach().to(data.features.device).requires_grad_(True)
        lr, personal_lr = cfg.peft.options.lr, cfg.peft.options.personal_lr
        if self.rounds_done < self.options.lp_rounds:  # linear probing: the head only
            loss = self._fine_tune(peft, [self.head], personal_lr, 0.0, 0.0, data, generator, precision)
        else:  # fine-tuning: the head and the copy of phi_g
            params = [self.head, *peft.private_parameters()]
            loss = self._fine_tune(
                peft, params, lr, cfg.train.momentum, cfg.train.weight_decay, data, generator, precision
            )
        self.rounds_done += 1
        return loss

    def private_state(self) -> dict[str, torch.Tensor]:
        if self.head is None:
            return {}
        return {"head": self.head.detach().cpu().clone(), "rounds": torch.tensor(self.rounds_done)}

    def load_private_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if "head" in state:
            self.head = torch.as_tensor(state["head"]).clone().float().requires_grad_(True)
            self.rounds_done = int(state["rounds"])

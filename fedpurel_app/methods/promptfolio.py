"""PromptFolio: a global and a local prompt mixed with a fixed weight (``promptfolio``).

Source: Pan et al., "Federated Learning from Vision-Language Foundation
Models: Theoretical Analysis and Method", NeurIPS 2024 (PromptFolio). Each
client trains the global branch phi_g (aggregated by FedAvg) and its own
local branch phi_k (never sent) together, in every Stage-1 round it takes
part in, with CE on the mixed prediction

    l = (1 - theta) l_G + theta l_P,        theta = ``method.promptfolio.mix-weight`` (0.2 in the paper)

PromptFolio mixes the two prompts' text features; CLIP's logits are linear in
the (normalised) text features, so mixing the logits is the same mixture for
the prompt variant, and the natural one for the adapter and LoRA variants.
GM: l_G alone; PM: the mixed logits. There is no separate personalization phase.
"""

from __future__ import annotations

import torch

from ..config import MethodConfig, knob
from ..registry import METHODS
from .base import Method


class PromptFolioConfig(MethodConfig):
    """PromptFolio: a global and a local branch mixed with a fixed weight."""

    mix_weight: float = knob(0.2, "theta: (1 - theta) l_G + theta l_P", role="training", ge=0.0, le=1.0)


@METHODS.register("promptfolio", PromptFolioConfig)
class PromptFolio(Method):
    stage1_trains_private = True

    def parameters(self, peft) -> list[torch.nn.Parameter]:
        return [*peft.global_parameters(), *peft.private_parameters()]

    def logits(self, peft, x: torch.Tensor) -> torch.Tensor:
        return self.personal_logits(peft, x)

    def personal_logits(self, peft, x: torch.Tensor) -> torch.Tensor:
        theta = self.options.mix_weight
        return (1.0 - theta) * peft.global_logits(x) + theta * peft.private_logits(x)

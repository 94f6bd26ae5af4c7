"""Zero-shot CLIP and PromptFL: the two references every Fed-LT table starts from.

- ``zero-shot``: the frozen CLIP with the dataset's template; no training.
  GM on the balanced test set, PM on the clients' test sets.
- ``promptfl`` (Guo et al., "PromptFL: Let Federated Participants Cooperatively
  Learn Prompts Instead of Models", IEEE TMC 2023): FedAvg over the PEFT
  parameters phi_g with plain cross entropy; one global model (GM). With a
  prompt variant this is PromptFL itself, with ``adapter`` FedCLIP's
  training, with ``lora`` FedAvg-LoRA. Hyper-parameters: ``peft.<variant>.lr``,
  ``train.local-epochs``, ``train.momentum``, ``train.weight-decay``.
"""

from __future__ import annotations

from ..plan import RoundPlan, standard_plan
from ..registry import METHODS
from .base import Method


@METHODS.register("zero-shot")
class ZeroShot(Method):
    """The frozen CLIP is the result: a plan of the zero-shot evaluation alone."""

    def plan(self) -> RoundPlan:
        return standard_plan(0)


@METHODS.register("promptfl")
class PromptFL(Method):
    reports = ("gm",)

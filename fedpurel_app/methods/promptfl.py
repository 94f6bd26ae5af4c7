"""Zero-shot CLIP and PromptFL: the two references every Fed-LT table starts from.

- ``zero-shot``: the frozen CLIP with the dataset's template; no training.
  GM on the balanced test set, PM on the clients' test sets.
- ``promptfl`` (Guo et al., "PromptFL: Let Federated Participants Cooperatively
  Learn Prompts Instead of Models", IEEE TMC 2023): FedAvg over the PEFT
  parameters phi_g with plain cross entropy; one global model (GM). With a
  prompt variant this is PromptFL itself, with ``adapter`` FedCLIP's
  training, with ``lora`` FedAvg-LoRA. Hyper-parameters: ``lr``,
  ``local-epochs``, ``momentum``, ``weight-decay``.
"""

from __future__ import annotations

from .base import Method


class ZeroShot(Method):
    name = "zero-shot"
    trains_global = False


class PromptFL(Method):
    name = "promptfl"
    reports = ("gm",)

"""FedCLIP-style attention adapter on the cached image embedding.

A branch re-weights the frozen image embedding ``e`` (the cached, L2-normalised
image features) coordinate by coordinate (docs/METHOD.md "PEFT variants"):

    a  = softmax(W2 tanh(W1 (sqrt(D) e) + b1) + b2)   # over the D coordinates
    e' = a * e                                        # elementwise
    logits = exp(logit_scale) * norm(e') @ norm(t).T

with ``t`` the frozen zero-shot text features of the dataset's template. W1 and
W2 are D x D with biases, as in FedCLIP. Both the image and the text encoder
stay frozen, so the inputs are the cached features, as for the prompt variant.

The cached e has unit norm, so its coordinates are ~1/sqrt(D); W1 reads
sqrt(D) e, coordinates of unit scale, the scale ``nn.Linear``'s default init
is made for (FedCLIP feeds the raw, unnormalised embedding). Without it
tanh(W1 e) is ~sqrt(D) times smaller and, on the tiny model at lr 0.01, the
adapter moved about 10x slower (needed lr 0.1 for the same train fit).

Initialisation (``peft.adapter.init``):

- ``"zero-shot"`` (default): W1, b1 PyTorch's default ``nn.Linear`` init drawn
  with the run's seed; W2 = 0, b2 = 0. Then a = 1/D exactly, e' = e / D and,
  because the logits normalise e', training starts *exactly* at the zero-shot
  classifier (the same role as B = 0 for LoRA or the phrase init for prompts).
  The 1/D scale of a needs no correction (no factor D on e'): norm() removes
  it from the logits, and it does not shrink the gradient reaching the
  pre-softmax scores either (the 1/D of softmax's Jacobian at a = 1/D cancels
  the D of norm()'s Jacobian at ||e'|| = 1/D). W2 receives a gradient from
  the first step (through tanh(W1 sqrt(D) e) != 0), W1 from the second on.
- ``"random"``: FedCLIP's own choice, PyTorch's default init for both layers
  (seeded). a is then close to, but not exactly, uniform: training starts near
  the zero-shot classifier, not on it.

phi_g and phi_k start from the same init.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftConfig, knob
from ..models import Clip
from ..registry import PEFT_VARIANTS
from .base import PeftVariant

ADAPTER_INITS = ("zero-shot", "random")


class AdapterConfig(PeftConfig):
    """FedCLIP attention adapter on the cached image embedding (peft.adapter.*).

    Learning rates chosen on a validation split of the embedded default (bench/tune.py; README
    "Per-variant defaults"); the paper presets set the paper's."""

    lr: float = knob(0.1, "Stage-1 SGD learning rate of phi_g", role="training", gt=0.0)
    personal_lr: float = knob(0.2, "Stage-2 SGD learning rate of phi_k", role="training", gt=0.0)

    init: Literal["zero-shot", "random"] = knob(
        "zero-shot", "'zero-shot': W2 = 0, starts exactly at zero-shot | 'random': FedCLIP's default init"
    )


class AttentionAdapter(nn.Module):
    """One branch: e -> softmax(W2 tanh(W1 e)) * e."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def attention(self, e: torch.Tensor) -> torch.Tensor:
        """The weights a [B, D] (each row sums to 1) for L2-normalised embeddings e."""
        return F.softmax(self.fc2(torch.tanh(self.fc1(e * self.fc1.in_features**0.5))), dim=-1)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.attention(e) * e


@PEFT_VARIANTS.register("adapter", AdapterConfig)
class AdapterPeft(PeftVariant):
    """FedCLIP's attention adapter with a global and a private branch."""

    inputs = "features"

    def __init__(
        self,
        clip: Clip,
        classnames: tuple[str, ...],
        template: str = "a photo of a {}.",
        init: Literal["zero-shot", "random"] = "zero-shot",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if init not in ADAPTER_INITS:
            raise ValueError(f"adapter init {init!r}: choose one of {ADAPTER_INITS}")
        self.logit_scale = float(clip.logit_scale)
        text = clip.zero_shot_text(classnames, template).to(clip.device)
        self.register_buffer("text", text, persistent=False)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.phi_g = AttentionAdapter(text.shape[1])
        if init == "zero-shot":
            with torch.no_grad():
                self.phi_g.fc2.weight.zero_()
                self.phi_g.fc2.bias.zero_()
        self.phi_k = copy.deepcopy(self.phi_g)

    @classmethod
    def from_config(
        cls, clip: Clip, classnames: tuple[str, ...], template: str, options: AdapterConfig, seed: int
    ) -> AdapterPeft:
        """The text side is the dataset's ``template``."""
        return cls(clip, classnames, template=template, init=options.init, seed=seed)

    def branch_embedding(self, branch: nn.Module, image_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(branch(image_features), dim=-1)

    def class_embeddings(self, branch: nn.Module) -> torch.Tensor:
        """The frozen zero-shot text features of the template."""
        return self.text

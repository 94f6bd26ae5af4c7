"""The interface every PEFT variant implements: a global branch and a private one.

A variant owns two branches of the same shape (docs/METHOD.md "Notation"):

- ``phi_g``: the global, shared parameters, trained in Stage 1 and aggregated
  by the server;
- ``phi_k``: the client's private residual parameters, trained in Stage 2;
  they never leave the client.

Both map a batch of inputs to class logits that carry CLIP's logit scale.
What a batch holds is declared by the variant's :attr:`PeftVariant.inputs`:

- ``"features"`` (default): the frozen image encoder's L2-normalised
  embeddings [B, D], computed once per client and cached (prompt, adapter);
- ``"pixels"``: preprocessed images [B, 3, H, W], for variants that put the
  image encoder in the loop (lora).

The frozen CLIP backbone is shared by the two branches and is not part of
either. A variant registers itself with its own config (a
:class:`~fedpurel_app.config.PeftConfig`: the ``peft.<name>.*`` keys) and is
built from it by :meth:`PeftVariant.from_config`; :func:`build_peft` does that
for a run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from ..registry import PEFT_VARIANTS

if TYPE_CHECKING:  # pragma: no cover
    from ..config import PeftConfig, RunConfig
    from ..models import Clip


class PeftVariant(nn.Module, ABC):
    """Two branches of one PEFT method over a frozen CLIP."""

    phi_g: nn.Module
    phi_k: nn.Module

    #: What :meth:`branch_logits` consumes: cached image ``"features"`` or ``"pixels"``.
    inputs: ClassVar[Literal["features", "pixels"]] = "features"

    @classmethod
    @abstractmethod
    def from_config(
        cls, clip: Clip, classnames: tuple[str, ...], template: str, options: PeftConfig, seed: int
    ) -> PeftVariant:
        """The variant over ``clip`` for ``classnames`` with its own config ``options``.

        ``template`` is the dataset's zero-shot template (``"a photo of a {}."``),
        for variants with a fixed text side; ``seed`` seeds a random init.
        """

    #: CLIP's logit scale exp(t), fixed.
    logit_scale: float

    @abstractmethod
    def branch_embedding(self, branch: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, D] of a batch of :attr:`inputs` under ``branch``."""

    @abstractmethod
    def class_embeddings(self, branch: nn.Module) -> torch.Tensor:
        """L2-normalised class (text) embeddings [C, D] under ``branch``: the classifier."""

    def branch_logits(self, branch: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Scaled class logits [B, C] of ``branch``: exp(t) * embedding @ class_embeddings.T."""
        return self.logit_scale * self.branch_embedding(branch, x) @ self.class_embeddings(branch).T

    def global_logits(self, x: torch.Tensor) -> torch.Tensor:
        """l_G: logits with phi_g."""
        return self.branch_logits(self.phi_g, x)

    def private_logits(self, x: torch.Tensor) -> torch.Tensor:
        """l_P: logits with phi_k."""
        return self.branch_logits(self.phi_k, x)

    def global_parameters(self) -> list[nn.Parameter]:
        return list(self.phi_g.parameters())

    def private_parameters(self) -> list[nn.Parameter]:
        return list(self.phi_k.parameters())

    def global_state(self) -> dict[str, torch.Tensor]:
        """phi_g as a CPU state dict: what a client sends and the server aggregates."""
        return _state(self.phi_g)

    def private_state(self) -> dict[str, torch.Tensor]:
        """phi_k as a CPU state dict: kept by the client only."""
        return _state(self.phi_k)

    def load_global_state(self, state: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        _load(self.phi_g, state, "phi_g")

    def load_private_state(self, state: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        _load(self.phi_k, state, "phi_k")


def _state(branch: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in branch.state_dict().items()}


def _load(branch: nn.Module, state: Mapping[str, torch.Tensor | np.ndarray], what: str) -> None:
    branch.load_state_dict(checked_state(branch.state_dict(), state, what))


def checked_state(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor | np.ndarray], what: str
) -> dict[str, torch.Tensor]:
    """``state`` as tensors of the dtypes of ``expected``; ValueError unless keys and shapes match."""
    if set(state) != set(expected):
        raise ValueError(f"{what} keys do not match this model: expected {sorted(expected)}, got {sorted(state)}")
    tensors = {}
    for key, value in state.items():
        tensor = torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value)
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{what}['{key}'] has shape {tuple(tensor.shape)}, this model expects {tuple(expected[key].shape)}"
            )
        tensors[key] = tensor.to(expected[key].dtype)
    return tensors


def build_peft(cfg: RunConfig, clip: Clip, classnames: tuple[str, ...], template: str) -> PeftVariant:
    """The run's PEFT variant (``peft.name``) over ``clip`` for ``classnames``, on the clip's device."""
    variant = PEFT_VARIANTS.get(cfg.peft.name)
    return variant.from_config(clip, classnames, template, cfg.peft.options, cfg.seed).to(clip.device)


def input_kind(name: str) -> str:
    """What the registered variant ``name`` consumes: ``"features"`` or ``"pixels"``."""
    return PEFT_VARIANTS.get(name).inputs

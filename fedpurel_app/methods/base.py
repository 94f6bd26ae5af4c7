"""The interface every federated method implements, on top of the shared loops.

A method decides three things, each with a default that a baseline overrides:

- **Stage 1** (:class:`~fedpurel_app.training.Stage1Objective`): the
  parameters a local step trains, its logits and task loss, and ``align``:
  the zero-shot anchor of gradient purification (``"none"``: no purification).
- **Personalization**: whether a post-hoc phase of ``personal-rounds``
  rounds runs after Stage 1 (:attr:`Method.personal_phase`), what a client
  does in it (:meth:`Method.personalize`) and the logits of its
  personalized model (:meth:`Method.personal_logits`).
- **What it reports**: ``"gm"`` (a global model on the balanced test set),
  ``"pm"`` (personalized models on the clients' test sets), or both.

A client's private parameters are the variant's phi_k branch plus, when a
method needs more (a linear head, a controller's state), the tensors of
:meth:`Method.private_state`; neither ever leaves the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from ..residual import fuse_logits
from ..training import Stage1Objective

if TYPE_CHECKING:  # pragma: no cover
    from ..config import RunConfig
    from ..peft import PeftVariant
    from ..training import FeatureSet


class Method(Stage1Objective):
    """A federated method over a PEFT variant: Stage 1, personalization, reports."""

    #: The run-config value of ``method``.
    name: ClassVar[str]
    #: What the method is meant to report: ``("gm",)``, ``("pm",)`` or both.
    reports: ClassVar[tuple[str, ...]] = ("gm", "pm")
    #: Purification anchor in Stage 1: ``"tkl"``, ``"kl"`` or ``"none"``.
    align: ClassVar[str] = "none"
    #: False: no Stage-1 rounds at all (zero-shot).
    trains_global: ClassVar[bool] = True
    #: True: ``personal-rounds`` rounds of :meth:`personalize` after Stage 1.
    personal_phase: ClassVar[bool] = False
    #: True: the personalization can also run inside every Stage-1 round (``interleaved``).
    interleavable: ClassVar[bool] = False
    #: True: Stage 1 also trains the client's private parameters (saved after every round).
    stage1_trains_private: ClassVar[bool] = False
    #: True: train messages carry the global class counts (``class-counts``).
    needs_prior: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig, class_counts: np.ndarray | None = None) -> None:
        self.cfg = cfg
        self.class_counts = None if class_counts is None else np.asarray(class_counts, dtype=np.float64)

    def prior(self) -> np.ndarray:
        """The global class counts (for :attr:`needs_prior` methods, sent with train messages)."""
        if self.class_counts is None:
            raise ValueError(f"method {self.name!r} needs the global class counts ('class-counts')")
        return self.class_counts

    # --- personalization ---
    def personalize(
        self, peft: PeftVariant, data: FeatureSet, generator: torch.Generator, first: bool, precision: str
    ) -> float:
        """One personalization round on a client's data (phi_g frozen); returns the mean loss.

        ``first``: the client has no private state yet.
        """
        raise NotImplementedError(f"method {self.name!r} has no personalization phase")

    def personal_logits(self, peft: PeftVariant, x: torch.Tensor) -> torch.Tensor:
        """Logits of the client's personalized model (default: FedPuReL's l_G + l_P)."""
        return fuse_logits(peft.global_logits(x), peft.private_logits(x))

    # --- private state beyond phi_k ---
    def private_state(self) -> dict[str, torch.Tensor]:
        """Extra private tensors of this client (CPU), kept beside phi_k."""
        return {}

    def load_private_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`private_state` returned."""

"""The interface every federated method implements, on top of the shared loops.

A method registers itself with its own config (a
:class:`~fedpurel_app.config.MethodConfig`: the ``method.<name>.*`` keys) and
decides four things, each with a default that a baseline overrides:

- **Its round plan** (:meth:`Method.plan`): the Stage-1 rounds, personalization
  rounds and evaluations the ServerApp runs (:mod:`fedpurel_app.plan`).
- **Stage 1** (:class:`~fedpurel_app.training.Stage1Objective`): the
  parameters a local step trains, its logits and task loss, and the
  zero-shot anchor of gradient purification (:meth:`Method.stage1_options`).
- **Personalization**: what a client does in a personalization step
  (:meth:`Method.personalize`) and the logits of its personalized model
  (:meth:`Method.personal_logits`).
- **What it reports**: ``"gm"`` (a global model on the balanced test set),
  ``"pm"`` (personalized models on the clients' test sets), or both.

A client's private parameters are the variant's phi_k branch plus, when a
method needs more (a linear head, a controller's state), the tensors of
:meth:`Method.private_state`; neither ever leaves the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from ..plan import RoundPlan, standard_plan
from ..registry import METHODS
from ..residual import fuse_logits
from ..training import Stage1Objective, Stage1Options

if TYPE_CHECKING:  # pragma: no cover
    from ..config import RunConfig
    from ..peft.base import PeftVariant
    from ..training import FeatureSet


class Method(Stage1Objective):
    """A federated method over a PEFT variant: its plan, Stage 1, personalization, reports."""

    #: What the method is meant to report: ``("gm",)``, ``("pm",)`` or both.
    reports: ClassVar[tuple[str, ...]] = ("gm", "pm")
    #: Purification anchor in Stage 1: ``"tkl"``, ``"kl"`` or ``"none"``.
    align: ClassVar[str] = "none"
    #: True: ``personalize.rounds`` rounds of :meth:`personalize` on all clients after Stage 1.
    personal_phase: ClassVar[bool] = False
    #: True: Stage 1 also trains the client's private parameters (kept after every round).
    stage1_trains_private: ClassVar[bool] = False
    #: True: every message carries the global class counts (the prior).
    needs_prior: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig, class_counts: np.ndarray | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.method.name
        #: This method's own config (``method.<name>.*``).
        self.options: Any = cfg.method.options
        self.class_counts = None if class_counts is None else np.asarray(class_counts, dtype=np.float64)

    def prior(self) -> np.ndarray:
        """The global class counts (for :attr:`needs_prior` methods, sent with every message)."""
        if self.class_counts is None:
            raise ValueError(f"method {self.name!r} needs the global class counts ('class-counts')")
        return self.class_counts

    # --- the round plan ---
    def plan(self) -> RoundPlan:
        """Zero-shot, ``train.rounds`` Stage-1 rounds, then (:attr:`personal_phase`)
        ``personalize.rounds`` rounds of personalization on all clients."""
        cfg = self.cfg
        personal = cfg.personalize.rounds if self.personal_phase else 0
        return standard_plan(cfg.train.rounds, personal, cfg.eval_every)

    # --- Stage 1 ---
    def stage1_options(self, precision: str) -> Stage1Options:
        """The local step's options: the variant's lr, Stage 1's SGD knobs, TKL's solve and
        this method's purification (:attr:`align`, :meth:`granularity`)."""
        cfg = self.cfg
        return Stage1Options(
            align=self.align,
            granularity=self.granularity(),
            lr=cfg.peft.options.lr,
            momentum=cfg.train.momentum,
            weight_decay=cfg.train.weight_decay,
            tau_min=cfg.tkl.tau_min,
            tau_max=cfg.tkl.tau_max,
            tau_tol=cfg.tkl.tol,
            tau_max_iter=cfg.tkl.max_iter,
            precision=precision,
        )

    def granularity(self) -> str:
        """Purification per parameter ``"tensor"`` or over the ``"flat"`` vector (unused without it)."""
        return "tensor"

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


def build_method(cfg: RunConfig, class_counts: np.ndarray | None = None) -> Method:
    """The run's method (``method.name``); ``class_counts``: the global prior, for methods that need it."""
    return METHODS.get(cfg.method.name)(cfg, class_counts)


def method_class(name: str) -> type[Method]:
    return METHODS.get(name)

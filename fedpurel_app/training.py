"""The local loops: a Stage-1 step (task and align gradients, purification, step)
and a Stage-2 step (private residual), written once for every PEFT variant.

They work on a :class:`FeatureSet`: a client's inputs for the PEFT variant,
labels and frozen zero-shot logits z. The inputs are whatever the variant
consumes (``PeftVariant.inputs``): cached L2-normalised image features, or
preprocessed pixels when the image encoder is in the loop (lora); the loops
only pass them to ``peft.global_logits`` / ``peft.private_logits``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .inputs import FeatureSet
from .peft.base import PeftVariant
from .purification import PurificationStats, purify_stacked_with_stats
from .residual import fuse_logits, residual_loss
from .tkl import temperature_aligned_kl


@dataclass(frozen=True)
class Stage1Options:
    align: str = "tkl"  # "tkl" | "kl" | "none"
    granularity: str = "tensor"  # "tensor" | "flat"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    tau_min: float = 0.05
    tau_max: float = 20.0
    tau_tol: float = 1e-4
    tau_max_iter: int = 50
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16" (resolved, see resolve_precision)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """torch's dynamic loss scaler for fp16 autocast; a pass-through for fp32 and bf16.

    It works with the purified gradients: purification is invariant to scaling both
    gradients by the same factor (the projection coefficient <s g_t, s g_a> / ||s g_a||^2
    does not depend on s), so the losses are scaled before the backward passes, the
    purified gradient is set as ``param.grad`` and ``scaler.step`` unscales it, skips the
    step when it overflowed and adapts the scale.
    """
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"``: bf16 on a CUDA device that supports it, else fp16 on CUDA, fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device, precision: str):
    """Mixed-precision forward passes; the PEFT parameters and their gradients stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Stage1Objective:
    """What a Stage-1 step trains and with which task loss; methods override it.

    The default is the one of PromptFL and FedPuReL: phi_g, its logits l_G and
    plain cross entropy. Baselines change one piece (a logit-adjusted or
    re-weighted loss, or a global and a local branch trained together); the
    purification against the zero-shot predictions, when on, acts on the
    gradients of whatever :meth:`parameters` returns.
    """

    def parameters(self, peft: PeftVariant) -> list[torch.nn.Parameter]:
        """The parameters one Stage-1 step updates."""
        return peft.global_parameters()

    def logits(self, peft: PeftVariant, x: torch.Tensor) -> torch.Tensor:
        """Training logits of a batch."""
        return peft.global_logits(x)

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L_task = CE(logits, y)."""
        return F.cross_entropy(logits, labels)


PLAIN = Stage1Objective()


@dataclass
class Stage1Stats:
    """Per-client, per-round summary of the Stage-1 steps.

    The sums may be tensors on the training device (what :func:`stage1_step`
    returns): they are read once, by :meth:`means`, not at every step.
    """

    steps: int = 0
    task_loss: float | torch.Tensor = 0.0
    align_loss: float | torch.Tensor = 0.0
    purified: int = 0  # steps that went through purification (none with align="none")
    conflicts: float | torch.Tensor = 0.0  # sum over those steps of the fraction of conflicting units
    cosine: float | torch.Tensor = 0.0  # sum over those steps of cos(g_task, g_align)

    def add(
        self, task_loss: float | torch.Tensor, align_loss: float | torch.Tensor, purification: PurificationStats | None
    ) -> None:
        self.steps += 1
        self.task_loss = self.task_loss + task_loss
        self.align_loss = self.align_loss + align_loss
        if purification is not None:
            self.purified += 1
            self.conflicts = self.conflicts + purification.conflict
            self.cosine = self.cosine + purification.cosine

    def means(self) -> dict[str, float]:
        """Mean losses; conflict rate and cosine only when purification ran (Python floats)."""
        n = max(self.steps, 1)
        task_loss, align_loss, conflicts, cosine = (
            float(v) for v in (self.task_loss, self.align_loss, self.conflicts, self.cosine)
        )
        means = {"steps": float(self.steps), "task-loss": task_loss / n, "align-loss": align_loss / n}
        if self.purified:
            means["conflict-rate"] = conflicts / self.purified
            means["mean-cosine"] = cosine / self.purified
        return means


def both_gradients(
    task_loss: torch.Tensor, align_loss: torch.Tensor, params: list[torch.nn.Parameter]
) -> list[torch.Tensor | None]:
    """(g_task, g_align) w.r.t. ``params`` in ONE batched backward pass, stacked per parameter.

    ``autograd.grad`` of the stacked losses with the identity as a batch of
    output gradients (``is_grads_batched``): every node of the shared graph is
    traversed once for both, with the same values as two separate
    ``autograd.grad`` calls (bitwise, measured). Entry i is ``[2, *shape]``
    (row 0 the task gradient, row 1 the align gradient), ``None`` for a
    parameter neither loss reaches. At CLIP ViT-B/16's size this is 5-9 %
    faster than two passes for prompt, 2-12 % for the adapter and even for
    LoRA (``bench/purification.py --model ViT-B-16``); on the tiny model 1-6 % slower.
    """
    stacked = torch.stack([task_loss, align_loss.to(task_loss.dtype)])
    eye = torch.eye(2, dtype=stacked.dtype, device=stacked.device)
    return list(torch.autograd.grad(stacked, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True))


def stage1_step(
    peft: PeftVariant,
    features: torch.Tensor,
    labels: torch.Tensor,
    zero_shot_logits: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    options: Stage1Options,
    objective: Stage1Objective = PLAIN,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, torch.Tensor | float, PurificationStats | None]:
    """One Stage-1 update of phi_g (docs/METHOD.md "Stage 1", steps 1-5).

    f = l_G(x); L_task = CE(f, y); L_align = TKL(z || f) (or plain KL).
    The task gradient loses its component that conflicts with the align
    gradient; g_align itself is never applied. With ``align="none"`` this is a
    plain CE step (the PromptFL / FedAvg-PEFT baseline). ``objective`` sets the
    parameters, logits and task loss (default: phi_g, l_G, CE); ``scaler`` is the
    loss scaler of fp16 autocast (:func:`grad_scaler`).

    Returns the detached task and align losses and the purification statistics
    as 0-d tensors on the training device (the align loss is 0.0 without
    alignment): the step never waits for the device (except the fp16 scaler's
    overflow check); :class:`Stage1Stats` reads the sums once per round.
    """
    params = objective.parameters(peft)
    scaler = scaler or grad_scaler(features.device, options.precision)
    with autocast(features.device, options.precision):
        logits = objective.logits(peft, features)
    logits = logits.float()
    task_loss = objective.task_loss(logits, labels)
    if options.align == "none":
        grads = torch.autograd.grad(scaler.scale(task_loss), params)
        align_value, stats = 0.0, None
    else:
        align_loss = temperature_aligned_kl(
            logits,
            zero_shot_logits,
            aligned=options.align == "tkl",
            tau_min=options.tau_min,
            tau_max=options.tau_max,
            tol=options.tau_tol,
            max_iter=options.tau_max_iter,
        )
        stacked = both_gradients(scaler.scale(task_loss), scaler.scale(align_loss), params)
        grads, stats = purify_stacked_with_stats(stacked, options.granularity, on_device=True)
        align_value = align_loss.detach()
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad
    scaler.step(optimizer)  # unscales; skips the step when the fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return task_loss.detach(), align_value, stats


def train_global(
    peft: PeftVariant,
    data: FeatureSet,
    options: Stage1Options,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    objective: Stage1Objective = PLAIN,
) -> Stage1Stats:
    """Stage 1 on one client: ``epochs`` passes over its data.

    A fresh optimizer per client per round (docs/METHOD.md "Stage 1", step 6: the
    reference leaks momentum across clients, we do not).
    """
    optimizer = torch.optim.SGD(
        objective.parameters(peft),
        lr=options.lr,
        momentum=options.momentum,
        weight_decay=options.weight_decay,
    )
    scaler = grad_scaler(data.features.device, options.precision)
    stats = Stage1Stats()
    for _ in range(epochs):
        for idx in data.batches(batch_size, generator):
            stats.add(
                *stage1_step(
                    peft,
                    data.features[idx],
                    data.labels[idx],
                    data.zero_shot_logits[idx],
                    optimizer,
                    options,
                    objective,
                    scaler,
                )
            )
    return stats


def sgd_epochs(
    params: list[torch.nn.Parameter],
    batch_loss,
    data: FeatureSet,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    precision: str = "fp32",
) -> float:
    """``epochs`` passes of SGD on ``params``; ``batch_loss(idx)`` gives a batch's loss.

    The loss is computed by the caller (forward passes under :func:`autocast`);
    with fp16 torch's :func:`grad_scaler` scales it before the backward pass and skips
    a step whose gradients overflowed. Returns the mean loss over the steps.
    """
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scaler = grad_scaler(data.features.device, precision)
    total, steps = 0.0, 0
    for _ in range(epochs):
        for idx in data.batches(batch_size, generator):
            loss = batch_loss(idx)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total, steps = total + loss.detach(), steps + 1  # summed on the device, read once
    optimizer.zero_grad(set_to_none=True)
    return float(total) / max(steps, 1)


def train_private(
    peft: PeftVariant,
    data: FeatureSet,
    lam: float,
    lr: float,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    precision: str = "fp32",
) -> float:
    """Stage 2 on one client: train phi_k with phi_g frozen; returns the mean loss.

    Loss (docs/METHOD.md "Stage 2"): (1 - lam) CE(l_G + l_P, y) + lam CE(l_P, y),
    plain SGD (no momentum, no weight decay, as the reference). l_G does not
    change during Stage 2, so it is computed once for the client's data.
    """
    device = data.features.device
    with torch.no_grad(), autocast(device, precision):
        global_logits = peft.global_logits(data.features).float()

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            private_logits = peft.private_logits(data.features[idx])
        return residual_loss(global_logits[idx], private_logits.float(), data.labels[idx], lam)

    return sgd_epochs(
        peft.private_parameters(), batch_loss, data, epochs, batch_size, generator, lr, precision=precision
    )


@torch.no_grad()
def predict(
    peft: PeftVariant,
    features: torch.Tensor,
    personalized: bool = False,
    precision: str = "fp32",
    personal_logits=None,
) -> torch.Tensor:
    """Predicted classes with l_G or, when ``personalized``, with the personalized logits.

    ``personal_logits(peft, x)`` gives those (default: FedPuReL's l_G + l_P).
    """
    with autocast(features.device, precision):
        if not personalized:
            logits = peft.global_logits(features)
        elif personal_logits is not None:
            logits = personal_logits(peft, features)
        else:
            logits = fuse_logits(peft.global_logits(features).float(), peft.private_logits(features).float())
    return logits.float().argmax(dim=-1)


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys (seed, round, partition, ...)."""
    import numpy as np

    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)

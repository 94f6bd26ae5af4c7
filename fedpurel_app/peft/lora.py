"""LoRA on CLIP's vision encoder, through the peft library.

phi_g and phi_k are two peft LoRA adapters ("global" and "private") on one
*private copy* of the frozen visual tower: the shared :class:`Clip` (whose
frozen encoders give the zero-shot logits and serve the other variants) is
never modified. A branch computes

    logits = exp(logit_scale) * norm(visual_lora(pixels)) @ t.T

with ``t`` the frozen zero-shot text features of the dataset's template. The
image encoder is in the loop, so this variant consumes preprocessed pixels
(``inputs = "pixels"``), not cached features.

Targets: q, k, v of every vision block (docs/METHOD.md "PEFT variants").
open_clip's blocks use ``nn.MultiheadAttention``, whose q, k, v live in one
packed ``in_proj_weight``; peft's LoRA for that module (target ``"attn"``)
adapts the packed matrix with ONE low-rank pair shared by q, k and v
(A: r x D, B: 3D x r) and, always, ``out_proj`` as well. That is not "rank r
on q, k and v". So in the private copy every self-attention
``nn.MultiheadAttention`` is replaced by :class:`SplitQKVAttention`, the same
function with separate ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``
``nn.Linear`` modules (weights sliced from the packed ones; same outputs up to
float rounding), and peft's plain ``Linear`` LoRA targets
``q_proj,k_proj,v_proj``: one (A: r x D, B: D x r) pair per projection and
block, as in the reference.

``peft.lora.targets`` is either a comma-separated list of module names, matched as
peft matches a list (a module whose path in the visual tower equals a name or
ends with ``.name``; e.g. ``"q_proj,v_proj"``, ``"q_proj,k_proj,v_proj,out_proj"``,
``"c_fc,c_proj"`` for the MLPs), or ``re:<regex>``, a regex that must match a
module's full path in the tower (peft's string form), e.g.
``re:transformer\\.resblocks\\.1\\.attn\\.[qv]_proj``.

Init: peft's default, A Kaiming-uniform (drawn with the run's seed), B = 0,
so phi_g starts exactly at the zero-shot classifier; phi_k starts from the
same values. Scaling: peft's alpha / r, or alpha / sqrt(r) with
``rslora=True`` (the reference's; peft's ``use_rslora``).

Only LoRA tensors travel: :meth:`LoraPeft.global_state` is peft's
``get_peft_model_state_dict`` of the global adapter (2 tensors per adapted
module), nothing of the frozen tower and nothing of phi_k.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import nn

from ..config import PeftConfig, knob
from ..errors import ConfigError
from ..models import Clip
from ..registry import PEFT_VARIANTS
from .base import PeftVariant, checked_state

DEFAULT_TARGETS = "q_proj,k_proj,v_proj"
REGEX_PREFIX = "re:"
# Forward passes without gradient (evaluation, Stage 2's l_G) go through the
# image encoder in chunks of this many images, so a whole test set fits in memory.
NO_GRAD_CHUNK = 256


def parse_targets(spec: str) -> str | list[str]:
    """``peft.lora.targets`` as peft's ``target_modules``: a list of names, or a regex string."""
    spec = spec.strip()
    if spec.startswith(REGEX_PREFIX):
        pattern = spec[len(REGEX_PREFIX) :]
        if not pattern:
            raise ValueError("peft.lora.targets 're:' has an empty regex")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"peft.lora.targets regex {pattern!r} is invalid: {err}") from None
        return pattern
    names = [name.strip() for name in spec.split(",")]
    if not names or any(not re.fullmatch(r"[A-Za-z0-9_.]+", name) for name in names):
        raise ValueError(
            f"peft.lora.targets {spec!r}: give comma-separated module names (e.g. {DEFAULT_TARGETS!r}) "
            f"or '{REGEX_PREFIX}<regex>'"
        )
    return names


class LoraOptions(PeftConfig):
    """LoRA on the vision encoder, through the peft library (peft.lora.*).

    Learning rates chosen on a validation split of the embedded default (bench/tune.py; README
    "Per-variant defaults"); the paper presets set the paper's."""

    lr: float = knob(0.005, "Stage-1 SGD learning rate of phi_g", role="training", gt=0.0)
    personal_lr: float = knob(0.1, "Stage-2 SGD learning rate of phi_k", role="training", gt=0.0)

    rank: int = knob(8, "rank r", ge=1)
    alpha: float = knob(16.0, "alpha; scaling alpha / r (peft) or alpha / sqrt(r) with rslora", gt=0.0)
    targets: str = knob(DEFAULT_TARGETS, "vision-tower modules: comma-separated names, or 're:<regex>' on full paths")
    rslora: bool = knob(False, "true: scale by alpha / sqrt(r), as the reference code")

    @field_validator("targets")
    @classmethod
    def _targets(cls, spec: str) -> str:
        parse_targets(spec)
        return spec


class SplitQKVAttention(nn.Module):
    """``nn.MultiheadAttention`` with separate q, k, v and output projections.

    Built from an existing module (weights copied); computes the same function
    through ``F.scaled_dot_product_attention``. Supports what open_clip's
    blocks use: ``need_weights=False``, an optional ``attn_mask`` (float or
    bool, [L, S] or [B * heads, L, S]), ``batch_first`` either way.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        bias = mha.in_proj_bias is not None
        weights = mha.in_proj_weight.detach().chunk(3)
        biases = mha.in_proj_bias.detach().chunk(3) if bias else (None, None, None)
        projections = []
        for weight, b in zip(weights, biases, strict=True):
            linear = nn.Linear(dim, dim, bias=bias, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if b is not None:
                    linear.bias.copy_(b)
            projections.append(linear)
        self.q_proj, self.k_proj, self.v_proj = projections
        out = mha.out_proj
        self.out_proj = nn.Linear(dim, dim, bias=out.bias is not None, device=out.weight.device, dtype=out.weight.dtype)
        self.out_proj.load_state_dict(out.state_dict())
        for param in self.parameters():
            param.requires_grad_(mha.in_proj_weight.requires_grad)

    @staticmethod
    def supports(mha: nn.Module) -> bool:
        return (
            isinstance(mha, nn.MultiheadAttention)
            and mha._qkv_same_embed_dim
            and mha.bias_k is None
            and not mha.add_zero_attn
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if need_weights or key_padding_mask is not None:
            raise NotImplementedError("SplitQKVAttention supports need_weights=False without key_padding_mask")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, dim = query.shape
        heads = self.num_heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, t.shape[1], heads, dim // heads).transpose(1, 2)

        q, k, v = split_heads(self.q_proj(query)), split_heads(self.k_proj(key)), split_heads(self.v_proj(value))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # True = not allowed, as in nn.MultiheadAttention
                attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                    attn_mask, float("-inf")
                )
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(batch, heads, length, -1)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=is_causal and attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


def split_attention(module: nn.Module) -> int:
    """Replace (in place) every supported ``nn.MultiheadAttention`` below ``module``; returns how many."""
    count = 0
    for child_name, child in list(module.named_children()):
        if SplitQKVAttention.supports(child):
            setattr(module, child_name, SplitQKVAttention(child))
            count += 1
        else:
            count += split_attention(child)
    return count


class LoraBranch(nn.Module):
    """One branch: the LoRA A and B modules of one peft adapter.

    The modules live inside the LoRA tower too; registering them here makes
    ``branch.parameters()`` exactly that adapter's LoRA tensors.
    """

    def __init__(self, adapter: str, modules: list[nn.Module]) -> None:
        super().__init__()
        self.adapter = adapter
        self.lora = nn.ModuleList(modules)


@PEFT_VARIANTS.register("lora", LoraOptions)
class LoraPeft(PeftVariant):
    """LoRA on a private copy of the visual tower, a global and a private adapter."""

    inputs = "pixels"
    GLOBAL = "global"
    PRIVATE = "private"

    def __init__(
        self,
        clip: Clip,
        classnames: tuple[str, ...],
        template: str = "a photo of a {}.",
        rank: int = 8,
        alpha: float = 16.0,
        targets: str = DEFAULT_TARGETS,
        rslora: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        self.logit_scale = float(clip.logit_scale)
        text = clip.zero_shot_text(classnames, template).to(clip.device)
        self.register_buffer("text", text, persistent=False)

        tower = copy.deepcopy(clip.model.visual)
        split_attention(tower)

        def config() -> LoraConfig:
            return LoraConfig(
                r=rank,
                lora_alpha=alpha,
                target_modules=parse_targets(targets),
                lora_dropout=0.0,
                bias="none",
                use_rslora=rslora,
            )

        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = get_peft_model(tower, config(), adapter_name=self.GLOBAL)
                model.add_adapter(self.PRIVATE, config())
        except ValueError as err:  # peft: no module matches the targets
            linear = sorted({name.rsplit(".", 1)[-1] for name, m in tower.named_modules() if isinstance(m, nn.Linear)})
            raise ConfigError(
                f"peft.lora.targets {targets!r} cannot be applied to the vision tower of {clip.name}: {err} "
                f"(names of its nn.Linear modules: {', '.join(linear)})"
            ) from None
        model.eval()
        # The tower copy (frozen base weights, on the clip's device) stays out of this
        # module's parameters and state; its LoRA modules are registered through the
        # two branches, so .parameters() / .to() see exactly the LoRA tensors.
        self._tower = (model,)

        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]

        def branch(adapter: str) -> LoraBranch:
            return LoraBranch(adapter, [m for layer in layers for m in (layer.lora_A[adapter], layer.lora_B[adapter])])

        self.phi_g = branch(self.GLOBAL)
        self.phi_k = branch(self.PRIVATE)
        for param in self.parameters():
            param.requires_grad_(True)
        # phi_k starts from the same init as phi_g (the reference: one fresh init everywhere).
        self.load_private_state(self.global_state())

    @classmethod
    def from_config(
        cls, clip: Clip, classnames: tuple[str, ...], template: str, options: LoraOptions, seed: int
    ) -> LoraPeft:
        return cls(
            clip,
            classnames,
            template=template,
            rank=options.rank,
            alpha=options.alpha,
            targets=options.targets,
            rslora=options.rslora,
            seed=seed,
        )

    @property
    def tower(self) -> nn.Module:
        """The LoRA-wrapped private copy of the visual tower (a peft ``PeftModel``)."""
        return self._tower[0]

    def _encode(self, adapter: str, pixels: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        if tower.active_adapter != adapter:
            tower.set_adapter(adapter)
            # peft freezes inactive adapters; both stay trainable here (the loops pick what they step).
            for param in self.parameters():
                param.requires_grad_(True)
        if torch.is_grad_enabled():
            return tower(pixels)
        return torch.cat([tower(chunk) for chunk in pixels.split(NO_GRAD_CHUNK)])

    def branch_embedding(self, branch: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._encode(branch.adapter, pixels), dim=-1)

    def class_embeddings(self, branch: nn.Module) -> torch.Tensor:
        """The frozen zero-shot text features of the template."""
        return self.text

    def global_state(self) -> dict[str, torch.Tensor]:
        """phi_g: peft's state dict of the global adapter, LoRA tensors only (CPU copies)."""
        return self._adapter_state(self.GLOBAL)

    def private_state(self) -> dict[str, torch.Tensor]:
        return self._adapter_state(self.PRIVATE)

    def _adapter_state(self, adapter: str) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.tower, adapter_name=adapter)
        return {key: value.detach().cpu().clone() for key, value in state.items()}

    def load_global_state(self, state: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        self._load_adapter(self.GLOBAL, state, "phi_g")

    def load_private_state(self, state: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        self._load_adapter(self.PRIVATE, state, "phi_k")

    def _load_adapter(self, adapter: str, state: Mapping[str, torch.Tensor | np.ndarray], what: str) -> None:
        """Check keys and shapes against the adapter's own state, then load with peft's
        ``set_peft_model_state_dict`` (which puts the adapter's name into the keys)."""
        from peft import set_peft_model_state_dict

        tensors = checked_state(self._adapter_state(adapter), state, what)
        with torch.no_grad():
            result = set_peft_model_state_dict(self.tower, tensors, adapter_name=adapter)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:  # pragma: no cover - checked_state has matched the keys already
            raise ValueError(f"{what}: peft did not load {sorted(unexpected)}")

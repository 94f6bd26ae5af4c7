"""CoOp text prompts: ``n_ctx`` learned context vectors shared by all classes.

The class prompt is ``"X X X X {class}."`` whose ``X`` token embeddings are
replaced by the context vectors of a branch (docs/METHOD.md "PEFT variants").
The image encoder is frozen, so a branch maps cached image features to logits
through the text encoder only:

    logits = exp(logit_scale) * norm(img) @ norm(text(ctx)).T

The text transformer is causal and pooled at the EOT token, so token sequences
are truncated to ``max(EOT) + 1``: identical features, far less compute.

Classes go through the text tower in chunks of ``class_chunk`` (a constructor
argument and attribute, not a run-config key): each class's features depend on
its own tokens only, so chunking changes no value beyond float rounding (tested
to 1e-6). ``class_chunk = 0`` (default) chunks automatically: a pass without
gradient (evaluation, Stage 2's frozen l_G) in chunks of :attr:`PromptPeft.AUTO_CHUNK`
classes, a pass with gradient at once (its backward pass keeps every chunk's
activations anyway, so chunking would not lower its peak memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftConfig, knob
from ..errors import ConfigError
from ..models import Clip
from ..registry import PEFT_VARIANTS
from .base import PeftVariant


class PromptConfig(PeftConfig):
    """CoOp prompt: learned context vectors of the text encoder (peft.prompt.*).

    Learning rates chosen on a validation split of the embedded default (bench/tune.py; README
    "Per-variant defaults"); the paper presets set the paper's."""

    lr: float = knob(0.1, "Stage-1 SGD learning rate of phi_g", role="training", gt=0.0)
    personal_lr: float = knob(0.1, "Stage-2 SGD learning rate of phi_k", role="training", gt=0.0)

    n_ctx: int = knob(4, "number of context vectors", ge=1, le=16)
    ctx_init: str = knob("a photo of a", "phrase whose embeddings initialise the context; '' = N(0, 0.02^2)")


class PromptContext(nn.Module):
    """One branch: the context vectors [n_ctx, width]."""

    def __init__(self, ctx: torch.Tensor) -> None:
        super().__init__()
        self.ctx = nn.Parameter(ctx.clone())


def _text_tower(model: nn.Module) -> nn.Module:
    """open_clip's CLIP keeps the text tower on the model, CustomTextCLIP in ``.text``."""
    return model.text if hasattr(model, "text") else model


@PEFT_VARIANTS.register("prompt", PromptConfig)
class PromptPeft(PeftVariant):
    """CoOp prompt learning with a global and a private context."""

    #: Classes per text-tower pass of an automatic chunking (``class_chunk = 0``) without gradient.
    AUTO_CHUNK = 256

    def __init__(
        self,
        clip: Clip,
        classnames: tuple[str, ...],
        n_ctx: int = 4,
        ctx_init: str = "a photo of a",
        seed: int = 0,
        class_chunk: int = 0,
    ) -> None:
        super().__init__()
        if class_chunk < 0:
            raise ValueError(f"class_chunk must be >= 0 (0: automatic), got {class_chunk}")
        #: Classes per pass of the text tower; 0: automatic (see the module's docstring).
        self.class_chunk = class_chunk
        tower = _text_tower(clip.model)
        # Frozen modules are used, not owned: keep them out of this module's state.
        self._tower = (tower,)
        self.logit_scale = float(clip.logit_scale)

        prompts = [" ".join(["X"] * n_ctx) + f" {name}." for name in classnames]
        tokens = clip.tokenizer(prompts).to(clip.device)
        eot = tokens.argmax(dim=-1)
        length = int(eot.max()) + 1
        if int(eot.min()) < n_ctx + 2:
            raise ValueError("a class prompt was truncated by the tokenizer's context length")
        tokens = tokens[:, :length]
        with torch.no_grad():
            embedding = tower.token_embedding(tokens)
        self.register_buffer("prefix", embedding[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embedding[:, 1 + n_ctx :].clone(), persistent=False)
        self.register_buffer("eot", eot, persistent=False)
        self.register_buffer("positional", tower.positional_embedding[:length].detach().clone(), persistent=False)
        mask = tower.attn_mask
        self.register_buffer("attn_mask", None if mask is None else mask[:length, :length].clone(), persistent=False)

        ctx = self._initial_context(clip, tower, n_ctx, ctx_init, seed)
        self.phi_g = PromptContext(ctx)
        self.phi_k = PromptContext(ctx)

    @classmethod
    def from_config(
        cls, clip: Clip, classnames: tuple[str, ...], template: str, options: PromptConfig, seed: int
    ) -> PromptPeft:
        """The learned context replaces the dataset's template, so ``template`` is not used
        (``peft.prompt.ctx-init`` plays its part)."""
        return cls(clip, classnames, n_ctx=options.n_ctx, ctx_init=options.ctx_init, seed=seed)

    @staticmethod
    def _initial_context(clip: Clip, tower: nn.Module, n_ctx: int, ctx_init: str, seed: int) -> torch.Tensor:
        width = tower.token_embedding.weight.shape[1]
        if not ctx_init:
            generator = torch.Generator().manual_seed(seed)
            return (torch.randn(n_ctx, width, generator=generator) * 0.02).to(clip.device)
        tokens = clip.tokenizer([ctx_init]).to(clip.device)
        n_words = int(tokens.argmax(dim=-1)[0]) - 1
        if n_words != n_ctx:
            raise ConfigError(
                f"peft.prompt.ctx-init {ctx_init!r} has {n_words} tokens but peft.prompt.n-ctx is {n_ctx}: "
                f"set peft.prompt.n-ctx = {n_words} or choose a phrase of {n_ctx} tokens "
                '(or peft.prompt.ctx-init = "" for a random init)'
            )
        with torch.no_grad():
            return tower.token_embedding(tokens)[0, 1 : 1 + n_ctx].clone()

    def text_features(self, branch: nn.Module) -> torch.Tensor:
        """L2-normalised class text features [C, D] for a branch's context (chunked over classes
        as :attr:`class_chunk` says)."""
        num_classes = self.prefix.shape[0]
        chunk = self.chunk_size(branch)
        if chunk >= num_classes:
            return self._text_features(branch, 0, num_classes)
        return torch.cat(
            [self._text_features(branch, s, min(s + chunk, num_classes)) for s in range(0, num_classes, chunk)]
        )

    def chunk_size(self, branch: nn.Module) -> int:
        """Classes per text-tower pass: :attr:`class_chunk`, or automatically all of them in a pass
        with gradient and :attr:`AUTO_CHUNK` in one without."""
        if self.class_chunk:
            return self.class_chunk
        with_grad = torch.is_grad_enabled() and branch.ctx.requires_grad
        return self.prefix.shape[0] if with_grad else self.AUTO_CHUNK

    def _text_features(self, branch: nn.Module, start: int, stop: int) -> torch.Tensor:
        """Text features of classes ``start`` to ``stop`` - 1."""
        tower = self._tower[0]
        count = stop - start
        ctx = branch.ctx.unsqueeze(0).expand(count, -1, -1)
        x = torch.cat([self.prefix[start:stop], ctx, self.suffix[start:stop]], dim=1) + self.positional
        x = tower.transformer(x, attn_mask=self.attn_mask)
        x = tower.ln_final(x)
        x = x[torch.arange(count, device=x.device), self.eot[start:stop]]
        projection = tower.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return F.normalize(x, dim=-1)

    def branch_embedding(self, branch: nn.Module, image_features: torch.Tensor) -> torch.Tensor:
        """The cached image features: the image side is frozen."""
        return image_features

    def class_embeddings(self, branch: nn.Module) -> torch.Tensor:
        return self.text_features(branch)

"""PEFT variants behind one interface; a new variant is one module plus one registry line."""

from __future__ import annotations

from ..models import Clip
from .base import PeftVariant
from .prompt import PromptPeft

PEFT_VARIANTS: dict[str, type[PeftVariant]] = {
    "prompt": PromptPeft,
}


def build_peft(name: str, clip: Clip, classnames: tuple[str, ...], **options) -> PeftVariant:
    """The PEFT variant ``name`` over ``clip`` for ``classnames``, on the clip's device."""
    try:
        variant = PEFT_VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown PEFT variant {name!r}; choose one of {sorted(PEFT_VARIANTS)}"
        ) from None
    return variant(clip, classnames, **options).to(clip.device)


__all__ = ["PEFT_VARIANTS", "PeftVariant", "PromptPeft", "build_peft"]

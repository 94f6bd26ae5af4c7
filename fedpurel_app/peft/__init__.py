"""PEFT variants behind one interface; a new variant is one module plus one registry line."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..models import Clip
from .adapter import AdapterPeft
from .base import PeftVariant
from .lora import LoraPeft
from .prompt import PromptPeft

if TYPE_CHECKING:  # pragma: no cover
    from ..config import RunConfig

PEFT_VARIANTS: dict[str, type[PeftVariant]] = {
    "prompt": PromptPeft,
    "adapter": AdapterPeft,
    "lora": LoraPeft,
}


def peft_class(name: str) -> type[PeftVariant]:
    """The registered variant ``name``; ValueError listing the known ones otherwise."""
    try:
        return PEFT_VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown PEFT variant {name!r}; choose one of {sorted(PEFT_VARIANTS)}"
        ) from None


def build_peft(
    name: str, clip: Clip, classnames: tuple[str, ...], template: str, cfg: RunConfig
) -> PeftVariant:
    """The PEFT variant ``name`` over ``clip`` for ``classnames``, on the clip's device.

    The variant reads its own knobs from the run config (``from_config``);
    ``template`` is the dataset's zero-shot template. To pass options
    directly, construct the variant class itself.
    """
    return peft_class(name).from_config(clip, classnames, template, cfg).to(clip.device)


__all__ = ["PEFT_VARIANTS", "AdapterPeft", "LoraPeft", "PeftVariant", "PromptPeft", "build_peft", "peft_class"]

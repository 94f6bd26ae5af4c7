"""Benchmarks at a real CLIP's size: an open_clip architecture with its random initial weights.

Real pretrained weights cannot be downloaded everywhere, and a step's cost does
not depend on the weights' values, only on the architecture. ``--model
ViT-B-16`` in a benchmark builds that architecture once (seeded), saves it as a
checkpoint file in the cache folder, and runs the app's own loading path on
it (``model.pretrained = <that file>``). Accuracies are meaningless there; times are
those of the real model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedpurel_app.models import default_cache_dir
from fedpurel_app.models.factory import import_open_clip


def random_checkpoint(model_name: str) -> str:
    """Path of a checkpoint of ``model_name`` with open_clip's seeded random initial weights."""
    path = Path(default_cache_dir()) / "bench" / f"{model_name}-random-init.pt"
    if not path.is_file():
        open_clip = import_open_clip(model_name)
        torch.manual_seed(0)
        model = open_clip.create_model(model_name, pretrained=None)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    return str(path)


def run_config(model_name: str | None) -> dict:
    """Run-config overrides (dotted keys) for ``--model``: none for the embedded default."""
    return {} if not model_name else {"model.name": model_name, "model.pretrained": random_checkpoint(model_name)}

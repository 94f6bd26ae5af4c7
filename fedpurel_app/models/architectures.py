"""This package's open_clip model configs (``configs/*.json``, e.g. the embedded ``fedpurel-tiny``),
registered with open_clip's public ``add_model_config`` once per process.

Its own module, below both the factory and the embedded pretraining, which both need it.
"""

from __future__ import annotations

import threading
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

_registered = False
_register_lock = threading.Lock()


def register_model_configs() -> None:
    """Register this package's open_clip model configs (configs/*.json) once per process."""
    global _registered
    if _registered:
        return
    with _register_lock:
        if not _registered:
            import open_clip

            open_clip.add_model_config(CONFIG_DIR)
            _registered = True

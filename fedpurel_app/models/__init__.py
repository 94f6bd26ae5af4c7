"""CLIP backbones: open_clip loading by name / tag / file, and the embedded tiny CLIP."""

from ..errors import ModelLoadError  # re-exported: fedpurel_app.models.ModelLoadError still works
from .factory import (
    CONFIG_DIR,
    DEFAULT_MODEL,
    EMBEDDED,
    Clip,
    create_clip,
    register_model_configs,
    resolve_device,
)
from .features import encode_images, preprocess_images, zero_shot_logits, zero_shot_text_features
from .pretrain import (
    default_cache_dir,
    embedded_checkpoint_path,
    ensure_embedded_checkpoint,
    pretrain_clip,
    train_embedded_model,
)

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_MODEL",
    "EMBEDDED",
    "Clip",
    "ModelLoadError",
    "create_clip",
    "default_cache_dir",
    "embedded_checkpoint_path",
    "encode_images",
    "ensure_embedded_checkpoint",
    "pretrain_clip",
    "preprocess_images",
    "register_model_configs",
    "resolve_device",
    "train_embedded_model",
    "zero_shot_logits",
    "zero_shot_text_features",
]

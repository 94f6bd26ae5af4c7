"""Load a frozen CLIP by name and pretrained source: the embedded tiny model, a local file or
folder, or an open_clip pretrained tag. Everything goes through open_clip's public API
(``open_clip.create_model_and_transforms``); open_clip is imported when a model is created,
not when this module is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch

from ..errors import ConfigError, ModelLoadError
from .architectures import CONFIG_DIR, register_model_configs
from .features import Clip

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_MODEL",
    "EMBEDDED",
    "Clip",
    "ModelLoadError",
    "create_clip",
    "import_open_clip",
    "register_model_configs",
    "resolve_device",
]

DEFAULT_MODEL = "fedpurel-tiny"
EMBEDDED = "embedded"
DEFAULT_PRETRAIN_DATASET = "mnist"


def import_open_clip(model_name: str | None = None):
    """``import open_clip`` (kept for callers of the former import trimming; ``model_name`` is ignored)."""
    import open_clip

    return open_clip


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto" -> cuda if available else cpu; "cpu"; "cuda" / "cuda:N" (error if absent)."""
    if isinstance(name, torch.device):
        name = str(name)
    key = str(name).strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(key)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"unknown device {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} requested but CUDA is not available on this machine (use device='auto' or 'cpu')"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device {name!r} requested but only {count} CUDA device(s) exist")
    elif dev.type != "cpu":
        if dev.type == "mps" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return dev
        raise ConfigError(f"device {name!r} is not supported here: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return dev


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _build(model_name: str, pretrained: str | None, device: torch.device, checkpoint_label: str) -> Clip:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    tokenizer = open_clip.get_tokenizer(model_name)
    _freeze(model)
    scale = float(model.logit_scale.detach().exp().reshape(-1)[0])
    return Clip(model, preprocess, tokenizer, model_name, checkpoint_label, device, scale)


def _load_pretrain_bundle(pretrain_dataset: Any, seed: int) -> Any:
    if pretrain_dataset is None:
        pretrain_dataset = DEFAULT_PRETRAIN_DATASET
    if isinstance(pretrain_dataset, str):
        from fedpurel_app.data import load_dataset

        return load_dataset(pretrain_dataset, seed=seed)
    return pretrain_dataset


# ----------------------------------------------------------------- open_clip pretrained tags


def _chain(e: BaseException):
    """``e`` and the exceptions it was raised from or during (each once)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _download_failure(e: BaseException) -> str | None:
    """Why the weights could not be fetched, when ``e`` (what open_clip raised) comes from a
    download that failed; None when it comes from somewhere else (e.g. a damaged cached file).

    Read from the exceptions huggingface_hub and urllib raise under open_clip's own error:
    huggingface_hub's ``OfflineModeIsEnabled`` (HF_HUB_OFFLINE set), ``LocalEntryNotFoundError``
    (not cached, Hub unreachable) and ``HfHubHTTPError``; urllib's ``URLError`` and plain
    connection errors for tags downloaded from a URL.
    """
    try:
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError:  # pragma: no cover - open_clip depends on huggingface_hub
        HfHubHTTPError = LocalEntryNotFoundError = OfflineModeIsEnabled = ()  # noqa: N806
    chain = list(_chain(e))
    if any(isinstance(x, OfflineModeIsEnabled) for x in chain):
        return "HF_HUB_OFFLINE is set"
    for x in chain:
        if isinstance(x, LocalEntryNotFoundError):
            # reached after huggingface_hub's retries (~45-50 s offline): say how to skip them
            return "no connection to the Hugging Face Hub; HF_HUB_OFFLINE=1 makes this fail at once"
        if isinstance(x, (HfHubHTTPError, URLError, ConnectionError, TimeoutError)):
            return _short(x)
    return None


def _missing_weights_message(model_name: str, tag: str, why: str) -> str:
    return (
        f"The open_clip weights '{tag}' for '{model_name}' are not in the local cache and cannot be "
        f"downloaded ({why}): download them on a machine with internet access (they land in the "
        f"Hugging Face cache) or pass pretrained='/path/to/checkpoint.safetensors' (or .pt/.bin), "
        f"a local open_clip checkpoint file for '{model_name}'."
    )


def _load_tag(model_name: str, tag: str, device: torch.device) -> Clip:
    import open_clip

    if not open_clip.is_pretrained_cfg(model_name, tag):
        valid = open_clip.list_pretrained_tags_by_model(model_name)
        listed = ", ".join(valid) if valid else "none"
        raise ModelLoadError(
            f"'{tag}' is neither an existing file nor an open_clip pretrained tag for "
            f"'{model_name}'; valid tags: {listed}; or use pretrained='{EMBEDDED}' "
            f"(for '{DEFAULT_MODEL}') or a path to a checkpoint file."
        )
    try:
        return _build(model_name, tag, device, tag)
    except Exception as e:  # noqa: BLE001 - wrap whatever the download or load raised
        why = _download_failure(e)
        if why is not None:
            raise ModelLoadError(_missing_weights_message(model_name, tag, why)) from e
        raise ModelLoadError(
            f"could not load the open_clip weights '{tag}' for '{model_name}' ({_short(e)}): "
            f"if they are cached, delete them from the Hugging Face cache to download again, or pass "
            f"pretrained='/path/to/checkpoint.safetensors', a local open_clip checkpoint file."
        ) from e


def _short(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters of it)."""
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ----------------------------------------------------------------------------- entry point


def create_clip(
    model_name: str = DEFAULT_MODEL,
    pretrained: str = EMBEDDED,
    cache_dir: str | os.PathLike | None = None,
    device: str = "auto",
    pretrain_dataset: Any = None,
    seed: int = 0,
    pretrain_epochs: int | None = None,
) -> Clip:
    """Create a frozen CLIP (eval mode, no parameter requires grad).

    - ``pretrained="embedded"``: the tiny model pretrained here on ``pretrain_dataset``'s
      ``pretrain`` split (a DatasetBundle, or a dataset name loaded with ``seed``; default
      "mnist"), cached in ``cache_dir`` ($FEDPUREL_CACHE or ~/.cache/fedpurel) and loaded
      back from that file through open_clip. ``seed`` seeds that pretraining;
      ``pretrain_epochs`` overrides its default number of epochs.
    - a path to an existing file: that open_clip checkpoint (.safetensors, .pt, .bin).
    - a path to a folder in open_clip's layout (``open_clip_config.json`` and
      ``open_clip_model.safetensors``): its config defines the model, whatever ``model_name`` says.
    - anything else: an open_clip pretrained tag for ``model_name`` (e.g. ViT-B-32 "openai").
      Offline and not cached, this raises a ModelLoadError saying so and how to point
      ``pretrained`` at a local file: at once with HF_HUB_OFFLINE=1, after huggingface_hub's
      retries (~50 s measured) without it.
    """
    dev = resolve_device(device)
    folder = Path(os.path.expanduser(str(pretrained))) if pretrained else None
    if folder is not None and folder.is_dir():
        return _load_folder(model_name, folder, dev)

    import open_clip

    register_model_configs()
    if open_clip.get_model_config(model_name) is None:
        raise ModelLoadError(
            f"unknown model '{model_name}'; known open_clip configs: {', '.join(open_clip.list_models())}"
        )
    if pretrained is None or str(pretrained).strip() == "":
        raise ModelLoadError(
            f"no pretrained weights given: use '{EMBEDDED}', a checkpoint file path or an open_clip tag"
        )
    pretrained = str(pretrained)

    if pretrained == EMBEDDED:
        from .pretrain import ensure_embedded_checkpoint

        bundle = _load_pretrain_bundle(pretrain_dataset, seed)
        kwargs = {} if pretrain_epochs is None else {"epochs": int(pretrain_epochs)}
        path = ensure_embedded_checkpoint(model_name, bundle, cache_dir=cache_dir, seed=seed, **kwargs)
        return _load_file(model_name, str(path), dev)
    expanded = os.path.expanduser(pretrained)
    if os.path.isfile(expanded):
        return _load_file(model_name, expanded, dev)
    if os.sep in pretrained or pretrained.endswith((".safetensors", ".pt", ".pth", ".bin")):
        raise ModelLoadError(f"checkpoint file not found: {pretrained}")
    return _load_tag(model_name, pretrained, dev)


def _load_file(model_name: str, path: str, device: torch.device) -> Clip:
    try:
        return _build(model_name, path, device, path)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load checkpoint {path} into '{model_name}': {_short(e)}") from e


def _load_folder(model_name: str, folder: Path, device: torch.device) -> Clip:
    """A checkpoint folder in open_clip's layout: ``open_clip_config.json`` (model and
    preprocessing config) beside ``open_clip_model.safetensors`` (or ``open_clip_pytorch_model.bin``);
    loaded through open_clip's ``local-dir:`` schema. The folder's config defines the model."""
    if not (folder / "open_clip_config.json").is_file():
        raise ModelLoadError(
            f"checkpoint folder {folder} has no open_clip_config.json: give a folder in open_clip's "
            "layout (open_clip_config.json + open_clip_model.safetensors) or the weights file itself"
        )
    weights = [
        p
        for p in sorted(folder.iterdir())
        if p.name.startswith("open_clip_") and p.suffix in (".safetensors", ".bin", ".pth")
    ]
    if not weights:
        raise ModelLoadError(
            f"checkpoint folder {folder} has no open_clip_model.safetensors (or open_clip_pytorch_model.bin)"
        )
    try:
        clip = _build(f"local-dir:{folder}", None, device, str(weights[0]))
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load the checkpoint folder {folder}: {type(e).__name__}: {e}") from e
    clip.name = model_name if model_name != DEFAULT_MODEL else folder.name
    return clip

"""Load a frozen CLIP by name and pretrained source: the embedded tiny model, a local file,
or an open_clip pretrained tag. Everything goes through ``open_clip.create_model_and_transforms``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import threading
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_MODEL",
    "EMBEDDED",
    "Clip",
    "ModelLoadError",
    "create_clip",
    "import_open_clip",
    "needs_timm",
    "needs_transformers",
    "register_model_configs",
    "resolve_device",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_MODEL = "fedpurel-tiny"
EMBEDDED = "embedded"
DEFAULT_PRETRAIN_DATASET = "mnist"
_NETWORK_PROBE_SECONDS = 1.0

_registered = False
_register_lock = threading.Lock()


class ModelLoadError(ValueError):
    """A model or its weights cannot be loaded; the message says what to do."""


@dataclass
class Clip:
    """A frozen open_clip model with what is needed to use it."""

    model: torch.nn.Module
    preprocess: Callable  # open_clip eval transform: PIL image -> [3, H, W] tensor
    tokenizer: Callable  # list[str] -> LongTensor [n, context_length]
    name: str
    checkpoint: str  # file path, or the open_clip pretrained tag
    device: torch.device
    logit_scale: float  # exp(model.logit_scale)


def _model_config(model_name: str) -> dict | None:
    """The JSON config of ``model_name`` in this package's or open_clip's config folder, read
    without importing open_clip; None for a name without one (``hf-hub:``, unknown) or an
    unreadable file."""
    spec = importlib.util.find_spec("open_clip")
    folders = [CONFIG_DIR]
    if spec is not None and spec.submodule_search_locations:
        folders.append(Path(next(iter(spec.submodule_search_locations))) / "model_configs")
    for folder in folders:
        path = folder / f"{model_name}.json"
        if path.is_file():
            try:
                config = json.loads(path.read_text())
            except (OSError, ValueError):
                return None
            return config if isinstance(config, dict) else None
    return None


def needs_transformers(model_name: str) -> bool:
    """Whether open_clip needs Hugging Face ``transformers`` for ``model_name``.

    True for a config with an ``hf_model_name`` text tower, for CoCa (its text
    generation) and for any name whose config is not a JSON file of this package
    or of open_clip (``hf-hub:`` models, unknown names), so that only models
    known to be plain CLIP towers skip it. Reads the config files without
    importing open_clip.
    """
    if "coca" in model_name.lower():
        return True
    config = _model_config(model_name)
    return config is None or "hf_model_name" in config.get("text_cfg", {})


def needs_timm(model_name: str) -> bool:
    """Whether open_clip needs ``timm`` for ``model_name``: a config with a ``timm_model_name``
    image tower, or a name without a config file here or in open_clip (as :func:`needs_transformers`)."""
    config = _model_config(model_name)
    return config is None or "timm_model_name" in config.get("vision_cfg", {})


_OPTIONAL_IMPORTS = {"transformers": needs_transformers, "timm": needs_timm}


def import_open_clip(model_name: str | None = None):
    """``import open_clip`` without the imports ``model_name`` does not need.

    In deployment every ClientApp message is a fresh process that imports
    open_clip, and in simulation the server and every Ray actor import it too.
    Most of that import is for what a plain CLIP never uses (measured on 2
    CPU cores: 2.75 s with everything, 0.55 s without):

    - ``transformers`` (HF text towers, CoCa) and ``timm`` (timm image towers):
      when :func:`needs_transformers` / :func:`needs_timm` say the model does
      not need one, open_clip is imported with it hidden, so it takes its
      "not installed" branch for that module. Both stay importable by anyone
      else afterwards (``peft`` for LoRA imports ``transformers`` as usual).
    - ``torch._dynamo``, which ``torchvision.ops`` (imported by open_clip for
      ``FrozenBatchNorm2d``) imports for one function of ``roi_align``:
      :func:`_dynamo_deferred`. A process that trains imports it anyway when
      it creates its first ``torch.optim`` optimizer (``add_param_group`` is
      wrapped by ``torch._disable_dynamo``); one that only evaluates (the
      server, an evaluation message) never does.

    With ``model_name`` None, or once open_clip is imported, this is a plain import.
    """
    if "open_clip" in sys.modules or model_name is None:
        import open_clip

        return open_clip
    hidden = [name for name, needed in _OPTIONAL_IMPORTS.items() if name not in sys.modules and not needed(model_name)]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        return _import_deferring_dynamo("open_clip")
    finally:
        for name in hidden:
            del sys.modules[name]


def _import_deferring_dynamo(module: str):
    """Import ``module`` inside :func:`_dynamo_deferred`; should it want more of ``torch._dynamo``
    than the stand-in has (another torchvision version), import it again with the real one."""
    try:
        with _dynamo_deferred():
            return importlib.import_module(module)
    except ImportError:
        return importlib.import_module(module)


@contextmanager
def _dynamo_deferred():
    """Import what runs inside without ``torch._dynamo`` (1.3 s of open_clip's import).

    ``torchvision.ops.roi_align`` does ``from torch._dynamo.utils import
    is_compile_supported`` at import. Inside this context that name comes from
    a stand-in module whose ``is_compile_supported`` imports the real one when
    it is first called; the stand-ins are removed on exit, so a later
    ``import torch._dynamo`` (``torch.compile``) imports the real package. A
    no-op when ``torch._dynamo`` is already imported.
    """
    if "torch._dynamo" in sys.modules:
        yield
        return

    def is_compile_supported(device_type):
        from torch._dynamo.utils import is_compile_supported as real

        return real(device_type)

    package = types.ModuleType("torch._dynamo")
    package.__path__ = []  # a package, so that ``torch._dynamo.utils`` resolves to the stand-in below
    utils = types.ModuleType("torch._dynamo.utils")
    utils.is_compile_supported = is_compile_supported
    package.utils = utils
    stand_ins = {"torch._dynamo": package, "torch._dynamo.utils": utils}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


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


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda if available else cpu; "cpu"; "cuda" / "cuda:N" (error if absent)."""
    if isinstance(name, torch.device):
        name = str(name)
    key = str(name).strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(key)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"unknown device {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} requested but CUDA is not available on this machine "
                "(use device='auto' or 'cpu')"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {name!r} requested but only {count} CUDA device(s) exist")
    elif dev.type != "cpu":
        if dev.type == "mps" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return dev
        raise ValueError(f"device {name!r} is not supported here: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return dev


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _build(model_name: str, pretrained: str, device: torch.device, checkpoint_label: str) -> Clip:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, device=device
    )
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


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cached_tag_file(cfg: dict) -> str | None:
    """Local path of a tag's weights if already downloaded, else None (never touches the network)."""
    if "file" in cfg and os.path.isfile(cfg["file"]):
        return cfg["file"]
    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
            from open_clip.pretrained import HF_WEIGHTS_NAME
        except ImportError:
            return None
        repo_id, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        candidates = [filename]
        try:
            from open_clip.pretrained import _get_safe_alternatives

            candidates = list(_get_safe_alternatives(filename)) + candidates
        except ImportError:  # pragma: no cover - older open_clip
            pass
        for fn in candidates:
            try:
                hit = try_to_load_from_cache(repo_id=repo_id, filename=fn)
            except Exception:  # noqa: BLE001 - any cache oddity means "not cached"
                hit = None
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    url = cfg.get("url", "")
    if url:
        target = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(target):
            return target
    return None


def _reachable(cfg: dict, timeout: float = _NETWORK_PROBE_SECONDS) -> bool:
    """Can we open a TCP connection to the weights' host within ``timeout`` seconds?

    With an HTTP(S) proxy configured a direct probe says nothing: assume reachable and let
    the download itself decide.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    if cfg.get("hf_hub"):
        try:
            from huggingface_hub import constants

            host = urlparse(constants.ENDPOINT).hostname
        except Exception:  # noqa: BLE001
            host = None
    else:
        host = urlparse(cfg.get("url", "")).hostname
    if not host:
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)  # bounds DNS resolution time too
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def _missing_weights_message(model_name: str, tag: str, why: str) -> str:
    return (
        f"The open_clip weights '{tag}' for '{model_name}' are not in the local cache and cannot be "
        f"downloaded ({why}): download them on a machine with internet access (they land in the "
        f"Hugging Face cache) or pass pretrained='/path/to/checkpoint.safetensors' (or .pt/.bin), "
        f"a local open_clip checkpoint file for '{model_name}'."
    )


def _load_tag(model_name: str, tag: str, device: torch.device) -> Clip:
    import open_clip
    from open_clip.pretrained import is_pretrained_cfg

    if not is_pretrained_cfg(model_name, tag):
        valid = open_clip.list_pretrained_tags_by_model(model_name)
        listed = ", ".join(valid) if valid else "none"
        raise ModelLoadError(
            f"'{tag}' is neither an existing file nor an open_clip pretrained tag for "
            f"'{model_name}'; valid tags: {listed}; or use pretrained='{EMBEDDED}' "
            f"(for '{DEFAULT_MODEL}') or a path to a checkpoint file."
        )
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    cached = _cached_tag_file(cfg) is not None
    if not cached:
        if _offline():
            raise ModelLoadError(_missing_weights_message(model_name, tag, "HF_HUB_OFFLINE is set"))
        if not _reachable(cfg):
            raise ModelLoadError(_missing_weights_message(model_name, tag, "no network connection"))
    try:
        return _build(model_name, tag, device, tag)
    except Exception as e:  # noqa: BLE001 - wrap whatever the download or load raised
        if not cached:
            raise ModelLoadError(_missing_weights_message(model_name, tag, _short(e))) from e
        raise ModelLoadError(
            f"could not load the cached open_clip weights '{tag}' for '{model_name}' ({_short(e)}): "
            f"delete them from the Hugging Face cache to download again, or pass "
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
    - anything else: an open_clip pretrained tag for ``model_name`` (e.g. ViT-B-32 "openai").
    """
    folder = Path(os.path.expanduser(str(pretrained or ""))) if pretrained else None
    if folder is not None and not folder.is_dir():
        folder = None
    # A checkpoint folder's own config defines the model, whatever model_name says.
    open_clip = import_open_clip(None if folder is not None else model_name)

    from .pretrain import ensure_embedded_checkpoint

    register_model_configs()
    dev = resolve_device(device)
    if folder is not None:
        return _load_folder(model_name, folder, dev)
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
    weights = [p for p in sorted(folder.iterdir()) if p.name.startswith("open_clip_") and p.suffix in (".safetensors", ".bin", ".pth")]
    if not weights:
        raise ModelLoadError(f"checkpoint folder {folder} has no open_clip_model.safetensors (or open_clip_pytorch_model.bin)")
    try:
        clip = _build(f"local-dir:{folder}", None, device, str(weights[0]))
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load the checkpoint folder {folder}: {type(e).__name__}: {e}") from e
    clip.name = model_name if model_name != DEFAULT_MODEL else folder.name
    return clip

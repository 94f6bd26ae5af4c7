"""Contrastive pretraining of the embedded tiny CLIP, and its on-disk checkpoint cache.

No CLIP weights ship inside any package and nothing can be downloaded at run time, so the
default backbone is a tiny open_clip model pretrained here, once, on the balanced
``pretrain`` split of a dataset bundle (image, caption) pairs. The result is written as an
open_clip state_dict in safetensors format and loaded back with
``open_clip.create_model_and_transforms(name, pretrained=<file>)``, exactly like a real
checkpoint.

Determinism: pretraining always runs on the CPU, in one thread, with its own seeded RNG state,
so the same inputs and seed give a bitwise-identical checkpoint on a given machine.
The global RNG state and the torch thread count are restored on return.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import default_cache_dir
from ..storage import file_lock, save_tensors_atomic
from .architectures import register_model_configs
from .features import preprocess_images

__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_LR",
    "RECIPE_VERSION",
    "default_cache_dir",
    "embedded_checkpoint_path",
    "ensure_embedded_checkpoint",
    "pretrain_clip",
    "train_embedded_model",
]

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 8
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 2e-3
DEFAULT_WEIGHT_DECAY = 0.1
WARMUP_FRACTION = 0.1
MAX_LOGIT_SCALE = math.log(100.0)
# Bump when the pretraining procedure changes in a way that changes the weights.
RECIPE_VERSION = 1
# Pretraining runs single-threaded: on this ~3 M-parameter model two threads were only ~20%
# faster than one on an idle 2-core machine, and many times SLOWER when other processes hold
# the cores (OpenMP threads spin-waiting for each other); one thread also makes the checkpoint
# independent of the machine's core count.
PRETRAIN_THREADS = 1


# --------------------------------------------------------------------------- pretraining


@contextlib.contextmanager
def _isolated_torch_state(seed: int, num_threads: int | None) -> Iterator[None]:
    """Seed torch's global RNGs and set the thread count; restore both afterwards."""
    old_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if num_threads is not None and num_threads != old_threads:
            torch.set_num_threads(num_threads)
        try:
            yield
        finally:
            if torch.get_num_threads() != old_threads:
                torch.set_num_threads(old_threads)


def _labels_of(images: Any, labels: Any) -> torch.Tensor:
    if labels is None:
        labels = getattr(images, "labels", None)
        if labels is None:
            raise ValueError("labels not given and the images object has no .labels")
    return torch.as_tensor(np.asarray(labels), dtype=torch.long)


def pretrain_clip(
    model: torch.nn.Module,
    preprocess: Callable,
    tokenizer: Callable,
    images: Any,
    labels: Any = None,
    classnames: Sequence[str] = (),
    captions: Sequence[str] = ("a photo of a {}.",),
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
) -> None:
    """Train ``model`` in place with the symmetric InfoNCE (CLIP) loss on (image, caption) pairs.

    ``images`` is a split (``pil(i)``, ``labels``, ``len()``) or a sequence of PIL images with
    ``labels`` given. Sample i is paired with ``template.format(classnames[labels[i]])`` for a
    template drawn at random per sample and per epoch from ``captions``. The model's own
    learnable ``logit_scale`` scales the logits (clamped at 100 as in CLIP). AdamW, linear
    warm-up then cosine decay. Runs on the device the model is on and uses torch's global RNG
    (seed it, or call under ``ensure_embedded_checkpoint``); the model is left in eval mode.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 for a contrastive loss, got {batch_size}")
    if not captions or any("{}" not in c for c in captions):
        raise ValueError("captions must be a non-empty sequence of templates containing '{}'")
    y = _labels_of(images, labels)
    n = len(images)
    if len(y) != n:
        raise ValueError(f"{n} images but {len(y)} labels")
    if n < 2:
        raise ValueError("need at least two images")
    if len(classnames) == 0 or int(y.min()) < 0 or int(y.max()) >= len(classnames):
        raise ValueError("labels must index into a non-empty classnames")

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)

    x_all = preprocess_images(preprocess, images)  # [N, 3, H, W], CPU
    n_templates, n_classes = len(captions), len(classnames)
    tokens = tokenizer([t.format(c) for t in captions for c in classnames])  # [T*C, L]
    tokens = tokens.view(n_templates, n_classes, -1)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, epochs * steps_per_epoch)
    warmup = max(1, int(WARMUP_FRACTION * total))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return 0.5 * lr * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    model.train()
    step = 0
    # A bar on a terminal, nothing in a log (tqdm's disable=None); the caller logs start and end.
    bar = tqdm(total=total, desc="pretraining the embedded CLIP", unit="step", disable=None, leave=False)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        tmpl = torch.randint(n_templates, (n,), generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            if len(idx) < 2:  # a lone sample has no negatives
                continue
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            img = model.encode_image(x_all[idx].to(device), normalize=True)
            txt = model.encode_text(tokens[tmpl[idx], y[idx]].to(device), normalize=True)
            logits = model.logit_scale.exp() * img @ txt.T
            target = torch.arange(len(idx), device=device)
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
            step += 1
            bar.update()
    bar.close()
    model.eval()


# --------------------------------------------------------------------------- the cache


def _pretrain_split(dataset: Any) -> Any:
    split = getattr(dataset, "pretrain", None)
    if split is None:
        raise ValueError("dataset has no 'pretrain' split (expected a DatasetBundle)")
    return split


def _captions_of(dataset: Any) -> tuple[str, ...]:
    """The bundle's caption templates, or its zero-shot template when it has none."""
    captions = tuple(getattr(dataset, "captions", ()) or ())
    return captions or (dataset.template,)


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns on the root logger that a model without weights is randomly
    initialised; for pretraining from scratch that is the point, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def _data_digest(dataset: Any) -> str:
    """Hash of what the pretraining sees: the pretrain images, labels, class names and captions."""
    split = _pretrain_split(dataset)
    h = hashlib.sha256()
    images = getattr(split, "images", None)
    if images is not None:
        arr = np.ascontiguousarray(np.asarray(images))
        h.update(str((arr.dtype.str, arr.shape)).encode())
        h.update(arr.tobytes())
    else:  # no raw array: hash the decoded images
        for i in range(len(split)):
            im = split.pil(i)
            h.update(str((im.mode, im.size)).encode())
            h.update(im.tobytes())
    lab = np.ascontiguousarray(np.asarray(split.labels, dtype=np.int64))
    h.update(lab.tobytes())
    h.update(json.dumps([list(dataset.classnames), list(_captions_of(dataset))]).encode())
    return h.hexdigest()


def _model_config(model_name: str) -> dict:
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown model '{model_name}'; known configs: {', '.join(open_clip.list_models())}")
    return cfg


def _cache_key(model_name: str, dataset: Any, seed: int, epochs: int, batch_size: int, lr: float) -> str:
    payload = {
        "recipe": RECIPE_VERSION,
        "model_name": model_name,
        "config": _model_config(model_name),
        "dataset": getattr(dataset, "name", "?"),
        "data": _data_digest(dataset),
        "seed": int(seed),
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "weight_decay": DEFAULT_WEIGHT_DECAY,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)


def embedded_checkpoint_path(
    model_name: str,
    dataset: Any,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
) -> Path:
    """Where the embedded checkpoint for these inputs lives (whether or not it exists yet)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = _cache_key(model_name, dataset, seed, epochs, batch_size, lr)
    name = getattr(dataset, "name", "data")
    return root / f"{_safe(model_name)}__{_safe(name)}__seed{seed}__ep{epochs}__{key[:16]}.safetensors"


def train_embedded_model(
    model_name: str,
    dataset: Any,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
) -> torch.nn.Module:
    """Build ``model_name`` from its config (random init from ``seed``) and pretrain it on the
    CPU on ``dataset.pretrain``; return the trained model (eval mode). No file is written.

    Torch's global RNG state and thread count are the same after the call as before.
    """
    import open_clip

    register_model_configs()
    split = _pretrain_split(dataset)
    threads = PRETRAIN_THREADS
    quiet = _DropRandomInitWarning()
    with _isolated_torch_state(seed, threads):
        logging.getLogger().addFilter(quiet)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, device="cpu")
        finally:
            logging.getLogger().removeFilter(quiet)
        tokenizer = open_clip.get_tokenizer(model_name)
        pretrain_clip(
            model,
            preprocess,
            tokenizer,
            split,
            split.labels,
            classnames=dataset.classnames,
            captions=_captions_of(dataset),
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
        )
    return model


def ensure_embedded_checkpoint(
    model_name: str,
    dataset: Any,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
) -> Path:
    """Path of the embedded checkpoint for (config, data, seed, recipe); pretrain it if missing.

    ``dataset`` is a DatasetBundle (``name``, ``classnames``, ``captions``, ``pretrain``).
    Concurrent callers (threads or processes) serialise on a lock file beside the checkpoint:
    exactly one trains, the others wait and reuse its file. The file is written to a temporary
    name and renamed into place, so it is never seen half-written.
    """
    path = embedded_checkpoint_path(model_name, dataset, cache_dir, seed, epochs, batch_size, lr)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(path.name + ".lock")):
        if path.is_file():  # another process finished it while we waited
            return path
        log.info(
            "pretraining the embedded %s on %s (first use; about a minute on 2 cores) -> %s",
            model_name,
            getattr(dataset, "name", "its dataset"),
            path,
        )
        t0 = time.perf_counter()
        model = train_embedded_model(model_name, dataset, seed, epochs, batch_size, lr)
        seconds = time.perf_counter() - t0
        meta = {
            "format": "open_clip state_dict",
            "model_name": model_name,
            "dataset": str(getattr(dataset, "name", "?")),
            "seed": str(seed),
            "epochs": str(epochs),
            "batch_size": str(batch_size),
            "lr": repr(lr),
            "recipe": str(RECIPE_VERSION),
        }
        # One metadata key: safetensors does not keep the order of several, and the file must
        # be bitwise reproducible.
        save_tensors_atomic(model.state_dict(), path, {"fedpurel": json.dumps(meta, sort_keys=True)})
        log.info("pretrained embedded %s on %s in %.1f s -> %s", model_name, meta["dataset"], seconds, path)
    return path

"""From a validated config to the cached inputs of the training loops.

Data flows one way: config -> dataset and Fed-LT split -> frozen CLIP ->
the PEFT variant's inputs and the zero-shot logits (:class:`FeatureSet`) -> training.
The inputs are what the variant declares (``PeftVariant.inputs``): cached image
features of the frozen encoder, or preprocessed pixels when the variant puts the
image encoder in the loop. Zero-shot logits always come from the frozen CLIP.
Both apps call these functions; neither holds method logic of its own.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import torch

from .config import RunConfig
from .data import DatasetBundle, load_dataset
from .data.fedlt import FedLTSplit, build_fedlt
from .models import (
    EMBEDDED,
    Clip,
    create_clip,
    default_cache_dir,
    encode_images,
    preprocess_images,
    zero_shot_logits,
    zero_shot_text_features,
)
from .models.feature_cache import cached_image_features
from .peft import PeftVariant, build_peft, peft_class
from .training import FeatureSet, Stage1Options

# The embedded CLIP and the dataset's pretrain/test/train-pool split do not depend
# on the experiment seed: like released CLIP weights, they are fixed.
BACKBONE_SEED = 0


@functools.lru_cache(maxsize=2)
def dataset(name: str, root: str) -> DatasetBundle:
    """The dataset bundle (cached per process)."""
    return load_dataset(name, root or None, seed=BACKBONE_SEED)


@functools.lru_cache(maxsize=2)
def _clip(model: str, pretrained: str, cache_dir: str, device: str, data: str, root: str) -> Clip:
    return create_clip(
        model,
        pretrained,
        cache_dir=cache_dir or None,
        device=device,
        # Only the embedded tiny CLIP is pretrained on (and keyed by) the dataset; real
        # weights need none of it, so a node holding only its own images can load them.
        pretrain_dataset=dataset(data, root) if pretrained == EMBEDDED else None,
        seed=BACKBONE_SEED,
    )


def load_clip(cfg: RunConfig) -> Clip:
    """The frozen CLIP of the run (cached per process; the embedded one is pretrained once)."""
    return _clip(cfg.model, cfg.pretrained, cfg.cache_dir, cfg.device, cfg.dataset, cfg.data_root)


def fedlt_split(cfg: RunConfig, num_clients: int) -> FedLTSplit:
    """The Fed-LT split for ``num_clients`` clients: the same in every process."""
    return _fedlt_split(
        cfg.dataset, cfg.data_root, num_clients, cfg.n_max, cfg.imbalance_factor,
        cfg.dirichlet_alpha, cfg.min_client_samples, cfg.client_test_size, cfg.seed,
    )


@functools.lru_cache(maxsize=4)
def _fedlt_split(data: str, root: str, num_clients: int, *protocol) -> FedLTSplit:
    bundle = dataset(data, root)
    return build_fedlt(bundle.train.labels, bundle.test.labels, bundle.num_classes, num_clients, *protocol)


def classes(cfg: RunConfig, data_dir: str = "") -> tuple[tuple[str, ...], str]:
    """(class names, zero-shot template) of the run's dataset.

    A node's ``data-dir`` may carry them (its ``dataset.json``), so that a node of
    an on-disk dataset needs none of the dataset's files; else they come from
    the dataset itself.
    """
    if data_dir:
        from .data.local import read_node_classes

        found = read_node_classes(data_dir, cfg.dataset)
        if found is not None:
            return found
    bundle = dataset(cfg.dataset, cfg.data_root)
    return bundle.classnames, bundle.template


def zero_shot_text(cfg: RunConfig, data_dir: str = "") -> torch.Tensor:
    """The frozen zero-shot classifier [C, D] of the dataset's template (once per model and classes)."""
    clip = load_clip(cfg)
    names, template = classes(cfg, data_dir)
    key = (id(clip.model), names, template)
    if key not in _ZERO_SHOT_TEXT:
        _ZERO_SHOT_TEXT[key] = zero_shot_text_features(clip, names, template)
    return _ZERO_SHOT_TEXT[key]


_ZERO_SHOT_TEXT: dict[tuple[int, tuple[str, ...], str], torch.Tensor] = {}


def class_counts(cfg: RunConfig) -> np.ndarray:
    """Global long-tailed train count per class (for Many / Medium / Few)."""
    return fedlt_split(cfg, 1).class_counts if cfg.n_max == 0 else _profile_counts(cfg)


def _profile_counts(cfg: RunConfig) -> np.ndarray:
    from .data.fedlt import long_tail_counts

    bundle = dataset(cfg.dataset, cfg.data_root)
    return long_tail_counts(cfg.n_max, cfg.imbalance_factor, bundle.num_classes)


def build_model(cfg: RunConfig, data_dir: str = "") -> PeftVariant:
    """The PEFT variant over the run's frozen CLIP, at its initial phi_g and phi_k
    (class names from :func:`classes`)."""
    return build_peft(cfg.peft, load_clip(cfg), *classes(cfg, data_dir), cfg)


def input_kind(cfg: RunConfig) -> str:
    """What the run's PEFT variant consumes: ``"features"`` or ``"pixels"``."""
    return peft_class(cfg.peft).inputs


def model_inputs(cfg: RunConfig, split, features: torch.Tensor | None = None) -> torch.Tensor:
    """The variant's inputs for a split, on the clip's device.

    ``"features"``: L2-normalised image features of the frozen encoder (``features``
    when already computed); ``"pixels"``: the images through CLIP's preprocessing.
    """
    clip = load_clip(cfg)
    kind = input_kind(cfg)
    if kind == "features":
        x = features if features is not None else encode_images(clip, split)
    elif kind == "pixels":
        x = preprocess_images(clip.preprocess, split)
    else:  # pragma: no cover - a variant declaring something else
        raise ValueError(f"PEFT variant {cfg.peft!r} declares unknown inputs {kind!r}")
    return x.to(clip.device)


def image_features(cfg: RunConfig, split, identity: str, cache_dir: str = "") -> torch.Tensor:
    """Frozen image features of a split: from the on-disk cache when ``feature-cache`` is on.

    ``identity`` names the split's samples (dataset, split, indices) for the cache key;
    ``cache_dir`` overrides the run's cache folder (a node keeps its own in its state-dir).
    """
    clip = load_clip(cfg)
    if not cfg.feature_cache:
        return encode_images(clip, split)
    cache_dir = cache_dir or cfg.cache_dir or str(default_cache_dir())
    return cached_image_features(clip, split, f"{cfg.dataset}:{cfg.data_root}/{identity}", cache_dir)


def _digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


def feature_set(cfg: RunConfig, split, identity: str, cache_dir: str = "", data_dir: str = "") -> FeatureSet:
    """A split's inputs for the run's PEFT variant, labels, and zero-shot logits z.

    z comes from the frozen image encoder and the dataset's template, whatever the variant
    (class names from :func:`classes`).
    """
    clip = load_clip(cfg)
    text = zero_shot_text(cfg, data_dir)
    features = image_features(cfg, split, identity, cache_dir)
    logits = zero_shot_logits(clip, features, text)
    labels = torch.as_tensor(np.asarray(split.labels), dtype=torch.long)
    inputs = model_inputs(cfg, split, features)
    return FeatureSet(inputs, labels.to(clip.device), logits.to(clip.device))


def _client_indices(cfg: RunConfig, partition_id: int, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {num_partitions - 1}]")
    split = fedlt_split(cfg, num_partitions)
    return split.client_train[partition_id], split.client_test[partition_id]


def client_splits(cfg: RunConfig, partition_id: int, num_partitions: int, data_dir: str = "") -> tuple:
    """A client's (train, test) image splits: the images of its node's ``data-dir`` when it
    has one, else its partition of the run's Fed-LT split; nothing of other clients."""
    if data_dir:
        from .data.local import load_node_data

        return load_node_data(data_dir, len(classes(cfg, data_dir)[0]))
    bundle = dataset(cfg.dataset, cfg.data_root)
    train, test = _client_indices(cfg, partition_id, num_partitions)
    return bundle.train.subset(train), bundle.test.subset(test)


def _split_identity(split, name: str, indices: np.ndarray | None) -> str:
    """Cache identity of a client split: its indices in the dataset, or its node-local files."""
    if indices is not None:
        return f"{name}/{_digest(indices)}"
    listing = "\n".join(f"{p} {y}" for p, y in zip(split.paths, split.labels, strict=True))
    return f"node:{split.root}/{name}/{hashlib.sha256(listing.encode()).hexdigest()[:16]}"


def client_feature_sets(
    cfg: RunConfig, partition_id: int, num_partitions: int, data_dir: str = "", cache_dir: str = ""
) -> tuple[FeatureSet, FeatureSet]:
    """A client's (train, test) feature sets (see :func:`client_splits`); ``cache_dir``:
    where its feature cache lives (default: the run's)."""
    train, test = client_splits(cfg, partition_id, num_partitions, data_dir)
    train_idx, test_idx = (None, None) if data_dir else _client_indices(cfg, partition_id, num_partitions)
    return (
        feature_set(cfg, train, _split_identity(train, "train", train_idx), cache_dir, data_dir),
        feature_set(cfg, test, _split_identity(test, "test", test_idx), cache_dir, data_dir),
    )


def client_inputs(
    cfg: RunConfig, partition_id: int, num_partitions: int, data_dir: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the variant's inputs of a client's (train, test) splits (no zero-shot pass)."""
    train, test = client_splits(cfg, partition_id, num_partitions, data_dir)
    return model_inputs(cfg, train), model_inputs(cfg, test)


def global_test_set(cfg: RunConfig) -> FeatureSet:
    """The balanced global test set (GM evaluation), prepared once."""
    return feature_set(cfg, dataset(cfg.dataset, cfg.data_root).test, "test/all")


def stage1_options(cfg: RunConfig) -> Stage1Options:
    """The Stage-1 step's options; the purification anchor comes from the method."""
    from .methods import method_class

    return Stage1Options(
        align=method_class(cfg.method).align,
        granularity=cfg.granularity,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        tau_min=cfg.tau_min,
        tau_max=cfg.tau_max,
        tau_tol=cfg.tau_tol,
        tau_max_iter=cfg.tau_max_iter,
        precision=precision(cfg),
    )


def precision(cfg: RunConfig) -> str:
    """The run's resolved mixed precision on its device (fp32 on CPU for ``auto``)."""
    from .training import resolve_precision

    return resolve_precision(cfg.precision, load_clip(cfg).device)


def evaluate_global(cfg: RunConfig, peft: PeftVariant, test: FeatureSet, counts: np.ndarray) -> dict:
    """GM metrics of phi_g on the balanced test set, plus TKL(z || l_G) there."""
    from .metrics import gm_summary
    from .tkl import temperature_aligned_kl
    from .training import autocast

    with torch.no_grad(), autocast(test.features.device, precision(cfg)):
        logits = peft.global_logits(test.features).float()
    with torch.no_grad():
        divergence = temperature_aligned_kl(
            logits, test.zero_shot_logits,
            tau_min=cfg.tau_min, tau_max=cfg.tau_max, tol=cfg.tau_tol, max_iter=cfg.tau_max_iter,
        )
    preds = logits.argmax(dim=-1).cpu().numpy()
    summary = gm_summary(preds, test.labels.cpu().numpy(), counts, cfg.many_threshold, cfg.few_threshold)
    summary["tkl_to_zero_shot"] = float(divergence)
    return summary


def evaluate_zero_shot(cfg: RunConfig, test: FeatureSet, counts: np.ndarray) -> dict:
    """GM metrics of the frozen zero-shot CLIP on the balanced test set."""
    from .metrics import gm_summary

    preds = test.zero_shot_logits.argmax(dim=-1).cpu().numpy()
    return gm_summary(preds, test.labels.cpu().numpy(), counts, cfg.many_threshold, cfg.few_threshold)

"""The run config: a small core of sections composed with the parts' own configs.

Flower hands a run its config flat, with dotted keys (``train.rounds``,
``peft.lora.rank``); the apps unflatten it with Flower's own
``unflatten_dict`` and :func:`parse_run_config` validates the nested mapping
once, at the edge of each app::

    seed, eval-every, output-dir, round-timeout, resume-from     (the run)
    data.*         the dataset and the Fed-LT protocol          (DataConfig)
    model.*        the frozen CLIP                               (ModelConfig)
    peft.name      the PEFT variant; peft.<variant>.* its own config (registered with it)
    method.name    the method;       method.<method>.* its own config (registered with it)
    train.*        Stage 1: rounds, sampling, the local loop     (TrainConfig)
    personalize.*  Stage 2: rounds and epochs                    (PersonalizeConfig)
    tkl.*          the temperature solve of TKL                  (TklConfig)

Each section is a strict pydantic model (a TOML ``1`` is no ``true``, a
``true`` is no number). Every field says, with :func:`knob`, what it is for;
its ``role`` says what it changes, and so what a fingerprint of the config
depends on (:func:`fingerprint`):

- ``"identity"`` (the default): what stored tensors mean (the data a node
  holds, the model, the shapes and init of the PEFT parameters);
- ``"training"``: the results, but not what stored tensors mean;
- ``"operational"``: nothing the run computes.

``pyproject.toml``'s ``[tool.flwr.app.config]`` is written from these models
(``fedpurel config --write``) and a test keeps the two equal.

Pure library code: no Flower, no torch. The parts' configs come from the
registries (:mod:`fedpurel_app.registry`), which import the parts on first use.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from .errors import ConfigError, NodeConfigError
from .registry import DATASETS, METHODS, PEFT_VARIANTS, Registry

Role = Literal["identity", "training", "operational"]
ROLES: tuple[Role, ...] = ("identity", "training", "operational")


def default_cache_dir() -> Path:
    """Where checkpoints, features and simulated nodes' state live by default: $FEDPUREL_CACHE,
    else ~/.cache/fedpurel."""
    env = os.environ.get("FEDPUREL_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/fedpurel").expanduser()


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def knob(default: Any, doc: str, *, role: Role = "identity", **constraints: Any) -> Any:
    """A config field: its default, one line of documentation, its role and pydantic constraints."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: choose one of {ROLES}")
    return Field(default, description=doc, json_schema_extra={"role": role}, **constraints)


def role_of(model: type[BaseModel], field: str) -> Role:
    extra = model.model_fields[field].json_schema_extra
    return extra.get("role", "identity") if isinstance(extra, dict) else "identity"


class Section(BaseModel):
    """A group of knobs under one key prefix: kebab-case keys, strict types, nothing unknown."""

    model_config = ConfigDict(
        alias_generator=_kebab,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        strict=True,
        allow_inf_nan=False,  # lr = inf or round-timeout = nan is always a mistake
    )


class ComponentConfig(Section):
    """Base of a part's own config (a PEFT variant's, a method's); registered with the part."""


class PeftConfig(ComponentConfig):
    """What every PEFT variant's config has: the learning rates its parameters train with."""

    lr: float = knob(0.05, "Stage-1 SGD learning rate of phi_g", role="training", gt=0.0)
    personal_lr: float = knob(0.1, "Stage-2 SGD learning rate of phi_k", role="training", gt=0.0)


class MethodConfig(ComponentConfig):
    """Base of a method's config (a method without knobs uses it as it is)."""


# ------------------------------------------------------------------------------------ sections


class DataConfig(Section):
    """The dataset and the Fed-LT protocol (docs/METHOD.md "Fed-LT protocol")."""

    name: str = knob(
        "mnist-animals-blur",
        "dataset: embedded 'mnist-animals-blur' (20 classes, blurred against the CLIP's clean pretraining) | "
        "'mnist-animals' (the same, unshifted) | 'mnist' (10); or 'cifar10-lt' | 'cifar100-lt' | 'imagenet-lt' | "
        "'places-lt' from data.root",
    )
    root: str = knob("", "folder of on-disk datasets (unused by the embedded ones)")
    n_max: int = knob(
        150, "long-tailed train count of class 0; 0 = the train pool as it is (ImageNet-LT, Places-LT)", ge=0
    )
    imbalance_factor: float = knob(100.0, "IF = n_max / n_min", ge=1.0)
    dirichlet_alpha: float = knob(1.0, "per-class Dirichlet concentration of the client split", gt=0.0)
    min_client_samples: int = knob(4, "every client gets at least this many train samples", ge=1)
    client_test_size: int = knob(100, "size of each client's test set (PM evaluation)", ge=1)
    many_threshold: float = knob(40.0, "Many: train count > many-threshold", role="training", ge=0.0)
    few_threshold: float = knob(10.0, "Few: train count <= few-threshold; Medium in between", role="training", ge=0.0)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in DATASETS:
            raise ValueError(f"unknown dataset; choose one of {sorted(DATASETS.names())}")
        return name

    @model_validator(mode="after")
    def _thresholds(self) -> DataConfig:
        if self.few_threshold > self.many_threshold:
            raise ValueError(
                f"data.few-threshold ({self.few_threshold}) must not exceed data.many-threshold ({self.many_threshold})"
            )
        return self


class ModelConfig(Section):
    """The frozen CLIP."""

    name: str = knob("fedpurel-tiny", "an open_clip architecture name", min_length=1)
    pretrained: str = knob(
        "embedded",
        "'embedded' (tiny CLIP pretrained here), a checkpoint file or folder, or an open_clip tag",
        min_length=1,
    )
    cache_dir: str = knob(
        "", "checkpoint and feature cache; '' = $FEDPUREL_CACHE or ~/.cache/fedpurel", role="training"
    )
    feature_cache: bool = knob(
        True, "keep frozen image features on disk (prompt, adapter); reused across runs", role="training"
    )
    device: str = knob(
        "auto", "'auto' (cuda when present) | 'cpu' | 'cuda[:N]'", role="training", pattern=r"^(auto|cpu|cuda(:\d+)?)$"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = knob(
        "auto",
        "autocast of forward passes: 'auto' (bf16/fp16 on GPU, fp32 on CPU) | 'fp32' | 'bf16' | 'fp16'",
        role="training",
    )


class TrainConfig(Section):
    """Stage 1: global balanced training (docs/METHOD.md "Stage 1")."""

    rounds: int = knob(30, "Stage-1 rounds", role="training", ge=1)
    local_epochs: int = knob(2, "local epochs per round", role="training", ge=1)
    batch_size: int = knob(16, "mini-batch size (Stage 1 and Stage 2)", role="training", ge=1)
    momentum: float = knob(0.9, "SGD momentum of Stage 1", role="training", ge=0.0, lt=1.0)
    weight_decay: float = knob(0.0005, "SGD weight decay of Stage 1", role="training", ge=0.0)
    fraction: float = knob(0.4, "fraction of clients sampled per round", role="training", gt=0.0, le=1.0)
    all_clients_first_round: bool = knob(
        True, "sample every client in round 1 (as the reference does)", role="training"
    )
    min_nodes: int = knob(2, "wait for this many connected clients before round 1", role="training", ge=1)


class PersonalizeConfig(Section):
    """Stage 2 and the post-hoc personalization of the baselines (docs/METHOD.md "Stage 2")."""

    rounds: int = knob(5, "personalization rounds on all clients after Stage 1", role="training", ge=0)
    epochs: int = knob(4, "local epochs per personalization round", role="training", ge=1)


class TklConfig(Section):
    """The per-sample temperature solve of TKL (docs/METHOD.md "TKL")."""

    tau_min: float = knob(0.05, "lower end of the temperature bracket", role="training", gt=0.0)
    tau_max: float = knob(20.0, "upper end of the temperature bracket", role="training", gt=0.0)
    tol: float = knob(0.0001, "stop when the bracket is this narrow", role="training", gt=0.0)
    max_iter: int = knob(50, "at most this many bisection steps", role="training", ge=1)

    @model_validator(mode="after")
    def _bracket(self) -> TklConfig:
        if self.tau_min >= self.tau_max:
            raise ValueError(f"tkl.tau-min ({self.tau_min}) must be smaller than tkl.tau-max ({self.tau_max})")
        return self


class DpConfig(Section):
    """Client-level differential privacy of the Stage-1 updates (docs/METHOD.md "Privacy")."""

    enabled: bool = knob(
        False, "clip every Stage-1 update to clipping-norm, add Gaussian noise at aggregation", role="training"
    )
    noise_multiplier: float = knob(
        1.0, "z: noise std z * C / (sampled clients) on the mean update", role="training", ge=0.0
    )
    clipping_norm: float = knob(0.1, "C: L2 norm bound of a client's update of phi_g", role="training", gt=0.0)
    delta: float = knob(0.0001, "delta of the (epsilon, delta) reported", role="training", gt=0.0, lt=1.0)
    target_epsilon: float = knob(
        0.0,
        "> 0: the noise multiplier is the smallest reaching this epsilon after train.rounds (overrides it)",
        role="training",
        ge=0.0,
    )

    @model_validator(mode="after")
    def _some_noise(self) -> DpConfig:
        if self.enabled and self.noise_multiplier <= 0 and self.target_epsilon <= 0:
            raise ValueError(
                "dp.enabled needs noise: set dp.noise-multiplier > 0 or dp.target-epsilon > 0 "
                "(clipping alone gives no privacy guarantee)"
            )
        return self


class SecAggConfig(Section):
    """Secure aggregation of the Stage-1 updates by Flower's SecAgg+ (docs/RELIABILITY.md "Secure aggregation")."""

    enabled: bool = knob(
        False, "Stage-1 rounds through Flower's SecAgg+: the server only holds the sum of the updates", role="training"
    )
    shares: float = knob(
        1.0,
        "fraction of a round's sampled clients that hold shares of each one's secrets",
        role="training",
        gt=0.0,
        le=1.0,
    )
    threshold: float = knob(
        0.6, "fraction of those shares that reconstructs a dropped client's mask", role="training", gt=0.0, le=1.0
    )
    clipping_range: float = knob(
        8.0, "every update value is quantized in [-r, r] (a DP run uses dp.clipping-norm)", role="training", gt=0.0
    )
    quantization_range: int = knob(
        4194304, "quantization levels of an update value (2^22; at most 2^24)", role="training", ge=2, le=2**24
    )


class TrackConfig(Section):
    """What a run writes besides results.json as it goes: TensorBoard events, MLflow (fedpurel_app/tracking.py)."""

    tensorboard: bool = knob(True, "TensorBoard event files in <run dir>/tensorboard", role="operational")
    image_every: int = knob(
        10, "the per-class accuracy image every this many rounds (and the last)", role="operational", ge=1
    )
    mlflow: bool = knob(False, "also log to a local MLflow store (needs mlflow-skinny)", role="operational")
    mlflow_uri: str = knob("", "the MLflow store; '' = sqlite:///<output-dir>/mlflow.db", role="operational")


class ComponentSection(Section):
    """``name`` selects a registered part; one field per part holds that part's config."""

    registry: ClassVar[Registry[Any]]
    name: str

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in cls.registry:
            raise ValueError(f"unknown {cls.registry.kind}; choose one of {sorted(cls.registry.names())}")
        return name

    @property
    def options(self) -> Any:
        """The selected part's own config."""
        return getattr(self, self.registry[self.name].field)


class RunConfig(Section):
    """All knobs of a FedPuReL run (defaults: the embedded default run)."""

    seed: int = knob(0, "experiment seed: the Fed-LT split, sampling, local shuffles, PEFT init", ge=0)
    eval_every: int = knob(1, "evaluate every this many rounds (and always the last)", role="training", ge=1)
    output_dir: str = knob(
        "outputs",
        "one folder per run below it; relative paths are under the app folder",
        role="operational",
        min_length=1,
    )
    round_timeout: float = knob(3600.0, "seconds to wait for the replies of one round", role="operational", gt=0.0)
    resume_from: str = knob(
        "", "a run folder (<output-dir>/<run>) to resume after its last completed step; '' = off", role="operational"
    )
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    peft: ComponentSection
    method: ComponentSection
    train: TrainConfig = TrainConfig()
    personalize: PersonalizeConfig = PersonalizeConfig()
    tkl: TklConfig = TklConfig()
    dp: DpConfig = DpConfig()
    secagg: SecAggConfig = SecAggConfig()
    track: TrackConfig = TrackConfig()

    def to_flower(self) -> dict[str, Any]:
        """The config as Flower's flat mapping with dotted kebab-case keys."""
        return dict(flat_items(self.model_dump(by_alias=True)))

    def resolved_output_dir(self, app_dir: Path) -> Path:
        """``output-dir`` as an absolute path (relative ones are under ``app_dir``)."""
        path = Path(self.output_dir).expanduser()
        return path if path.is_absolute() else (app_dir / path).resolve()


DEFAULTS = {"peft": "prompt", "method": "fedpurel"}


def _component_section(key: str, registry: Registry[Any]) -> type[ComponentSection]:
    fields: dict[str, Any] = {
        "name": (str, knob(DEFAULTS[key], f"the {registry.kind}: {' | '.join(repr(n) for n in registry.names())}")),
    }
    for entry in registry.entries():
        config = entry.config or MethodConfig
        fields[entry.field] = (config, config())
    section = create_model(f"{key.title()}Section", __base__=ComponentSection, **fields)
    section.registry = registry
    return section


_MODEL_CACHE: dict[tuple[int, int, int], type[RunConfig]] = {}


def run_config_model() -> type[RunConfig]:
    """The run config's model for the parts registered now (cached until a registry changes)."""
    for registry in (PEFT_VARIANTS, METHODS, DATASETS):
        registry.entries()  # the built-in parts register themselves on first use
    key = (PEFT_VARIANTS.version, METHODS.version, DATASETS.version)
    model = _MODEL_CACHE.get(key)
    if model is None:
        peft, method = _component_section("peft", PEFT_VARIANTS), _component_section("method", METHODS)
        model = create_model("RunConfig", __base__=RunConfig, peft=(peft, peft()), method=(method, method()))
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = model
    return model


# --------------------------------------------------------------------------- flat keys and docs


def flat_items(nested: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of a nested mapping, in order."""
    for key, value in nested.items():
        if isinstance(value, Mapping):
            yield from flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def schema_items(model: type[BaseModel] | None = None, prefix: str = "") -> Iterator[tuple[str, Any, str, Role]]:
    """``(dotted key, default, doc, role)`` of every knob of the run config, in order."""
    model = model or run_config_model()
    for name, field in model.model_fields.items():
        key = f"{prefix}{_kebab(name)}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from schema_items(annotation, f"{key}.")
        else:
            yield key, field.default, field.description or "", role_of(model, name)


def known_keys() -> tuple[str, ...]:
    return tuple(key for key, *_ in schema_items())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _doc(model: type[BaseModel]) -> str:
    return (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""


def pyproject_section() -> str:
    """``[tool.flwr.app.config]`` as written in pyproject.toml: every knob with its default and doc,
    one group per section, each headed by its model's first docstring line."""
    groups: list[tuple[str, str, list[tuple[str, str]]]] = []

    def walk(model: type[BaseModel], prefix: str, title: str) -> None:
        rows, nested = [], []
        for name, field in model.model_fields.items():
            key = f"{prefix}{_kebab(name)}"
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                nested.append((annotation, f"{key}.", key))
            else:
                rows.append((f"{key} = {_toml_value(field.default)}", field.description or ""))
        if rows:
            groups.append((title, _doc(model), rows))
        for sub, sub_prefix, sub_title in nested:
            walk(sub, sub_prefix, sub_title)

    walk(run_config_model(), "", "the run")
    width = max(len(left) for _, _, rows in groups for left, _ in rows)
    lines = [
        "[tool.flwr.app.config]",
        "# Written from the config models by `fedpurel config --write`; a test keeps the two equal.",
    ]
    for title, doc, rows in groups:
        lines.append(f"# --- {title}: {doc}" if doc else f"# --- {title}")
        lines += [f"{left.ljust(width)}  # {text}" if text else left for left, text in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- fingerprints

# What each fingerprint covers. "checkpoint": everything a resumed run must share with the
# killed one; "state": what a node's private tensors mean; "features": what its cached
# inputs and zero-shot logits mean. Fields of the selected parts only; other parts' knobs
# never matter.
SCOPES: dict[str, tuple[frozenset[str], frozenset[Role]]] = {
    "checkpoint": (frozenset({"*"}), frozenset({"identity", "training"})),
    "state": (frozenset({"*"}), frozenset({"identity"})),
    "features": (frozenset({"", "data", "model"}), frozenset({"identity"})),
}


def fingerprint_fields(cfg: RunConfig, scope: str) -> dict[str, Any]:
    """The dotted keys and values of ``cfg`` that the ``scope`` depends on."""
    sections, roles = SCOPES[scope]
    out: dict[str, Any] = {}

    def walk(model: BaseModel, prefix: str) -> None:
        for name in type(model).model_fields:
            value, key = getattr(model, name), f"{prefix}{_kebab(name)}"
            if isinstance(value, ComponentSection):
                if "*" in sections:
                    out[f"{key}.name"] = value.name
                    walk(value.options, f"{key}.{value.name}.")
            elif isinstance(value, BaseModel):
                if "*" in sections or key in sections:
                    walk(value, f"{key}.")
            elif role_of(type(model), name) in roles and (prefix or top):
                out[key] = value

    top = "*" in sections or "" in sections  # the run's own keys (seed, ...)
    walk(cfg, "")
    return out


def fingerprint(cfg: RunConfig, scope: str, **extra: Any) -> dict[str, str]:
    """``{"key": sha256 prefix, "fields": canonical JSON}`` of the ``scope``'s fields plus ``extra``
    (a node's identity, a variant's input kind). The fields go with the key so that a refusal
    can say which values differ."""
    fields = {**fingerprint_fields(cfg, scope), **{k: v for k, v in extra.items()}}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return {"key": hashlib.sha256(canonical.encode()).hexdigest()[:32], "fields": canonical}


def fingerprint_diff(theirs: str, ours: str) -> list[str]:
    """The differing keys of two fingerprints' fields, as ``key: theirs -> ours`` lines."""
    try:
        a, b = json.loads(theirs), json.loads(ours)
    except ValueError:
        return []
    return [
        f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


# ------------------------------------------------------------------------------------- parsing


def suggest(key: str, known: tuple[str, ...]) -> str | None:
    """The known key closest to ``key``, or None: one whose last part is ``key``'s last part,
    else the closest whole key, else the closest last part."""
    last = key.rsplit(".", 1)[-1]
    same = [k for k in known if k.rsplit(".", 1)[-1] == last]
    if same:
        return same[0]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    tails = {k.rsplit(".", 1)[-1]: k for k in reversed(known)}
    close = difflib.get_close_matches(last, list(tails), n=1, cutoff=0.6)
    return tails[close[0]] if close else None


def _describe(error: Mapping[str, Any], known: tuple[str, ...]) -> str:
    loc = ".".join(_kebab(str(part)) for part in error["loc"] if not isinstance(part, int))
    if error["type"] == "missing":
        return f"missing key '{loc}'"
    if error["type"] == "extra_forbidden":
        close = suggest(loc, known)
        hint = f" (did you mean '{close}'?)" if close else ""
        return f"unknown key '{loc}'{hint}"
    message = str(error["msg"]).removeprefix("Value error, ")
    message = message[:1].lower() + message[1:]
    if isinstance(error.get("input"), Mapping):  # a relation between keys of one section
        return message
    return f"key '{loc}': value {error.get('input')!r} is invalid: {message}"


def parse_run_config(values: Mapping[str, Any]) -> RunConfig:
    """Validate a run config given as a nested mapping (sections as mappings) once.

    Flower's flat ``run_config`` becomes one with Flower's ``unflatten_dict``.
    Raises :class:`ConfigError` listing every problem, one per line, each naming
    the key, the bad value and what is accepted.
    """
    model = run_config_model()
    try:
        return model.model_validate(dict(values))
    except ValidationError as err:
        known = known_keys()
        problems = [_describe(e, known) for e in err.errors()]
        raise ConfigError(
            "Invalid run config:\n  - "
            + "\n  - ".join(problems)
            + "\nFix these keys in --run-config (or [tool.flwr.app.config] of pyproject.toml), then run again."
        ) from None


def default_run_config() -> RunConfig:
    return run_config_model()()


# --------------------------------------------------------------------------------- node config


class NodeConfig(Section):
    """A SuperNode's node-config: which data it holds, where its private state lives.

    Simulation sets ``partition-id`` and ``num-partitions``; a real SuperNode gets
    them (and optionally ``state-dir`` and ``data-dir``) from ``flower-supernode
    --node-config``. Without ``data-dir`` the node uses its partition of the run's
    Fed-LT split; with it, the images listed in its own folder
    (:mod:`fedpurel_app.data.local`), and ``partition-id`` only names the node
    (seeds, state). ``state-dir`` holds phi_k and the node's feature cache.
    """

    partition_id: int = Field(ge=0)
    num_partitions: int = Field(ge=1)
    state_dir: str = ""
    data_dir: str = ""

    @model_validator(mode="after")
    def _partition_in_range(self) -> NodeConfig:
        if self.partition_id >= self.num_partitions:
            raise ValueError(
                f"partition-id ({self.partition_id}) must be smaller than num-partitions ({self.num_partitions})"
            )
        return self


NODE_KEYS = tuple(_kebab(name) for name in NodeConfig.model_fields)


def parse_node_config(node_config: Mapping[str, Any]) -> NodeConfig:
    """Validate a SuperNode's node-config; raises :class:`NodeConfigError` listing every problem."""
    try:
        return NodeConfig.model_validate(dict(node_config))
    except ValidationError as err:
        problems = [
            _describe(e, NODE_KEYS) if e["loc"] else str(e["msg"]).removeprefix("Value error, ") for e in err.errors()
        ]
        raise NodeConfigError(
            "Invalid node config:\n  - "
            + "\n  - ".join(problems)
            + '\nStart the SuperNode with --node-config "partition-id=<i> num-partitions=<n> '
            "[state-dir='<folder>'] [data-dir='<folder>']\", then run again."
        ) from None


__all__ = [
    "ComponentConfig",
    "ConfigError",
    "DataConfig",
    "DpConfig",
    "SecAggConfig",
    "MethodConfig",
    "ModelConfig",
    "NodeConfig",
    "PeftConfig",
    "PersonalizeConfig",
    "RunConfig",
    "TklConfig",
    "TrackConfig",
    "TrainConfig",
    "default_run_config",
    "fingerprint",
    "fingerprint_diff",
    "knob",
    "parse_node_config",
    "parse_run_config",
    "pyproject_section",
    "run_config_model",
    "schema_items",
]

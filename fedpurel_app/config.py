"""The run config: one pydantic model, validated once at the edge of each app.

Every knob lives in ``[tool.flwr.app.config]`` of ``pyproject.toml`` under a
kebab-case name (``local-epochs``); :class:`RunConfig` holds the same knobs as
snake_case attributes. :func:`parse_run_config` turns a Flower ``run_config``
mapping into a validated :class:`RunConfig`, or raises :class:`ConfigError`
whose message lists every problem at once, naming the key, the bad value and
what is accepted.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


def _to_kebab(name: str) -> str:
    return name.replace("_", "-")


class ConfigError(ValueError):
    """A user mistake in the run config; the message says what to change."""


class RunConfig(BaseModel):
    """All knobs of a FedPuReL run (defaults: the embedded default run)."""

    model_config = ConfigDict(
        alias_generator=_to_kebab,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,  # lr = inf or round-timeout = nan is always a mistake
    )

    # --- data: Fed-LT protocol (METHOD.md "Data protocol") ---
    dataset: str = "mnist-animals"
    data_root: str = ""
    n_max: int = Field(150, ge=0)
    imbalance_factor: float = Field(100.0, ge=1.0)
    dirichlet_alpha: float = Field(1.0, gt=0.0)
    min_client_samples: int = Field(4, ge=1)
    client_test_size: int = Field(100, ge=1)
    many_threshold: float = Field(40.0, ge=0.0)
    few_threshold: float = Field(10.0, ge=0.0)

    # --- model ---
    model: str = Field("fedpurel-tiny", min_length=1)
    pretrained: str = Field("embedded", min_length=1)
    cache_dir: str = ""
    feature_cache: bool = True
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    # --- PEFT ---
    peft: str = "prompt"
    n_ctx: int = Field(4, ge=1, le=16)
    ctx_init: str = "a photo of a"
    adapter_init: Literal["zero-shot", "random"] = "zero-shot"
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0.0)
    lora_targets: str = "q_proj,k_proj,v_proj"
    lora_rslora: bool = False

    # --- method: FedPuReL or a baseline (fedpurel_app/methods) ---
    method: str = "fedpurel"
    la_tau: float = Field(1.0, ge=0.0)
    mix_weight: float = Field(0.2, ge=0.0, le=1.0)
    lp_rounds: int = Field(1, ge=0)
    grab_kp: float = Field(1.0, ge=0.0)
    grab_ki: float = Field(0.01, ge=0.0)
    grab_kd: float = Field(0.1, ge=0.0)

    # --- Stage 1: global balanced training ---
    granularity: Literal["tensor", "flat"] = "tensor"
    num_rounds: int = Field(30, ge=1)
    local_epochs: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    fraction_train: float = Field(0.4, gt=0.0, le=1.0)
    all_clients_first_round: bool = True
    min_nodes: int = Field(2, ge=1)
    tau_min: float = Field(0.05, gt=0.0)
    tau_max: float = Field(20.0, gt=0.0)
    tau_tol: float = Field(1e-4, gt=0.0)
    tau_max_iter: int = Field(50, ge=1)

    # --- Stage 2: personalized residual learning ---
    personalization: Literal["post", "interleaved"] = "post"
    personal_rounds: int = Field(5, ge=0)
    personal_epochs: int = Field(4, ge=1)
    personal_lr: float = Field(0.1, gt=0.0)
    lam: float = Field(0.9, ge=0.0, le=1.0)

    # --- evaluation and output ---
    eval_every: int = Field(1, ge=1)
    seed: int = Field(0, ge=0)
    output_dir: str = Field("outputs", min_length=1)
    round_timeout: float = Field(3600.0, gt=0.0)

    # --- resume ---
    resume_from: str = ""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info) -> Any:
        """``num-rounds = true`` would silently mean 1: only bool knobs take true/false."""
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation is not bool:
            raise ValueError("true/false is only accepted by on/off keys")
        return value

    @field_validator("dataset", "peft", "method")
    @classmethod
    def _registered(cls, name: str, info) -> str:
        """Datasets, PEFT variants and methods are whatever their registries hold."""
        from .data import DATASETS
        from .methods import METHODS
        from .peft import PEFT_VARIANTS

        registry = {"dataset": DATASETS, "peft": PEFT_VARIANTS, "method": METHODS}[info.field_name]
        if name not in registry:
            raise ValueError(f"unknown {info.field_name}; choose one of {sorted(registry)}")
        return name

    @field_validator("lora_targets")
    @classmethod
    def _lora_targets(cls, spec: str) -> str:
        from .peft.lora import parse_targets

        parse_targets(spec)
        return spec

    @model_validator(mode="after")
    def _check_relations(self) -> RunConfig:
        problems = relation_problems(self.model_dump())
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def to_flower(self) -> dict[str, Any]:
        """The config as a Flower-style mapping with kebab-case keys."""
        return self.model_dump(by_alias=True)

    def resolved_output_dir(self, app_dir: Path) -> Path:
        """``output-dir`` as an absolute path (relative ones are under ``app_dir``)."""
        path = Path(self.output_dir).expanduser()
        return path if path.is_absolute() else (app_dir / path).resolve()


KNOWN_KEYS = tuple(_to_kebab(name) for name in RunConfig.model_fields)


def relation_problems(values: Mapping[str, Any], skip: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Violated relations between keys, from snake_case ``values`` (missing ones: defaults).

    A relation is only checked when its values are valid (numbers: plain and finite),
    so that it can be reported next to the field errors of other keys (a bad
    value of one of the two, named in ``skip``, is reported as a field error instead).
    """

    def number(name: str) -> float | None:
        if name in skip:
            return None
        value = values.get(name, RunConfig.model_fields[name].default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value)

    def choice(name: str) -> Any:
        return None if name in skip else values.get(name, RunConfig.model_fields[name].default)

    from .methods import METHODS

    problems = []
    method, schedule = choice("method"), choice("personalization")
    if schedule == "interleaved" and method in METHODS and not METHODS[method].interleavable:
        problems.append(
            f"personalization = 'interleaved' needs a method with a residual branch "
            f"(fedpurel, fedpurel-kl), not {method!r}: use personalization = 'post'"
        )
    tau_min, tau_max = number("tau_min"), number("tau_max")
    if tau_min is not None and tau_max is not None and tau_min >= tau_max:
        problems.append(f"tau-min ({tau_min}) must be smaller than tau-max ({tau_max})")
    few, many = number("few_threshold"), number("many_threshold")
    if few is not None and many is not None and few > many:
        problems.append(f"few-threshold ({few}) must not exceed many-threshold ({many})")
    return problems


def _describe(error: dict[str, Any], known_keys: tuple[str, ...] = ()) -> str:
    loc = ".".join(str(part) for part in error["loc"])
    if error["type"] == "missing":
        return f"missing key '{loc}'"
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc, known_keys or KNOWN_KEYS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key '{loc}'{hint}"
    message = error["msg"].removeprefix("Value error, ")
    return f"key '{loc}': value {error['input']!r} is invalid: {message[:1].lower()}{message[1:]}"


def parse_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Validate a Flower ``run_config`` mapping (kebab-case keys) once.

    Raises :class:`ConfigError` listing every problem, one per line.
    """
    raw = dict(run_config)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        problems = [_describe(e) for e in err.errors() if e["loc"]]
        relations = [e for e in err.errors() if not e["loc"]]
        if relations:  # the model validator ran: every field was valid
            problems += relations[0]["msg"].removeprefix("Value error, ").split("; ")
        else:
            # pydantic skips the model validator after a field error: check the
            # relations on the raw values so that they are reported all the same.
            bad = {str(e["loc"][0]) for e in err.errors() if e["loc"]}
            snake = {str(k).replace("-", "_"): v for k, v in raw.items()}
            problems += relation_problems(snake, skip={k.replace("-", "_") for k in bad})
        raise ConfigError(
            "Invalid run config:\n  - "
            + "\n  - ".join(problems)
            + "\nFix these keys in [tool.flwr.app.config] of pyproject.toml "
            "or in --run-config, then run again."
        ) from None


class NodeConfig(BaseModel):
    """A SuperNode's node-config: which data it holds, where its private state lives.

    Simulation sets ``partition-id`` and ``num-partitions``; a real SuperNode gets
    them (and optionally ``state-dir`` and ``data-dir``) from ``flower-supernode
    --node-config``. Without ``data-dir`` the node uses its partition of the run's
    Fed-LT split; with it, the images listed in its own folder
    (:mod:`fedpurel_app.data.local`), and ``partition-id`` only names the node
    (seeds, state). ``state-dir`` holds phi_k and the node's feature cache.
    """

    model_config = ConfigDict(alias_generator=_to_kebab, populate_by_name=True, extra="forbid", frozen=True)

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


NODE_KEYS = tuple(_to_kebab(name) for name in NodeConfig.model_fields)


def parse_node_config(node_config: Mapping[str, Any]) -> NodeConfig:
    """Validate a SuperNode's node-config; raises :class:`ConfigError` listing every problem."""
    try:
        return NodeConfig.model_validate(dict(node_config))
    except ValidationError as err:
        problems = [
            _describe(e, NODE_KEYS) if e["loc"] else e["msg"].removeprefix("Value error, ") for e in err.errors()
        ]
        raise ConfigError(
            "Invalid node config:\n  - "
            + "\n  - ".join(problems)
            + '\nStart the SuperNode with --node-config "partition-id=<i> num-partitions=<n> '
            "[state-dir='<folder>'] [data-dir='<folder>']\", then run again."
        ) from None

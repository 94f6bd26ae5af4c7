"""Property test of the run-config edge: random configs are either accepted or refused
with one ConfigError naming every bad key, never another exception.

Each generated config is Flower's flat mapping of dotted keys: a random subset of
the known keys with, per key, a valid value or a wrong one (wrong type, out of
range, NaN/Inf, true/false for a number, 1/0 for a bool, a name no registry
holds), plus unknown keys in random sections. The oracle (which keys are bad) is
derived from the field constraints of the config models themselves.
"""

from __future__ import annotations

import math
import string
import typing

import annotated_types as at
from flwr.common.config import unflatten_dict
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fedpurel_app.config import ConfigError, parse_run_config, run_config_model
from fedpurel_app.registry import DATASETS, METHODS, PEFT_VARIANTS
from tests.conftest import make_cfg

WORDS = st.text(alphabet=string.ascii_letters, min_size=1, max_size=8).map(lambda w: "x" + w)
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def knobs(model: type[BaseModel] | None = None, prefix: str = "") -> dict[str, FieldInfo]:
    """Dotted key -> pydantic field of every knob of the run config."""
    model = model or run_config_model()
    out: dict[str, FieldInfo] = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{name.replace('_', '-')}"
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out.update(knobs(field.annotation, f"{key}."))
        else:
            out[key] = field
    return out


KNOBS = knobs()
KEYS = sorted(KNOBS)
# Every prefix that names a section ("peft", "peft.prompt", ...): no unknown key may be one.
SECTIONS = sorted({key.rsplit(".", 1)[0] for key in KEYS if "." in key} | {"peft", "method"})
SECTIONS = sorted({".".join(s.split(".")[: i + 1]) for s in SECTIONS for i in range(len(s.split(".")))})


def _bounds(field: FieldInfo) -> dict:
    found = {}
    for meta in field.metadata:
        for attr in ("ge", "gt", "le", "lt", "min_length"):
            if isinstance(meta, getattr(at, {"min_length": "MinLen"}.get(attr, attr.capitalize()))):
                found[attr] = getattr(meta, attr)
    return found


def _in_range(value: float, b: dict) -> bool:
    return (
        ("ge" not in b or value >= b["ge"])
        and ("gt" not in b or value > b["gt"])
        and ("le" not in b or value <= b["le"])
        and ("lt" not in b or value < b["lt"])
    )


def _numbers(kind: type, b: dict) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """(valid, invalid) values of a numeric field with bounds ``b``."""
    lo = b.get("ge", b.get("gt", -1e6))
    hi = b.get("le", b.get("lt", lo + 100))
    if kind is int:
        valid = st.integers(int(lo), int(hi)).filter(lambda v: _in_range(v, b))
        out = st.one_of(
            st.integers(min(-(10**6), 2 * int(lo)), int(lo) - 1) if "ge" in b or "gt" in b else st.nothing(),
            st.integers(int(hi) + 1, max(10**6, 2 * int(hi) + 1)) if "le" in b or "lt" in b else st.nothing(),
        )
        # strict: a float (even 3.0) is no count, true is no number
        wrong = st.one_of(
            out,
            WORDS,
            st.booleans(),
            st.floats(0.1, 0.9).map(lambda f: int(lo) + 1 + f),
            st.just(float(int(lo) + 1)),
            NON_FINITE,
        )
    else:
        valid = st.one_of(
            st.floats(lo, hi, exclude_min="gt" in b, exclude_max="lt" in b),
            st.integers(math.ceil(lo), math.floor(hi)).filter(lambda v: _in_range(v, b)),
        )
        out = st.one_of(
            st.floats(-1e6, lo, exclude_max="ge" in b) if "ge" in b or "gt" in b else st.nothing(),
            st.floats(hi, 1e6, exclude_min="le" in b) if "le" in b or "lt" in b else st.nothing(),
        )
        wrong = st.one_of(out, WORDS, st.booleans(), NON_FINITE)
    return valid, wrong


SPECIAL = {
    "data.name": (st.sampled_from(sorted(DATASETS)), st.one_of(WORDS, st.integers())),
    "peft.name": (st.sampled_from(sorted(PEFT_VARIANTS)), st.one_of(WORDS, st.floats())),
    "method.name": (st.sampled_from(sorted(METHODS)), st.one_of(WORDS, st.integers())),
    "model.device": (
        st.sampled_from(["auto", "cpu", "cuda", "cuda:0", "cuda:3"]),
        st.sampled_from(["tpu", "cuda:", "gpu0", "CPU"]),
    ),
    "peft.lora.targets": (
        st.sampled_from(["q_proj", "q_proj,v_proj", "re:.*attn.*"]),
        st.sampled_from(["", ",", "re:(", "re:", 7]),
    ),
}


def field_strategies(key: str) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """(valid, invalid) values of one knob, from its type and constraints."""
    if key in SPECIAL:
        return SPECIAL[key]
    field = KNOBS[key]
    kind, b = field.annotation, _bounds(field)
    if typing.get_origin(kind) is typing.Literal:
        choices = typing.get_args(kind)
        wrong = st.one_of(WORDS.filter(lambda w: w not in choices), st.integers(), st.booleans())
        return st.sampled_from(choices), wrong
    if kind is bool:
        # strict: 1/0 and "true" are no booleans
        return st.booleans(), st.one_of(WORDS, st.sampled_from([0, 1, "true"]), st.floats(0.1, 0.9))
    if kind in (int, float):
        return _numbers(kind, b)
    assert kind is str, (key, kind)
    valid = st.text(max_size=6) if not b.get("min_length") else WORDS
    invalid = st.one_of(
        st.integers(), st.floats(allow_nan=False), st.booleans(), st.just("") if b.get("min_length") else st.nothing()
    )
    return valid, invalid


STRATEGIES = {key: field_strategies(key) for key in KEYS}
# Relations between keys of one section: (section, low, high, message, strict).
RELATIONS = (
    ("tkl", "tkl.tau-min", "tkl.tau-max", "tkl.tau-min", True),
    ("data", "data.few-threshold", "data.many-threshold", "data.few-threshold", False),
)


def _section(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


@st.composite
def configs(draw):
    """(flat run_config, strings expected in the error message)."""
    keys = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=14))
    config, bad, bad_sections = {}, set(), set()
    one_in = draw(st.sampled_from([0, 0, 2, 6]))  # 0: every value valid (only a relation can fail)
    for key in keys:
        if one_in and draw(st.integers(0, one_in - 1)) == 0:
            config[key] = draw(STRATEGIES[key][1])
            bad.add(f"key '{key}'")
            bad_sections.add(_section(key))
        else:
            config[key] = draw(STRATEGIES[key][0])
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        section = draw(st.sampled_from(["", *SECTIONS]))
        word = draw(st.text(alphabet=string.ascii_lowercase + "-", min_size=1, max_size=12))
        unknown = f"{section}.{word}" if section else word
        if unknown not in KNOBS and unknown not in SECTIONS and unknown not in config:
            config[unknown] = draw(st.one_of(st.integers(), WORDS))
            bad.add(f"unknown key '{unknown}'")
            bad_sections.add(section)

    def value(key: str) -> float:
        return float(config.get(key, KNOBS[key].default))

    for section, low, high, message, strict in RELATIONS:
        if section in bad_sections:  # a section with a bad field is not checked as a whole
            continue
        a, b = value(low), value(high)
        if a >= b if strict else a > b:
            bad.add(message)
    return config, bad


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_random_configs_are_accepted_or_refused_naming_every_bad_key(case):
    config, bad = case
    event("invalid config" if bad else "valid config")
    try:
        parsed = parse_run_config(unflatten_dict(config))
    except ConfigError as err:
        message = str(err)
        assert bad, f"a valid config was refused: {config!r}\n{message}"
        missing = [name for name in sorted(bad) if name not in message]
        assert not missing, f"{missing} not named in:\n{message}"
        lines = [line for line in message.splitlines() if line.startswith("  - ")]
        assert len(lines) == len(bad), message  # one line per problem, no noise
        return
    assert not bad, f"accepted although bad: {sorted(bad)} in {config!r}"
    for key, value in config.items():
        assert parsed.to_flower()[key] == value  # every given value is the parsed one
    assert make_cfg(parsed.to_flower()) == parsed  # accepted configs round-trip


def test_a_relation_is_reported_next_to_field_errors():
    try:
        make_cfg(
            {"peft.prompt.lr": -1.0, "tkl.tau-min": 5.0, "tkl.tau-max": 1.0, "data.few-threshold": 50.0, "bogus": 1}
        )
    except ConfigError as err:
        message = str(err)
    else:
        raise AssertionError("accepted")
    assert "key 'peft.prompt.lr'" in message and "unknown key 'bogus'" in message
    assert "tkl.tau-min (5.0) must be smaller than tkl.tau-max (1.0)" in message
    assert "data.few-threshold (50.0) must not exceed data.many-threshold (40.0)" in message


def test_booleans_and_non_finite_numbers_are_refused_for_numeric_keys():
    for override in (
        {"train.rounds": True},
        {"peft.prompt.lr": math.inf},
        {"round-timeout": math.nan},
        {"method.fedpurel.lam": False},
        {"peft.lora.alpha": -math.inf},
    ):
        try:
            make_cfg(override)
        except ConfigError as err:
            assert f"key '{next(iter(override))}'" in str(err)
        else:
            raise AssertionError(f"{override} accepted")


def test_numbers_are_refused_for_boolean_keys():
    for override in ({"model.feature-cache": 1}, {"train.all-clients-first-round": 0}, {"peft.lora.rslora": 1.0}):
        try:
            make_cfg(override)
        except ConfigError as err:
            assert f"key '{next(iter(override))}'" in str(err)
        else:
            raise AssertionError(f"{override} accepted")

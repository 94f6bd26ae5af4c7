"""Property test of the run-config edge: random configs are either accepted or refused
with one ConfigError naming every bad key, never another exception.

Each generated config is a random subset of the known keys with, per key, a
valid value or a wrong one (wrong type, out of range, NaN/Inf, true/false for a
number, a name no registry holds), plus unknown keys. The oracle (which keys
are bad) is derived from the field constraints of RunConfig itself.
"""

from __future__ import annotations

import math
import string
import typing

import annotated_types as at
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedpurel_app.config import KNOWN_KEYS, ConfigError, RunConfig, parse_run_config
from fedpurel_app.data import DATASETS
from fedpurel_app.methods import METHODS
from fedpurel_app.peft import PEFT_VARIANTS

WORDS = st.text(alphabet=string.ascii_letters, min_size=1, max_size=8).map(lambda w: "x" + w)
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def _bounds(name: str) -> dict:
    found = {}
    for meta in RunConfig.model_fields[name].metadata:
        for attr in ("ge", "gt", "le", "lt", "min_length"):
            if isinstance(meta, getattr(at, {"min_length": "MinLen"}.get(attr, attr.capitalize()))):
                found[attr] = getattr(meta, attr)
    return found


def _in_range(value: float, b: dict) -> bool:
    return (
        ("ge" not in b or value >= b["ge"]) and ("gt" not in b or value > b["gt"])
        and ("le" not in b or value <= b["le"]) and ("lt" not in b or value < b["lt"])
    )


def _numbers(kind: type, b: dict) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """(valid, invalid) values of a numeric field with bounds ``b``."""
    lo = b.get("ge", b.get("gt", -1e6))
    hi = b.get("le", b.get("lt", lo + 100))
    if kind is int:
        valid = st.integers(int(lo), int(hi)).filter(lambda v: _in_range(v, b))
        out = st.one_of(st.integers(-10**6, int(lo) - 1) if "ge" in b or "gt" in b else st.nothing(),
                        st.integers(int(hi) + 1, 10**6) if "le" in b or "lt" in b else st.nothing())
        wrong = st.one_of(out, WORDS, st.booleans(), st.floats(0.1, 0.9).map(lambda f: int(lo) + 1 + f), NON_FINITE)
    else:
        valid = st.one_of(
            st.floats(lo, hi, exclude_min="gt" in b, exclude_max="lt" in b),
            st.integers(math.ceil(lo), math.floor(hi)).filter(lambda v: _in_range(v, b)),
        )
        out = st.one_of(st.floats(-1e6, lo, exclude_max="ge" in b) if "ge" in b or "gt" in b else st.nothing(),
                        st.floats(hi, 1e6, exclude_min="le" in b) if "le" in b or "lt" in b else st.nothing())
        wrong = st.one_of(out, WORDS, st.booleans(), NON_FINITE)
    return valid, wrong


SPECIAL = {
    "dataset": (st.sampled_from(sorted(DATASETS)), st.one_of(WORDS, st.integers())),
    "peft": (st.sampled_from(sorted(PEFT_VARIANTS)), st.one_of(WORDS, st.floats())),
    "method": (st.sampled_from(sorted(METHODS)), st.one_of(WORDS, st.integers())),
    "device": (st.sampled_from(["auto", "cpu", "cuda", "cuda:0", "cuda:3"]), st.sampled_from(["tpu", "cuda:", "gpu0", "CPU"])),
    "lora_targets": (st.sampled_from(["q_proj", "q_proj,v_proj", "re:.*attn.*"]), st.sampled_from(["", ",", "re:(", 7])),
}


def field_strategies(name: str) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """(valid, invalid) values of one knob, from its type and constraints."""
    if name in SPECIAL:
        return SPECIAL[name]
    field = RunConfig.model_fields[name]
    kind, b = field.annotation, _bounds(name)
    if typing.get_origin(kind) is typing.Literal:
        choices = typing.get_args(kind)
        return st.sampled_from(choices), st.one_of(WORDS.filter(lambda w: w not in choices), st.integers(), st.booleans())
    if kind is bool:
        return st.booleans(), st.one_of(WORDS.filter(lambda w: w.lower() not in {"xy", "xn"}), st.floats(0.1, 0.9))
    if kind in (int, float):
        return _numbers(kind, b)
    assert kind is str, (name, kind)
    valid = st.text(max_size=6) if not b.get("min_length") else WORDS
    invalid = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.just("") if b.get("min_length") else st.nothing())
    return valid, invalid


FIELDS = sorted(RunConfig.model_fields)
STRATEGIES = {name: field_strategies(name) for name in FIELDS}


@st.composite
def configs(draw):
    """(run_config, names expected in the error message)."""
    names = draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=12))
    config, bad = {}, set()
    one_in = draw(st.sampled_from([0, 0, 2, 6]))  # 0: every value valid (only a relation can fail)
    for name in names:
        key = name.replace("_", "-")
        if one_in and draw(st.integers(0, one_in - 1)) == 0:
            config[key] = draw(STRATEGIES[name][1])
            bad.add(f"key '{key}'")
        else:
            config[key] = draw(STRATEGIES[name][0])
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        unknown = draw(st.text(alphabet=string.ascii_lowercase + "-", min_size=1, max_size=12))
        if unknown not in KNOWN_KEYS:
            config[unknown] = draw(st.one_of(st.integers(), WORDS))
            bad.add(f"unknown key '{unknown}'")

    def valid(name: str) -> float | None:
        key = name.replace("_", "-")
        if key not in config:
            return RunConfig.model_fields[name].default
        return None if f"key '{key}'" in bad else float(config[key])

    def chosen(name: str) -> str | None:
        key = name.replace("_", "-")
        return None if f"key '{key}'" in bad else config.get(key, RunConfig.model_fields[name].default)

    method = chosen("method")
    if chosen("personalization") == "interleaved" and method is not None and not METHODS[method].interleavable:
        bad.add("personalization = 'interleaved'")
    for low, high, message in (("tau_min", "tau_max", "tau-min"), ("few_threshold", "many_threshold", "few-threshold")):
        a, b = valid(low), valid(high)
        if a is not None and b is not None and (a >= b if low == "tau_min" else a > b):
            bad.add(message)
    return config, bad


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_random_configs_are_accepted_or_refused_naming_every_bad_key(case):
    config, bad = case
    event("invalid config" if bad else "valid config")
    try:
        parsed = parse_run_config(config)
    except ConfigError as err:
        message = str(err)
        assert bad, f"a valid config was refused: {config!r}\n{message}"
        missing = [name for name in sorted(bad) if name not in message]
        assert not missing, f"{missing} not named in:\n{message}"
        lines = [line for line in message.splitlines() if line.startswith("  - ")]
        assert len(lines) == len(bad), message  # one line per problem, no noise
        return
    assert not bad, f"accepted although bad: {sorted(bad)} in {config!r}"
    assert parse_run_config(parsed.to_flower()) == parsed  # accepted configs round-trip


def test_a_relation_is_reported_next_to_field_errors():
    try:
        parse_run_config({"lr": -1.0, "tau-min": 5.0, "tau-max": 1.0, "few-threshold": 50.0, "bogus": 1})
    except ConfigError as err:
        message = str(err)
    assert "key 'lr'" in message and "unknown key 'bogus'" in message
    assert "tau-min (5.0) must be smaller than tau-max (1.0)" in message
    assert "few-threshold (50.0) must not exceed many-threshold (40.0)" in message


def test_booleans_and_non_finite_numbers_are_refused_for_numeric_keys():
    for override in ({"num-rounds": True}, {"lr": math.inf}, {"round-timeout": math.nan}):
        try:
            parse_run_config(override)
        except ConfigError as err:
            assert f"key '{next(iter(override))}'" in str(err)
        else:
            raise AssertionError(f"{override} accepted")

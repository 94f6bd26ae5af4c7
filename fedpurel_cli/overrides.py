"""Merge presets (.toml files) and key=value strings into one `flwr run --run-config` string.

`flwr run` accepts either one TOML file or key=value pairs, not both; this lets
`scripts/run.sh configs/<preset>.toml "seed=1"` combine them (later ones win).
Every key is checked against the app's run config (``[tool.flwr.app.config]``
of ``pyproject.toml``, written from the config models): an unknown key stops
with one line that names it and the closest known key.

    fedpurel overrides configs/cifar100-lt-prompt.toml "seed=1 method.name='promptfl'"
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedpurel_app.config import flat_items, suggest

ROOT = Path(__file__).resolve().parent.parent

# A key=value pair (the value may be quoted and hold spaces), or any other word (an error).
TOKEN = re.compile(r"(?P<key>\S+?)=(?P<value>'[^']*'|\"[^\"]*\"|\S+)|(?P<word>\S+)")


class OverrideError(ValueError):
    """An argument that is neither a readable .toml preset nor key=value pairs; says what to do."""


def known_keys(pyproject: Path = ROOT / "pyproject.toml") -> tuple[str, ...]:
    """The run config's keys, flat and dotted, as Flower reads them from the app."""
    config = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    return tuple(key for key, _ in flat_items(config))


def merge(args: list[str]) -> dict[str, Any]:
    """Presets and key=value strings in order into one flat dict of dotted keys: a later value
    of a key wins, also within one string. Raises OverrideError for a missing or invalid
    preset, a value that is not TOML, or a word that is not key=value."""
    pairs: dict[str, Any] = {}
    for arg in args:
        if arg.endswith(".toml"):
            try:
                with open(arg, "rb") as handle:
                    pairs.update(flat_items(tomllib.load(handle)))
            except OSError as err:
                raise OverrideError(f"cannot read the preset {arg}: {err.strerror}") from None
            except tomllib.TOMLDecodeError as err:
                raise OverrideError(f"the preset {arg} is not valid TOML: {err}") from None
            continue
        for match in TOKEN.finditer(arg):
            token, key, value = match[0], match["key"], match["value"]
            if key is None:
                raise OverrideError(
                    f"'{token}' is neither key=value nor a .toml preset "
                    "(e.g. \"seed=1 method.name='promptfl'\", or configs/<preset>.toml)"
                )
            try:
                parsed: Mapping[str, Any] = tomllib.loads(f"{key} = {value}")
            except tomllib.TOMLDecodeError:
                raise OverrideError(
                    f"'{token}': the value is not a TOML value (numbers and true/false as they are, "
                    f"text in quotes: {key}='...')"
                ) from None
            pairs.update(flat_items(parsed))
    return pairs


def check_keys(pairs: Mapping[str, Any], known: tuple[str, ...]) -> None:
    """Every key must be one of the run config's; OverrideError naming the first that is not."""
    for key in pairs:
        if key not in known:
            close = suggest(key, known)
            hint = f" (did you mean '{close}'?)" if close else ""
            raise OverrideError(
                f"unknown run-config key '{key}'{hint}; the keys are in [tool.flwr.app.config] of pyproject.toml"
            )


def to_run_config(pairs: Mapping[str, Any]) -> str:
    def literal(value: Any) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        return f"'{value}'" if isinstance(value, str) else repr(value)

    return " ".join(f"{key}={literal(value)}" for key, value in pairs.items())


def main(argv: list[str]) -> int:
    """Print the merged overrides as one --run-config string, or with ``--lines`` one key=value per line."""
    lines = "--lines" in argv
    try:
        pairs = merge([arg for arg in argv if arg != "--lines"])
        check_keys(pairs, known_keys())
    except OverrideError as err:
        raise SystemExit(f"fedpurel: {err}") from None
    if lines:
        for key, value in pairs.items():
            print(to_run_config({key: value}))
    else:
        print(to_run_config(pairs))
    return 0

"""Merge presets (.toml files) and key=value strings into one `flwr run --run-config` string.

`flwr run` accepts either one TOML file or key=value pairs, not both; this lets
`scripts/run.sh configs/<preset>.toml "seed=1"` combine them (later ones win).
"""

from __future__ import annotations

import re
import sys
import tomllib

# A key=value pair (the value may be quoted and hold spaces), or any other word (an error).
TOKEN = re.compile(r"(?P<key>\S+?)=(?P<value>'[^']*'|\"[^\"]*\"|\S+)|(?P<word>\S+)")


class OverrideError(ValueError):
    """An argument that is neither a readable .toml preset nor key=value pairs; says what to do."""


def merge(args: list[str]) -> dict:
    """Presets and key=value strings in order into one dict: a later value of a key wins, also
    within one string. Raises OverrideError for a missing or invalid preset, a value that is
    not TOML, or a word that is not key=value."""
    pairs: dict = {}
    for arg in args:
        if arg.endswith(".toml"):
            try:
                with open(arg, "rb") as handle:
                    pairs.update(tomllib.load(handle))
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
                    "(e.g. \"seed=1 method='promptfl'\", or configs/<preset>.toml)"
                )
            try:
                pairs.update(tomllib.loads(f"{key} = {value}"))
            except tomllib.TOMLDecodeError:
                raise OverrideError(
                    f"'{token}': the value is not a TOML value (numbers and true/false as they are, "
                    f"text in quotes: {key}='...')"
                ) from None
    return pairs


def to_run_config(pairs: dict) -> str:
    def literal(value) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        return f"'{value}'" if isinstance(value, str) else repr(value)

    return " ".join(f"{key}={literal(value)}" for key, value in pairs.items())


if __name__ == "__main__":
    try:
        print(to_run_config(merge(sys.argv[1:])))
    except OverrideError as err:
        sys.exit(f"fedpurel: {err}")

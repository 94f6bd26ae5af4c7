"""Merge presets (.toml files) and key=value strings into one `flwr run --run-config` string.

`flwr run` accepts either one TOML file or key=value pairs, not both; this lets
`scripts/run.sh configs/<preset>.toml "seed=1"` combine them (later ones win).
"""

from __future__ import annotations

import re
import sys
import tomllib

PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


def merge(args: list[str]) -> dict:
    pairs: dict = {}
    for arg in args:
        if arg.endswith(".toml"):
            with open(arg, "rb") as handle:
                pairs.update(tomllib.load(handle))
        else:
            pairs.update(tomllib.loads("\n".join(f"{k} = {v}" for k, v in PAIR.findall(arg))))
    return pairs


def to_run_config(pairs: dict) -> str:
    def literal(value) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        return f"'{value}'" if isinstance(value, str) else repr(value)

    return " ".join(f"{key}={literal(value)}" for key, value in pairs.items())


if __name__ == "__main__":
    print(to_run_config(merge(sys.argv[1:])))

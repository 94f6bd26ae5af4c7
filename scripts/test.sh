#!/usr/bin/env bash
# Set up .venv if needed, then lint and run the whole test suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
# Lint and format first (pyproject.toml's [tool.ruff]): a finding stops here, before the tests.
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
exec .venv/bin/python -m pytest -q --durations=25 "$@"

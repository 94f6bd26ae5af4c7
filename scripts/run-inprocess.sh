#!/usr/bin/env bash
# The run scripts/run.sh makes, computed in this one process without Flower (bench/inprocess.py):
# the same clients, sampling, aggregation and plan, so phi_g and GM are bitwise those of the Flower
# simulation and PM equal up to the order of floating-point sums. For comparisons of many runs:
# no SuperLink, no Ray, several runs side by side (fedpurel compare --engine inprocess --jobs 2).
#
#   bash scripts/run-inprocess.sh [presets and key=value strings, as scripts/run.sh takes]
#
# Environment: NUM_SUPERNODES (20, the number of clients), OUTPUT_DIR (./outputs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
mapfile -t pairs < <(.venv/bin/fedpurel overrides --lines "$@")
output_dir=${OUTPUT_DIR:-$PWD/outputs}
mkdir -p "$output_dir"
sets=(--set "output-dir='$output_dir'")
for pair in "${pairs[@]}"; do
  [ -n "$pair" ] && sets+=(--set "$pair")
done
exec .venv/bin/python bench/inprocess.py --clients "${NUM_SUPERNODES:-20}" "${sets[@]}"

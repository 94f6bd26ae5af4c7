#!/usr/bin/env bash
# Set up .venv if needed, then run methods x seeds with scripts/run.sh and write the comparison report.
#
#   bash scripts/compare.sh                                         # all 9 methods, seeds 0,1,2 -> outputs/compare
#   bash scripts/compare.sh --methods fedpurel,promptfl --seeds 0,1 # a subset
#   bash scripts/compare.sh --out outputs/c100 configs/cifar100-lt-prompt.toml "train.rounds=50"
#
# Resumable: run the same command again and finished jobs are skipped. Writes
# <out>/results.md, results.csv and PNG plots; one folder per job under <out>/runs/.
# Environment: as scripts/run.sh (NUM_SUPERNODES, CLIENT_GPUS, FLWR_HOME).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fedpurel compare "$@"

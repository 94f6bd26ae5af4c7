#!/usr/bin/env bash
# Run FedPuReL on the federation started by deploy/start.sh (or any SuperLink in
# $FLWR_HOME/config.toml under the name $CONNECTION) and check that it completed.
#
#   bash deploy/run.sh                                        # the default run config
#   bash deploy/run.sh "train.rounds=2 personalize.rounds=1"  # any [tool.flwr.app.config] override
#   bash deploy/run.sh configs/<preset>.toml "seed=1"         # presets and overrides, as scripts/run.sh
#   OUTPUT_DIR=/app/outputs CONNECTION=fedpurel-docker bash deploy/run.sh "..."   # Docker (deploy/README.md)
#
# OUTPUT_DIR ($DEPLOY_DIR/outputs): absolute folder the ServerApp writes results.json to,
# a path where the ServerApp runs (for Docker the container's /app/outputs, the `outputs`
# volume); the ServerApp creates it. An `output-dir=...` in the overrides wins over it.
# Exits non-zero unless the run's final status is finished:completed: `flwr run --stream`
# itself exits 0 even when the ServerApp failed. The run ID is written to
# $DEPLOY_DIR/last-run-id (for `flwr log` / `flwr stop`).
set -euo pipefail
# shellcheck source=deploy/common.sh
source "$(dirname "$0")/common.sh"
cd "$FEDPUREL_REPO"
[ -f "$FLWR_HOME/config.toml" ] || die "no connection in $FLWR_HOME/config.toml: bash deploy/start.sh first"
# Presets and key=value strings as one --run-config string; an unknown key stops here, in one line.
overrides=$(fedpurel overrides "$@")
# Flower refuses a key given twice: the caller's output-dir replaces ours. No mkdir here:
# the folder is on the ServerApp's host (a container path for Docker), which creates it.
if ! [[ " $overrides" =~ [[:space:]]output-dir[[:space:]]*= ]]; then
  overrides="output-dir='${OUTPUT_DIR:-$DEPLOY_DIR/outputs}' $overrides"
fi
mkdir -p "$DEPLOY_DIR"
log=$(mktemp)
stage=$(mktemp -d)
trap 'rm -rf "$log" "$stage"' EXIT

# A copy of the app's own files: `flwr run .` would list .venv's too (5 s); same FAB.
app=$(fedpurel stage "$stage/app")
# Unbuffered: the log goes through a pipe, and each round's line should show when it is logged.
PYTHONUNBUFFERED=1 flwr run "$app" "$CONNECTION" --stream --run-config "$overrides" 2>&1 \
  | grep --line-buffered -v -E "^(INFO|DEBUG):flwr:|^\s*$" | tee "$log"

run_id=$(sed -n 's/.*Successfully started run \([0-9]*\).*/\1/p' "$log" | tail -n 1)
[ -n "$run_id" ] || die "the run was not started (see the messages above)"
echo "$run_id" >"$DEPLOY_DIR/last-run-id"
status=""
for _ in $(seq 30); do  # the stream can end a moment before the status is final
  status=$(flwr ls "$CONNECTION" --run-id "$run_id" --format json \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["runs"][0]["status"])')
  case $status in finished:*) break ;; esac
  sleep 1
done
if [ "$status" != "finished:completed" ]; then
  die "run $run_id ended with status $status (its log: flwr log $run_id $CONNECTION --show)"
fi
echo "run $run_id: $status"

#!/usr/bin/env bash
# Set up .venv if needed, then run FedPuReL in Flower simulation (Ray) on the embedded default.
#
#   bash scripts/run.sh                                   # the default run (20 clients)
#   bash scripts/run.sh "method.name='promptfl' seed=1"        # any [tool.flwr.app.config] override
#   bash scripts/run.sh configs/cifar100-lt-prompt.toml "seed=1"   # a preset, then overrides
#
# Environment: NUM_SUPERNODES (20), CLIENT_GPUS (0.0; e.g. 0.25 on a GPU machine),
# OUTPUT_DIR (./outputs), FLWR_HOME (./.flwr), RAY_ADDRESS (unset: a Ray instance on this
# machine; <head>:6379: the simulation runs on that existing Ray cluster, see
# fedpurel_cli/ray_cluster.py). Exits non-zero unless Flower records the run as completed.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate

export FLWR_HOME=${FLWR_HOME:-$repo/.flwr}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# The app's dependencies are already in .venv: never reinstall them per run.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES=${RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES:-1000000000}
# Ray starts idle workers for the first driver, but Flower's actors need workers of their own
# (runtime env): the idle ones only take CPU from the start-up.
export RAY_prestart_worker_first_driver=${RAY_prestart_worker_first_driver:-0}
output_dir=${OUTPUT_DIR:-$repo/outputs}
mkdir -p "$FLWR_HOME" "$output_dir"
if [ ! -f "$FLWR_HOME/config.toml" ]; then
  printf '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n' > "$FLWR_HOME/config.toml"
fi

# `flwr run` starts a detached local SuperLink; stop the one it starts when we are done.
before=$(pgrep -f "flower-superlink .*--database $FLWR_HOME/" || true)
log=$(mktemp)
# `flwr run .` lists every file below the repository, .venv's too, before it picks the
# app's (5 s): run a copy of the app's own files instead (the same FAB, byte for byte).
stage=$(mktemp -d)
cleanup() {
  for pid in $(pgrep -f "flower-superlink .*--database $FLWR_HOME/" || true); do
    case " $before " in *" $pid "*) continue ;; esac
    pkill -TERM -P "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -rf "$log" "$stage"
}
trap cleanup EXIT

# Presets (.toml files) and key=value strings, later ones win, as one --run-config string;
# an unknown key stops here with one line.
overrides=$(fedpurel overrides "$@")

# One CPU per ClientApp actor; no init-args (num-cpus, num-gpus): Ray refuses those when it
# joins an existing cluster, which has its resources from `ray start`.
federation="num-supernodes=${NUM_SUPERNODES:-20} client-resources-num-cpus=1 client-resources-num-gpus=${CLIENT_GPUS:-0.0}"
if [ -n "${RAY_ADDRESS:-}" ]; then
  # Flower's simulation has no address field: the SuperLink that `flwr run` starts passes
  # RAY_ADDRESS on to the simulation, whose ray.init() joins the cluster. A SuperLink already
  # running on Flower's local port was started with its own environment: it would not.
  case "$federation" in *init-args*)
    echo "fedpurel: on an existing Ray cluster (RAY_ADDRESS) the federation config must not set init-args" >&2
    exit 2 ;;
  esac
  port=${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39091}
  for pid in $(pgrep -f "flower-superlink .*--port $port( |$)" || true); do
    theirs=$(tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | sed -n 's/^RAY_ADDRESS=//p')
    if [ "$theirs" != "$RAY_ADDRESS" ]; then
      echo "fedpurel: a local SuperLink (pid $pid) already runs on port $port with RAY_ADDRESS='$theirs':" \
        "its simulation would not use RAY_ADDRESS=$RAY_ADDRESS; wait for its run to end, or stop it" >&2
      exit 2
    fi
  done
  # Which cluster, how many nodes, CPUs and GPUs; and whether every node can run the app.
  python -m fedpurel_cli.ray_cluster --client-cpus 1 --client-gpus "${CLIENT_GPUS:-0.0}" "$@"
fi

# The embedded CLIP's first use pretrains it (about a minute): here, with a progress bar.
fedpurel prepare "$@"

app=$(fedpurel stage "$stage/app")
# Unbuffered: the log goes through a pipe, and each round's line should show when it is logged.
PYTHONUNBUFFERED=1 flwr run "$app" --stream \
  --federation-config "$federation" \
  --run-config "output-dir='$output_dir' $overrides" 2>&1 | grep --line-buffered -v -E "^(INFO|DEBUG):flwr:|^\s*$" | tee "$log"

# `flwr run --stream` exits 0 even when the ServerApp failed: the run's final status says.
run_id=$(sed -n 's/.*Successfully started run \([0-9]*\).*/\1/p' "$log" | tail -n 1)
if [ -z "$run_id" ]; then
  echo "fedpurel: the run was not started (see the messages above)" >&2
  exit 1
fi
status=$(flwr ls --run-id "$run_id" --format json | python -c 'import json,sys; print(json.load(sys.stdin)["runs"][0]["status"])')
if [ "$status" != "finished:completed" ]; then
  echo "fedpurel: run $run_id ended with status $status" >&2
  exit 1
fi

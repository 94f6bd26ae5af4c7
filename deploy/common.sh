# Shared settings of the deploy/ scripts (sourced, not run).
#
# Every script reads the same environment variables, so that start.sh, run.sh,
# stop.sh and the tests agree on paths and ports:
#   DEPLOY_DIR           work dir of the deployment (certs, keys, state, logs, pids, FLWR_HOME)
#                        default: $HOME/.fedpurel-deploy (outside the repo: `flwr run .`
#                        bundles the app folder, and keys must never end up in it)
#   SUPERLINK_HOST       address the SuperLink binds to and the nodes dial (127.0.0.1)
#   SUPERLINK_PORT       the SuperLink's one HTTP port: Fleet, Control and ServerAppIo (39191)
#   SUPERNODE_PORT_BASE  SuperNode i serves its ClientAppIo API on SUPERNODE_PORT_BASE + i (39200)
#   CONNECTION           name of the connection written to $FLWR_HOME/config.toml (fedpurel-deploy)
# The ports default away from the simulation's local SuperLink (39091, 39093) and
# from Flower's own defaults (8000, 9094), so both can run beside this one.

FEDPUREL_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEPLOY_DIR=${DEPLOY_DIR:-$HOME/.fedpurel-deploy}
SUPERLINK_HOST=${SUPERLINK_HOST:-127.0.0.1}
SUPERLINK_PORT=${SUPERLINK_PORT:-39191}
SUPERNODE_PORT_BASE=${SUPERNODE_PORT_BASE:-39200}
CONNECTION=${CONNECTION:-fedpurel-deploy}

CERT_DIR=$DEPLOY_DIR/certs
KEY_DIR=$DEPLOY_DIR/keys
PID_FILE=$DEPLOY_DIR/pids
LOG_DIR=$DEPLOY_DIR/logs
export FLWR_HOME=$DEPLOY_DIR/flwr-home

# The venv's Flower CLIs when present (no activation needed), else whatever is on PATH.
if [ -x "$FEDPUREL_REPO/.venv/bin/flwr" ]; then
  PATH="$FEDPUREL_REPO/.venv/bin:$PATH"
fi
export PATH
export FLWR_DISABLE_UPDATE_CHECK=1
# A SuperNode's SuperExec looks for a new ClientApp message every second by default, so
# every message waited 0.5 s on average before its process started; the SuperLink's does
# the same for the ServerApp.
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL=${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.1}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

die() { echo "fedpurel-deploy: $*" >&2; exit 1; }

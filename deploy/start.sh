#!/usr/bin/env bash
# Start a FedPuReL federation on this machine: one SuperLink and N SuperNodes,
# each a separate process, with TLS and SuperNode authentication ON.
#
#   bash deploy/start.sh                 # 3 SuperNodes (NUM_SUPERNODES)
#   bash deploy/start.sh 5               # 5 SuperNodes
#   bash deploy/start.sh --node 3        # (re)start SuperNode 3 alone in the running federation
#   bash deploy/start.sh --node 3 --no-register   # ... without registering its key (it is refused)
#   bash deploy/start.sh --insecure      # debugging only: no TLS, hence no node authentication
#
# Then: bash deploy/run.sh "<run-config overrides>"; bash deploy/stop.sh.
# Settings come from the environment (deploy/common.sh): DEPLOY_DIR, SUPERLINK_HOST,
# SUPERLINK_PORT, SUPERNODE_PORT_BASE, CONNECTION, and NODE_CONFIG_EXTRA (appended to
# every SuperNode's --node-config), NODE_DATA_ROOT (node i gets data-dir='$NODE_DATA_ROOT/i':
# its own images, see `.venv/bin/fedpurel node-data`), STARTUP_TIMEOUT (seconds, 90).
#
# Node i gets --node-config "partition-id=i num-partitions=N state-dir='$DEPLOY_DIR/nodes/i/state'"
# and its own FLWR_HOME ($DEPLOY_DIR/nodes/i/flwr-home, where the app is installed).
# Every process is started in its own process group and recorded as "<name> <pid>"
# in $DEPLOY_DIR/pids; deploy/stop.sh stops exactly those.
set -euo pipefail
# shellcheck source=deploy/common.sh
source "$(dirname "$0")/common.sh"

insecure=0
only_node=""
register=1
num=${NUM_SUPERNODES:-3}
while [ $# -gt 0 ]; do
  case $1 in
    --insecure) insecure=1 ;;
    --node) only_node=${2:?--node needs a SuperNode index}; shift ;;
    --no-register) register=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    [0-9]*) num=$1 ;;
    *) die "unknown argument '$1' (see deploy/start.sh --help)" ;;
  esac
  shift
done
[[ $num =~ ^[1-9][0-9]*$ ]] || die "the number of SuperNodes must be a positive integer, got '$num'"
timeout=${STARTUP_TIMEOUT:-90}
ENV_FILE=$DEPLOY_DIR/federation.env

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# Start "$@" detached in its own session (process group = its PID), log to $log, record its PID.
launch() {
  local name=$1 log=$2; shift 2
  setsid "$@" >>"$log" 2>&1 </dev/null &
  local pid=$!
  echo "$name $pid" >>"$PID_FILE"
  echo "$pid"
}

superlink_alive() {
  local name pid
  read -r name pid <"$PID_FILE" || return 1
  [ "$name" = superlink ] && alive "$pid"
}

register_key() {  # register_key <public key file> <node index>: idempotent, retried
  local pub=$1 i=$2 out verdict
  for _ in $(seq 20); do
    # `--format json` exits 0 also on failure: decide on the JSON.
    out=$(flwr supernode register "$pub" "$CONNECTION" --format json 2>&1 || true)
    verdict=$(python3 -c '
import json, sys
try:
    reply = json.loads(sys.argv[1])
except ValueError:
    print("retry"); sys.exit()
if reply.get("success"):
    print("id", reply["node-id"])
elif "already in use" in reply.get("error-message", ""):
    print("known")  # registered before (persistent SuperLink database)
else:
    print("retry")
' "$out")
    case $verdict in
      id*) echo "${verdict#id }" >"$DEPLOY_DIR/nodes/$i/node-id"; return 0 ;;
      known) return 0 ;;
    esac
    echo "$(date -Is) register $pub: $out" >>"$LOG_DIR/register.log"
    superlink_alive || die "the SuperLink is not running (log: $LOG_DIR/superlink.log)"
    sleep 1
  done
  die "could not register $pub: $out"
}

start_supernode() {  # start_supernode <index> <num-partitions>
  local i=$1 n=$2 port=$((SUPERNODE_PORT_BASE + $1)) node_dir=$DEPLOY_DIR/nodes/$1
  mkdir -p "$node_dir/state" "$node_dir/flwr-home"
  chmod 700 "$node_dir" "$node_dir/state"
  [ -f "$KEY_DIR/supernode-$i" ] || bash "$FEDPUREL_REPO/deploy/keys.sh" "$((i + 1))" >/dev/null
  if [ "$register" = 1 ] && [ "$insecure" = 0 ]; then register_key "$KEY_DIR/supernode-$i.pub" "$i"; fi
  local node_config="partition-id=$i num-partitions=$n state-dir='$node_dir/state' ${NODE_CONFIG_EXTRA:-}"
  if [ -n "${NODE_DATA_ROOT:-}" ]; then
    [ -d "$NODE_DATA_ROOT/$i" ] || die "NODE_DATA_ROOT=$NODE_DATA_ROOT has no folder $i for SuperNode $i"
    node_config="$node_config data-dir='$(cd "$NODE_DATA_ROOT/$i" && pwd)'"
  fi
  # Flower's node authentication requires TLS: --insecure drops both.
  local security=(--insecure)
  if [ "$insecure" = 0 ]; then
    security=(--root-certificates "$CERT_DIR/ca.crt" --auth-supernode-private-key "$KEY_DIR/supernode-$i")
  fi
  FLWR_HOME=$node_dir/flwr-home launch "supernode-$i" "$LOG_DIR/supernode-$i.log" \
    flower-supernode --superlink "$SUPERLINK_HOST:$SUPERLINK_PORT" "${security[@]}" \
    --host 127.0.0.1 --port "$port" \
    --node-config "$node_config" >/dev/null
}

wait_online() {  # wait_online <count>: until that many SuperNodes are online
  local want=$1 deadline=$((SECONDS + timeout)) online=0
  while [ $SECONDS -lt $deadline ]; do
    online=$(flwr supernode ls "$CONNECTION" --format json 2>/dev/null \
      | python3 -c 'import json,sys; print(sum(n["status"] == "online" for n in json.load(sys.stdin)["nodes"]))' \
      2>/dev/null || echo 0)
    [ "$online" -ge "$want" ] && return 0
    while read -r name pid; do
      case $name in
        supernode-*) alive "$pid" || die "$name exited while starting (log: $LOG_DIR/$name.log)" ;;
      esac
    done <"$PID_FILE"
    sleep 1
  done
  die "only $online of $want SuperNodes came online within ${timeout}s (logs: $LOG_DIR)"
}

# --- one SuperNode into the running federation -------------------------------------------
if [ -n "$only_node" ]; then
  [ -f "$ENV_FILE" ] || die "no federation is running under $DEPLOY_DIR (start it first)"
  # shellcheck disable=SC1090
  source "$ENV_FILE"
  insecure=$FED_INSECURE
  [[ $only_node =~ ^[0-9]+$ ]] || die "--node needs a SuperNode index, got '$only_node'"
  while read -r name pid; do
    if [ "$name" = "supernode-$only_node" ] && alive "$pid"; then
      die "supernode-$only_node is already running (PID $pid)"
    fi
  done <"$PID_FILE"
  start_supernode "$only_node" "$FED_NUM_SUPERNODES"
  echo "supernode-$only_node started (log: $LOG_DIR/supernode-$only_node.log)"
  exit 0
fi

# --- the whole federation ------------------------------------------------------------------
mkdir -p "$DEPLOY_DIR" "$LOG_DIR" "$FLWR_HOME"
chmod 700 "$DEPLOY_DIR"
if [ -f "$PID_FILE" ]; then
  while read -r name pid; do
    alive "$pid" && die "a federation is already running under $DEPLOY_DIR ($name, PID $pid): bash deploy/stop.sh first"
  done <"$PID_FILE"
  rm -f "$PID_FILE"
fi

if [ "$insecure" = 1 ]; then
  echo "fedpurel-deploy: WARNING: --insecure: no TLS and no SuperNode authentication (debugging only)" >&2
  security_args=(--insecure)
else
  [ -f "$CERT_DIR/server.pem" ] || bash "$FEDPUREL_REPO/deploy/certs.sh" >/dev/null
  security_args=(--ssl-ca-certfile "$CERT_DIR/ca.crt" --ssl-certfile "$CERT_DIR/server.pem"
                 --ssl-keyfile "$CERT_DIR/server.key" --enable-supernode-auth)
fi
bash "$FEDPUREL_REPO/deploy/keys.sh" "$num" >/dev/null

cat >"$ENV_FILE" <<ENV
FED_NUM_SUPERNODES=$num
FED_INSECURE=$insecure
FED_ADDRESS=$SUPERLINK_HOST:$SUPERLINK_PORT
ENV

# The flwr CLI's connection to this SuperLink, in this deployment's own FLWR_HOME.
{
  printf '[superlink]\ndefault = "%s"\n\n[superlink.%s]\naddress = "%s:%s"\n' \
    "$CONNECTION" "$CONNECTION" "$SUPERLINK_HOST" "$SUPERLINK_PORT"
  if [ "$insecure" = 1 ]; then echo 'insecure = true'; else echo "root-certificates = \"$CERT_DIR/ca.crt\""; fi
} >"$FLWR_HOME/config.toml"

# From here on, a failure stops whatever was started.
trap 'status=$?; if [ $status -ne 0 ]; then echo "fedpurel-deploy: start failed: stopping what was started" >&2; bash "$FEDPUREL_REPO/deploy/stop.sh" >&2 || true; fi' EXIT

launch superlink "$LOG_DIR/superlink.log" \
  flower-superlink "${security_args[@]}" \
  --disable-runtime-dependency-installation \
  --database "$DEPLOY_DIR/superlink.db" \
  --host "$SUPERLINK_HOST" --port "$SUPERLINK_PORT" >/dev/null

deadline=$((SECONDS + timeout))
until grep -q "Uvicorn running" "$LOG_DIR/superlink.log" 2>/dev/null \
    && flwr supernode ls "$CONNECTION" --format json 2>/dev/null | grep -q '"success": true'; do
  superlink_alive || die "the SuperLink exited (log: $LOG_DIR/superlink.log)"
  [ $SECONDS -lt $deadline ] || die "the SuperLink did not answer within ${timeout}s (log: $LOG_DIR/superlink.log)"
  sleep 0.5
done
superlink_alive || die "the SuperLink exited (log: $LOG_DIR/superlink.log)"

for ((i = 0; i < num; i++)); do
  start_supernode "$i" "$num"
done
wait_online "$num"
echo "federation up: SuperLink $SUPERLINK_HOST:$SUPERLINK_PORT ($([ "$insecure" = 1 ] && echo "INSECURE: no TLS, no node auth" || echo "TLS, node authentication")), $num SuperNodes"
echo "  connection '$CONNECTION' in $FLWR_HOME/config.toml; PIDs in $PID_FILE; logs in $LOG_DIR"

#!/usr/bin/env bash
# End-to-end check of the Docker deployment on this host: builds the images, brings up
# deploy/compose.yml + deploy/compose.tls.yml (SuperLink, ServerApp SuperExec, 3 SuperNodes
# with their ClientApp SuperExecs; TLS, node authentication, healthchecks), runs short jobs
# on the default dataset with deploy/run.sh, and removes everything it created.
#
#   bash deploy/compose-check.sh                 # needs a Docker engine with Compose v2
#   bash deploy/compose-check.sh --keep-images   # keep the images it built (a rerun skips the build)
#
# What it checks:
#   run a   a short job on all 3 nodes completes; results.json has its rounds, GM and PM;
#           every node's state volume holds its phi_k, owner-only (the folder 0700, its files 0600)
#   run b   node 1's two containers are killed (SIGKILL) when Stage 1 starts; the run
#           completes with the other two nodes
#   run c   node 1 restarted (same key, same volume): a new run personalizes on all 3 nodes,
#           node 1 with the phi_k it kept, unchanged
# and prints one summary line with the timings. On any failure it prints the last lines of
# every container's log. Only 127.0.0.1 is published (a free port); the containers talk on
# their own compose networks. Everything goes under a temporary folder and a compose project
# of its own (fedpurel-check-<pid>): containers, networks, volumes, and the images it built
# unless --keep-images (images that were there before are kept).
#
# Environment: STARTUP_TIMEOUT (s, 300), RUN_TIMEOUT (s per run, 1200), KEEP_ON_FAILURE=1
# (leave the project up after a failure, to look at it; remove it with the printed command).
set -euo pipefail
# shellcheck source=deploy/common.sh
source "$(dirname "$0")/common.sh"
cd "$FEDPUREL_REPO"

keep_images=0
for a in "$@"; do
  case $a in
    --keep-images) keep_images=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$a' (see --help)" ;;
  esac
done
startup_timeout=${STARTUP_TIMEOUT:-300}
run_timeout=${RUN_TIMEOUT:-1200}

# The run configs (namespaced keys). a: the short job; b: one Stage-1 round that goes on
# with two nodes (round-timeout bounds the wait should heartbeat detection fail);
# c: b with all three nodes again.
RUN_A="train.rounds=2 personalize.rounds=1 train.local-epochs=1 personalize.epochs=1 data.client-test-size=30 train.min-nodes=3"
RUN_B="train.rounds=1 personalize.rounds=0 train.local-epochs=1 data.client-test-size=30 train.min-nodes=2 round-timeout=150"
RUN_C="train.rounds=1 personalize.rounds=0 train.local-epochs=1 data.client-test-size=30 train.min-nodes=3 round-timeout=150"

command -v docker >/dev/null || die "no docker CLI"
docker compose version >/dev/null 2>&1 || die "no Docker Compose v2 (docker compose)"
docker info >/dev/null 2>&1 || die "no Docker engine answers"
command -v flwr >/dev/null || die "no flwr CLI (bash scripts/setup.sh creates .venv with it)"

t_start=$SECONDS
declare -A took=()
lap() { took[$1]=$((SECONDS - $2)); }
say() { echo "compose-check: $*"; }

work=$(mktemp -d "${TMPDIR:-/tmp}/fedpurel-compose-check.XXXXXX")
project=fedpurel-check-$$
export DEPLOY_DIR=$work/deploy
export FLWR_HOME=$DEPLOY_DIR/flwr-home
export CONNECTION=fedpurel-docker
export OUTPUT_DIR=/app/outputs
SUPERLINK_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export SUPERLINK_PORT SUPERLINK_BIND=127.0.0.1
files=(-f deploy/compose.yml -f deploy/compose.tls.yml -f "$work/compose.check.yml")
compose() { docker compose -p "$project" "${files[@]}" "$@"; }

images=(fedpurel/superlink fedpurel/supernode fedpurel/superexec)
tag=$(sed -n 's/^ARG FLWR_VERSION=//p' docker/superexec.Dockerfile)
declare -A had=()
for image in "${images[@]}"; do
  had[$image]=$(docker image inspect -f '{{.Id}}' "$image:$tag" 2>/dev/null || true)
done

as_app() {  # as_app CMD...: run CMD on $work as the images' `app` user's owner (root in a container)
  docker run --rm --user 0 --entrypoint "" -v "$work:$work" "fedpurel/superlink:$tag" "$@"
}

cleanup() {
  local status=$?
  set +e
  if [ $status -ne 0 ]; then
    say "FAILED; the containers' last log lines:" >&2
    compose logs --no-color --tail 40 >&2 2>&1
    if [ "${KEEP_ON_FAILURE:-0}" = 1 ]; then
      say "left up: DEPLOY_DIR=$DEPLOY_DIR SUPERLINK_PORT=$SUPERLINK_PORT docker compose -p $project ${files[*]} down -v; rm -rf $work" >&2
      exit $status
    fi
  fi
  local t=$SECONDS
  compose down -v --remove-orphans --timeout 10 >/dev/null 2>&1
  if [ "$keep_images" = 0 ]; then
    for image in "${images[@]}"; do
      id=$(docker image inspect -f '{{.Id}}' "$image:$tag" 2>/dev/null || true)
      if [ -n "$id" ] && [ "$id" != "${had[$image]}" ]; then docker image rm "$image:$tag" >/dev/null 2>&1; fi
    done
    # The classic builder keeps the dependency stage as an untagged image (labelled in the Dockerfile).
    docker image prune -f --filter label=fedpurel.build-stage=superexec-deps >/dev/null 2>&1
  fi
  # Files handed to uid 49999 come back before the folder goes (no sudo needed).
  [ -d "$work/deploy" ] && as_app chown -R "$(id -u):$(id -g)" "$work" >/dev/null 2>&1
  rm -rf "$work"
  took[down]=$((SECONDS - t))
  if [ $status -eq 0 ]; then
    echo "compose-check: OK 3 SuperNodes, TLS + node auth: build ${took[build]}s, up ${took[up]}s," \
      "run-a ${took[run-a]}s, run-b (node 1 killed) ${took[run-b]}s (kill->end ${took[kill-end]}s)," \
      "restart ${took[restart]}s, run-c ${took[run-c]}s, down ${took[down]}s, total $((SECONDS - t_start))s"
  fi
  exit $status
}
trap cleanup EXIT

# A small overlay of the check's own: one torch thread per ClientApp process (3 nodes and a
# server share this host's cores).
cat >"$work/compose.check.yml" <<'YML'
x-one-thread: &one-thread
  environment:
    OMP_NUM_THREADS: "1"
    MKL_NUM_THREADS: "1"
services:
  superexec-serverapp: *one-thread
  superexec-clientapp-0: *one-thread
  superexec-clientapp-1: *one-thread
  superexec-clientapp-2: *one-thread
YML

# --- images ------------------------------------------------------------------------------
t=$SECONDS
say "building the images (one per role) ..."
compose build >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; die "docker compose build failed"; }
lap build $t
for image in "${images[@]}"; do
  say "  $image:$tag $(docker image inspect -f '{{.Size}}' "$image:$tag" | awk '{printf "%.2f GB", $1 / 1e9}')"
done

# --- TLS material, node keys, the CLI's connection ------------------------------------------
bash deploy/certs.sh superlink >/dev/null
bash deploy/keys.sh 3 >/dev/null
for i in 0 1 2; do mkdir -p "$DEPLOY_DIR/nodes/$i/data"; done
# The containers run as uid 49999: hand them what they mount, and nothing else (ca.key, ca.srl stay).
as_app chown 49999:49999 "$DEPLOY_DIR"/certs/{ca.crt,server.pem,server.key,superexec.secret}
as_app chown -R 49999:49999 "$DEPLOY_DIR/keys"
mkdir -p "$FLWR_HOME"
printf '[superlink]\ndefault = "%s"\n\n[superlink.%s]\naddress = "127.0.0.1:%s"\nroot-certificates = "%s"\n' \
  "$CONNECTION" "$CONNECTION" "$SUPERLINK_PORT" "$DEPLOY_DIR/certs/ca.crt" >"$FLWR_HOME/config.toml"

# --- up ------------------------------------------------------------------------------------
health() {  # health SERVICE: its container's health status (or state)
  local id
  id=$(compose ps -aq "$1" 2>/dev/null | head -n 1)
  [ -n "$id" ] || { echo missing; return; }
  docker inspect -f '{{if and .State.Running .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id"
}
wait_healthy() {  # wait_healthy SERVICE...
  local deadline=$((SECONDS + startup_timeout)) s st pending
  while :; do
    pending=""
    for s in "$@"; do
      st=$(health "$s")
      case $st in
        healthy) ;;
        exited|dead|unhealthy) die "$s is $st" ;;
        *) pending="$pending $s($st)" ;;
      esac
    done
    [ -z "$pending" ] && return 0
    [ $SECONDS -lt $deadline ] || die "not healthy within ${startup_timeout}s:$pending"
    sleep 2
  done
}
online() {  # online: the node IDs the SuperLink has online, one per line
  flwr supernode ls "$CONNECTION" --format json 2>/dev/null \
    | python3 -c 'import json,sys; [print(n["node-id"]) for n in json.load(sys.stdin)["nodes"] if n["status"] == "online"]' \
    2>/dev/null || true
}
wait_online() {  # wait_online COUNT
  local deadline=$((SECONDS + startup_timeout)) n=0
  while [ $SECONDS -lt $deadline ]; do
    n=$(online | wc -l)
    [ "$n" -ge "$1" ] && return 0
    sleep 2
  done
  die "only $n of $1 SuperNodes online within ${startup_timeout}s"
}

services=(superlink superexec-serverapp supernode-0 supernode-1 supernode-2
          superexec-clientapp-0 superexec-clientapp-1 superexec-clientapp-2)
t=$SECONDS
say "starting the federation (project $project, SuperLink on 127.0.0.1:$SUPERLINK_PORT) ..."
compose up -d >"$work/up.log" 2>&1 || { cat "$work/up.log" >&2; die "docker compose up failed"; }
wait_healthy "${services[@]}"
[ "$(docker inspect -f '{{.State.ExitCode}}' "$(compose ps -aq register-nodes)")" = 0 ] || die "register-nodes failed"
wait_online 3
lap up $t
# Published on loopback only.
published=$(docker port "$(compose ps -q superlink)" 39191/tcp)
[ "$published" = "127.0.0.1:$SUPERLINK_PORT" ] || die "the SuperLink is published on '$published', not 127.0.0.1 only"

# --- run a: the short job ------------------------------------------------------------------
in_service() { local s=$1; shift; compose exec -T "$s" "$@"; }
results_of() {  # results_of LOG: results.json of the run that LOG shows, printed
  local path
  path=$(sed -n 's/.*\[fedpurel\] results: \(\S*results\.json\).*/\1/p' "$1" | tail -n 1)
  [ -n "$path" ] || die "the run did not name its results file (log: $1)"
  in_service superexec-serverapp cat "$path"
}
phi_k_sum() { in_service "superexec-clientapp-$1" sha256sum /app/state/phi_k.safetensors | cut -d' ' -f1; }

t=$SECONDS
say "run a: $RUN_A"
timeout "$run_timeout" bash deploy/run.sh "$RUN_A" >"$work/run-a.log" 2>&1 || { tail -n 40 "$work/run-a.log" >&2; die "run a failed"; }
lap run-a $t
results_of "$work/run-a.log" >"$work/results-a.json"
python3 - "$work/results-a.json" <<'PY' || die "run a: results.json is not what it should be"
import json, sys
r = json.load(open(sys.argv[1]))
phases = [x["phase"] for x in r["rounds"]]
assert phases == ["global", "global", "personal"], phases
assert r["rounds"][0]["train"]["clients"] == 3, r["rounds"][0]
assert 0 < r["final"]["gm"]["all"] <= 1 and r["final"]["pm"]["num_clients"] == 3, r["final"]
PY
for i in 0 1 2; do
  # Owner-only: the folder 0700 and the files in it 0600 (phi_k among them), all the app user's.
  bad=$(in_service "superexec-clientapp-$i" sh -c \
    'test -f /app/state/phi_k.safetensors || echo "no phi_k.safetensors"
     find /app/state -maxdepth 0 ! -perm 700; find /app/state -maxdepth 1 -type f ! -perm 600; find /app/state ! -user app')
  [ -z "$bad" ] || die "node $i: state volume: $bad"
done
say "run a: completed; results.json checked; phi_k owner-only in each node's state volume:" \
  "$(in_service superexec-clientapp-0 sh -c 'stat -c "%a %n" /app/state /app/state/*' | tr '\n' ' ')"

# --- run b: node 1 killed when Stage 1 starts ----------------------------------------------------
before=$(phi_k_sum 1)
nodes_before=$(online | sort)
t=$SECONDS
say "run b: $RUN_B (node 1 killed at Stage 1)"
killed_at=""
: >"$work/run-b.log"
timeout "$run_timeout" bash deploy/run.sh "$RUN_B" >"$work/run-b.log" 2>&1 &
run_pid=$!
while kill -0 "$run_pid" 2>/dev/null; do
  if [ -z "$killed_at" ] && grep -q "\[fedpurel\] zero-shot" "$work/run-b.log"; then
    compose kill -s SIGKILL supernode-1 superexec-clientapp-1 >/dev/null 2>&1
    killed_at=$SECONDS
  fi
  sleep 0.5
done
wait "$run_pid" || { tail -n 40 "$work/run-b.log" >&2; die "run b failed"; }
[ -n "$killed_at" ] || die "run b ended before Stage 1 started"
lap run-b $t
took[kill-end]=$((SECONDS - killed_at))
[ "$(health supernode-1)" = exited ] || die "supernode-1 is $(health supernode-1) after the kill, not exited (restart policy?)"
results_of "$work/run-b.log" >"$work/results-b.json"
python3 - "$work/results-b.json" <<'PY' || die "run b: results.json is not what it should be"
import json, sys
r = json.load(open(sys.argv[1]))
# Round 1 went out to all three nodes; the killed one never answered (nor evaluated).
assert r["rounds"][0]["train"]["clients"] == 3, r["rounds"][0]
assert r["final"]["pm"]["num_clients"] == 2, r["final"]["pm"]
PY
grep -q "Received 2 results" "$work/run-b.log" || die "run b: round 1 was not aggregated from the two nodes left"
say "run b: completed with 2 nodes"

# --- node 1 back, run c: its phi_k kept --------------------------------------------------------
t=$SECONDS
compose start supernode-1 >/dev/null 2>&1
wait_healthy supernode-1
compose start superexec-clientapp-1 >/dev/null 2>&1
wait_healthy superexec-clientapp-1
wait_online 3
lap restart $t
[ "$(online | sort)" = "$nodes_before" ] || die "node 1 came back under another node ID"
[ "$(phi_k_sum 1)" = "$before" ] || die "node 1's phi_k changed across the kill"
t=$SECONDS
say "run c: $RUN_C"
timeout "$run_timeout" bash deploy/run.sh "$RUN_C" >"$work/run-c.log" 2>&1 || { tail -n 40 "$work/run-c.log" >&2; die "run c failed"; }
lap run-c $t
results_of "$work/run-c.log" >"$work/results-c.json"
python3 - "$work/results-c.json" <<'PY' || die "run c: a node lost its phi_k"
import json, sys
pm = json.load(open(sys.argv[1]))["final"]["pm"]
assert pm["num_clients"] == 3 and pm["personalized_clients"] == 3, pm
PY
[ "$(phi_k_sum 1)" = "$before" ] || die "run c changed node 1's phi_k (it trains no Stage 2)"
say "run c: node 1 personalized with the phi_k it kept"

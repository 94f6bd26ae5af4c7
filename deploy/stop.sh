#!/usr/bin/env bash
# Stop every process deploy/start.sh started (by the PIDs it recorded), or one SuperNode.
#
#   bash deploy/stop.sh              # SuperNodes first, then the SuperLink
#   bash deploy/stop.sh --node 2     # only SuperNode 2
#
# Each recorded process leads its own process group; the SuperExec, ServerApp and
# ClientApp processes it spawned are its descendants (some in sessions of their own).
# The recorded PID's group and all its descendants get SIGTERM; whatever still runs
# after STOP_TIMEOUT seconds (15) gets SIGKILL. A recorded PID is signalled only
# while it still runs a Flower command (a PID may be reused after a crash).
set -euo pipefail
# shellcheck source=deploy/common.sh
source "$(dirname "$0")/common.sh"

only=""
if [ "${1:-}" = "--node" ]; then only="supernode-${2:?--node needs a SuperNode index}"; fi
[ -f "$PID_FILE" ] || { echo "nothing to stop under $DEPLOY_DIR"; exit 0; }
timeout=${STOP_TIMEOUT:-15}

ours() {  # ours <pid>: still one of the Flower processes we started (not a reused PID)
  [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -q -E 'flower-super(link|node)'
}
descendants() {  # descendants <pid>: every live descendant, children first
  local child
  for child in $(pgrep -P "$1" 2>/dev/null || true); do
    echo "$child"
    descendants "$child"
  done
}
group_members() { pgrep -g "$1" 2>/dev/null || true; }

# SuperNodes before the SuperLink (reverse start order).
mapfile -t entries < <(tac "$PID_FILE")
declare -A procs=()   # pid -> name, everything we signal
for entry in "${entries[@]}"; do
  read -r name pid <<<"$entry"
  [ -n "$only" ] && [ "$name" != "$only" ] && continue
  members=""
  if ours "$pid"; then members="$pid $(descendants "$pid")"; fi
  # A leader that died leaves its group behind (e.g. after kill -9 of a SuperNode).
  members="$members $(group_members "$pid")"
  for p in $members; do procs[$p]=$name; done
  [ -n "${members// /}" ] && echo "stopping $name (PID $pid)"
done

for p in "${!procs[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
deadline=$((SECONDS + timeout))
while :; do
  left=()
  for p in "${!procs[@]}"; do kill -0 "$p" 2>/dev/null && left+=("$p"); done
  [ ${#left[@]} -eq 0 ] && break
  if [ $SECONDS -ge $deadline ]; then
    for p in "${left[@]}"; do
      echo "fedpurel-deploy: ${procs[$p]}: PID $p ignored SIGTERM for ${timeout}s: SIGKILL" >&2
      kill -KILL "$p" 2>/dev/null || true
    done
    break
  fi
  sleep 0.2
done

if [ -n "$only" ]; then
  grep -v "^$only " "$PID_FILE" >"$PID_FILE.tmp" || true
  mv "$PID_FILE.tmp" "$PID_FILE"
else
  rm -f "$PID_FILE"
fi
echo "stopped"

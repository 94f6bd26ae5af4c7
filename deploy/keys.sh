#!/usr/bin/env bash
# Create N SuperNode authentication key pairs (ECDSA P-384, OpenSSH format).
#
#   bash deploy/keys.sh 3      # $DEPLOY_DIR/keys/supernode-{0,1,2} and .pub
#
# The private key stays on its SuperNode host (--auth-supernode-private-key);
# the public key is registered with the SuperLink (`flwr supernode register`).
# Existing keys are kept (a node's key is its identity: its node ID survives
# restarts only with the same key).
set -euo pipefail
# shellcheck source=deploy/common.sh
source "$(dirname "$0")/common.sh"
n=${1:?usage: deploy/keys.sh NUM_SUPERNODES}
[[ $n =~ ^[0-9]+$ ]] || die "NUM_SUPERNODES must be a number, got '$n'"

mkdir -p "$KEY_DIR"
chmod 700 "$KEY_DIR"
for ((i = 0; i < n; i++)); do
  key=$KEY_DIR/supernode-$i
  if [ ! -f "$key" ]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedpurel-supernode-$i" -f "$key"
  fi
  chmod 600 "$key"
done
echo "$n SuperNode key pairs in $KEY_DIR"

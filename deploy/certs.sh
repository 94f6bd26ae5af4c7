#!/usr/bin/env bash
# Create a private CA and the SuperLink's TLS certificate, signed by it.
#
#   bash deploy/certs.sh                         # SANs: localhost, 127.0.0.1, ::1
#   bash deploy/certs.sh superlink.example.org 10.0.0.5   # plus the names/addresses nodes dial
#
# Writes to $DEPLOY_DIR/certs (see deploy/common.sh):
#   ca.crt      the root certificate: copy it to every SuperNode host and to the flwr CLI
#   ca.key      the CA's private key: keep it offline, it signs server certificates
#   server.pem  the SuperLink's certificate (--ssl-certfile)
#   server.key  its private key (--ssl-keyfile), stays on the SuperLink host
#   superexec.secret  shared secret of the SuperLink and the ServerApp's SuperExec in
#               process isolation (Docker layouts; --superexec-auth-secret-file)
# 127.0.0.1 is always in the SANs: the SuperLink's own SuperExec dials it, also when
# the SuperLink binds 0.0.0.0 (without it a run stays pending forever).
# An existing CA is reused (FORCE=1 makes a new one); the server certificate is
# always re-issued, so re-running with more hosts is safe.
set -euo pipefail
# shellcheck source=deploy/common.sh
source "$(dirname "$0")/common.sh"
DAYS=${CERT_DAYS:-825}

mkdir -p "$CERT_DIR"
chmod 700 "$CERT_DIR"
cd "$CERT_DIR"
umask 077

if [ "${FORCE:-0}" = 1 ] || [ ! -f ca.key ] || [ ! -f ca.crt ]; then
  openssl ecparam -name secp384r1 -genkey -noout -out ca.key
  openssl req -x509 -new -key ca.key -sha384 -days "$DAYS" -subj "/CN=fedpurel deployment CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.crt
fi

sans="DNS:localhost,IP:127.0.0.1,IP:::1"
for host in "$@"; do
  case $host in
    localhost|127.0.0.1|::1) ;;
    *[!0-9.]*)
      if [[ $host == *:* ]]; then sans="$sans,IP:$host"; else sans="$sans,DNS:$host"; fi ;;
    *) sans="$sans,IP:$host" ;;
  esac
done

openssl ecparam -name secp384r1 -genkey -noout -out server.key
openssl req -new -key server.key -subj "/CN=${1:-localhost}" -out server.csr
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$sans" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$DAYS" -sha384 \
  -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext
[ -s superexec.secret ] || openssl rand -hex 32 | tr -d '\n' > superexec.secret
chmod 600 superexec.secret
chmod 600 ca.key server.key
chmod 644 ca.crt server.pem
openssl verify -CAfile ca.crt server.pem >/dev/null
echo "certificates in $CERT_DIR (SANs: $sans)"

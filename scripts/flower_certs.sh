#!/usr/bin/env bash
# Certificates and keys for a Flower deployment with TLS and SuperNode authentication.
# Usage: scripts/flower_certs.sh OUT_DIR NUM_SUPERNODES SUPERLINK_NAME_OR_IP...
#   OUT_DIR/ca.crt            give to every SuperNode (--root-certificates) and to `flwr run` (root-certificates)
#   OUT_DIR/server.pem, .key  the SuperLink's certificate and key (--ssl-certfile, --ssl-keyfile; --ssl-ca-certfile ca.crt)
#   OUT_DIR/node<i>, .pub     SuperNode i's key pair: the private key stays on that machine
#                             (--auth-supernode-private-key), the public one is registered with
#                             `flwr supernode register OUT_DIR/node<i>.pub CONNECTION`
# The server certificate names every SUPERLINK_NAME_OR_IP given, the way SuperNodes will address it.
set -euo pipefail
[ $# -ge 3 ] || { sed -n 2,10p "$0"; exit 2; }
out=$1; nodes=$2; shift 2
mkdir -p "$out"
names=()
for name in "$@"; do
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then names+=("IP:$name"); else names+=("DNS:$name"); fi
done
san=$(IFS=,; echo "${names[*]}")
openssl genrsa -out "$out/ca.key" 4096 2>/dev/null
openssl req -new -x509 -key "$out/ca.key" -sha256 -subj "/CN=spearfl-flower-ca" -days 365 -out "$out/ca.crt"
openssl genrsa -out "$out/server.key" 4096 2>/dev/null
openssl req -new -key "$out/server.key" -subj "/CN=$1" -out "$out/server.csr"
printf "subjectAltName=%s\n" "$san" > "$out/server.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -out "$out/server.pem" -days 365 -sha256 -extfile "$out/server.ext" 2>/dev/null
for ((i = 0; i < nodes; i++)); do
    rm -f "$out/node$i" "$out/node$i.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "spearfl-node$i" -f "$out/node$i"  # Flower takes ECDSA keys
done
rm -f "$out/server.csr" "$out/server.ext"
echo "wrote $out: ca.crt, server.pem, server.key, node0..node$((nodes - 1)) (+ .pub)"

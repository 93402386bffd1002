#!/bin/sh
# A self-signed ECDSA P-256 certificate for trying TLS locally (conf/gateway.conf's commented
# TLS server uses these files):  sh scripts/selfsigned.sh [NAME]   (default: localhost)
set -eu
name=${1:-localhost}
cd "$(dirname "$0")/.."
mkdir -p conf/certs
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
    -subj "/CN=$name" -addext "subjectAltName=DNS:$name,IP:127.0.0.1" \
    -keyout "conf/certs/$name.key" -out "conf/certs/$name.pem" 2>/dev/null
chmod 600 "conf/certs/$name.key"
echo "conf/certs/$name.pem and conf/certs/$name.key"

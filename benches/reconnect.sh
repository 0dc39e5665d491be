#!/usr/bin/env bash
# Reconnect to first message, with and without TLS session resumption: one
# `pingme serve` with a certificate chain like a public deployment's (RSA
# 2048 root -> intermediate -> leaf for localhost, made here with openssl;
# the server sends leaf + intermediate), then the SDK's reconnect_time
# example over QUIC and over TLS, verifying the chain against the root.
#   benches/reconnect.sh PINGME_BINARY RECONNECT_TIME_BINARY [ROUNDS=500] [BASE_PORT=21080]
set -euo pipefail
bin=${1:?usage: benches/reconnect.sh PINGME_BINARY RECONNECT_TIME_BINARY [ROUNDS] [BASE_PORT]}
reconnect_time=${2:?reconnect_time binary (cargo build --release -p pingme-client --example reconnect_time)}
rounds=${3:-500}
port=${4:-21080}
source "$(dirname "$0")/server.sh"

pki="$bench_dir/pki"
mkdir -p "$pki"
cat > "$pki/ext.cnf" <<'CNF'
[ca]
basicConstraints=critical,CA:TRUE
keyUsage=critical,keyCertSign,cRLSign
[leaf]
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1
CNF
(
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout root.key -out root.pem -days 2 \
        -subj "/CN=pingme bench root" -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -newkey rsa:2048 -nodes -keyout inter.key -out inter.csr -subj "/CN=pingme bench intermediate"
    openssl x509 -req -in inter.csr -CA root.pem -CAkey root.key -CAcreateserial -out inter.pem -days 2 \
        -extfile ext.cnf -extensions ca
    openssl req -newkey rsa:2048 -nodes -keyout leaf.key -out leaf.csr -subj "/CN=localhost"
    openssl x509 -req -in leaf.csr -CA inter.pem -CAkey inter.key -CAcreateserial -out leaf.pem -days 2 \
        -extfile ext.cnf -extensions leaf
    cat leaf.pem inter.pem > chain.pem
) 2> /dev/null
NODE_TLS_CERT="$pki/chain.pem" NODE_TLS_KEY="$pki/leaf.key" start_server "$bin" "$port"
tls_port=$((port + 2))
for transport in quic tls; do
    "$reconnect_time" --api "$api" --gateway "$transport://127.0.0.1:$tls_port" \
        --ca "$pki/root.pem" --rounds "$rounds"
done

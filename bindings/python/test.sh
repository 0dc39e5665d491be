#!/usr/bin/env bash
# The Python binding's test against a real server: builds `pingme` (the
# same command as web/test.sh, so CI reuses that build), generates the
# Python module with bindings/generate.sh (which builds the library and
# the bindings generator), starts `pingme serve` on free loopback ports
# with a temporary data folder, runs bindings/python/test_pingme.py with
# plain python3, and always stops the server (its log is printed when the
# test fails).
#   bindings/python/test.sh
# PINGME_BIN overrides the server binary; BASE_PORT=N uses ports N..N+3
# instead of free ones.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

if [ -z "${PINGME_BIN:-}" ]; then
    cargo build --locked -q -p pingme-gateway --bin pingme
    PINGME_BIN="${CARGO_TARGET_DIR:-$root/target}/debug/pingme"
fi

work=$(mktemp -d)
server_pid=""
stop_server() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap stop_server EXIT

bash bindings/generate.sh "$work/generated" python > /dev/null

# Four TCP ports (QUIC shares the TLS port number over UDP).
if [ -n "${BASE_PORT:-}" ]; then
    read -r http tcp tls metrics <<< "$BASE_PORT $((BASE_PORT + 1)) $((BASE_PORT + 2)) $((BASE_PORT + 3))"
else
    read -r http tcp tls metrics < <(python3 -c '
import socket
sockets = [socket.socket() for _ in range(4)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in sockets))')
fi
cat > "$work/pingme.yaml" <<YAML
app: { host: 127.0.0.1, port: $http, env: development }
listeners: { tcp: 127.0.0.1:$tcp, tls: 127.0.0.1:$tls, quic: 127.0.0.1:$tls, metrics: 127.0.0.1:$metrics }
auth: { jwt_secret: bindings-test-secret-0123456789, password_hash_memory_kib: 64, password_hash_iterations: 1 }
storage: { data_dir: $work/data }
YAML
RUST_LOG=warn "$PINGME_BIN" serve --config "$work/pingme.yaml" > "$work/server.log" 2>&1 &
server_pid=$!

api="http://127.0.0.1:$http"
ready=""
for _ in $(seq 300); do
    if curl -sf "$api/health" > /dev/null; then ready=1; break; fi
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$ready" ]; then
    echo "pingme serve did not become ready; log:"; cat "$work/server.log"; exit 1
fi

if ! PYTHONPATH="$work/generated/python" PINGME_API="$api" PINGME_TCP="127.0.0.1:$tcp" \
    PINGME_TLS="127.0.0.1:$tls" PINGME_QUIC="127.0.0.1:$tls" PINGME_WS="ws://127.0.0.1:$http/v1/ws" \
    python3 bindings/python/test_pingme.py; then
    echo "--- pingme serve log"; tail -n 100 "$work/server.log"
    exit 1
fi

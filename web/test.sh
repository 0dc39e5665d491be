#!/usr/bin/env bash
# The chat page's browser test: builds `pingme`, starts `pingme serve` on
# free loopback ports with a temporary data dir, runs web/tests with node's
# test runner and headless Chromium (puppeteer-core), and always stops the
# server (its log is printed when the test fails).
#   web/test.sh
#   WEBCHAT_SCREENSHOT=docs/img/webchat.png web/test.sh   # also save a screenshot
# CHROMIUM overrides the browser (default /usr/bin/chromium); PINGME_BIN a
# prebuilt binary (default: cargo build, debug).
set -euo pipefail
cd "$(dirname "$0")"
web=$(pwd)

[ -x node_modules/.bin/esbuild ] || npm ci --ignore-scripts --no-audit --no-fund
if [ -z "${PINGME_BIN:-}" ]; then
    (cd .. && cargo build --locked -q -p pingme-gateway --bin pingme)
    target="${CARGO_TARGET_DIR:-$web/../target}"
    PINGME_BIN="$target/debug/pingme"
fi
if [ -n "${WEBCHAT_SCREENSHOT:-}" ]; then
    WEBCHAT_SCREENSHOT="$(cd "$(dirname "$WEBCHAT_SCREENSHOT")" && pwd)/$(basename "$WEBCHAT_SCREENSHOT")"
    export WEBCHAT_SCREENSHOT
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

# Four free TCP ports (QUIC shares the TLS port number over UDP).
read -r http tcp tls metrics < <(node -e '
  const net = require("node:net");
  Promise.all([0, 1, 2, 3].map(() => new Promise((done) => {
    const server = net.createServer().listen(0, "127.0.0.1", () => done(server));
  }))).then((servers) => {
    console.log(servers.map((s) => s.address().port).join(" "));
    servers.forEach((s) => s.close());
  });')
cat > "$work/pingme.yaml" <<YAML
app: { host: 127.0.0.1, port: $http, env: development }
listeners: { tcp: 127.0.0.1:$tcp, tls: 127.0.0.1:$tls, quic: 127.0.0.1:$tls, metrics: 127.0.0.1:$metrics }
# A short heartbeat, so the page notices the network-drop step's dead link
# within seconds (a ping unanswered by the next one means a dead link).
# The history step types 35 messages as fast as the browser can: above the
# default send rate, so a fast machine got RATE_LIMITED, the page retried
# those a second later, and they took later seqs than the lines typed after
# them (the page does not hold later sends back behind a refused one yet).
session: { heartbeat_interval: 2s, idle_timeout: 30s, messages_per_second: 1000 }
auth: { jwt_secret: webchat-test-secret-0123456789, password_hash_memory_kib: 64, password_hash_iterations: 1 }
storage: { data_dir: $work/data }
YAML
RUST_LOG=warn "$PINGME_BIN" serve --config "$work/pingme.yaml" > "$work/server.log" 2>&1 &
server_pid=$!

base="http://127.0.0.1:$http"
ready=""
for _ in $(seq 300); do
    if curl -sf "$base/health" > /dev/null; then ready=1; break; fi
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$ready" ]; then
    echo "pingme serve did not become ready; log:"; cat "$work/server.log"; exit 1
fi

if ! PINGME_URL="$base" node --test --test-reporter=spec tests/chat.test.mjs; then
    echo "--- pingme serve log"; tail -n 100 "$work/server.log"
    exit 1
fi

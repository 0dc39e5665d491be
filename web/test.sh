#!/usr/bin/env bash
# The chat page's browser test: builds `pingme`, starts two `pingme serve`
# (one with a low message rate) on free loopback ports with temporary data
# dirs, runs web/tests with node's test runner and headless Chromium
# (puppeteer-core), and always stops the servers (their logs are printed
# when the test fails).
#   web/test.sh
#   WEBCHAT_SCREENSHOT=docs/img/webchat.png web/test.sh   # also save a screenshot
# CHROMIUM overrides the browser (default /usr/bin/chromium); PINGME_BIN a
# prebuilt binary (default: cargo build, debug). The binary serves the page
# embedded when it was built (web/dist): after changing web/src, run
# web/build.sh and let this script build, or a prebuilt binary tests the
# old page.
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
server_pids=()
stop_servers() {
    for pid in "${server_pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap stop_servers EXIT

# start_server NAME SESSION_YAML: runs `pingme serve` on four free TCP
# ports (QUIC shares the TLS port number over UDP) with the data and log
# in $work/NAME, waits until it is ready, and sets $base to its URL.
start_server() {
    local name=$1 session=$2 http tcp tls metrics
    read -r http tcp tls metrics < <(node -e '
      const net = require("node:net");
      Promise.all([0, 1, 2, 3].map(() => new Promise((done) => {
        const server = net.createServer().listen(0, "127.0.0.1", () => done(server));
      }))).then((servers) => {
        console.log(servers.map((s) => s.address().port).join(" "));
        servers.forEach((s) => s.close());
      });')
    mkdir -p "$work/$name"
    cat > "$work/$name/pingme.yaml" <<YAML
app: { host: 127.0.0.1, port: $http, env: development }
listeners: { tcp: 127.0.0.1:$tcp, tls: 127.0.0.1:$tls, quic: 127.0.0.1:$tls, metrics: 127.0.0.1:$metrics }
session: $session
auth: { jwt_secret: webchat-test-secret-0123456789, password_hash_memory_kib: 64, password_hash_iterations: 1 }
storage: { data_dir: $work/$name/data }
YAML
    RUST_LOG=warn "$PINGME_BIN" serve --config "$work/$name/pingme.yaml" > "$work/$name/server.log" 2>&1 &
    local pid=$!
    server_pids+=("$pid")
    base="http://127.0.0.1:$http"
    for _ in $(seq 300); do
        if curl -sf "$base/health" > /dev/null; then return 0; fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "pingme serve ($name) did not become ready; log:"; cat "$work/$name/server.log"
    exit 1
}

# The main server: a short heartbeat, so the page notices the network-drop
# step's dead link within seconds (a ping unanswered by the next one means
# a dead link). The history step types 35 messages as fast as the browser
# can, above the default rate of frames (sends, fetches, acks and read
# markers alike): the page would keep their order, but a refused fetch or
# ack would only slow that step down, so this server allows plenty.
start_server main "{ heartbeat_interval: 2s, idle_timeout: 30s, messages_per_second: 1000 }"
main_url=$base
# A server that allows few frames per second: the send-order test types a
# burst of lines faster than that, so some sends are refused (RATE_LIMITED)
# and must be retried before the lines typed after them.
start_server slow "{ heartbeat_interval: 2s, idle_timeout: 30s, messages_per_second: 10 }"
slow_url=$base

if ! PINGME_URL="$main_url" PINGME_SLOW_URL="$slow_url" \
        node --test --test-concurrency=1 --test-reporter=spec tests/acks.test.mjs tests/chat.test.mjs tests/send_order.test.mjs; then
    for name in main slow; do
        echo "--- pingme serve ($name) log"; tail -n 100 "$work/$name/server.log"
    done
    exit 1
fi

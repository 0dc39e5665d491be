# Sourced by the benchmark scripts: start one `pingme serve` on loopback
# with a throw-away data folder, and stop it when the script exits.
#   start_server PINGME_BINARY BASE_PORT
# sets $server_pid, $api (HTTP base URL), $gateway (tcp:// address) and
# $bench_dir. Password hashing is cheap and per-address limits are lifted
# through $EXTRA_YAML (lines appended to the config: older binaries that do
# not know a key refuse it, so the caller passes what its binary knows).
bench_dir=$(mktemp -d)
server_pid=""
stop_server() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null; server_pid=""; }
trap 'stop_server; rm -rf "$bench_dir"' EXIT
start_server() {
    local bin=$1 port=$2
    cat > "$bench_dir/pingme.yaml" <<YAML
app: { host: 127.0.0.1, port: $port, env: development }
listeners: { tcp: 127.0.0.1:$((port + 1)), tls: 127.0.0.1:$((port + 2)), quic: 127.0.0.1:$((port + 2)), metrics: 127.0.0.1:$((port + 3)) }
session: { messages_per_second: 100000, idle_timeout: 300s }
storage: { data_dir: $bench_dir/data }
${EXTRA_YAML:-}
YAML
    RUST_LOG=warn "$bin" serve --config "$bench_dir/pingme.yaml" 2> "$bench_dir/server.log" &
    server_pid=$!
    api="http://127.0.0.1:$port"
    gateway="tcp://127.0.0.1:$((port + 1))"
    for _ in $(seq 300); do
        curl -sf "$api/health" > /dev/null && return 0
        sleep 0.1
    done
    echo "pingme serve did not become ready; log:"; cat "$bench_dir/server.log"; exit 1
}

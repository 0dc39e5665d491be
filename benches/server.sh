# Sourced by the benchmark scripts: start one `pingme serve` on loopback
# with a throw-away data folder, and stop it when the script exits.
#   start_server PINGME_BINARY BASE_PORT
# sets $server_pid, $api (HTTP base URL), $gateway (tcp:// address) and
# $bench_dir. Password hashing is cheap and per-address limits are lifted
# through $EXTRA_YAML (lines appended to the config: older binaries that do
# not know a key refuse it, so the caller passes what its binary knows).
# The node itself is benches/nodes.sh's.
source "$(dirname "${BASH_SOURCE[0]}")/nodes.sh"
bench_dir=$(mktemp -d)
server_pid=""
on_exit() { rm -rf "$bench_dir"; }
stop_server() { stop_node server; server_pid=""; }
start_server() {
    local port=$2
    nodes_init "$1" "$bench_dir"
    start_node server all "$port" "${EXTRA_YAML:-}"
    server_pid=$(node_pid server)
    api="http://127.0.0.1:$port"
    gateway="tcp://127.0.0.1:$((port + 1))"
}

# Sourced by the benchmark scripts: the one place that writes a `pingme
# serve` config, starts the process on loopback, waits until it is ready,
# and stops everything it started when the script exits (also its MySQL
# databases). Also the CPU and memory readings the scripts print.
#
#   nodes_init PINGME_BINARY [DIR]   configs, data and logs go to DIR (default: a temp folder)
#   start_node NAME ROLE PORT [YAML] HTTP on PORT, TCP on PORT+1 (or $NODE_TCP,
#                                    e.g. one port several gateways share), TLS and
#                                    QUIC on PORT+2, ops (health, metrics) on PORT+3;
#                                    ready when the ops port's /health answers 200
#   stop_node NAME [SIGNAL]          signal it (TERM) and wait for it
#   node_pid NAME                    its process id
#   mysql_database LABEL             a fresh `pingme_*` database, its YAML in $database_yaml
#                                    (not printed: a $(...) subshell would forget to drop it)
#
# NODE_TLS_CERT and NODE_TLS_KEY (PEM files), if set, replace the self-signed development
# certificate of the TLS and QUIC listeners.
# The config: app (role and gateway id = NAME, unless ROLE is all), listeners, the data folder, a
# session line with lifted rates, then YAML (the caller's settings; a
# `storage: { backend: ...` line in it replaces the data folder line).
# NODE_NAMED=1 gives a role-all node its gateway id (= NAME) too: nodes that
# share a Redis directory need distinct ids.
# NODE_IDLE_TIMEOUT (300s) and NODE_HEARTBEAT (the server's default) set the
# session's idle timeout and the heartbeat interval it announces.
# NODE_READY_SECONDS (60) bounds the readiness wait; a node that is not
# ready by then fails the script with its log.

declare -A node_pids=()
node_databases=()
nodes_dir=""
node_bin=""

nodes_init() {
    node_bin=${1:?pingme binary}
    nodes_dir=${2:-$(mktemp -d)}
    mkdir -p "$nodes_dir"
}

nodes_mysql() {
    mysql -h "${MYSQL_HOST:-127.0.0.1}" -P "${MYSQL_PORT:-3306}" -u "${MYSQL_USER:-pingme}" \
        "-p${MYSQL_PASSWORD:-pingme}" -N -e "$1"
}

# Stops every node still running (our children only), drops the databases,
# then runs the caller's `on_exit` if it defines one.
nodes_cleanup() {
    local name pid
    for name in "${!node_pids[@]}"; do
        pid=${node_pids[$name]}
        kill -0 "$pid" 2>/dev/null && kill "$pid" 2>/dev/null
    done
    for name in "${!node_pids[@]}"; do wait "${node_pids[$name]}" 2>/dev/null || true; done
    node_pids=()
    for db in "${node_databases[@]}"; do nodes_mysql "DROP DATABASE IF EXISTS $db" || true; done
    node_databases=()
    if declare -F on_exit > /dev/null; then on_exit; fi
}
trap nodes_cleanup EXIT

mysql_database() {
    local db="pingme_bench_$1_$$"
    nodes_mysql "CREATE DATABASE $db"
    node_databases+=("$db")
    database_yaml="storage: { backend: mysql }
database: { host: ${MYSQL_HOST:-127.0.0.1}, port: ${MYSQL_PORT:-3306}, username: ${MYSQL_USER:-pingme}, password: ${MYSQL_PASSWORD:-pingme}, name: $db, pool_size: 16 }"
}

start_node() {
    local name=$1 role=$2 port=$3 extra=${4:-}
    local config="$nodes_dir/$name.yaml"
    {
        # A single node (role all) gets no cluster keys: the scripts compare
        # older binaries too, which refuse keys they do not know.
        if [ "$role" = all ] && [ -z "${NODE_NAMED:-}" ]; then
            echo "app: { host: 127.0.0.1, port: $port, env: development }"
        else
            echo "app: { host: 127.0.0.1, port: $port, env: development, gateway_id: $name, role: $role }"
        fi
        echo "listeners: { tcp: 127.0.0.1:${NODE_TCP:-$((port + 1))}, tls: 127.0.0.1:$((port + 2)), quic: 127.0.0.1:$((port + 2)), metrics: 127.0.0.1:$((port + 3))${NODE_TLS_CERT:+, tls_cert: $NODE_TLS_CERT, tls_key: $NODE_TLS_KEY} }"
        grep -q "^storage: { backend" <<< "$extra" || echo "storage: { data_dir: $nodes_dir/$name-data }"
        echo "session: { messages_per_second: 100000, idle_timeout: ${NODE_IDLE_TIMEOUT:-300s}${NODE_HEARTBEAT:+, heartbeat_interval: $NODE_HEARTBEAT} }"
        echo "$extra"
    } > "$config"
    RUST_LOG=${RUST_LOG:-warn} "$node_bin" serve --config "$config" 2> "$nodes_dir/$name.log" &
    node_pids[$name]=$!
    local tries=$(( ${NODE_READY_SECONDS:-60} * 10 ))
    for _ in $(seq "$tries"); do
        curl -sf "http://127.0.0.1:$((port + 3))/health" > /dev/null && return 0
        kill -0 "${node_pids[$name]}" 2>/dev/null || break
        sleep 0.1
    done
    echo "$name did not become ready; log:"; cat "$nodes_dir/$name.log"; exit 1
}

node_pid() { echo "${node_pids[$1]}"; }

stop_node() {
    local pid=${node_pids[$1]:-}
    [ -n "$pid" ] || return 0
    kill "-${2:-TERM}" "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "node_pids[$1]"
}

# Signals a node without waiting (kill -9 under load) and forgets it.
signal_node() {
    local pid=${node_pids[$1]:-}
    [ -n "$pid" ] || return 0
    kill "-${2:-KILL}" "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "node_pids[$1]"
}

# CPU seconds (user + system) a process used so far.
cpu_seconds() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }
# The shared services' processes (broker, Redis, database), if running here.
service_pids() { pgrep -f 'tansu broker|redis-server|mariadbd|mysqld' | tr '\n' ' '; }
services_cpu() {
    local total=0 pid
    for pid in $(service_pids); do total=$(awk -v a="$total" -v b="$(cpu_seconds "$pid")" 'BEGIN { printf "%.2f", a + b }'); done
    echo "$total"
}
# Each shared service's CPU seconds so far, by name.
services_by_name() {
    local pid
    for pid in $(service_pids); do echo -n "$(ps -o comm= -p "$pid")=$(cpu_seconds "$pid") "; done
}
# Each running node's CPU seconds and resident memory so far.
nodes_usage() {
    local name pid
    for name in $(printf '%s\n' "${!node_pids[@]}" | sort); do
        pid=${node_pids[$name]}
        kill -0 "$pid" 2>/dev/null || continue
        echo "$name: $(cpu_seconds "$pid") s CPU, RSS $(ps -o rss= -p "$pid") KiB"
    done
}
# The load average, to print beside every figure (2 shared cores).
load_average() { cut -d' ' -f1-3 /proc/loadavg; }

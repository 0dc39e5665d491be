#!/usr/bin/env bash
# The cluster against the single node, on this machine, same load: 1:1
# chat with the two users of every pair on different gateways (cluster:
# two `--role gateway` processes and one `--role worker`, over Kafka,
# Redis and MySQL), then the same chat on one `pingme serve` with the same
# MySQL store and on one with the embedded store. Prints each
# `pingme-loadgen` report's summary (send->ack and send->deliver
# percentiles, lost / duplicated / out of order, server CPU).
#
#   benches/cluster.sh PINGME PINGME_LOADGEN
#
# Needs a Kafka-protocol broker (KAFKA_BROKERS, default 127.0.0.1:9092;
# `bash .ci/kafka.sh` starts Tansu), Redis (REDIS_HOST:REDIS_PORT, default
# 127.0.0.1:6379) and MySQL/MariaDB (MYSQL_HOST, MYSQL_PORT, MYSQL_USER,
# MYSQL_PASSWORD: default 127.0.0.1:3306, pingme/pingme, a user that may
# create `pingme_*` databases). Every run gets its own database, topics and
# Redis key prefix, and everything started is stopped at exit.
#   CONNECTIONS (2000), RATE per connection per second (1), DURATION (60 s),
#   RUNS ("cluster mysql embedded"), OUT (reports; default a temp folder),
#   FETCH_WAIT_MAX_MS, LINGER_MS (the cluster's kafka settings; defaults
#   of the binary when unset).
set -euo pipefail

pingme=${1:?pingme binary}
loadgen_bin=${2:?pingme-loadgen binary}
connections=${CONNECTIONS:-2000}
rate=${RATE:-1}
seconds=${DURATION:-60}
runs=" ${RUNS:-cluster mysql embedded} "
brokers=${KAFKA_BROKERS:-127.0.0.1:9092}
redis_host=${REDIS_HOST:-127.0.0.1}
redis_port=${REDIS_PORT:-6379}
mysql_host=${MYSQL_HOST:-127.0.0.1}
mysql_port=${MYSQL_PORT:-3306}
mysql_user=${MYSQL_USER:-pingme}
mysql_password=${MYSQL_PASSWORD:-pingme}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
echo "reports in $out"

pids=()
names=()
databases=()
mysql_cmd() { mysql -h "$mysql_host" -P "$mysql_port" -u "$mysql_user" "-p$mysql_password" -N -e "$1"; }
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    for db in "${databases[@]}"; do mysql_cmd "DROP DATABASE IF EXISTS $db" || true; done
}
trap cleanup EXIT

# The settings every node of one run shares: cheap password hashing (the
# set-up registers thousands of users from 127.0.0.1), limits lifted.
common_yaml() {
    cat <<YAML
session: { messages_per_second: 100000, idle_timeout: 300s }
auth: { jwt_secret: cluster-benchmark-secret-0123456789, password_hash_memory_kib: 64, password_hash_iterations: 1,
        max_registrations_per_ip: 1000000, max_login_failures_per_ip: 1000000 }
http: { max_connections: 100000, max_connections_per_ip: 100000 }
YAML
}

# A fresh MySQL database for one run; prints the `database` section.
database_yaml() {
    local db="pingme_bench_$1_$$"
    mysql_cmd "CREATE DATABASE $db"
    databases+=("$db")
    echo "storage: { backend: mysql }"
    echo "database: { host: $mysql_host, port: $mysql_port, username: $mysql_user, password: $mysql_password, name: $db, pool_size: 16 }"
}

# start_node NAME ROLE BASE_PORT EXTRA_YAML: one `pingme serve`, ready
# when its ops port's /health says so.
start_node() {
    local name=$1 role=$2 port=$3 extra=$4
    {
        echo "app: { host: 127.0.0.1, port: $port, env: development, gateway_id: $name, role: $role }"
        echo "listeners: { tcp: 127.0.0.1:$((port + 1)), tls: 127.0.0.1:$((port + 2)), quic: 127.0.0.1:$((port + 2)), metrics: 127.0.0.1:$((port + 3)) }"
        echo "storage: { data_dir: $out/$name-data }"
        common_yaml
        echo "$extra"
    } > "$out/$name.yaml"
    # The storage line above and a backend line in $extra would clash:
    # merge them (YAML keys must be unique).
    if grep -q "^storage: { backend" "$out/$name.yaml"; then
        sed -i "/^storage: { data_dir/d" "$out/$name.yaml"
    fi
    RUST_LOG=warn "$pingme" serve --config "$out/$name.yaml" 2> "$out/$name.log" &
    pids+=($!)
    names+=("$name")
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$((port + 3))/health" > /dev/null && return 0
        sleep 0.1
    done
    echo "$name did not become ready; log:"; cat "$out/$name.log"; exit 1
}

stop_nodes() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    pids=()
    names=()
}

# CPU seconds (user + system) a process used so far.
cpu_seconds() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }
# The shared services' processes (broker, Redis, database), if running here.
service_pids() { pgrep -f 'tansu broker|redis-server|mariadbd|mysqld' | tr '\n' ' '; }
services_cpu() {
    local total=0
    for pid in $(service_pids); do total=$(awk -v a="$total" -v b="$(cpu_seconds "$pid")" 'BEGIN { printf "%.2f", a + b }'); done
    echo "$total"
}
# Each shared service's CPU seconds so far, by name.
services_by_name() {
    for pid in $(service_pids); do echo -n "$(ps -o comm= -p "$pid")=$(cpu_seconds "$pid") "; done
}

# Each node's CPU seconds and resident memory so far, and the services'
# CPU seconds since $services_before.
node_usage() {
    for i in "${!pids[@]}"; do
        echo "${names[$i]}: $(cpu_seconds "${pids[$i]}") s CPU, RSS $(ps -o rss= -p "${pids[$i]}") KiB"
    done
    echo "services' CPU seconds after: $(services_by_name)"
    echo "broker + Redis + database: $(awk -v a="$(services_cpu)" -v b="$services_before" 'BEGIN { printf "%.2f", a - b }') s CPU during the run"
}

chat() {
    local label=$1 api=$2 gateways=$3 server_pid=$4
    services_before=$(services_cpu)
    echo "services' CPU seconds before: $(services_by_name)"
    echo; echo "== $label: $connections connections, $rate msg/s each, ${seconds}s, partners on gateways $gateways"
    "$loadgen_bin" run chat -n "$connections" --register --user-prefix "c$label" --rate "$rate" --size 100 \
        --duration "$seconds" --drain 5 --api "$api" --gateway "$gateways" ${server_pid:+--server-pid "$server_pid"} \
        --quiet --report "$out/$label.json"
}

if [[ "$runs" == *" cluster "* ]]; then
    suffix="bench$$"
    cluster_yaml="$(database_yaml cluster)
redis: { enabled: true, host: $redis_host, port: $redis_port, key_prefix: \"$suffix:\" }
kafka: { brokers: \"$brokers\", downstream_topic_prefix: down-$suffix-, push_topic: push-$suffix, dlq_topic: dlq-$suffix${FETCH_WAIT_MAX_MS:+, fetch_wait_max_ms: $FETCH_WAIT_MAX_MS}${LINGER_MS:+, linger_ms: $LINGER_MS} }
task: { task_topic: task-$suffix, persistence_topic: persist-$suffix, consumer_group: task-$suffix-group, persistence_group: persist-$suffix-group }"
    start_node worker worker 21000 "$cluster_yaml"
    start_node gw-1 gateway 21010 "$cluster_yaml"
    start_node gw-2 gateway 21020 "$cluster_yaml"
    chat cluster http://127.0.0.1:21010 tcp://127.0.0.1:21011,tcp://127.0.0.1:21021 ""
    node_usage
    stop_nodes
fi

if [[ "$runs" == *" mysql "* ]]; then
    start_node single-mysql all 21030 "$(database_yaml single)"
    chat single-mysql http://127.0.0.1:21030 tcp://127.0.0.1:21031 "${pids[0]}"
    node_usage
    stop_nodes
fi

if [[ "$runs" == *" embedded "* ]]; then
    start_node single-embedded all 21040 ""
    chat single-embedded http://127.0.0.1:21040 tcp://127.0.0.1:21041 "${pids[0]}"
    node_usage
    stop_nodes
fi
echo; echo "reports in $out"

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
#   BASE_PORT (21000: the worker's, then gateways and single nodes every 10),
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
b=${BASE_PORT:-21000}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
echo "reports in $out"

source "$(dirname "$0")/nodes.sh"
nodes_init "$pingme" "$out"
export MYSQL_HOST=$mysql_host MYSQL_PORT=$mysql_port MYSQL_USER=$mysql_user MYSQL_PASSWORD=$mysql_password

# The settings every node of one run shares: cheap password hashing (the
# set-up registers thousands of users from 127.0.0.1), limits lifted.
common_yaml() {
    cat <<YAML
auth: { jwt_secret: cluster-benchmark-secret-0123456789, password_hash_memory_kib: 64, password_hash_iterations: 1,
        max_registrations_per_ip: 1000000, max_login_failures_per_ip: 1000000 }
http: { max_connections: 100000, max_connections_per_ip: 100000 }
YAML
}

# Each node's CPU seconds and resident memory so far, and the services'
# CPU seconds since $services_before.
node_usage() {
    nodes_usage
    echo "services' CPU seconds after: $(services_by_name)"
    echo "broker + Redis + database: $(awk -v a="$(services_cpu)" -v b="$services_before" 'BEGIN { printf "%.2f", a - b }') s CPU during the run"
    echo "load average: $(load_average)"
}

stop_nodes() { for name in "${!node_pids[@]}"; do stop_node "$name"; done; }

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
    mysql_database cluster
    cluster_yaml="$(common_yaml)
$database_yaml
redis: { enabled: true, host: $redis_host, port: $redis_port, key_prefix: \"$suffix:\" }
kafka: { brokers: \"$brokers\", downstream_topic_prefix: down-$suffix-, push_topic: push-$suffix, dlq_topic: dlq-$suffix${FETCH_WAIT_MAX_MS:+, fetch_wait_max_ms: $FETCH_WAIT_MAX_MS}${LINGER_MS:+, linger_ms: $LINGER_MS} }
task: { task_topic: task-$suffix, persistence_topic: persist-$suffix, consumer_group: task-$suffix-group, persistence_group: persist-$suffix-group }"
    start_node worker worker $((b + 0)) "$cluster_yaml"
    start_node gw-1 gateway $((b + 10)) "$cluster_yaml"
    start_node gw-2 gateway $((b + 20)) "$cluster_yaml"
    chat cluster http://127.0.0.1:$((b + 10)) tcp://127.0.0.1:$((b + 11)),tcp://127.0.0.1:$((b + 21)) ""
    node_usage
    stop_nodes
fi

if [[ "$runs" == *" mysql "* ]]; then
    mysql_database single
    start_node single-mysql all $((b + 30)) "$(common_yaml)
$database_yaml"
    chat single-mysql http://127.0.0.1:$((b + 30)) tcp://127.0.0.1:$((b + 31)) "$(node_pid single-mysql)"
    node_usage
    stop_nodes
fi

if [[ "$runs" == *" embedded "* ]]; then
    start_node single-embedded all $((b + 40)) "$(common_yaml)"
    chat single-embedded http://127.0.0.1:$((b + 40)) tcp://127.0.0.1:$((b + 41)) "$(node_pid single-embedded)"
    node_usage
    stop_nodes
fi
echo; echo "reports in $out"

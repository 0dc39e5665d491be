#!/usr/bin/env bash
# The million-connection run (issue 14, run 6): CONNECTIONS authenticated
# idle TCP connections on loopback, held by gateway processes of at most
# PER_GATEWAY connections each (the per-process file limit here is 20,000),
# opened by load generator shards of the same size (one shard per gateway,
# on that gateway's own port), with a small chat load running through them
# once they are all up. Users are provisioned in bulk with `pingme users
# import` (one argon2 hash for all of them, tokens minted with the
# configured secret), not registered over HTTP. A sampler records, every
# SAMPLE_EVERY seconds, the connections up (the gateways' gauges), all
# gateways' RSS, all load generators' RSS, the kernel's slab, its TCP
# buffer pages (/proc/net/sockstat) and the machine's used memory, and
# draws them (`pingme-loadgen ramp-chart`). Everything it starts it stops;
# every phase is bounded in time; below MIN_AVAILABLE_MIB of available
# memory the sampler stops the load generators (the run then reports how
# far it got and why it stopped).
#
#   benches/million.sh PINGME PINGME_LOADGEN
#
# MODE: cluster (default: `--role gateway` processes and WORKERS `--role
#   worker` processes over Kafka, the Redis directory and MariaDB: every
#   chat message goes sender gateway -> Kafka -> worker -> Kafka ->
#   recipient gateway) or nodes (`--role all` processes over the same
#   MariaDB and Redis, no Kafka: each node routes through its in-process
#   bus, so chat partners share a node).
# Sizes: CONNECTIONS (1000000, chat ones included), PER_GATEWAY (18000),
#   CHAT_CONNECTIONS (10000, on 2 gateways of their own in cluster mode,
#   partners across them; 1 in nodes mode), CHAT_RATE (0.03 msg/s each),
#   CHAT_DURATION (60 s of sends once all are up), CONNECT_RATE (1000/s in
#   all, split over the shards), CONNECT_CONCURRENCY (16 handshakes in
#   flight per shard), HEARTBEAT (240s, announced to clients;
#   IDLE_TIMEOUT 600s), FETCH_WAIT_MS (Kafka consumers' fetch.wait.max.ms,
#   10), SAMPLE_EVERY (2 s), MIN_AVAILABLE_MIB (2048), RAMP_LIMIT (900 s;
#   the wait for the ramp also ends after 30 s without progress).
# Threads: GATEWAY_SHARDS (1 connection shard per gateway process) and
#   WORKER_THREADS (1 tokio worker in every process the script starts:
#   gateways, workers, the import, the load generators): a hundred
#   processes on two cores should not each run a thread per core.
# Ports: BASE_PORT (30000): gateway i (1-based) HTTP BASE+100+10i, TCP +1,
#   TLS/QUIC +2, ops +3; worker j ops BASE+1003+10j; own Redis BASE+9.
# Services: KAFKA_BROKERS (127.0.0.1:9092), MYSQL_HOST/PORT/USER/PASSWORD
#   (127.0.0.1:3306, pingme/pingme; the run gets its own database); Redis
#   is the run's own redis-server (a million directory entries would
#   otherwise stay in a shared one). OUT: configs, logs, samples, reports.
set -euo pipefail
cd "$(dirname "$0")/.."

pingme=${1:?usage: benches/million.sh PINGME PINGME_LOADGEN}
loadgen_bin=${2:?pingme-loadgen binary}
mode=${MODE:-cluster}
connections=${CONNECTIONS:-1000000}
per_gateway=${PER_GATEWAY:-18000}
chat_connections=${CHAT_CONNECTIONS:-10000}
chat_rate=${CHAT_RATE:-0.03}
chat_duration=${CHAT_DURATION:-60}
connect_rate=${CONNECT_RATE:-1000}
connect_concurrency=${CONNECT_CONCURRENCY:-16}
workers=${WORKERS:-1}
sample_every=${SAMPLE_EVERY:-2}
min_available_mib=${MIN_AVAILABLE_MIB:-2048}
base=${BASE_PORT:-30000}
brokers=${KAFKA_BROKERS:-127.0.0.1:9092}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
export NODE_HEARTBEAT=${HEARTBEAT:-240s} NODE_IDLE_TIMEOUT=${IDLE_TIMEOUT:-600s} NODE_NAMED=1
# Read by tokio's multi-threaded runtime in every process started below.
export TOKIO_WORKER_THREADS=${WORKER_THREADS:-1}

case $mode in cluster | nodes) ;; *) echo "MODE is cluster or nodes"; exit 64 ;; esac
if [ "$per_gateway" -gt 19500 ]; then
    echo "PER_GATEWAY must leave room under the 20,000 file limit (at most 19500)"; exit 64
fi
idle=$(( connections - chat_connections ))
[ "$idle" -gt 0 ] || { echo "CONNECTIONS must exceed CHAT_CONNECTIONS"; exit 64; }
idle_shards=$(( (idle + per_gateway - 1) / per_gateway ))
if [ "$mode" = cluster ]; then chat_gateways=2; else chat_gateways=1; fi
[ "$chat_connections" -gt 0 ] || chat_gateways=0
if [ "$chat_gateways" -gt 0 ] && [ $(( chat_connections / chat_gateways )) -gt "$per_gateway" ]; then
    echo "CHAT_CONNECTIONS / $chat_gateways exceeds PER_GATEWAY"; exit 64
fi
gateways=$(( idle_shards + chat_gateways ))

source benches/nodes.sh
nodes_init "$pingme" "$out"
gateway_port() { echo $((base + 100 + 10 * $1)); }
worker_port() { echo $((base + 1000 + 10 * $1)); }

helper_pids=()
on_exit() {
    [ -n "${sampler_pid:-}" ] && kill "$sampler_pid" 2>/dev/null
    for pid in "${helper_pids[@]}"; do kill -0 "$pid" 2>/dev/null && kill "$pid" 2>/dev/null; done
    for pid in "${helper_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    return 0
}

redis_port=$((base + 9))
redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no \
    > "$out/redis.log" 2>&1 &
redis_pid=$!
helper_pids+=("$redis_pid")
for _ in $(seq 100); do redis-cli -p "$redis_port" ping > /dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$redis_port" ping > /dev/null || { echo "own redis-server did not start:"; cat "$out/redis.log"; exit 1; }

suffix="million$$"
mysql_database million
# A gateway reads one device row per authentication: two pooled
# connections each keep 60 gateways under MariaDB's default 151.
gateway_db_yaml=${database_yaml/pool_size: 16/pool_size: 2}
worker_db_yaml=${database_yaml/pool_size: 16/pool_size: 8}
common_yaml="auth: { jwt_secret: million-benchmark-secret-0123456789, access_token_ttl: 2h, password_hash_memory_kib: 64, password_hash_iterations: 1 }
redis: { enabled: true, host: 127.0.0.1, port: $redis_port, key_prefix: \"$suffix:\" }
shards: ${GATEWAY_SHARDS:-1}"
if [ "$mode" = cluster ]; then
    common_yaml="$common_yaml
kafka: { brokers: \"$brokers\", downstream_topic_prefix: down-$suffix-, push_topic: push-$suffix, dlq_topic: dlq-$suffix, downstream_partitions: 1, fetch_wait_max_ms: ${FETCH_WAIT_MS:-10} }
task: { task_topic: task-$suffix, persistence_topic: persist-$suffix, consumer_group: task-$suffix-group, persistence_group: persist-$suffix-group }"
fi

echo "== million: $connections connections ($idle idle on $idle_shards gateways, $chat_connections chatting at $chat_rate msg/s each on $chat_gateways), mode $mode, heartbeat $NODE_HEARTBEAT; out $out"
echo "load average at start: $(load_average); $(free -m | awk '/^Mem:/ { print "memory available " $7 " MiB of " $2 }')"

# 1. Users, in bulk: one argon2 hash (of a random password nobody keeps)
#    for all of them, imported with a device each and a minted token.
cat > "$out/import.yaml" <<YAML
app: { env: development }
$gateway_db_yaml
$common_yaml
YAML
password=$(head -c 18 /dev/urandom | base64)
hash=$(printf '%s\n' "$password" | "$pingme" users hash-password --config "$out/import.yaml")
awk -v n="$connections" -v h="$hash" -v p="m$$u" \
    'BEGIN { for (i = 0; i < n; i++) printf "{\"username\":\"%s%d\",\"password_hash\":\"%s\"}\n", p, i, h }' \
    > "$out/users.jsonl"
echo "== importing $connections users"
import_started=$(date +%s%N)
timeout 900 "$pingme" users import --config "$out/import.yaml" --device million \
    --tokens "$out/tokens.txt" "$out/users.jsonl" 2>&1 | tee "$out/import.log"
import_s=$(awk -v a="$import_started" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
echo "import took $import_s s in all (reading, checking, storing, minting)"
rm -f "$out/users.jsonl"
head -n "$idle" "$out/tokens.txt" | split -l "$per_gateway" -d -a 3 - "$out/idle-tokens-"
tail -n "$chat_connections" "$out/tokens.txt" > "$out/chat-tokens"

# 2. The processes.
services_before=$(services_cpu)
if [ "$mode" = cluster ]; then
    for j in $(seq 1 "$workers"); do
        start_node "worker-$j" worker "$(worker_port "$j")" "$worker_db_yaml
$common_yaml"
    done
    role=gateway
else
    role=all
fi
started_gateways=$(date +%s%N)
for i in $(seq 1 "$gateways"); do
    start_node "gw-$i" "$role" "$(gateway_port "$i")" "$gateway_db_yaml
$common_yaml"
done
echo "$gateways gateways ready in $(awk -v a="$started_gateways" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }') s"
gateway_pids=()
metric_urls=()
for i in $(seq 1 "$gateways"); do
    gateway_pids+=("$(node_pid "gw-$i")")
    metric_urls+=("http://127.0.0.1:$(( $(gateway_port "$i") + 3 ))/metrics")
done

rss_kib() { # sum of VmRSS over the given pids (those still running)
    local pid files=()
    for pid in "$@"; do [ -r "/proc/$pid/status" ] && files+=("/proc/$pid/status"); done
    [ "${#files[@]}" -gt 0 ] || { echo 0; return; }
    awk '/^VmRSS:/ { s += $2 } END { printf "%d", s + 0 }' "${files[@]}" 2> /dev/null || echo 0
}
# The load generators run under `timeout`: their pids are its children.
loadgens_rss_kib() {
    local pid all=()
    [ -s "$out/loadgen.pids" ] || { echo 0; return; }
    for pid in $(cat "$out/loadgen.pids"); do all+=($(pgrep -P "$pid")); done
    rss_kib "${all[@]}"
}
connected() {
    curl -s --max-time 10 "${metric_urls[@]}" \
        | awk '/^pingme_gateway_connections[ {]/ { s += $NF } END { printf "%d", s + 0 }'
}
cpu_sum() { local t=0 pid; for pid in "$@"; do t=$(awk -v a="$t" -v b="$(cpu_seconds "$pid" 2>/dev/null || echo 0)" 'BEGIN { printf "%.2f", a + b }'); done; echo "$t"; }
meminfo() { awk -v k="$1:" '$1 == k { print $2 }' /proc/meminfo; }
gateways_rss_idle=$(rss_kib "${gateway_pids[@]}")
echo "gateways before any connection: RSS $((gateways_rss_idle / 1024)) MiB in all; $(grep '^TCP:' /proc/net/sockstat); Slab $(( $(meminfo Slab) / 1024 )) MiB"

# 3. The sampler: one CSV line every SAMPLE_EVERY seconds; stops the load
#    generators below MIN_AVAILABLE_MIB.
echo "second,connections,gateways_rss_kib,loadgens_rss_kib,slab_kib,tcp_mem_pages,used_kib,tcp_inuse,load" > "$out/samples.csv"
: > "$out/loadgen.pids"
t0=$(date +%s%N)
(
    while :; do
        sec=$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
        avail=$(meminfo MemAvailable)
        mapfile -t lg < "$out/loadgen.pids"
        echo "$sec,$(connected),$(rss_kib "${gateway_pids[@]}"),$(loadgens_rss_kib),$(meminfo Slab),$(awk '/^TCP:/ { print $NF }' /proc/net/sockstat),$(( $(meminfo MemTotal) - avail )),$(awk '/^TCP:/ { print $3 }' /proc/net/sockstat),$(cut -d' ' -f1 /proc/loadavg)" >> "$out/samples.csv"
        if [ "$avail" -lt $(( min_available_mib * 1024 )) ] && [ ! -e "$out/memory-floor" ]; then
            echo "$sec s: memory available $((avail / 1024)) MiB < $min_available_mib MiB: stopping the load generators" | tee "$out/memory-floor" >&2
            [ "${#lg[@]}" -gt 0 ] && kill "${lg[@]}" 2> /dev/null
        fi
        sleep "$sample_every"
    done
) &
sampler_pid=$!

# 4. The idle shards, one per gateway, paced to CONNECT_RATE in all. Each
#    holds its connections until the chat has run and drained.
shard_rate=$(( (connect_rate + idle_shards - 1) / idle_shards ))
# Each shard holds for `hold` seconds after its own ramp: the shards ramp
# side by side, so they all hold through the chat (its ramp, sends, drain).
ramp_bound=$(( ${RAMP_LIMIT:-900} + 60 ))
hold=$(( chat_duration + 60 ))
shard_pids=()
shard=0
ramp_started=$(date +%s%N)
for file in "$out"/idle-tokens-*; do
    n=$(wc -l < "$file")
    gw=$((shard + 1))
    timeout --kill-after=10 $(( ramp_bound + hold + 120 )) "$loadgen_bin" run idle -n "$n" --tokens "$file" \
        --gateway "tcp://127.0.0.1:$(( $(gateway_port "$gw") + 1 ))" --connect-rate "$shard_rate" \
        --connect-concurrency "$connect_concurrency" --connect-timeout 30 --duration "$hold" --drain 1 --quiet \
        --report "$out/idle-$shard.json" > "$out/idle-$shard.log" 2>&1 &
    shard_pids+=($!)
    helper_pids+=($!)
    echo $! >> "$out/loadgen.pids"
    shard=$((shard + 1))
done

# Wait for the idle ramp: until all are up, the memory floor, no progress
# for 30 s (connections that failed are the shards' to report), or
# RAMP_LIMIT (900) seconds.
idle_up=0
best=0
best_at=$SECONDS
ramp_limit=$(( SECONDS + ${RAMP_LIMIT:-900} ))
while [ "$SECONDS" -lt "$ramp_limit" ]; do
    idle_up=$(connected)
    [ "$idle_up" -ge "$idle" ] && break
    [ -e "$out/memory-floor" ] && break
    if [ "$idle_up" -gt "$best" ]; then best=$idle_up; best_at=$SECONDS; fi
    [ $(( SECONDS - best_at )) -ge 30 ] && break
    any=0; for pid in "${shard_pids[@]}"; do kill -0 "$pid" 2>/dev/null && any=1 && break; done
    [ "$any" = 1 ] || break
    sleep 1
done
ramp_s=$(awk -v a="$ramp_started" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
echo "== idle ramp: $idle_up of $idle up after $ramp_s s ($(awk -v n="$idle_up" -v s="$ramp_s" 'BEGIN { printf "%.0f", n / s }') connections/s); load average $(load_average)"

# 5. The chat through the million: CHAT_CONNECTIONS more, partners on two
#    gateways (cluster) or one (nodes), CHAT_RATE msg/s each.
chat_status=0
# The figures at the peak: every connection up (and the chat running, if any).
sample_peak() {
    peak_connections=$(connected)
    peak_gateways_rss=$(rss_kib "${gateway_pids[@]}")
    peak_loadgens_rss=$(loadgens_rss_kib)
    peak_sockstat=$(grep '^TCP:' /proc/net/sockstat)
    peak_slab=$(meminfo Slab)
    peak_available=$(meminfo MemAvailable)
}
if [ "$chat_gateways" -gt 0 ] && [ ! -e "$out/memory-floor" ]; then
    chat_targets=()
    for k in $(seq 1 "$chat_gateways"); do
        chat_targets+=("tcp://127.0.0.1:$(( $(gateway_port $((idle_shards + k))) + 1 ))")
    done
    echo "== chat: $chat_connections connections at $chat_rate msg/s each for $chat_duration s"
    timeout --kill-after=10 $(( chat_duration + 240 )) "$loadgen_bin" run chat -n "$chat_connections" \
        --tokens "$out/chat-tokens" --gateway "$(IFS=,; echo "${chat_targets[*]}")" \
        --connect-rate 5000 --rate "$chat_rate" --size 100 --duration "$chat_duration" --drain 20 --quiet \
        --report "$out/chat.json" --timeline-png "$out/chat.png" > "$out/chat.log" 2>&1 &
    chat_pid=$!
    helper_pids+=("$chat_pid")
    echo "$chat_pid" >> "$out/loadgen.pids"
    # The peak: every connection up while the chat runs.
    sleep $(( 10 + chat_duration / 2 ))
    sample_peak
    gw_cpu_mid=$(cpu_sum "${gateway_pids[@]}")
    wait "$chat_pid" || chat_status=$?
else
    sample_peak
fi

echo "== at the peak: $peak_connections connections up; load average $(load_average)"
echo "gateways: RSS $((peak_gateways_rss / 1024)) MiB in all ($gateways processes; $((gateways_rss_idle / 1024)) MiB before connections): $(awk -v r="$peak_gateways_rss" -v i="$gateways_rss_idle" -v n="$peak_connections" 'BEGIN { if (n > 0) printf "%.0f bytes per connection in all, %.0f over the empty processes", r * 1024 / n, (r - i) * 1024 / n }')"
echo "load generators: RSS $((peak_loadgens_rss / 1024)) MiB in all"
echo "kernel: $peak_sockstat (mem in pages); Slab $((peak_slab / 1024)) MiB; memory available $((peak_available / 1024)) MiB"
echo "redis: $(redis-cli -p "$redis_port" info memory | awk -F: '/^used_memory_human/ { print $2 }' | tr -d '\r') used, $(redis-cli -p "$redis_port" dbsize | tr -d '\r') keys"
[ -e "$out/memory-floor" ] && cat "$out/memory-floor"

# 6. Reports: the idle shards end their hold by themselves.
for pid in "${shard_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
kill "$sampler_pid" 2>/dev/null || true
wait "$sampler_pid" 2>/dev/null || true
sampler_pid=""
nodes_usage > "$out/nodes-usage.txt" 2>/dev/null || true
echo "processes' CPU seconds: gateways $(cpu_sum "${gateway_pids[@]}") in all; broker + Redis + database $(awk -v a="$(services_cpu)" -v b="$services_before" 'BEGIN { printf "%.2f", a - b }') s ($(services_by_name))"
if [ -s "$out/chat.json" ]; then
    echo; echo "== chat through the million"
    tail -n 12 "$out/chat.log"
fi
idle_reports=("$out"/idle-*.json)
if [ -e "${idle_reports[0]}" ]; then
    echo; echo "== joined report of ${#idle_reports[@]} idle shards"
    "$loadgen_bin" merge "${idle_reports[@]}" --report "$out/idle-merged.json" || true
fi
"$loadgen_bin" ramp-chart "$out/samples.csv" --png "$out/ramp.png" \
    --title "$peak_connections connections, $gateways gateways ($mode)"
echo "ramp chart: $out/ramp.png; samples: $out/samples.csv; reports in $out"
exit "$chat_status"

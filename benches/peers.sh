#!/usr/bin/env bash
# Fanout side by side with other brokers (issue 17): one subject or group,
# every subscriber online on its own connection, one sender bursting
# 100-byte messages, at each size in SIZES, against pingme (release `pingme
# serve`, durable embedded store, `pingme-loadgen run fanout`), a NATS
# server (core pub/sub) and an MQTT broker (QoS 0) through
# `pingme-loadgen peers`, which checks every delivery the same way. The
# brokers alternate within each round. Prints deliveries/s on the machine
# (pingme's over the seconds of its timeline that delivered),
# deliveries per server CPU-second and the ratios to pingme; a broker that is
# not running is named and skipped. Bounded: ROUNDS x sizes x brokers runs of
# RUN_SECONDS each.
#
#   benches/peers.sh                       # builds release binaries
#   PINGME=... LOADGEN=... benches/peers.sh
#
# NATS (127.0.0.1:4222) and MQTT (127.0.0.1:1883) addresses: NATS_ADDR,
# MQTT_ADDR; their process ids for the CPU figures come from pgrep
# (nats-server, mosquitto) or NATS_PID / MQTT_PID. SIZES ("1000 10000"),
# BURST (100), BURST_INTERVAL_MS (20 up to 1,000 subscribers, 50 above), RUN_SECONDS (10), ROUNDS (1),
# DRAIN (30 s: pingme stores every acknowledged send and delivers all of
# them, so at 10,000 subscribers its backlog takes seconds to drain; what
# has not arrived by then counts as lost).
# PINGME_RUN_ARGS: more options for pingme's load generator (e.g.
# "--ack-delay-ms 0" to ack after every read, as before the SDK held acks).
# pingme listens on 18180 (HTTP), 18181 (TCP), 18183 (ops). OUT: reports.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-target}"
[ -n "${PINGME:-}" ] || cargo build --locked -q --release -p pingme-gateway -p pingme-loadgen --bins
pingme="${PINGME:-$target/release/pingme}"
loadgen_bin="${LOADGEN:-$target/release/pingme-loadgen}"
sizes=${SIZES:-1000 10000}
burst=${BURST:-100}
# Bursts every 20 ms up to 1,000 subscribers (5M deliveries/s offered, more
# than any of the brokers delivers here; every 50 ms would offer 2M/s and cap
# pingme there), every 50 ms above (20M/s offered at 10,000: already past
# every broker, and at 50M/s pingme's backlog grows until it cuts slow
# subscribers, who then catch up by fetch longer than DRAIN lasts).
interval_for() {
    if [ -n "${BURST_INTERVAL_MS:-}" ]; then echo "$BURST_INTERVAL_MS"
    elif [ "$1" -le 1000 ]; then echo 20
    else echo 50; fi
}
drain=${DRAIN:-30}
seconds=${RUN_SECONDS:-10}
rounds=${ROUNDS:-1}
nats_addr=${NATS_ADDR:-127.0.0.1:4222}
mqtt_addr=${MQTT_ADDR:-127.0.0.1:1883}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
echo "reports in $out"

port_open() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }
peers=()
if port_open "$nats_addr"; then peers+=(nats); else echo "NATS: nothing listens on $nats_addr, skipped"; fi
if port_open "$mqtt_addr"; then peers+=(mqtt); else echo "MQTT: nothing listens on $mqtt_addr, skipped"; fi
nats_pid=${NATS_PID:-$(pgrep -o -x nats-server || true)}
mqtt_pid=${MQTT_PID:-$(pgrep -o -x mosquitto || true)}

source benches/nodes.sh
nodes_init "$pingme" "$out"
node_yaml="auth: { jwt_secret: peers-benchmark-secret-0123456789, password_hash_memory_kib: 64, password_hash_iterations: 1,
        max_registrations_per_ip: 1000000, max_login_failures_per_ip: 1000000 }
http: { max_connections: 100000, max_connections_per_ip: 100000 }"
api=http://127.0.0.1:18180

# pingme: a fresh node and group per size, so every run starts alike.
run_pingme() {
    local members=$1 report=$2
    stop_node peers
    rm -rf "$out/peers-data"
    start_node peers all 18180 "$node_yaml"
    local group
    group=$("$loadgen_bin" group --api "$api" --members "$members" --user-prefix "p$members" --http-concurrency 128 2>/dev/null)
    "$loadgen_bin" run fanout -n "$members" --register --user-prefix "p$members" --group "$group" \
        --api "$api" --gateway tcp://127.0.0.1:18181 --burst "$burst" --burst-interval-ms "$interval" \
        --size 100 --duration "$seconds" --drain "$drain" --server-pid "$(node_pid peers)" --quiet --report "$report" \
        ${PINGME_RUN_ARGS:-}
}

run_peer() {
    local peer=$1 members=$2 report=$3 addr pid
    if [ "$peer" = nats ]; then addr=$nats_addr pid=$nats_pid; else addr=$mqtt_addr pid=$mqtt_pid; fi
    "$loadgen_bin" peers "$peer" --address "$addr" -n "$members" --burst "$burst" \
        --burst-interval-ms "$interval" --size 100 --duration "$seconds" \
        ${pid:+--server-pid "$pid"} --report "$report"
}

status=0
for round in $(seq "$rounds"); do
    for members in $sizes; do
        interval=$(interval_for "$members")
        echo; echo "== round $round, $members subscribers, bursts of $burst every $interval ms: pingme"
        run_pingme "$members" "$out/pingme-$members-$round.json" || status=$?
        stop_node peers
        for peer in "${peers[@]}"; do
            echo; echo "== round $round, $members subscribers: $peer"
            run_peer "$peer" "$members" "$out/$peer-$members-$round.json" || status=$?
        done
    done
done

echo; echo "== side by side (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
python3 - "$out" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
rows = {}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    name = os.path.basename(path)[:-5]
    broker, members, round_ = name.rsplit("-", 2)
    r = json.load(open(path))
    if broker == "pingme":
        # Over the seconds that delivered (first to last), as the peers'
        # figure runs from the first publish to the last delivery: the
        # report's own rate also counts the idle end of the drain.
        busy = [i for i, sample in enumerate(r["timeline"]) if sample["delivered"] > 0]
        delivered = r["deliveries"]["delivered"]
        rate = delivered / (busy[-1] - busy[0] + 1) if busy else 0.0
        cpu = r.get("server_cpu_s")
        per_cpu = delivered / cpu if cpu else None
        bad = sum(r["deliveries"][k] for k in ("lost", "duplicated", "out_of_order", "stored_twice"))
    else:
        rate = r["deliveries_per_second"]
        per_cpu = r.get("deliveries_per_server_cpu_second")
        bad = r["lost"] + r["duplicated_or_reordered"]
    rows.setdefault((int(members), round_), {})[broker] = (rate, per_cpu, bad)
fmt = lambda x: "-" if x is None else f"{x / 1e6:.2f}M"
print("| subscribers | round | broker | deliveries/s | per server CPU-s | lost+dup+reordered | pingme / broker (deliveries/s) |")
print("|---|---|---|---|---|---|---|")
for (members, round_), brokers in sorted(rows.items()):
    ours = brokers.get("pingme", (None, None, None))[0]
    for broker, (rate, per_cpu, bad) in sorted(brokers.items(), key=lambda kv: kv[0] != "pingme"):
        ratio = "" if broker == "pingme" or not ours or not rate else f"{ours / rate:.2f}x"
        print(f"| {members:,} | {round_} | {broker} | {fmt(rate)} | {fmt(per_cpu)} | {bad} | {ratio} |")
EOF
exit "$status"

#!/usr/bin/env bash
# End-to-end scenarios: starts `pingme serve` (single node, durable embedded
# store, loopback only) and drives it with `pingme-loadgen`, one scenario at
# a time, printing each summary and writing the JSON reports. Every loop is
# bounded: counts and durations come from the settings below.
#
#   benches/e2e.sh                # full run (release binaries; builds them)
#   benches/e2e.sh --smoke        # small and short (CI; uses debug binaries)
#   SCENARIOS="fanout chat" benches/e2e.sh   # only these (default: all)
#   CHAT=19500 CHAT_SHARDS=2 SCENARIOS=chat benches/e2e.sh   # the chat's
#       connections over two load generator processes
#   PINGME=old/pingme LOADGEN=new/pingme-loadgen benches/e2e.sh   # given
#       binaries, nothing built (a build before and after a change, same
#       load generator)
#
# Scenarios: group fanout (one group, every member online, bursts of 100-byte
# messages), huge group (a group of 100,000 with 5,000 members online), idle
# fleet (connect+auth rate, server memory per connection),
# 1:1 chat (every connection sends one message per second; send->deliver
# latency with durable storage). Loss, duplication or reordering makes the
# load generator, and so this script, fail.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=full
[ "${1:-}" = "--smoke" ] && mode=smoke
target="${CARGO_TARGET_DIR:-target}"
if [ "$mode" = smoke ]; then
    profile_dir="$target/debug"
    [ -n "${PINGME:-}" ] || cargo build --locked -q -p pingme-gateway -p pingme-loadgen --bins
    FANOUT_MEMBERS=200 FANOUT_SECONDS=3 FANOUT_BURST=8 IDLE=500 CHAT=200 CHAT_SECONDS=5 CHAT_SHARDS=1
    HUGE_MEMBERS=1000 HUGE_ONLINE=100
else
    profile_dir="$target/release"
    [ -n "${PINGME:-}" ] || cargo build --locked -q --release -p pingme-gateway -p pingme-loadgen --bins
    FANOUT_MEMBERS=${FANOUT_MEMBERS:-5000} FANOUT_SECONDS=${FANOUT_SECONDS:-10} FANOUT_BURST=${FANOUT_BURST:-8}
    IDLE=${IDLE:-19000} CHAT=${CHAT:-10000} CHAT_SECONDS=${CHAT_SECONDS:-30} CHAT_SHARDS=${CHAT_SHARDS:-1}
    HUGE_MEMBERS=${HUGE_MEMBERS:-100000} HUGE_ONLINE=${HUGE_ONLINE:-5000}
fi
pingme="${PINGME:-$profile_dir/pingme}"
loadgen_bin="${LOADGEN:-$profile_dir/pingme-loadgen}"
api=http://127.0.0.1:18080
loadgen() { "$loadgen_bin" "$@" --api "$api" --gateway tcp://127.0.0.1:18081; }
scenarios=" ${SCENARIOS:-fanout huge idle chat} "
wanted() { [[ "$scenarios" == *" $1 "* ]]; }
out="${E2E_OUT:-$(mktemp -d)}"
mkdir -p "$out"
echo "reports in $out"

# One node (benches/nodes.sh): HTTP 18080, TCP 18081, ops 18083.
# Registration is not what is measured: cheap password hashing keeps the
# set-up of thousands of users short, and every user comes from 127.0.0.1,
# so the per-address limits are lifted.
source benches/nodes.sh
nodes_init "$pingme" "$out"
node_yaml="auth: { jwt_secret: e2e-benchmark-secret-0123456789, password_hash_memory_kib: 64, password_hash_iterations: 1,
        max_registrations_per_ip: 1000000, max_login_failures_per_ip: 1000000 }
http: { max_connections: 100000, max_connections_per_ip: 100000 }"
server_pid=""
# A fresh node with an empty store for each scenario.
start_server() {
    stop_node e2e
    rm -rf "$out/e2e-data"
    start_node e2e all 18080 "$node_yaml"
    server_pid=$(node_pid e2e)
}

if wanted fanout; then
    echo; echo "== fanout: one group of $FANOUT_MEMBERS online members, bursts of $FANOUT_BURST x 100 B every 200 ms"
    start_server
    group=$("$loadgen_bin" group --api "$api" --members "$FANOUT_MEMBERS" --user-prefix fo --http-concurrency 128)
    loadgen run fanout -n "$FANOUT_MEMBERS" --register --user-prefix fo --group "$group" \
        --burst "$FANOUT_BURST" --burst-interval-ms 200 --size 100 --duration "$FANOUT_SECONDS" \
        --server-pid "$server_pid" --quiet --report "$out/fanout.json" --timeline-png "$out/fanout.png"
fi

if wanted huge; then
    echo; echo "== huge group: $HUGE_MEMBERS members, $HUGE_ONLINE online, bursts of 8 x 100 B every 200 ms"
    start_server
    group=$("$loadgen_bin" group --api "$api" --members "$HUGE_MEMBERS" --user-prefix huge --http-concurrency 128)
    loadgen run huge-group -n "$HUGE_ONLINE" --register --user-prefix huge --group "$group" \
        --burst 8 --burst-interval-ms 200 --size 100 --duration "$FANOUT_SECONDS" \
        --server-pid "$server_pid" --quiet --report "$out/huge.json"
fi

if wanted idle; then
    echo; echo "== idle fleet: $IDLE authenticated TCP connections, connecting at 2,000 per second"
    start_server
    loadgen run idle -n "$IDLE" --register --user-prefix idle --connect-rate 2000 --duration 5 --drain 0 \
        --server-pid "$server_pid" --quiet --report "$out/idle.json"
fi

if wanted chat; then
    echo; echo "== chat: $CHAT connections, each sends one 1:1 message per second (durable)"
    start_server
    if [ "$CHAT_SHARDS" -le 1 ]; then
        loadgen run chat -n "$CHAT" --register --user-prefix chat --rate 1 --size 100 --duration "$CHAT_SECONDS" \
            --server-pid "$server_pid" --quiet --report "$out/chat.json" --timeline-png "$out/chat.png"
    else
        # One slice of the users per load generator process (a process
        # holds at most 20,000 open files here), started together; each
        # prints its own summary, then the reports are merged.
        chat_pids=()
        for i in $(seq 0 $((CHAT_SHARDS - 1))); do
            loadgen run chat -n "$CHAT" --shard "$i/$CHAT_SHARDS" --register --user-prefix chat --rate 1 \
                --size 100 --duration "$CHAT_SECONDS" --connect-rate $(( 1000 / CHAT_SHARDS )) \
                --server-pid "$server_pid" --quiet --report "$out/chat-$i.json" > "$out/chat-$i.log" 2>&1 &
            chat_pids+=($!)
        done
        status=0
        for pid in "${chat_pids[@]}"; do wait "$pid" || status=$?; done
        for i in $(seq 0 $((CHAT_SHARDS - 1))); do echo "-- load generator $i/$CHAT_SHARDS"; cat "$out/chat-$i.log"; done
        [ "$status" = 0 ] || { echo "a load generator failed ($status)"; exit 1; }
        "$loadgen_bin" merge "$out"/chat-*.json --report "$out/chat.json" --timeline-png "$out/chat.png"
    fi
fi

echo; echo "e2e scenarios passed; reports in $out"

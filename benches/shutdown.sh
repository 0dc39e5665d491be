#!/usr/bin/env bash
# Graceful shutdown under load: one `pingme serve`, N connections of the load
# generator's 1:1 chat (one message per second each), SIGTERM once they are
# all up; prints the time from SIGTERM to the process's exit and its exit
# status. The load generator's own verdict is not the point here (its server
# goes away mid-run); e2e_shutdown (gateway/tests) asserts that every
# accepted send is answered.
#   benches/shutdown.sh PINGME_BINARY LOADGEN_BINARY [N=2000] [BASE_PORT=22080]
set -euo pipefail
bin=${1:?usage: benches/shutdown.sh PINGME_BINARY LOADGEN_BINARY [N] [BASE_PORT]}
loadgen=${2:?pingme-loadgen binary}
n=${3:-2000}
source "$(dirname "$0")/server.sh"
start_server "$bin" "${4:-22080}"
"$loadgen" run chat -n "$n" --register --user-prefix down --rate 1 --size 100 --duration 120 --drain 0 \
    --connect-rate 2000 --api "$api" --gateway "$gateway" --quiet > "$bench_dir/loadgen.log" 2>&1 &
loadgen_pid=$!
# Registering (cheap hashes) and connecting at 2,000/s, then a few seconds
# of steady chat before the signal.
connected=0
for _ in $(seq 600); do
    connected=$(curl -s "http://127.0.0.1:$(( ${4:-22080} + 3 ))/metrics" \
        | awk '/^pingme_connections_active|^pingme_gateway_connections[ {]/ { s += $NF } END { print s + 0 }')
    [ "${connected%.*}" -ge "$n" ] && break
    sleep 0.5
done
sleep 5
start=$(date +%s.%N)
kill -TERM "$server_pid"
status=0
wait "$server_pid" || status=$?
end=$(date +%s.%N)
server_pid=""
kill "$loadgen_pid" 2>/dev/null; wait "$loadgen_pid" 2>/dev/null || true
printf 'SIGTERM -> exit: %.3f s, exit status %s, %s connections (of %s) open at the signal\n' \
    "$(echo "$end - $start" | bc -l)" "$status" "${connected%.*}" "$n"

#!/usr/bin/env bash
# Graceful shutdown under load: one `pingme serve`, N connections of the load
# generator's 1:1 chat (one message per second each), SIGTERM once they are
# all up; prints the time from SIGTERM to the process's exit and its exit
# status. The load generator's own verdict is not the point here (its server
# goes away mid-run); e2e_shutdown (gateway/tests) asserts that every
# accepted send is answered. STRAGGLER also holds one HTTP request half
# sent from just before the signal until the exit: `headers` (the request
# line and part of a header) or `body` (all headers and 1 of 64 body bytes);
# `none` by default. The load generator registers N users from one address:
# lift the server's per-address limits and make hashing cheap through
# EXTRA_YAML (benches/server.sh), e.g.
#   EXTRA_YAML='auth: { password_hash_memory_kib: 64, password_hash_iterations: 1, max_registrations_per_ip: 1000000, max_login_failures_per_ip: 1000000 }'
#   benches/shutdown.sh PINGME_BINARY LOADGEN_BINARY [N=2000] [BASE_PORT=22080] [STRAGGLER=none]
set -euo pipefail
bin=${1:?usage: benches/shutdown.sh PINGME_BINARY LOADGEN_BINARY [N] [BASE_PORT] [none|headers|body]}
loadgen=${2:?pingme-loadgen binary}
n=${3:-2000}
straggler=${5:-none}
case $straggler in
    none) request="" ;;
    headers) request='POST /v1/auth/login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-' ;;
    body) request='POST /v1/auth/login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n{' ;;
    *) echo "STRAGGLER is none, headers or body, not $straggler"; exit 64 ;;
esac
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
        | awk '/^pingme_connections_active|^pingme_gateway_connections[ {]/ { s += $NF } END { print s + 0 }') || true
    [ "${connected%.*}" -ge "$n" ] && break
    kill -0 "$loadgen_pid" 2>/dev/null || break
    sleep 0.5
done
if [ "${connected%.*}" -lt "$n" ]; then
    echo "only ${connected%.*} of $n connections came up; load generator:"; tail -n 5 "$bench_dir/loadgen.log"; exit 1
fi
sleep 5
if [ -n "$request" ]; then
    # Held open on descriptor 3 until the server has exited; a moment for
    # the server to read what was sent.
    exec 3<> "/dev/tcp/127.0.0.1/${4:-22080}"
    printf '%b' "$request" >&3
    sleep 0.5
fi
start=$(date +%s.%N)
kill -TERM "$server_pid"
status=0
wait "$server_pid" || status=$?
end=$(date +%s.%N)
server_pid=""
unset 'node_pids[server]'  # reaped above
[ -n "$request" ] && exec 3>&-
kill "$loadgen_pid" 2>/dev/null || true; wait "$loadgen_pid" 2>/dev/null || true
printf 'SIGTERM -> exit: %.3f s, exit status %s, %s connections (of %s) open at the signal, straggler: %s\n' \
    "$(echo "$end - $start" | bc -l)" "$status" "${connected%.*}" "$n" "$straggler"

#!/usr/bin/env bash
# Login throughput of one `pingme serve` at the default password-hashing
# cost: P users, N logins (login i as user i mod P, each on its own device
# id) P at a time, over HTTP with curl. Prints how many succeeded, logins
# per second and the answers' statuses.
#   benches/login_rate.sh PINGME_BINARY [N=200] [P=8] [BASE_PORT=20080]
set -euo pipefail
bin=${1:?usage: benches/login_rate.sh PINGME_BINARY [N] [P] [BASE_PORT]}
n=${2:-200}
parallel=${3:-8}
# The server at its default hashing cost: no EXTRA_YAML from the caller.
EXTRA_YAML=
source "$(dirname "$0")/server.sh"
start_server "$bin" "${4:-20080}"
auth="$api/v1/auth"
for u in $(seq 0 $((parallel - 1))); do
    curl -sf -X POST -H 'content-type: application/json' \
        -d "{\"username\":\"bench$u\",\"password\":\"bench-password\"}" "$auth/register" > /dev/null
done
start=$(date +%s.%N)
seq "$n" | awk -v p="$parallel" '{print $1 % p, $1}' | xargs -P "$parallel" -L1 sh -c \
    'curl -s -o /dev/null -w "%{http_code}\n" -X POST -H "content-type: application/json" \
        -d "{\"username\":\"bench$2\",\"password\":\"bench-password\",\"device_id\":\"d$3\"}" "$1/login"' \
    _ "$auth" > "$bench_dir/codes"
end=$(date +%s.%N)
ok=$(grep -c '^200$' "$bench_dir/codes" || true)
rate=$(echo "$n / ($end - $start)" | bc -l)
printf '%s/%s logins ok, %.1f logins/s (%s in parallel); answers: %s\n' "$ok" "$n" "$rate" "$parallel" \
    "$(sort "$bench_dir/codes" | uniq -c | awk '{printf "%s %s  ", $1, $2}')"

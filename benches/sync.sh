#!/usr/bin/env bash
# Offline sync: one `pingme serve`, a backlog of MESSAGES x SIZE bytes in a
# DM written while the recipient is offline, then the recipient syncs it
# ROUNDS times as a new device (client/examples/sync_time.rs prints each
# round's time; it exits non-zero if a round is cut or misses a message).
#   benches/sync.sh PINGME_BINARY SYNC_TIME_BINARY [MESSAGES=10000] [SIZE=100] [ROUNDS=3] [BASE_PORT=21080]
set -euo pipefail
bin=${1:?usage: benches/sync.sh PINGME_BINARY SYNC_TIME_BINARY [MESSAGES] [SIZE] [ROUNDS] [BASE_PORT]}
sync_time=${2:?sync_time binary (cargo build --release -p pingme-client --example sync_time)}
source "$(dirname "$0")/server.sh"
start_server "$bin" "${6:-21080}"
"$sync_time" --api "$api" --gateway "$gateway" --messages "${3:-10000}" --size "${4:-100}" --rounds "${5:-3}"

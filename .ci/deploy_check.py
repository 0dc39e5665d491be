#!/usr/bin/env python3
"""Checks that the deployment kit in deploy/ agrees with itself and with
the binary (called by .ci/deploy-check.sh, which runs the tools' own checks:
promtool, haproxy -c, hadolint, docker-compose config).

  deploy_check.py METRICS_FILE      METRICS_FILE: the output of `pingme metrics`
  deploy_check.py --self-test METRICS_FILE

What it checks:
- every metric named by a Grafana panel or an alert rule is one the binary
  exports (a histogram also as _bucket/_sum/_count), or Prometheus' own `up`;
- the compose file's pingme nodes are the ones Prometheus scrapes, its
  gateways are the ones HAProxy balances, on the ports pingme.cluster.yaml
  listens on; every node gets the seed's environment names;
- every file the compose file mounts exists; Grafana's datasource uid and
  dashboard folder are the ones the dashboard and the compose file use.
--self-test also proves that a panel or a rule on a metric the binary does
not export is caught.
"""

import copy
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

# Series Prometheus makes itself (per scrape target), not the binary.
PROMETHEUS_SERIES = {"up"}
# Environment names of the seed every pingme node is configured with.
SEED_ENV = [
    "APP_ENV", "JWT_SECRET", "DB_HOST", "DB_PORT", "DB_USERNAME", "DB_PASSWORD",
    "DB_NAME", "REDIS_HOST", "REDIS_PORT", "KAFKA_BROKERS",
]
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
    "unless", "bool", "offset", "inf", "nan",
}


def load_yaml(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def exported_metrics(path):
    """Names `pingme metrics` lists (name, kind, help per line), expanded to
    the series names Prometheus stores for each kind."""
    names = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        name, kind = line.split()[:2]
        names.add(name)
        if kind in ("histogram", "summary"):
            names.update({f"{name}_sum", f"{name}_count"})
        if kind == "histogram":
            names.add(f"{name}_bucket")
    if not names:
        raise SystemExit(f"{path}: no metrics listed")
    return names


def promql_metric_names(expr):
    """Metric names in a PromQL expression: identifiers that are not
    functions, keywords, label names or grouping labels."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr
    )
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", expr):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def dashboard_exprs(dashboard):
    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield f"panel {panel.get('title')!r}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and query:
            inner = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", query)
            yield f"variable {variable.get('name')!r}", inner.group(1) if inner else query


def rule_exprs(rules):
    for group in rules.get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert") or rule.get("record")
            yield f"rule {name!r}", str(rule["expr"])


def unknown_metrics(sources, known):
    errors = []
    for where, expr in sources:
        names = promql_metric_names(expr)
        if not names:
            errors.append(f"{where}: no metric in {expr!r}")
        for name in sorted(names - known - PROMETHEUS_SERIES):
            errors.append(f"{where}: `{name}` is not a metric the binary exports")
    return errors


def check_metrics(dashboard, rules, known):
    return unknown_metrics(dashboard_exprs(dashboard), known) + unknown_metrics(
        rule_exprs(rules), known
    )


def port_of(address):
    return int(str(address).rsplit(":", 1)[1])


def check_wiring(compose, prometheus, haproxy_cfg, cluster_config, grafana_ds, grafana_dash, dashboard):
    errors = []
    services = compose["services"]
    nodes = {
        name: svc for name, svc in services.items()
        if "serve" in (svc.get("command") or [])
    }
    gateways = sorted(n for n, s in nodes.items() if "gateway" in s["command"])
    workers = sorted(n for n, s in nodes.items() if "worker" in s["command"])
    if len(gateways) < 2 or len(workers) < 2:
        errors.append(f"compose: want 2+ gateways and 2+ workers, have {gateways} and {workers}")
    for needed in ("haproxy", "kafka", "redis", "mysql", "scylla", "prometheus", "grafana"):
        if needed not in services:
            errors.append(f"compose: no `{needed}` service")

    for name, svc in nodes.items():
        env = svc.get("environment") or {}
        missing = [var for var in SEED_ENV if var not in env]
        if missing:
            errors.append(f"compose: {name} lacks {missing}")
    gateway_ids = [services[g].get("environment", {}).get("APP_GATEWAY_ID") for g in gateways]
    if None in gateway_ids or len(set(gateway_ids)) != len(gateway_ids):
        errors.append(f"compose: every gateway needs its own APP_GATEWAY_ID, have {gateway_ids}")

    listeners = cluster_config["listeners"]
    ops_port = port_of(listeners["metrics"])
    scraped = set()
    for job in prometheus["scrape_configs"]:
        for static in job.get("static_configs", []):
            scraped.update(static["targets"])
    expected = {f"{name}:{ops_port}" for name in nodes}
    if scraped != expected:
        errors.append(f"prometheus: scrapes {sorted(scraped)}, compose has {sorted(expected)}")

    # HAProxy: each backend lists every gateway on one gateway port; the
    # health check goes to the ops port.
    gateway_ports = {port_of(listeners["tcp"]), port_of(listeners["tls"]), cluster_config["app"]["port"]}
    backends, current = {}, None
    for line in haproxy_cfg.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] in ("global", "defaults", "frontend", "backend", "resolvers", "listen"):
            current = words[1] if words[0] == "backend" else None
            if current:
                backends[current] = []
        elif words[0] == "server" and current:
            backends[current].append(words[2])
        elif words[0] == "default-server" and f"port {ops_port}" not in line:
            errors.append(f"haproxy: health checks must go to the ops port {ops_port}")
    seen_ports = set()
    for backend, servers in backends.items():
        hosts = sorted(s.rsplit(":", 1)[0] for s in servers)
        ports = {port_of(s) for s in servers}
        seen_ports |= ports
        if hosts != gateways:
            errors.append(f"haproxy: backend {backend} has {hosts}, compose gateways are {gateways}")
        if len(ports) != 1:
            errors.append(f"haproxy: backend {backend} mixes ports {sorted(ports)}")
    if seen_ports != gateway_ports:
        errors.append(f"haproxy: balances ports {sorted(seen_ports)}, gateways listen on {sorted(gateway_ports)}")

    # Files and folders the compose file mounts from deploy/.
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith(".") and not (DEPLOY / source).exists():
                errors.append(f"compose: {name} mounts {source}, which does not exist")

    # Grafana: the dashboard's datasource is the provisioned one, and the
    # provider reads the folder the compose file mounts the dashboards at.
    uids = {ds["uid"] for ds in grafana_ds["datasources"]}
    used = set()
    for panel in dashboard["panels"]:
        for item in [panel] + panel.get("targets", []):
            if isinstance(item.get("datasource"), dict):
                used.add(item["datasource"]["uid"])
    if not used <= uids:
        errors.append(f"grafana: dashboard uses datasources {sorted(used - uids)} that are not provisioned")
    paths = {p["options"]["path"] for p in grafana_dash["providers"]}
    mounts = {v.split(":")[1] for v in services["grafana"]["volumes"] if ":" in v}
    if not paths <= mounts:
        errors.append(f"grafana: provider reads {sorted(paths)}, compose mounts {sorted(mounts)}")
    return errors


def main(argv):
    self_test = "--self-test" in argv
    args = [a for a in argv if a != "--self-test"]
    if len(args) != 1:
        raise SystemExit(__doc__)
    known = exported_metrics(args[0])
    dashboard = json.loads((DEPLOY / "grafana/dashboards/pingme.json").read_text(encoding="utf-8"))
    rules = load_yaml(DEPLOY / "prometheus/alerts.yml")

    if self_test:
        broken = copy.deepcopy(dashboard)
        broken["panels"][1]["targets"].append({"expr": "sum(rate(pingme_no_such_metric_total[5m]))"})
        broken_rules = copy.deepcopy(rules)
        broken_rules["groups"][0]["rules"][0]["expr"] = 'pingme_not_exported{job="pingme"} == 0'
        caught = check_metrics(broken, broken_rules, known)
        if not any("pingme_no_such_metric_total" in e for e in caught) or not any(
            "pingme_not_exported" in e for e in caught
        ):
            print("self-test: unknown metrics were not caught", file=sys.stderr)
            return 1
        assert promql_metric_names(
            'histogram_quantile(0.99, sum by (instance, le) (rate(a_b_bucket{x="y"}[5m]))) > 0.1 and on (instance) c'
        ) == {"a_b_bucket", "c"}
        print("self-test: ok (unknown metrics in a panel and in a rule are caught)")

    errors = check_metrics(dashboard, rules, known)
    errors += check_wiring(
        load_yaml(DEPLOY / "compose.yaml"),
        load_yaml(DEPLOY / "prometheus/prometheus.yml"),
        (DEPLOY / "haproxy.cfg").read_text(encoding="utf-8"),
        load_yaml(DEPLOY / "pingme.cluster.yaml"),
        load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml"),
        load_yaml(DEPLOY / "grafana/provisioning/dashboards/pingme.yaml"),
        dashboard,
    )
    for error in errors:
        print(f"deploy check: {error}", file=sys.stderr)
    if errors:
        return 1
    panels = sum(1 for _ in dashboard_exprs(dashboard))
    alerts = sum(1 for _ in rule_exprs(rules))
    print(f"deploy check: ok ({panels} dashboard queries and {alerts} rules on {len(known)} exported series names; compose, HAProxy, Prometheus and Grafana agree)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

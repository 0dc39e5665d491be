//! The list of every metric the `pingme` binary exports on its ops port,
//! with kind and help text. It is read back from the same `describe_*`
//! calls that label `/metrics`, so it cannot drift from them: `pingme
//! metrics` prints it, and the deployment checks (.ci/deploy-check.sh) hold
//! the Grafana dashboard and the Prometheus alert rules to it.

use std::sync::Mutex;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MetricKind {
    /// Only goes up (Prometheus `counter`).
    Counter,
    /// A value that is set (Prometheus `gauge`).
    Gauge,
    /// Observations in buckets (Prometheus `histogram`: `_bucket`, `_sum`,
    /// `_count`).
    Histogram,
}

impl MetricKind {
    /// The Prometheus `# TYPE` word.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// One exported metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedMetric {
    /// The metric family's name, e.g. `pingme_router_messages_accepted_total`.
    pub name: String,
    /// Its kind.
    pub kind: MetricKind,
    /// Its help text.
    pub help: String,
}

/// Describes every metric of every part of the binary in the installed
/// recorder (the API and process, the connections, the router).
pub fn describe_all() {
    crate::ops::describe_metrics();
    crate::server::describe_metrics();
    pingme_router::telemetry::describe();
}

/// Every metric [`describe_all`] describes, sorted by name.
pub fn list() -> Vec<ExportedMetric> {
    let collector = Collector::default();
    metrics::with_local_recorder(&collector, describe_all);
    let mut metrics = collector
        .described
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    metrics.sort_by(|a, b| a.name.cmp(&b.name));
    metrics.dedup_by(|a, b| a.name == b.name);
    metrics
}

/// A recorder that only keeps descriptions (recording is a no-op).
#[derive(Default)]
struct Collector {
    described: Mutex<Vec<ExportedMetric>>,
}

impl Collector {
    fn keep(&self, name: KeyName, kind: MetricKind, help: SharedString) {
        let metric = ExportedMetric {
            name: name.as_str().to_string(),
            kind,
            help: help.to_string(),
        };
        self.described
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(metric);
    }
}

impl Recorder for Collector {
    fn describe_counter(&self, key: KeyName, _unit: Option<Unit>, help: SharedString) {
        self.keep(key, MetricKind::Counter, help);
    }

    fn describe_gauge(&self, key: KeyName, _unit: Option<Unit>, help: SharedString) {
        self.keep(key, MetricKind::Gauge, help);
    }

    fn describe_histogram(&self, key: KeyName, _unit: Option<Unit>, help: SharedString) {
        self.keep(key, MetricKind::Histogram, help);
    }

    fn register_counter(&self, _key: &Key, _metadata: &Metadata<'_>) -> Counter {
        Counter::noop()
    }

    fn register_gauge(&self, _key: &Key, _metadata: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _key: &Key, _metadata: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_every_part_of_the_binary_once_with_its_kind() {
        let metrics = list();
        let kind_of = |name: &str| {
            metrics
                .iter()
                .find(|m| m.name == name)
                .map(|m| m.kind)
                .unwrap_or_else(|| panic!("{name} not listed"))
        };
        assert_eq!(kind_of(crate::ops::HTTP_REQUESTS), MetricKind::Counter);
        assert_eq!(kind_of(crate::ops::READY), MetricKind::Gauge);
        assert_eq!(kind_of("pingme_gateway_connections"), MetricKind::Gauge);
        assert_eq!(
            kind_of(pingme_router::telemetry::APPEND_SECONDS),
            MetricKind::Histogram
        );
        assert_eq!(
            kind_of(pingme_router::telemetry::DLQ_SIZE),
            MetricKind::Gauge
        );
        assert!(metrics.iter().all(|m| !m.help.is_empty()), "{metrics:?}");
    }
}

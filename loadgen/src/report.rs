//! The machine-readable report: latency summaries (with the recorded
//! histogram buckets, so reports of several processes merge exactly up to
//! histogram precision), counts, rates and a per-second time series; the
//! `merge` subcommand's logic; a CSV of the time series for plotting.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::accounting::DeliveryCounts;

/// Latencies are recorded in microseconds, up to an hour.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// A latency distribution as reported.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Mean, microseconds.
    pub mean_us: f64,
    /// Median, microseconds.
    pub p50_us: u64,
    /// 90th percentile, microseconds.
    pub p90_us: u64,
    /// 99th percentile, microseconds.
    pub p99_us: u64,
    /// 99.9th percentile, microseconds.
    pub p999_us: u64,
    /// Maximum, microseconds.
    pub max_us: u64,
    /// The recorded buckets (value, count), for merging.
    pub buckets: Vec<(u64, u64)>,
}

impl LatencySummary {
    /// Summarises a histogram.
    pub fn of(histogram: &Histogram<u64>) -> LatencySummary {
        if histogram.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: histogram.len(),
            mean_us: histogram.mean(),
            p50_us: histogram.value_at_quantile(0.50),
            p90_us: histogram.value_at_quantile(0.90),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
            buckets: histogram
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        }
    }

    /// The histogram back from the buckets.
    pub fn histogram(&self) -> Histogram<u64> {
        let mut histogram = new_histogram();
        for (value, count) in &self.buckets {
            histogram.saturating_record_n(*value, *count);
        }
        histogram
    }

    /// Both distributions as one.
    pub fn merged(&self, other: &LatencySummary) -> LatencySummary {
        let mut histogram = self.histogram();
        histogram
            .add(other.histogram())
            .expect("same bounds on both sides");
        LatencySummary::of(&histogram)
    }
}

/// One second of the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// Seconds since the start.
    pub second: u64,
    /// Connections up at the end of this second.
    pub connected: u64,
    /// Connections established during this second.
    pub connects: u64,
    /// Sends acknowledged during this second.
    pub acked: u64,
    /// Messages delivered during this second.
    pub delivered: u64,
    /// Errors during this second.
    pub errors: u64,
    /// p99 send-to-ack over this second, microseconds (0 without sends).
    pub ack_p99_us: u64,
    /// Median send-to-deliver over this second, microseconds (0 without
    /// deliveries; absent in reports from before it was recorded).
    #[serde(default)]
    pub deliver_p50_us: u64,
    /// p99 send-to-deliver over this second, microseconds (0 without deliveries).
    #[serde(default)]
    pub deliver_p99_us: u64,
}

/// The larger of two optional figures (processes that watched the same
/// server over the same phase).
fn max_of(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// A time when connections were down: from the first drop while all were
/// up until every dropped one authenticated again.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Outage {
    /// The first drop, Unix milliseconds.
    pub started_unix_ms: u64,
    /// When the last dropped connection was back (absent: some never were).
    pub all_back_unix_ms: Option<u64>,
    /// Connections that dropped during it.
    pub connections: u64,
}

impl Outage {
    /// From the first drop until all were back, seconds.
    pub fn all_back_after_s(&self) -> Option<f64> {
        self.all_back_unix_ms
            .map(|back| back.saturating_sub(self.started_unix_ms) as f64 / 1000.0)
    }

    /// The outages of processes that ran side by side, overlapping ones
    /// joined: one kill seen by every shard is one outage, over when the
    /// last shard's connections are back.
    pub fn joined(outages: impl IntoIterator<Item = Outage>) -> Vec<Outage> {
        let mut all: Vec<Outage> = outages.into_iter().collect();
        all.sort_by_key(|o| o.started_unix_ms);
        let mut joined: Vec<Outage> = Vec::new();
        for outage in all {
            match joined.last_mut() {
                // Still open, or over after this one began: the same episode.
                Some(last)
                    if last
                        .all_back_unix_ms
                        .is_none_or(|back| back >= outage.started_unix_ms) =>
                {
                    last.connections += outage.connections;
                    last.all_back_unix_ms = match (last.all_back_unix_ms, outage.all_back_unix_ms) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        _ => None,
                    };
                }
                _ => joined.push(outage),
            }
        }
        joined
    }
}

/// The report of one process, or the merge of several.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Shards this report covers (`["0/1"]`, or several after a merge).
    pub shards: Vec<String>,
    /// Connections asked for.
    pub connections_target: u64,
    /// Connections that got through connect + auth at least once.
    pub connections_established: u64,
    /// Connect or auth failures.
    pub connect_failures: u64,
    /// Sends answered with an error or never answered.
    pub send_failures: u64,
    /// Reconnects done (reconnect-storm).
    pub reconnects: u64,
    /// Wall time of the measured phase, seconds.
    pub duration_s: f64,
    /// Connections per second achieved during the ramp.
    pub connect_rate: f64,
    /// Delivered messages per second over the measured phase.
    pub delivered_per_s: f64,
    /// Server memory per connection from VmRSS, bytes (idle with `--server-pid`).
    pub server_bytes_per_connection: Option<f64>,
    /// Server CPU time (user + system) over the measured phase and drain,
    /// seconds (with `--server-pid`): per-core figures on a machine the
    /// load generator shares.
    #[serde(default)]
    pub server_cpu_s: Option<f64>,
    /// Server CPU time over the ramp (connect + authenticate), seconds.
    #[serde(default)]
    pub server_ramp_cpu_s: Option<f64>,
    /// Connect + authenticate.
    pub connect_latency: LatencySummary,
    /// Send until SendAck.
    pub send_to_ack: LatencySummary,
    /// Send until the recipient got the Deliver.
    pub send_to_deliver: LatencySummary,
    /// From a drop until the connection authenticated again.
    #[serde(default)]
    pub reconnect_latency: LatencySummary,
    /// Sends sent again with the same client_msg_id (after a reconnect or
    /// a "later" answer).
    #[serde(default)]
    pub resent: u64,
    /// Fetches of a gap a live connection saw for more than a second.
    #[serde(default)]
    pub gap_fetches: u64,
    /// Times when connections were down, and how long until all were back.
    #[serde(default)]
    pub outages: Vec<Outage>,
    /// Lost, duplicated, reordered.
    pub deliveries: DeliveryCounts,
    /// Free-form parameters of the run.
    pub parameters: BTreeMap<String, String>,
    /// Per-second samples (summed per second across merged reports).
    pub timeline: Vec<Sample>,
}

impl Report {
    /// Whether the run saw lost, duplicated or reordered messages.
    pub fn has_errors(&self) -> bool {
        self.deliveries.has_errors()
    }

    /// Combines the reports of processes that ran side by side.
    pub fn merge(reports: &[Report]) -> Result<Report, String> {
        let Some(first) = reports.first() else {
            return Err("nothing to merge".into());
        };
        let mut merged = Report {
            scenario: first.scenario.clone(),
            parameters: first.parameters.clone(),
            ..Report::default()
        };
        let mut timeline: BTreeMap<u64, Sample> = BTreeMap::new();
        for report in reports {
            if report.scenario != merged.scenario {
                return Err(format!(
                    "cannot merge scenario {:?} with {:?}",
                    report.scenario, merged.scenario
                ));
            }
            merged.shards.extend(report.shards.iter().cloned());
            merged.connections_target += report.connections_target;
            merged.connections_established += report.connections_established;
            merged.connect_failures += report.connect_failures;
            merged.send_failures += report.send_failures;
            merged.reconnects += report.reconnects;
            merged.duration_s = merged.duration_s.max(report.duration_s);
            // Processes ran side by side: their rates add up.
            merged.connect_rate += report.connect_rate;
            merged.delivered_per_s += report.delivered_per_s;
            merged.connect_latency = merged.connect_latency.merged(&report.connect_latency);
            merged.send_to_ack = merged.send_to_ack.merged(&report.send_to_ack);
            merged.send_to_deliver = merged.send_to_deliver.merged(&report.send_to_deliver);
            merged.reconnect_latency = merged.reconnect_latency.merged(&report.reconnect_latency);
            merged.resent += report.resent;
            merged.gap_fetches += report.gap_fetches;
            merged.outages.extend(report.outages.iter().cloned());
            merged.deliveries.merge(&report.deliveries);
            merged.server_bytes_per_connection = merged
                .server_bytes_per_connection
                .or(report.server_bytes_per_connection);
            // Every process watched the same server over the same phase.
            merged.server_cpu_s = max_of(merged.server_cpu_s, report.server_cpu_s);
            merged.server_ramp_cpu_s = max_of(merged.server_ramp_cpu_s, report.server_ramp_cpu_s);
            for sample in &report.timeline {
                let slot = timeline.entry(sample.second).or_insert_with(|| Sample {
                    second: sample.second,
                    ..Sample::default()
                });
                slot.connected += sample.connected;
                slot.connects += sample.connects;
                slot.acked += sample.acked;
                slot.delivered += sample.delivered;
                slot.errors += sample.errors;
                // Not mergeable exactly; the worst shard is the honest bound.
                slot.ack_p99_us = slot.ack_p99_us.max(sample.ack_p99_us);
                slot.deliver_p50_us = slot.deliver_p50_us.max(sample.deliver_p50_us);
                slot.deliver_p99_us = slot.deliver_p99_us.max(sample.deliver_p99_us);
            }
        }
        merged.shards.sort();
        merged.outages = Outage::joined(std::mem::take(&mut merged.outages));
        merged.timeline = timeline.into_values().collect();
        Ok(merged)
    }

    /// The time series as CSV (for plotting with any tool).
    pub fn timeline_csv(&self) -> String {
        let mut csv = String::from(
            "second,connected,connects,acked,delivered,errors,ack_p99_us,deliver_p50_us,deliver_p99_us\n",
        );
        for s in &self.timeline {
            csv.push_str(&format!(
                "{},{},{},{},{},{},{},{},{}\n",
                s.second,
                s.connected,
                s.connects,
                s.acked,
                s.delivered,
                s.errors,
                s.ack_p99_us,
                s.deliver_p50_us,
                s.deliver_p99_us
            ));
        }
        csv
    }

    /// A human-readable summary for the terminal.
    pub fn print_summary(&self) {
        let line = |name: &str, l: &LatencySummary| {
            if l.count > 0 {
                println!(
                    "{name:<16} n={:<9} p50={:>8}us p90={:>8}us p99={:>8}us p99.9={:>8}us max={:>8}us",
                    l.count, l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
                );
            }
        };
        println!(
            "scenario {} shards {:?}: {}/{} connections, {} connect failures, {:.0} conn/s",
            self.scenario,
            self.shards,
            self.connections_established,
            self.connections_target,
            self.connect_failures,
            self.connect_rate
        );
        line("connect+auth", &self.connect_latency);
        line("send->ack", &self.send_to_ack);
        line("send->deliver", &self.send_to_deliver);
        line("drop->back", &self.reconnect_latency);
        let d = &self.deliveries;
        println!(
            "delivered {} of {} expected ({:.0}/s): lost {}, duplicated {}, out of order {}, stored twice {}; send failures {}; reconnects {}",
            d.delivered,
            d.expected,
            self.delivered_per_s,
            d.lost,
            d.duplicated,
            d.out_of_order,
            d.stored_twice,
            self.send_failures,
            self.reconnects
        );
        if self.reconnects > 0 || d.recovered > 0 || self.resent > 0 || d.redelivered > 0 {
            println!(
                "recovery: {} recovered by fetch ({} gap fetches on live connections), {} seen both pushed and fetched, {} sends sent again, {} pushed again",
                d.recovered, self.gap_fetches, d.overlaps, self.resent, d.redelivered
            );
        }
        for outage in &self.outages {
            match outage.all_back_after_s() {
                Some(seconds) => println!(
                    "outage: {} connections dropped, all back after {seconds:.2} s",
                    outage.connections
                ),
                None => println!(
                    "outage: {} connections dropped, NOT all back by the end",
                    outage.connections
                ),
            }
        }
        if let Some(bytes) = self.server_bytes_per_connection {
            println!("server memory: {bytes:.0} bytes per connection (VmRSS delta)");
        }
        if let Some(cpu) = self.server_ramp_cpu_s.filter(|cpu| *cpu > 0.0) {
            println!(
                "server CPU over the ramp: {cpu:.2} s; {:.0} connect+auth per server CPU-second",
                self.connections_established as f64 / cpu
            );
        }
        let delivered = self.delivered_per_s * self.duration_s;
        if let Some(cpu) = self
            .server_cpu_s
            .filter(|cpu| *cpu > 0.0 && delivered > 0.0)
        {
            println!(
                "server CPU: {cpu:.2} s over {:.1} s ({:.0}% of one core); {:.0} deliveries per server CPU-second",
                self.duration_s,
                100.0 * cpu / self.duration_s.max(1e-3),
                delivered / cpu
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram_of(values: impl IntoIterator<Item = u64>) -> Histogram<u64> {
        let mut h = new_histogram();
        for v in values {
            h.record(v).unwrap();
        }
        h
    }

    #[test]
    fn summary_percentiles_follow_the_samples() {
        let summary = LatencySummary::of(&histogram_of(1..=1000));
        assert_eq!(summary.count, 1000);
        assert_eq!(summary.p50_us, 500);
        assert_eq!(summary.p90_us, 900);
        assert_eq!(summary.p99_us, 990);
        assert_eq!(summary.p999_us, 999);
        assert_eq!(summary.max_us, 1000);
        assert!((summary.mean_us - 500.5).abs() < 1.0);
        assert_eq!(
            LatencySummary::of(&new_histogram()),
            LatencySummary::default()
        );
    }

    #[test]
    fn merging_reports_adds_counts_and_combines_distributions() {
        let mut a = Report {
            scenario: "chat".into(),
            shards: vec!["0/2".into()],
            connections_target: 10,
            connections_established: 10,
            connect_rate: 100.0,
            send_to_ack: LatencySummary::of(&histogram_of(1..=500)),
            deliveries: DeliveryCounts {
                expected: 5,
                delivered: 5,
                ..Default::default()
            },
            timeline: vec![Sample {
                second: 1,
                connected: 10,
                acked: 3,
                ack_p99_us: 40,
                ..Default::default()
            }],
            ..Report::default()
        };
        let b = Report {
            shards: vec!["1/2".into()],
            send_to_ack: LatencySummary::of(&histogram_of(501..=1000)),
            deliveries: DeliveryCounts {
                expected: 5,
                delivered: 4,
                lost: 1,
                ..Default::default()
            },
            timeline: vec![
                Sample {
                    second: 1,
                    connected: 7,
                    acked: 2,
                    ack_p99_us: 90,
                    ..Default::default()
                },
                Sample {
                    second: 2,
                    connected: 7,
                    ..Default::default()
                },
            ],
            ..a.clone()
        };
        a.connections_established = 10;
        // Round trip through JSON, as the merge subcommand reads files.
        let b: Report = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        let merged = Report::merge(&[a, b]).unwrap();
        assert_eq!(merged.shards, vec!["0/2", "1/2"]);
        assert_eq!(merged.connections_target, 20);
        assert_eq!(merged.connect_rate, 200.0);
        assert_eq!(merged.send_to_ack.count, 1000);
        assert_eq!(merged.send_to_ack.p50_us, 500);
        assert_eq!(merged.send_to_ack.p99_us, 990);
        assert_eq!(merged.deliveries.lost, 1);
        assert!(merged.has_errors());
        assert_eq!(merged.timeline.len(), 2);
        assert_eq!(merged.timeline[0].connected, 17);
        assert_eq!(merged.timeline[0].acked, 5);
        assert_eq!(merged.timeline[0].ack_p99_us, 90);
        assert!(merged.timeline_csv().starts_with("second,connected"));
        assert!(Report::merge(&[]).is_err());
        let other = Report {
            scenario: "idle".into(),
            ..Report::default()
        };
        assert!(Report::merge(&[merged, other]).is_err());
    }

    #[test]
    fn overlapping_outages_of_shards_join_into_one() {
        let outage = |start, back: Option<u64>, connections| Outage {
            started_unix_ms: start,
            all_back_unix_ms: back,
            connections,
        };
        let joined = Outage::joined([
            outage(5_000, Some(6_500), 40),
            outage(1_000, Some(2_000), 10),
            outage(1_200, Some(3_000), 12),
            outage(7_000, None, 3),
            outage(7_100, Some(7_200), 1),
        ]);
        assert_eq!(
            joined,
            vec![
                outage(1_000, Some(3_000), 22),
                outage(5_000, Some(6_500), 40),
                outage(7_000, None, 4),
            ]
        );
        assert_eq!(joined[0].all_back_after_s(), Some(2.0));
        assert_eq!(joined[2].all_back_after_s(), None);
    }
}

//! Downstream topics of gateways gone for long: found and reported, never
//! deleted. A gateway that stops for good leaves its
//! `downstream-topic-{gateway_id}` behind, and records may still be
//! published to it until its lease ends; after that nothing reads or
//! writes it. Workers look for such topics now and then (the brokers list
//! the topics, the Redis directory says when each gateway's lease ended)
//! and report them in the log and in `pingme_kafka_stale_downstream_topics`,
//! so an operator deletes them (or restarts the gateway, which resumes it).

use std::sync::Arc;
use std::time::Duration;

use crate::bus::KafkaBus;
use crate::directory::Clock;
use crate::redis_directory::RedisDirectory;
use crate::telemetry;

/// One downstream topic whose gateway is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleDownstream {
    /// The topic.
    pub topic: String,
    /// Its gateway id (the topic name without the prefix).
    pub gateway: String,
    /// When the gateway's last lease ended (Unix ms); `None`: no lease on
    /// record (the gateway never registered under this Redis prefix).
    pub lease_ended_ms: Option<i64>,
}

/// Whether a gateway whose latest lease ends at `lease_end` (Unix ms) is
/// gone for longer than `after`, at `now_ms`.
pub fn is_stale(lease_end: Option<i64>, now_ms: i64, after: Duration) -> bool {
    let after = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
    match lease_end {
        Some(end) => now_ms.saturating_sub(end) > after,
        None => true,
    }
}

/// The downstream topics (named `{prefix}{gateway}`) of gateways gone for
/// longer than `after`.
pub async fn find(
    bus: &Arc<KafkaBus>,
    directory: &RedisDirectory,
    clock: &dyn Clock,
    prefix: &str,
    after: Duration,
) -> Result<Vec<StaleDownstream>, String> {
    let listing = bus.clone();
    let owned_prefix = prefix.to_string();
    let timeout = bus.settings().request_timeout;
    let topics = tokio::task::spawn_blocking(move || listing.topics_named(&owned_prefix, timeout))
        .await
        .map_err(|error| error.to_string())?
        .map_err(|error| error.to_string())?;
    let mut stale = Vec::new();
    for topic in topics {
        let gateway = topic[prefix.len()..].to_string();
        if gateway.is_empty() {
            continue;
        }
        let lease_end = directory
            .lease_end(&gateway)
            .await
            .map_err(|error| error.to_string())?;
        if is_stale(lease_end, clock.now_ms(), after) {
            stale.push(StaleDownstream {
                topic,
                gateway,
                lease_ended_ms: lease_end,
            });
        }
    }
    stale.sort_by(|a, b| a.topic.cmp(&b.topic));
    Ok(stale)
}

/// Looks every `after / 4` (at least every second, at most every five
/// minutes) until aborted; logs the list when it changes and keeps the
/// gauge current.
pub async fn watch(
    bus: Arc<KafkaBus>,
    directory: Arc<RedisDirectory>,
    clock: Arc<dyn Clock>,
    prefix: String,
    after: Duration,
) {
    let every = (after / 4).clamp(Duration::from_secs(1), Duration::from_secs(300));
    let mut reported: Option<Vec<StaleDownstream>> = None;
    loop {
        match find(&bus, &directory, &*clock, &prefix, after).await {
            Ok(stale) => {
                metrics::gauge!(telemetry::STALE_DOWNSTREAM).set(stale.len() as f64);
                if reported.as_ref() != Some(&stale) {
                    if !stale.is_empty() {
                        let topics: Vec<&str> = stale.iter().map(|s| s.topic.as_str()).collect();
                        tracing::warn!(?topics, older_than = ?after,
                            "downstream topics of gateways gone for long: delete them, or restart those gateways");
                    }
                    reported = Some(stale);
                }
            }
            Err(error) => {
                tracing::debug!(%error, "stale downstream topics not checked this time");
            }
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_is_stale_once_its_lease_ended_longer_ago_than_the_limit() {
        let hour = Duration::from_secs(3600);
        let now = 10_000_000;
        assert!(
            !is_stale(Some(now + 5_000), now, hour),
            "lease still running"
        );
        assert!(
            !is_stale(Some(now - 3_600_000), now, hour),
            "exactly the limit"
        );
        assert!(is_stale(Some(now - 3_600_001), now, hour));
        assert!(is_stale(None, now, hour), "never held a lease");
    }
}

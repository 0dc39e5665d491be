//! The router's metric names (Prometheus style, recorded with the
//! `metrics` crate; the binary installs the exporter).

/// Counter: sends stored for the first time.
pub const ACCEPTED: &str = "pingme_router_messages_accepted_total";
/// Counter: deliver frames queued on connections.
pub const DELIVERED: &str = "pingme_router_messages_delivered_total";
/// Counter, label `code`: sends and work items that failed.
pub const FAILED: &str = "pingme_router_messages_failed_total";
/// Counter: sends answered from the idempotency record.
pub const DUPLICATES: &str = "pingme_router_messages_duplicates_total";
/// Gauge, label `topic`: records queued between stages.
pub const QUEUE_DEPTH: &str = "pingme_router_queue_depth";
/// Histogram: seconds one batched `MessageStore::append` took.
pub const APPEND_SECONDS: &str = "pingme_router_store_append_seconds";
/// Histogram: messages per batched append.
pub const APPEND_BATCH: &str = "pingme_router_store_append_batch_size";
/// Counter, label `stage`: retries after a failed try.
pub const RETRIES: &str = "pingme_router_retries_total";
/// Gauge: dead letters stored.
pub const DLQ_SIZE: &str = "pingme_router_dlq_size";
/// Counter: push notifications sent (recipients).
pub const PUSHED: &str = "pingme_router_push_sent_total";

/// Counts one failure with its code.
pub fn failed(code: pingme_protocol::ErrorCode, count: u64) {
    metrics::counter!(FAILED, "code" => code.code().to_string()).increment(count);
}

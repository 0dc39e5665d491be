//! The router's metric names (Prometheus style, recorded with the
//! `metrics` crate; the binary installs the exporter) and their help texts
//! ([`describe`], which is also how `pingme metrics` lists them).

/// Counter: sends stored for the first time.
pub const ACCEPTED: &str = "pingme_router_messages_accepted_total";
/// Counter: deliver frames queued on connections.
pub const DELIVERED: &str = "pingme_router_messages_delivered_total";
/// Counter, label `code`: sends and work items that failed.
pub const FAILED: &str = "pingme_router_messages_failed_total";
/// Counter: sends answered from the idempotency record.
pub const DUPLICATES: &str = "pingme_router_messages_duplicates_total";
/// Gauge, label `topic`: records queued between stages (the consumer
/// group's lag), sampled every second.
pub const QUEUE_DEPTH: &str = "pingme_router_queue_depth";
/// Gauge, labels `topic`, `group`, `partition`: records on the Kafka
/// broker not yet committed by the group, as this node's member of the
/// partition last saw it (0 once the partition moved away).
pub const CONSUMER_LAG: &str = "pingme_kafka_consumer_lag";
/// Gauge: downstream topics of gateways whose lease ended longer ago than
/// `kafka.stale_downstream_after` (reported by workers; never deleted).
pub const STALE_DOWNSTREAM: &str = "pingme_kafka_stale_downstream_topics";
/// Histogram: seconds one batched `MessageStore::append` took.
pub const APPEND_SECONDS: &str = "pingme_router_store_append_seconds";
/// Histogram: messages per batched append.
pub const APPEND_BATCH: &str = "pingme_router_store_append_batch_size";
/// Histogram: seconds from a send's acceptance by its gateway to its
/// conversation worker taking it (the persistence topic's queue).
pub const SEND_WAIT_SECONDS: &str = "pingme_router_send_wait_seconds";
/// Histogram: seconds from a send's acceptance by its gateway to its ack
/// (or error) handed on toward the sender's connection: queue, append and
/// answer, the server's share of what a sender waits for.
pub const SEND_ACK_SECONDS: &str = "pingme_router_send_ack_seconds";
/// Counter, label `stage`: retries after a failed try.
pub const RETRIES: &str = "pingme_router_retries_total";
/// Gauge: dead letters stored.
pub const DLQ_SIZE: &str = "pingme_router_dlq_size";
/// Counter: push notifications sent (recipients).
pub const PUSHED: &str = "pingme_router_push_sent_total";
/// Counter: delivered watermarks (device, conversation) written.
pub const WATERMARKS_WRITTEN: &str = "pingme_router_delivered_watermarks_written_total";
/// Counter: delivery pages planned from this gateway's own connections
/// because the Redis directory was unreachable.
pub const DIRECTORY_FALLBACKS: &str = "pingme_router_directory_fallbacks_total";

/// Gives every router metric its kind and help text in the installed
/// recorder. A metric recorded here without being described is missing
/// from `pingme metrics`, which the deployment checks hold the dashboard
/// and alert rules to.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(ACCEPTED, "sends stored for the first time");
    describe_counter!(
        DELIVERED,
        "deliver frames queued on recipients' connections (one per connection reached)"
    );
    describe_counter!(
        FAILED,
        "sends and work items that failed, by error code (label code)"
    );
    describe_counter!(
        DUPLICATES,
        "sends answered from the idempotency record (client retries)"
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "records queued between pipeline stages and not processed yet, by topic, sampled every second"
    );
    describe_gauge!(
        CONSUMER_LAG,
        "Kafka consumer lag by topic, group and partition: the high watermark minus the committed offset, as the partition's member on this node last saw it"
    );
    describe_gauge!(
        STALE_DOWNSTREAM,
        "downstream topics of gateways gone (lease ended) for longer than kafka.stale_downstream_after: an operator may delete them"
    );
    describe_histogram!(
        APPEND_SECONDS,
        Unit::Seconds,
        "duration of one batched, durable message append"
    );
    describe_histogram!(APPEND_BATCH, "messages per batched append");
    describe_histogram!(
        SEND_WAIT_SECONDS,
        Unit::Seconds,
        "from a send's acceptance by its gateway to its conversation worker taking it"
    );
    describe_histogram!(
        SEND_ACK_SECONDS,
        Unit::Seconds,
        "from a send's acceptance by its gateway to its answer handed on toward the sender"
    );
    describe_counter!(
        RETRIES,
        "retries after a failed try, by pipeline stage (label stage)"
    );
    describe_gauge!(DLQ_SIZE, "dead letters stored, waiting for an operator");
    describe_counter!(PUSHED, "offline-push recipients sent to the webhook");
    describe_counter!(
        WATERMARKS_WRITTEN,
        "delivered watermarks (device, conversation) written to the store"
    );
    describe_counter!(
        DIRECTORY_FALLBACKS,
        "delivery pages planned from this gateway's own connections while the Redis directory was unreachable"
    );
}

/// Records, for each send, the time since its gateway accepted it
/// (`accepted_at_us` of 0, unknown, is left out; a clock that stepped
/// back counts as zero).
pub(crate) fn since_accepted(histogram: &'static str, accepted_at_us: impl Iterator<Item = u64>) {
    let now = crate::pipeline::now_us();
    let histogram = metrics::histogram!(histogram);
    for at in accepted_at_us.filter(|&at| at != 0) {
        histogram.record(now.saturating_sub(at) as f64 / 1e6);
    }
}

/// Counts one failure with its code.
pub fn failed(code: pingme_protocol::ErrorCode, count: u64) {
    metrics::counter!(FAILED, "code" => code.code().to_string()).increment(count);
}

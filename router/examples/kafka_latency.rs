//! Produce -> consume latency of the Kafka bus, to choose `linger.ms` and
//! `fetch.wait.max.ms` (docs/benchmarks.md, "Kafka bus latency"). One
//! node publishes records at a steady rate, keyed over every partition;
//! one group member consumes them and commits after every poll, as the
//! pipeline's stages do. Prints p50/p99/max of publish -> poll.
//!
//! ```text
//! KAFKA_BROKERS=127.0.0.1:9092 cargo run --example kafka_latency -- \
//!     [rate_per_s=2000] [seconds=5] [linger_ms=1] [fetch_wait_max_ms=10] [partitions=4]
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pingme_router::{Bus, DeadLetterRecord, KafkaBus, KafkaSettings, Polled, Topic};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numeric arguments"))
        .collect();
    let arg = |i: usize, default: u64| args.get(i).copied().unwrap_or(default);
    let (rate, seconds, linger, fetch_wait, partitions) =
        (arg(0, 2000), arg(1, 5), arg(2, 1), arg(3, 10), arg(4, 4));
    let brokers = std::env::var("KAFKA_BROKERS").expect("KAFKA_BROKERS");
    let mut settings = KafkaSettings::new(brokers);
    settings.linger_ms = linger as u32;
    settings.fetch_wait_max_ms = fetch_wait as u32;
    settings.session_timeout_ms = 3_000;
    settings.heartbeat_interval_ms = 500;
    let bus = Arc::new(KafkaBus::new(settings).expect("kafka client"));
    let name = format!("latency-{}", uuid::Uuid::now_v7().simple());
    let topic: Topic<DeadLetterRecord> = Topic::new(name.clone(), partitions as u32);
    bus.declare(&topic).expect("declare");
    let mut member = bus
        .join(&topic, &name, "latency-0", CancellationToken::new())
        .expect("join");
    // Wait for the member to own every partition before timing anything.
    let mut owned = 0;
    while owned < partitions as usize {
        if let Polled::Assigned(p) = member.poll(1).await {
            owned += p.len();
        }
    }
    let epoch = Instant::now();
    let total = rate * seconds;
    let producer = {
        let (bus, topic) = (bus.clone(), topic.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
            for n in 0..total {
                tick.tick().await;
                let record = DeadLetterRecord {
                    kind: "latency".into(),
                    payload: Bytes::from(
                        (epoch.elapsed().as_nanos() as u64).to_be_bytes().to_vec(),
                    ),
                    code: 0,
                    error: String::new(),
                    attempts: n as u32,
                };
                bus.publish(&topic, n, record).await.expect("publish");
            }
        })
    };
    let mut histogram = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    let mut received = 0;
    while received < total {
        let Polled::Records(records) = member.poll(1000).await else {
            continue;
        };
        let now = epoch.elapsed().as_nanos() as u64;
        for consumed in records {
            let sent = u64::from_be_bytes(consumed.record.payload[..8].try_into().unwrap());
            histogram.record((now - sent) / 1000).expect("in range");
            received += 1;
        }
        member.commit().await.expect("commit");
    }
    producer.await.expect("producer");
    println!(
        "rate={rate}/s records={total} linger.ms={linger} fetch.wait.max.ms={fetch_wait} \
         partitions={partitions}: p50={:.2}ms p99={:.2}ms max={:.2}ms",
        histogram.value_at_quantile(0.50) as f64 / 1000.0,
        histogram.value_at_quantile(0.99) as f64 / 1000.0,
        histogram.max() as f64 / 1000.0,
    );
}

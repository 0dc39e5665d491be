//! Fanout against other brokers, for side-by-side figures (issue 17): the
//! shape of `run fanout` (one subject, every subscriber online on its own
//! connection, one publisher sending bursts) against a NATS server (core
//! pub/sub) or an MQTT broker (QoS 0, what Mosquitto delivers cheapest),
//! through their usual Rust clients. Every delivery is checked as in a
//! pingme run: each message carries the publisher's counter, and each
//! subscriber expects the counters in order, once; a gap is lost, a counter
//! at or below one already seen is duplicated or reordered.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio::sync::{Semaphore, watch};

use crate::run::{read_cpu_seconds, unix_micros};

/// The broker on the other side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Peer {
    /// A NATS server, core publish/subscribe (no JetStream).
    Nats,
    /// An MQTT 3.1.1 broker, QoS 0.
    Mqtt,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct PeerPlan {
    pub peer: Peer,
    /// host:port of the broker.
    pub address: String,
    pub subscribers: u64,
    pub burst: u64,
    pub burst_interval: Duration,
    pub size: usize,
    pub duration: Duration,
    /// How long to wait for outstanding deliveries after the last publish.
    pub drain: Duration,
    /// Connections being opened at once.
    pub connect_concurrency: usize,
    pub server_pid: Option<u32>,
}

/// The outcome, printed and written as JSON.
#[derive(Debug, serde::Serialize)]
pub struct PeerReport {
    pub peer: Peer,
    pub subscribers: u64,
    pub published: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated_or_reordered: u64,
    /// Subscribers whose connection ended before the run did (a broker
    /// dropping a slow consumer, say).
    pub dropped_subscribers: u64,
    /// From the first publish to the last delivery (or the end of the drain).
    pub seconds: f64,
    pub deliveries_per_second: f64,
    pub server_cpu_seconds: Option<f64>,
    pub deliveries_per_server_cpu_second: Option<f64>,
    /// Publish to delivery, sampled on every sixteenth subscriber.
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
}

impl PeerReport {
    pub fn has_errors(&self) -> bool {
        self.lost > 0 || self.duplicated_or_reordered > 0
    }

    pub fn print_summary(&self) {
        println!(
            "{:?}: {} subscribers, {} published, {} of {} delivered in {:.2}s: {:.0} deliveries/s",
            self.peer,
            self.subscribers,
            self.published,
            self.delivered,
            self.expected,
            self.seconds,
            self.deliveries_per_second,
        );
        if let (Some(cpu), Some(per)) = (
            self.server_cpu_seconds,
            self.deliveries_per_server_cpu_second,
        ) {
            println!("server CPU {cpu:.2}s: {per:.0} deliveries per server CPU-second");
        }
        println!(
            "lost {}, duplicated or reordered {}, subscribers dropped {}; publish->deliver p50 {:.1} ms, p99 {:.1} ms",
            self.lost,
            self.duplicated_or_reordered,
            self.dropped_subscribers,
            self.latency_p50_ms,
            self.latency_p99_ms
        );
    }
}

/// The body of message `counter`: the counter, the send time, padding.
fn encode(counter: u64, size: usize) -> Bytes {
    let mut body = BytesMut::with_capacity(size.max(16));
    body.put_u64(counter);
    body.put_u64(unix_micros());
    body.resize(size.max(16), 0);
    body.freeze()
}

fn decode(mut body: &[u8]) -> Option<(u64, u64)> {
    (body.len() >= 16).then(|| (body.get_u64(), body.get_u64()))
}

/// Publish-to-deliver in microseconds, up to 10 minutes; two significant
/// digits keep the sampled subscribers' histograms small.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 2).expect("valid histogram bounds")
}

/// One subscriber's check of what reached it.
#[derive(Debug)]
struct Tally {
    /// The next counter expected.
    next: u64,
    delivered: u64,
    lost: u64,
    repeated: u64,
    /// Sampled subscribers only.
    latency: Option<Histogram<u64>>,
}

impl Tally {
    fn new(sampled: bool) -> Self {
        Tally {
            next: 0,
            delivered: 0,
            lost: 0,
            repeated: 0,
            latency: sampled.then(latency_histogram),
        }
    }

    /// One message; false when it is not one of ours.
    fn arrive(&mut self, body: &[u8], shared: &Progress) -> bool {
        let Some((counter, sent_us)) = decode(body) else {
            return false;
        };
        if counter < self.next {
            self.repeated += 1;
            return true;
        }
        self.lost += counter - self.next;
        self.next = counter + 1;
        self.delivered += 1;
        shared.delivered.fetch_add(1, Ordering::Relaxed);
        if let Some(histogram) = &mut self.latency {
            let _ = histogram.record(unix_micros().saturating_sub(sent_us).max(1));
        }
        true
    }
}

/// What the subscribers share while the run goes on.
#[derive(Debug, Default)]
struct Progress {
    delivered: AtomicU64,
    ready: AtomicU64,
}

/// Runs `plan` and reports; an error if the broker cannot be reached or a
/// subscriber cannot subscribe.
pub async fn run(plan: PeerPlan) -> anyhow::Result<PeerReport> {
    let progress = Arc::new(Progress::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(plan.connect_concurrency.max(1)));
    let mut subscribers = Vec::with_capacity(plan.subscribers as usize);
    for index in 0..plan.subscribers {
        let plan = plan.clone();
        let (progress, gate, stop) = (progress.clone(), gate.clone(), stop_rx.clone());
        subscribers.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.expect("never closed");
            let tally = Tally::new(index % 16 == 0);
            match plan.peer {
                Peer::Nats => nats_subscriber(&plan, index, tally, &progress, permit, stop).await,
                Peer::Mqtt => mqtt_subscriber(&plan, index, tally, &progress, permit, stop).await,
            }
        }));
    }
    // Everyone subscribed before the first publish, or the count would
    // blame the broker for messages sent before a subscription existed.
    let deadline = Instant::now() + Duration::from_secs(60) + plan.duration;
    while progress.ready.load(Ordering::Relaxed) < plan.subscribers {
        if Instant::now() > deadline || subscribers.iter().any(|s| s.is_finished()) {
            let _ = stop_tx.send(true);
            for subscriber in subscribers {
                if let Ok(Err(e)) = subscriber.await {
                    return Err(e.context("subscribing"));
                }
            }
            anyhow::bail!("subscribers not ready in time");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{} subscribers ready; publishing {} x {} B every {} ms for {:.0}s",
        plan.subscribers,
        plan.burst,
        plan.size,
        plan.burst_interval.as_millis(),
        plan.duration.as_secs_f64()
    );

    let cpu_before = plan.server_pid.and_then(read_cpu_seconds);
    let started = Instant::now();
    let published = match plan.peer {
        Peer::Nats => nats_publish(&plan).await?,
        Peer::Mqtt => mqtt_publish(&plan).await?,
    };
    let expected = published * plan.subscribers;
    let drain_until = Instant::now() + plan.drain;
    let mut last_seen = (progress.delivered.load(Ordering::Relaxed), Instant::now());
    while last_seen.0 < expected && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = progress.delivered.load(Ordering::Relaxed);
        if now != last_seen.0 {
            last_seen = (now, Instant::now());
        }
    }
    let seconds = last_seen.1.duration_since(started).as_secs_f64();
    let cpu = plan
        .server_pid
        .and_then(read_cpu_seconds)
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    let _ = stop_tx.send(true);

    let mut report = PeerReport {
        peer: plan.peer,
        subscribers: plan.subscribers,
        published,
        expected,
        delivered: 0,
        lost: 0,
        duplicated_or_reordered: 0,
        dropped_subscribers: 0,
        seconds,
        deliveries_per_second: 0.0,
        server_cpu_seconds: cpu,
        deliveries_per_server_cpu_second: None,
        latency_p50_ms: 0.0,
        latency_p99_ms: 0.0,
    };
    let mut latency = latency_histogram();
    for subscriber in subscribers {
        let (tally, dropped) = subscriber.await.context("subscriber task")??;
        report.delivered += tally.delivered;
        // What never came after the last delivery is lost too.
        report.lost += tally.lost + published.saturating_sub(tally.next);
        report.duplicated_or_reordered += tally.repeated;
        report.dropped_subscribers += u64::from(dropped);
        if let Some(histogram) = &tally.latency {
            latency.add(histogram).expect("same bounds");
        }
    }
    report.deliveries_per_second = report.delivered as f64 / seconds.max(1e-9);
    report.deliveries_per_server_cpu_second = cpu
        .filter(|cpu| *cpu > 0.0)
        .map(|cpu| report.delivered as f64 / cpu);
    report.latency_p50_ms = latency.value_at_quantile(0.5) as f64 / 1000.0;
    report.latency_p99_ms = latency.value_at_quantile(0.99) as f64 / 1000.0;
    Ok(report)
}

/// The publishing side of a peer run.
enum Publisher {
    Nats(async_nats::Client),
    Mqtt(rumqttc::AsyncClient),
}

impl Publisher {
    async fn publish(&self, body: Bytes) -> anyhow::Result<()> {
        match self {
            Publisher::Nats(client) => client.publish(SUBJECT, body).await?,
            Publisher::Mqtt(client) => {
                client
                    .publish(SUBJECT_MQTT, rumqttc::QoS::AtMostOnce, false, body)
                    .await?
            }
        }
        Ok(())
    }

    /// Hands a burst to the server before the next one, like a pingme
    /// sender whose sends are acknowledged (MQTT at QoS 0 has no such
    /// step: its event loop writes as the requests come).
    async fn end_burst(&self) -> anyhow::Result<()> {
        if let Publisher::Nats(client) = self {
            client.flush().await?;
        }
        Ok(())
    }
}

/// Publishes bursts for the run's duration as fast as the broker takes
/// them; returns how many.
async fn publish_bursts(plan: &PeerPlan, publisher: &Publisher) -> anyhow::Result<u64> {
    let mut ticks = tokio::time::interval(plan.burst_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let until = Instant::now() + plan.duration;
    let mut counter = 0;
    while Instant::now() < until {
        ticks.tick().await;
        for _ in 0..plan.burst {
            publisher.publish(encode(counter, plan.size)).await?;
            counter += 1;
        }
        publisher.end_burst().await?;
    }
    Ok(counter)
}

async fn nats_publish(plan: &PeerPlan) -> anyhow::Result<u64> {
    let client = async_nats::connect(plan.address.as_str()).await?;
    publish_bursts(plan, &Publisher::Nats(client)).await
}

const SUBJECT: &str = "pingme.peers.fanout";

/// Subscribes, says it is ready, and checks what comes until told to stop;
/// returns its tally and whether its connection ended early.
async fn nats_subscriber(
    plan: &PeerPlan,
    index: u64,
    mut tally: Tally,
    progress: &Progress,
    permit: tokio::sync::OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<(Tally, bool)> {
    let client = async_nats::ConnectOptions::new()
        .name(format!("peers-{index}"))
        .connect(plan.address.as_str())
        .await
        .with_context(|| format!("subscriber {index} connecting to {}", plan.address))?;
    let mut subscription = client.subscribe(SUBJECT).await?;
    // The server has the subscription once it answers the flush's ping.
    client.flush().await?;
    drop(permit);
    progress.ready.fetch_add(1, Ordering::Relaxed);
    loop {
        tokio::select! {
            message = subscription.next() => match message {
                Some(message) => { tally.arrive(&message.payload, progress); }
                None => return Ok((tally, true)),
            },
            _ = stop.changed() => return Ok((tally, false)),
        }
    }
}

async fn mqtt_publish(plan: &PeerPlan) -> anyhow::Result<u64> {
    let (client, mut events) = mqtt_connect(plan, "peers-publisher", plan.burst as usize * 2)?;
    // A broker that stops reading holds the publisher back (as TCP does):
    // rumqttc's default gives up on a write after 5 s ("Flush timeout"),
    // which a busy single-threaded broker exceeds when publishes come
    // faster than it fans them out.
    let mut network = events.network_options();
    network.set_connection_timeout(PUBLISHER_WRITE_WAIT.as_secs());
    events.set_network_options(network);
    // The event loop does the network I/O; it runs beside the publishing.
    // The first error ends it: the publisher's connection is gone.
    let mut driver = tokio::spawn(async move {
        loop {
            if let Err(error) = events.poll().await {
                return error;
            }
        }
    });
    // (A clone is a handle on the same request queue.)
    let publisher = Publisher::Mqtt(client.clone());
    let counter = match publish_bursts(plan, &publisher).await {
        Ok(counter) => counter,
        Err(error) => {
            // The request queue only says it closed; the event loop's own
            // error says why.
            if let Ok(Ok(cause)) = tokio::time::timeout(Duration::from_secs(1), &mut driver).await {
                anyhow::bail!("the MQTT publisher's connection ended: {cause}");
            }
            return Err(error);
        }
    };
    // Out of the client before it disconnects.
    client.disconnect().await?;
    let _ = tokio::time::timeout(Duration::from_secs(10), driver).await;
    Ok(counter)
}

const SUBJECT_MQTT: &str = "pingme/peers/fanout";

/// How long the MQTT publisher waits for the broker to take a write.
const PUBLISHER_WRITE_WAIT: Duration = Duration::from_secs(60);

fn mqtt_connect(
    plan: &PeerPlan,
    id: &str,
    requests: usize,
) -> anyhow::Result<(rumqttc::AsyncClient, rumqttc::EventLoop)> {
    let (host, port) = plan
        .address
        .rsplit_once(':')
        .context("the MQTT address is host:port")?;
    let mut options = rumqttc::MqttOptions::new(id, host, port.parse()?);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    Ok(rumqttc::AsyncClient::new(options, requests.max(10)))
}

async fn mqtt_subscriber(
    plan: &PeerPlan,
    index: u64,
    mut tally: Tally,
    progress: &Progress,
    permit: tokio::sync::OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<(Tally, bool)> {
    use rumqttc::{Event, Packet};
    let (client, mut events) = mqtt_connect(plan, &format!("peers-{index}"), 10)?;
    client
        .subscribe(SUBJECT_MQTT, rumqttc::QoS::AtMostOnce)
        .await?;
    let mut permit = Some(permit);
    loop {
        tokio::select! {
            event = events.poll() => match event {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    permit.take();
                    progress.ready.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    tally.arrive(&publish.payload, progress);
                }
                Ok(_) => {}
                Err(e) if permit.is_some() => {
                    return Err(anyhow::Error::from(e).context(format!("subscriber {index} connecting to {}", plan.address)));
                }
                Err(_) => return Ok((tally, true)),
            },
            _ = stop.changed() => return Ok((tally, false)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_carries_its_counter_and_send_time() {
        let body = encode(42, 100);
        assert_eq!(body.len(), 100);
        let (counter, sent) = decode(&body).expect("ours");
        assert_eq!(counter, 42);
        assert!(sent > 0);
        assert_eq!(decode(&body[..15]), None);
    }

    #[test]
    fn gaps_are_lost_and_repeats_counted() {
        let progress = Progress::default();
        let mut tally = Tally::new(true);
        for counter in [0, 1, 2, 5, 6, 6, 3, 7] {
            assert!(tally.arrive(&encode(counter, 16), &progress));
        }
        // 3 and 4 skipped (lost), the second 6 and the late 3 repeated.
        assert_eq!(tally.delivered, 6);
        assert_eq!(tally.lost, 2);
        assert_eq!(tally.repeated, 2);
        assert_eq!(tally.next, 8);
        assert_eq!(progress.delivered.load(Ordering::Relaxed), 6);
        assert_eq!(tally.latency.as_ref().map(Histogram::len), Some(6));
        assert!(!tally.arrive(b"short", &progress));
    }
}

//! Running a scenario: ramp connections at the asked rate over the source
//! addresses, drive each one (heartbeats, sends, delivery checks), print
//! progress every second, and build the report.
//!
//! Each connection is one task on a bare [`Session`] (no SDK driver: a
//! million of them must stay cheap). Message bodies carry this process's run
//! tag and the send time, so receivers measure send-to-deliver and count
//! only the messages this process is accountable for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use futures::{FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use pingme_client::session::{Session, open_session};
use pingme_client::transport::{ConnectOptions, Endpoint};
use pingme_client::v1::{ContentType, DeliveryAck, Ping, SendMessage, client_frame, server_frame};
use pingme_protocol::ClientFrame;
use tokio::sync::{Semaphore, watch};

use crate::accounting::Accounting;
use crate::report::{LatencySummary, Report, Sample, new_histogram};
use crate::source::SourceAddrs;
use crate::users::User;

/// What the connections do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Connect and hold with heartbeats.
    Idle,
    /// Pairs of users message each other at a set rate.
    Chat,
    /// One member sends bursts to a group every member is in.
    Fanout,
    /// As fanout, to a group far larger than the connections (made with
    /// `pingme-loadgen group --members M`): the first N members come
    /// online, the rest stay offline. Shows that the sender's ack and the
    /// online members' deliveries do not wait for the paging of the
    /// offline majority.
    HugeGroup,
    /// Idle fleet, and every interval a fraction drops and reconnects.
    ReconnectStorm,
}

/// The knobs of one run (already validated).
#[derive(Debug, Clone)]
pub struct Plan {
    pub scenario: Scenario,
    /// Gateways (one, or several behind no balancer): connection `i`
    /// goes to `endpoints[i % len]`, so chat partners (`i`, `i ^ 1`) sit on
    /// different gateways whenever there are several.
    pub endpoints: Vec<Endpoint>,
    pub sources: Option<SourceAddrs>,
    pub connect_rate: u64,
    pub connect_concurrency: usize,
    pub connect_timeout: Duration,
    pub duration: Duration,
    pub drain: Duration,
    pub heartbeat: Option<Duration>,
    pub rate_per_connection: f64,
    pub body_size: usize,
    pub group: String,
    pub burst: u64,
    pub burst_interval: Duration,
    pub storm_fraction: f64,
    pub storm_interval: Duration,
    pub server_pid: Option<u32>,
    pub quiet: bool,
}

/// What every connection task shares.
struct Shared {
    plan: Plan,
    run_tag: u64,
    connected: AtomicU64,
    established: AtomicU64,
    connects: AtomicU64,
    connect_failures: AtomicU64,
    acked: AtomicU64,
    delivered: AtomicU64,
    errors: AtomicU64,
    send_failures: AtomicU64,
    reconnects: AtomicU64,
    connect_latency: Mutex<Histogram<u64>>,
    ack_latency: Mutex<Histogram<u64>>,
    ack_latency_second: Mutex<Histogram<u64>>,
    deliver_latency: Mutex<Histogram<u64>>,
    /// Send-to-deliver of the current second only; the progress loop
    /// reads its p50/p99 and resets it every second.
    deliver_latency_second: Mutex<Histogram<u64>>,
    accounting: Mutex<Accounting>,
    /// Local fanout members online (recipients per fanout send).
    members: AtomicU64,
}

/// Phases the connections follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Connections are still coming up: hold, do not send.
    Ramp,
    /// The measured phase: send.
    Run,
    /// Stop sending, keep receiving.
    Drain,
    /// Close.
    Stop,
}

fn record(histogram: &Mutex<Histogram<u64>>, elapsed: Duration) {
    let micros = elapsed.as_micros().max(1) as u64;
    histogram
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .saturating_record(micros);
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A body: run tag, send time (Unix µs), padding up to `size`.
pub fn encode_body(run_tag: u64, sent_us: u64, size: usize) -> Bytes {
    let mut body = BytesMut::with_capacity(size.max(16));
    body.put_u64(run_tag);
    body.put_u64(sent_us);
    body.resize(size.max(16), b'.');
    body.freeze()
}

/// The run tag and send time of a body, if it is one of ours.
pub fn decode_body(body: &[u8]) -> Option<(u64, u64)> {
    let tag = u64::from_be_bytes(body.get(0..8)?.try_into().ok()?);
    let sent = u64::from_be_bytes(body.get(8..16)?.try_into().ok()?);
    Some((tag, sent))
}

/// The 1:1 conversation id of two users.
pub fn dm(a: u64, b: u64) -> String {
    format!("dm:{}:{}", a.min(b), a.max(b))
}

/// What one connection does in the scenario.
#[derive(Debug, Clone)]
enum Role {
    Idle,
    Chat { conversation_id: String },
    FanoutSender,
    FanoutMember,
}

fn role_of(scenario: Scenario, users: &[User], index: usize) -> Role {
    match scenario {
        Scenario::Idle | Scenario::ReconnectStorm => Role::Idle,
        Scenario::Chat => {
            let partner = index ^ 1;
            match users.get(partner) {
                Some(peer) => Role::Chat {
                    conversation_id: dm(users[index].user_id, peer.user_id),
                },
                None => Role::Idle,
            }
        }
        Scenario::Fanout | Scenario::HugeGroup if index == 0 => Role::FanoutSender,
        Scenario::Fanout | Scenario::HugeGroup => Role::FanoutMember,
    }
}

fn read_vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// CPU time (user + system) the process has used, seconds. /proc counts
/// in USER_HZ ticks, which Linux fixes at 100 per second for user space.
fn read_cpu_seconds(pid: u32) -> Option<f64> {
    cpu_seconds_of_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime + stime of one `/proc/PID/stat` line, seconds.
fn cpu_seconds_of_stat(stat: &str) -> Option<f64> {
    // Fields after the command name (which may hold spaces) in parentheses;
    // utime and stime are the 14th and 15th fields of the line.
    let after_name = &stat[stat.rfind(')')? + 2..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user + system) as f64 / 100.0)
}

/// CPU seconds process `pid` used since it had used `before`.
fn cpu_seconds_since(pid: Option<u32>, before: Option<f64>) -> Option<f64> {
    Some(read_cpu_seconds(pid?)? - before?)
}

/// Runs the scenario for `users` and returns the report.
pub async fn run(plan: Plan, users: Vec<User>, shard_label: String) -> Report {
    let shared = Arc::new(Shared {
        plan: plan.clone(),
        run_tag: rand::random(),
        connected: AtomicU64::new(0),
        established: AtomicU64::new(0),
        connects: AtomicU64::new(0),
        connect_failures: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        send_failures: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        connect_latency: Mutex::new(new_histogram()),
        ack_latency: Mutex::new(new_histogram()),
        ack_latency_second: Mutex::new(new_histogram()),
        deliver_latency: Mutex::new(new_histogram()),
        deliver_latency_second: Mutex::new(new_histogram()),
        accounting: Mutex::new(Accounting::default()),
        members: AtomicU64::new(0),
    });
    let users = Arc::new(users);
    let total = users.len() as u64;
    // Memory per connection is an idle-fleet figure: in the other scenarios
    // the server also holds messages, queues and store caches by then.
    let rss_before = plan
        .server_pid
        .filter(|_| plan.scenario == Scenario::Idle)
        .and_then(read_vm_rss_kib);

    let (phase_tx, phase_rx) = watch::channel(Phase::Ramp);
    let (storm_tx, storm_rx) = watch::channel(0u64);
    let (progress_stop, progress) = {
        let (tx, rx) = watch::channel(false);
        (tx, tokio::spawn(progress_loop(shared.clone(), rx)))
    };

    // Ramp: one connection task per user, paced at the connect rate, with
    // a bound on handshakes in flight.
    let started = Instant::now();
    let ramp_cpu_before = plan.server_pid.and_then(read_cpu_seconds);
    let handshakes = Arc::new(Semaphore::new(plan.connect_concurrency.max(1)));
    let mut tasks = Vec::with_capacity(users.len());
    let pace =
        (plan.connect_rate > 0).then(|| Duration::from_secs_f64(1.0 / plan.connect_rate as f64));
    for index in 0..users.len() {
        if let Some(pace) = pace {
            let due = started + pace.mul_f64(index as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let permit = handshakes
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let role = role_of(plan.scenario, &users, index);
        tasks.push(tokio::spawn(connection(
            shared.clone(),
            users.clone(),
            index,
            role,
            permit,
            phase_rx.clone(),
            storm_rx.clone(),
        )));
    }
    // Wait until every connection got through or failed.
    while shared.established.load(Ordering::Relaxed)
        + shared.connect_failures.load(Ordering::Relaxed)
        < total
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ramp = started.elapsed();
    let server_ramp_cpu_s = cpu_seconds_since(plan.server_pid, ramp_cpu_before);

    let server_bytes_per_connection = match (plan.server_pid, rss_before) {
        (Some(pid), Some(before)) => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let after = read_vm_rss_kib(pid).unwrap_or(before);
            let connected = shared.connected.load(Ordering::Relaxed).max(1);
            Some((after.saturating_sub(before) * 1024) as f64 / connected as f64)
        }
        _ => None,
    };

    // The measured phase: senders start only now, so every fanout send
    // finds all members online.
    let _ = phase_tx.send(Phase::Run);
    let measured = Instant::now();
    let delivered_before = shared.delivered.load(Ordering::Relaxed);
    let server_cpu_before = plan.server_pid.and_then(read_cpu_seconds);
    if plan.scenario == Scenario::ReconnectStorm {
        let mut epoch = 0;
        let end = measured + plan.duration;
        while Instant::now() + plan.storm_interval <= end {
            tokio::time::sleep(plan.storm_interval).await;
            epoch += 1;
            let _ = storm_tx.send(epoch);
        }
        tokio::time::sleep_until(end.into()).await;
    } else {
        tokio::time::sleep(plan.duration).await;
    }
    let _ = phase_tx.send(Phase::Drain);
    tokio::time::sleep(plan.drain).await;
    let duration = measured.elapsed();
    let delivered = shared.delivered.load(Ordering::Relaxed) - delivered_before;
    let server_cpu_s = cpu_seconds_since(plan.server_pid, server_cpu_before);
    let _ = phase_tx.send(Phase::Stop);
    for task in tasks {
        let _ = task.await;
    }
    let _ = progress_stop.send(true);
    let timeline = progress.await.unwrap_or_default();

    let histogram = |h: &Mutex<Histogram<u64>>| {
        LatencySummary::of(&h.lock().unwrap_or_else(|e| e.into_inner()))
    };
    let deliveries = shared
        .accounting
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .counts();
    let mut parameters = std::collections::BTreeMap::new();
    parameters.insert("endpoint".into(), format!("{:?}", plan.endpoints));
    parameters.insert("connect_rate".into(), plan.connect_rate.to_string());
    parameters.insert("duration_s".into(), plan.duration.as_secs_f64().to_string());
    parameters.insert(
        "rate_per_connection".into(),
        plan.rate_per_connection.to_string(),
    );
    parameters.insert("body_size".into(), plan.body_size.to_string());
    parameters.insert(
        "source_addresses".into(),
        plan.sources
            .as_ref()
            .map_or(0, SourceAddrs::len)
            .to_string(),
    );
    if matches!(plan.scenario, Scenario::Fanout | Scenario::HugeGroup) {
        parameters.insert("group".into(), plan.group.clone());
        parameters.insert("burst".into(), plan.burst.to_string());
    }
    Report {
        scenario: format!("{:?}", plan.scenario).to_lowercase(),
        shards: vec![shard_label],
        connections_target: total,
        connections_established: shared.established.load(Ordering::Relaxed),
        connect_failures: shared.connect_failures.load(Ordering::Relaxed),
        send_failures: shared.send_failures.load(Ordering::Relaxed),
        reconnects: shared.reconnects.load(Ordering::Relaxed),
        duration_s: duration.as_secs_f64(),
        connect_rate: shared.established.load(Ordering::Relaxed) as f64
            / ramp.as_secs_f64().max(1e-3),
        delivered_per_s: delivered as f64 / duration.as_secs_f64().max(1e-3),
        server_bytes_per_connection,
        server_cpu_s,
        server_ramp_cpu_s,
        connect_latency: histogram(&shared.connect_latency),
        send_to_ack: histogram(&shared.ack_latency),
        send_to_deliver: histogram(&shared.deliver_latency),
        deliveries,
        parameters,
        timeline,
    }
}

/// Prints a progress line every second and keeps the per-second samples.
async fn progress_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) -> Vec<Sample> {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = (0u64, 0u64, 0u64, 0u64);
    let mut samples = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return samples,
        }
        let now = (
            shared.connects.load(Ordering::Relaxed),
            shared.acked.load(Ordering::Relaxed),
            shared.delivered.load(Ordering::Relaxed),
            shared.errors.load(Ordering::Relaxed),
        );
        let [ack_p99] = take_quantiles(&shared.ack_latency_second, [0.99]);
        let [deliver_p50, deliver_p99] =
            take_quantiles(&shared.deliver_latency_second, [0.50, 0.99]);
        let sample = Sample {
            second: started.elapsed().as_secs(),
            connected: shared.connected.load(Ordering::Relaxed),
            connects: now.0 - last.0,
            acked: now.1 - last.1,
            delivered: now.2 - last.2,
            errors: now.3 - last.3,
            ack_p99_us: ack_p99,
            deliver_p50_us: deliver_p50,
            deliver_p99_us: deliver_p99,
        };
        if !shared.plan.quiet {
            println!(
                "[{:>4}s] connected {:>8} (+{:>6}/s) failed {:>6} | acked {:>7}/s p99 {:>7}us | delivered {:>8}/s p99 {:>7}us | errors {}",
                sample.second,
                sample.connected,
                sample.connects,
                shared.connect_failures.load(Ordering::Relaxed),
                sample.acked,
                sample.ack_p99_us,
                sample.delivered,
                sample.deliver_p99_us,
                sample.errors
            );
        }
        samples.push(sample);
        last = now;
    }
}

/// The quantiles of one second's histogram (0 when it saw nothing), then
/// empties it for the next second.
fn take_quantiles<const N: usize>(
    histogram: &Mutex<Histogram<u64>>,
    quantiles: [f64; N],
) -> [u64; N] {
    let mut h = histogram.lock().unwrap_or_else(|e| e.into_inner());
    let values = quantiles.map(|q| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(q)
        }
    });
    h.reset();
    values
}

async fn open(shared: &Shared, users: &[User], index: usize) -> Option<Session> {
    let plan = &shared.plan;
    let options = ConnectOptions {
        local_ip: plan
            .sources
            .as_ref()
            .map(|s| s.for_connection(index as u64)),
    };
    let started = Instant::now();
    match open_session(
        &plan.endpoints[index % plan.endpoints.len()],
        &options,
        &users[index].token,
        "pingme-loadgen",
        plan.connect_timeout,
    )
    .await
    {
        Ok(session) => {
            record(&shared.connect_latency, started.elapsed());
            shared.connects.fetch_add(1, Ordering::Relaxed);
            shared.connected.fetch_add(1, Ordering::Relaxed);
            Some(session)
        }
        Err(e) => {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            if !plan.quiet && shared.connect_failures.load(Ordering::Relaxed) < 5 {
                eprintln!("connection {index}: {e}");
            }
            None
        }
    }
}

/// Whether connection `index` drops in storm `epoch` (a hash, so the
/// choice is spread evenly and differs per epoch without shared state).
pub fn storm_picks(index: u64, epoch: u64, fraction: f64) -> bool {
    let mut x =
        index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    (x as f64 / u64::MAX as f64) < fraction
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    shared: Arc<Shared>,
    users: Arc<Vec<User>>,
    index: usize,
    role: Role,
    permit: tokio::sync::OwnedSemaphorePermit,
    mut phase: watch::Receiver<Phase>,
    mut storm: watch::Receiver<u64>,
) {
    let Some(mut session) = open(&shared, &users, index).await else {
        shared.connect_failures.fetch_add(1, Ordering::Relaxed);
        return;
    };
    drop(permit);
    shared.established.fetch_add(1, Ordering::Relaxed);
    if matches!(role, Role::FanoutMember | Role::FanoutSender) {
        shared.members.fetch_add(1, Ordering::Relaxed);
    }
    loop {
        match drive(
            &shared, &users, index, &role, session, &mut phase, &mut storm,
        )
        .await
        {
            Ended::Stop => break,
            Ended::Storm | Ended::Lost => {
                if *phase.borrow() == Phase::Stop {
                    break;
                }
                match open(&shared, &users, index).await {
                    Some(next) => {
                        shared.reconnects.fetch_add(1, Ordering::Relaxed);
                        session = next;
                    }
                    None => {
                        shared.connect_failures.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
    }
}

enum Ended {
    Stop,
    Storm,
    Lost,
}

async fn drive(
    shared: &Shared,
    users: &[User],
    index: usize,
    role: &Role,
    session: Session,
    phase: &mut watch::Receiver<Phase>,
    storm: &mut watch::Receiver<u64>,
) -> Ended {
    let plan = &shared.plan;
    let me = users[index].user_id;
    let Session {
        connection,
        hello_ack,
        ..
    } = session;
    let (mut sink, mut stream) = (connection.sink, connection.stream);
    let heartbeat_period = plan
        .heartbeat
        .unwrap_or(match hello_ack.heartbeat_interval_ms {
            0 => Duration::from_secs(30),
            ms => Duration::from_millis(ms.into()),
        });
    let mut heartbeat = tokio::time::interval_at(
        tokio::time::Instant::now() + heartbeat_period,
        heartbeat_period,
    );
    // Chat sends at its rate; the fanout sender bursts; others never send.
    let send_period = match role {
        Role::Chat { .. } if plan.rate_per_connection > 0.0 => {
            Some(Duration::from_secs_f64(1.0 / plan.rate_per_connection))
        }
        Role::FanoutSender => Some(plan.burst_interval),
        _ => None,
    };
    let mut sender = tokio::time::interval(send_period.unwrap_or(Duration::from_secs(3600)));
    sender.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Stagger senders so a fleet does not send in lockstep.
    let offset = send_period.map_or(Duration::ZERO, |p| p.mul_f64(rand::random::<f64>()));
    sender.reset_at(tokio::time::Instant::now() + offset);
    let mut in_flight: HashMap<u64, Instant> = HashMap::new();
    // Highest seq received per conversation, not yet acknowledged.
    let mut acks: HashMap<String, u64> = HashMap::new();
    let mut next_request_id = 1000u64;

    let conversation_id = match role {
        Role::Chat { conversation_id } => conversation_id.clone(),
        _ => plan.group.clone(),
    };
    loop {
        let result = tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(frame)) => {
                    // Handle everything already read, then acknowledge
                    // cumulatively: one ack per conversation per batch, as
                    // a real client does (the SDK too), not one per frame.
                    let mut result = handle(shared, index as u64, me, frame, &mut in_flight, &mut acks);
                    for _ in 0..DRAIN_PER_TURN {
                        if result.is_err() {
                            break;
                        }
                        match stream.next().now_or_never() {
                            Some(Some(Ok(frame))) => {
                                result = handle(shared, index as u64, me, frame, &mut in_flight, &mut acks);
                            }
                            // The end or an error shows up again on the
                            // next poll of the select.
                            _ => break,
                        }
                    }
                    match result {
                        Ok(()) => send_acks(&mut sink, &mut acks).await,
                        err => err,
                    }
                }
                _ => {
                    shared.connected.fetch_sub(1, Ordering::Relaxed);
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    shared.send_failures.fetch_add(in_flight.len() as u64, Ordering::Relaxed);
                    return Ended::Lost;
                }
            },
            _ = heartbeat.tick() => {
                sink.send(ClientFrame {
                    request_id: 0,
                    body: Some(client_frame::Body::Ping(Ping { client_time_ms: (unix_micros() / 1000) as i64 })),
                }).await
            }
            _ = sender.tick(), if send_period.is_some() && *phase.borrow() == Phase::Run => {
                let count = if matches!(role, Role::FanoutSender) { plan.burst.max(1) } else { 1 };
                let mut result = Ok(());
                for _ in 0..count {
                    next_request_id += 1;
                    in_flight.insert(next_request_id, Instant::now());
                    let frame = ClientFrame {
                        request_id: next_request_id,
                        body: Some(client_frame::Body::Send(SendMessage {
                            client_msg_id: format!("{:x}-{index}-{next_request_id}", shared.run_tag),
                            conversation_id: conversation_id.clone(),
                            content_type: ContentType::Custom as i32,
                            body: encode_body(shared.run_tag, unix_micros(), plan.body_size),
                        })),
                    };
                    result = sink.feed(frame).await;
                    if result.is_err() { break; }
                }
                match result {
                    Ok(()) => sink.flush().await,
                    err => err,
                }
            }
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow() == Phase::Stop {
                    let _ = sink.close().await;
                    shared.connected.fetch_sub(1, Ordering::Relaxed);
                    shared.send_failures.fetch_add(in_flight.len() as u64, Ordering::Relaxed);
                    return Ended::Stop;
                }
                if *phase.borrow() == Phase::Run {
                    // The send timer was not polled during the ramp, so its
                    // first tick is long due on every connection: restart it
                    // at this connection's own offset, or the whole fleet
                    // would send in lockstep from here on.
                    sender.reset_at(tokio::time::Instant::now() + offset);
                }
                Ok(())
            }
            changed = storm.changed() => {
                if changed.is_ok() && storm_picks(index as u64, *storm.borrow(), plan.storm_fraction) {
                    let _ = sink.close().await;
                    shared.connected.fetch_sub(1, Ordering::Relaxed);
                    return Ended::Storm;
                }
                Ok(())
            }
        };
        if result.is_err() {
            shared.connected.fetch_sub(1, Ordering::Relaxed);
            shared.errors.fetch_add(1, Ordering::Relaxed);
            shared
                .send_failures
                .fetch_add(in_flight.len() as u64, Ordering::Relaxed);
            return Ended::Lost;
        }
    }
}

/// Frames handled per wake-up before the acks go out.
const DRAIN_PER_TURN: usize = 256;

/// One cumulative delivery ack per conversation that received something.
async fn send_acks(
    sink: &mut pingme_client::transport::FrameSink,
    acks: &mut HashMap<String, u64>,
) -> pingme_client::Result<()> {
    if acks.is_empty() {
        return Ok(());
    }
    for (conversation_id, seq) in acks.drain() {
        sink.feed(ClientFrame {
            request_id: 0,
            body: Some(client_frame::Body::DeliveryAck(DeliveryAck {
                conversation_id,
                seq,
            })),
        })
        .await?;
    }
    sink.flush().await
}

fn handle(
    shared: &Shared,
    index: u64,
    me: u64,
    frame: pingme_protocol::ServerFrame,
    in_flight: &mut HashMap<u64, Instant>,
    acks: &mut HashMap<String, u64>,
) -> pingme_client::Result<()> {
    match frame.body {
        Some(server_frame::Body::SendAck(_)) => {
            if let Some(sent) = in_flight.remove(&frame.request_id) {
                let elapsed = sent.elapsed();
                record(&shared.ack_latency, elapsed);
                record(&shared.ack_latency_second, elapsed);
                shared.acked.fetch_add(1, Ordering::Relaxed);
                let recipients = match shared.plan.scenario {
                    // Only the members online here are expected to get it.
                    Scenario::Fanout | Scenario::HugeGroup => {
                        shared.members.load(Ordering::Relaxed).saturating_sub(1)
                    }
                    _ => 1,
                };
                shared
                    .accounting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .expect(recipients);
            }
        }
        Some(server_frame::Body::Error(error)) => {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            if in_flight.remove(&frame.request_id).is_some() {
                shared.send_failures.fetch_add(1, Ordering::Relaxed);
            }
            if error.fatal {
                return Err(pingme_client::ClientError::Server {
                    code: error.code,
                    message: error.message,
                    client_msg_id: error.client_msg_id,
                });
            }
        }
        Some(server_frame::Body::Deliver(deliver)) => {
            let Some(message) = deliver.message else {
                return Ok(());
            };
            let ours = decode_body(&message.body).filter(|(tag, _)| *tag == shared.run_tag);
            if let Some((_, sent_us)) = ours
                && message.sender_id != me
            {
                shared.delivered.fetch_add(1, Ordering::Relaxed);
                let latency = Duration::from_micros(unix_micros().saturating_sub(sent_us));
                record(&shared.deliver_latency, latency);
                record(&shared.deliver_latency_second, latency);
                shared
                    .accounting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .deliver(index, &message.conversation_id, message.seq);
            }
            // Acknowledged after the batch, so the ack write is not in
            // the latency.
            let highest = acks.entry(message.conversation_id).or_default();
            *highest = (*highest).max(message.seq);
        }
        Some(server_frame::Body::GoAway(_)) => {
            return Err(pingme_client::ClientError::ConnectionClosed);
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_cpu_time_is_read_and_grows() {
        let pid = std::process::id();
        let before = read_cpu_seconds(pid).expect("own /proc/self/stat");
        // Real work until the kernel has charged at least one tick to us:
        // how long that takes depends on what else the machine runs, so
        // only growth is asserted, never an amount per wall-clock time.
        let give_up = Instant::now() + Duration::from_secs(120);
        let mut x = 0u64;
        let after = loop {
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            let now = read_cpu_seconds(pid).unwrap();
            if now > before || Instant::now() > give_up {
                break now;
            }
        };
        assert!(after > before, "{before} -> {after}");
        assert_eq!(read_cpu_seconds(u32::MAX), None);
    }

    #[test]
    fn cpu_seconds_are_utime_plus_stime_in_ticks() {
        // A command name with spaces and a ')' must not shift the fields.
        let stat = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    250 130 0 0 20 0 4 0 100 1000000 200";
        assert_eq!(cpu_seconds_of_stat(stat), Some(3.8));
        assert_eq!(cpu_seconds_of_stat("4242 (cut short) S 1"), None);
        assert_eq!(cpu_seconds_of_stat("no parentheses at all"), None);
    }

    #[test]
    fn bodies_carry_the_run_tag_and_send_time() {
        let body = encode_body(42, 1_700_000_000_000_000, 64);
        assert_eq!(body.len(), 64);
        assert_eq!(decode_body(&body), Some((42, 1_700_000_000_000_000)));
        assert_eq!(encode_body(1, 2, 0).len(), 16);
        assert_eq!(decode_body(b"short"), None);
    }

    #[test]
    fn storms_pick_about_the_fraction_and_vary_by_epoch() {
        let picked = |epoch| {
            (0..100_000u64)
                .filter(|i| storm_picks(*i, epoch, 0.1))
                .count()
        };
        let first = picked(1);
        assert!((9_000..11_000).contains(&first), "{first}");
        let overlap = (0..100_000u64)
            .filter(|i| storm_picks(*i, 1, 0.1) && storm_picks(*i, 2, 0.1))
            .count();
        assert!(
            overlap < 2_000,
            "epochs pick different connections: {overlap}"
        );
        assert_eq!((0..1000u64).filter(|i| storm_picks(*i, 1, 0.0)).count(), 0);
    }

    #[test]
    fn chat_pairs_neighbours_and_fanout_has_one_sender() {
        let users: Vec<User> = (10..15)
            .map(|id| User {
                user_id: id,
                token: String::new(),
            })
            .collect();
        assert!(
            matches!(role_of(Scenario::Chat, &users, 0), Role::Chat { conversation_id } if conversation_id == "dm:10:11")
        );
        assert!(
            matches!(role_of(Scenario::Chat, &users, 1), Role::Chat { conversation_id } if conversation_id == "dm:10:11")
        );
        assert!(
            matches!(role_of(Scenario::Chat, &users, 4), Role::Idle),
            "the odd one out idles"
        );
        assert!(matches!(
            role_of(Scenario::Fanout, &users, 0),
            Role::FanoutSender
        ));
        assert!(matches!(
            role_of(Scenario::Fanout, &users, 3),
            Role::FanoutMember
        ));
        assert!(matches!(
            role_of(Scenario::HugeGroup, &users, 0),
            Role::FanoutSender
        ));
        assert!(matches!(
            role_of(Scenario::HugeGroup, &users, 4),
            Role::FanoutMember
        ));
    }
}

//! Running a scenario: ramp connections at the asked rate over the source
//! addresses, drive each one (heartbeats, sends, delivery checks), print
//! progress every second, and build the report.
//!
//! Each connection is one task on a bare [`Session`] (no SDK driver: a
//! million of them must stay cheap). Message bodies carry this process's run
//! tag, the send time and the sender's counter of the send, so receivers
//! measure send-to-deliver, count only the messages this process is
//! accountable for, and tell a retried send stored twice.
//!
//! A connection that drops (its gateway killed, a go-away, a fatal error)
//! comes back as a client would: it reconnects with backoff (through the
//! same address, so a balancer picks a live gateway), authenticates again,
//! resends its unacknowledged sends with their client_msg_ids, and fetches
//! each conversation from the last seq it holds without a gap; the outage
//! (first drop until every dropped connection is back) is in the report.
//! A gap that outlasts a second on a live connection (a push the server
//! could not route) is fetched too, as the SDK does.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use futures::{FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use pingme_client::Backoff;
use pingme_client::session::{Session, handshake};
use pingme_client::transport::{ConnectOptions, Connector, Endpoint};
use pingme_client::v1::{
    ContentType, DeliveryAck, FetchMessages, Ping, SendMessage, client_frame, server_frame,
};
use pingme_client::{ClientError, Result as ClientResult};
use pingme_protocol::{ClientFrame, ErrorCode};
use rustc_hash::FxHashMap;
use tokio::sync::{Semaphore, watch};

use crate::accounting::{Accounting, Arrival, Path, Retries};
use crate::frame_view::{DeliveredView, FrameView};
use crate::report::{LatencySummary, Outage, Report, Sample, new_histogram};
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
    /// TLS and QUIC connections of one source address resume each
    /// other's sessions.
    pub tls_resumption: bool,
    pub duration: Duration,
    pub drain: Duration,
    pub heartbeat: Option<Duration>,
    /// How long delivery acks wait for more to acknowledge (zero: none).
    pub ack_delay: Duration,
    pub rate_per_connection: f64,
    pub body_size: usize,
    pub group: String,
    pub burst: u64,
    pub burst_interval: Duration,
    pub storm_fraction: f64,
    pub storm_interval: Duration,
    pub server_pid: Option<u32>,
    pub quiet: bool,
    /// A seq pushed again counts as redelivered, not duplicated.
    pub accept_redelivery: bool,
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
    /// The run's ledger: each connection's is added when it ends.
    accounting: Mutex<Accounting>,
    retries: Retries,
    /// Local fanout members online (recipients per fanout send).
    members: AtomicU64,
    /// From a drop until the connection authenticated again.
    reconnect_latency: Mutex<Histogram<u64>>,
    /// Sends sent again (after a reconnect or a "later" answer).
    resent: AtomicU64,
    /// Fetches of a gap that outlasted GAP_WAIT.
    gap_fetches: AtomicU64,
    outages: Mutex<Outages>,
    /// One connector per (gateway, source address), made on first use:
    /// its QUIC connections share one UDP socket and endpoint (a socket and
    /// an endpoint task per connection cost the load generator more than
    /// the handshake), and with `--tls-resumption` its TLS sessions.
    connectors: Mutex<HashMap<ConnectorKey, Arc<Connector>>>,
}

/// A gateway (its index in the plan) and the local address connecting to it.
type ConnectorKey = (usize, Option<IpAddr>);

impl Shared {
    fn connector(&self, endpoint: usize, local_ip: Option<IpAddr>) -> ClientResult<Arc<Connector>> {
        let mut connectors = self.connectors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(connector) = connectors.get(&(endpoint, local_ip)) {
            return Ok(connector.clone());
        }
        let options = ConnectOptions {
            local_ip,
            tls_resumption: self.plan.tls_resumption,
        };
        let connector = Arc::new(Connector::new(
            self.plan.endpoints[endpoint].clone(),
            options,
        )?);
        connectors.insert((endpoint, local_ip), connector.clone());
        Ok(connector)
    }
}

/// Episodes during which connections were down: from the first drop while
/// all were up until every dropped connection is back.
#[derive(Debug, Default)]
struct Outages {
    down: u64,
    current: Option<Outage>,
    done: Vec<Outage>,
}

impl Outages {
    fn dropped(&mut self) {
        self.down += 1;
        let outage = self.current.get_or_insert_with(|| Outage {
            started_unix_ms: unix_micros() / 1000,
            ..Outage::default()
        });
        outage.connections += 1;
    }

    fn back(&mut self) {
        self.down = self.down.saturating_sub(1);
        if self.down == 0
            && let Some(mut outage) = self.current.take()
        {
            outage.all_back_unix_ms = Some(unix_micros() / 1000);
            self.done.push(outage);
        }
    }

    /// Every episode, the one still open (some never came back) last.
    fn all(&self) -> Vec<Outage> {
        self.done
            .iter()
            .chain(self.current.as_ref())
            .cloned()
            .collect()
    }
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

pub(crate) fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The smallest body: run tag, send time, counter.
pub const MIN_BODY: usize = 24;

/// A body: run tag, send time (Unix µs), the sender's counter of this send
/// (1, 2, ...; the same on every retry), padding up to `size`.
pub fn encode_body(run_tag: u64, sent_us: u64, counter: u64, size: usize) -> Bytes {
    let mut body = BytesMut::with_capacity(size.max(MIN_BODY));
    body.put_u64(run_tag);
    body.put_u64(sent_us);
    body.put_u64(counter);
    body.resize(size.max(MIN_BODY), b'.');
    body.freeze()
}

/// The run tag, send time and counter of a body, if it is one of ours.
pub fn decode_body(body: &[u8]) -> Option<(u64, u64, u64)> {
    let word = |at: usize| Some(u64::from_be_bytes(body.get(at..at + 8)?.try_into().ok()?));
    Some((word(0)?, word(8)?, word(16)?))
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
pub(crate) fn read_cpu_seconds(pid: u32) -> Option<f64> {
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
        retries: Retries::new(plan.accept_redelivery),
        members: AtomicU64::new(0),
        reconnect_latency: Mutex::new(new_histogram()),
        resent: AtomicU64::new(0),
        gap_fetches: AtomicU64::new(0),
        outages: Mutex::new(Outages::default()),
        connectors: Mutex::new(HashMap::new()),
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
        reconnect_latency: histogram(&shared.reconnect_latency),
        resent: shared.resent.load(Ordering::Relaxed),
        gap_fetches: shared.gap_fetches.load(Ordering::Relaxed),
        outages: shared
            .outages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .all(),
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
    let local_ip = plan
        .sources
        .as_ref()
        .map(|s| s.for_connection(index as u64));
    let started = Instant::now();
    let opening = async {
        let connector = shared.connector(index % plan.endpoints.len(), local_ip)?;
        let connection = connector.connect().await?;
        handshake(connection, &users[index].token, "pingme-loadgen").await
    };
    let opened = tokio::time::timeout(plan.connect_timeout, opening)
        .await
        .unwrap_or(Err(ClientError::Timeout));
    match opened {
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

/// A send not yet acknowledged: kept across reconnects and sent again with
/// the same client_msg_id until the server answers it.
#[derive(Debug, Clone)]
struct Unacked {
    client_msg_id: String,
    conversation_id: String,
    body: Bytes,
    /// When it was first sent: its send-to-ack includes every retry.
    first_sent: Instant,
    /// "Later" answers so far (the retry backoff).
    refusals: u32,
}

/// What one connection keeps across its transports.
#[derive(Debug, Default)]
struct Carry {
    /// The counter of the next send.
    next_counter: u64,
    /// counter -> the send, until acknowledged.
    unacked: BTreeMap<u64, Unacked>,
    /// Conversation -> the seqs it holds (own acknowledged sends and
    /// arrivals); after a reconnect each is fetched from its floor.
    held: FxHashMap<String, SeqFloor>,
    /// What it sent that was acknowledged and what reached it.
    ledger: Accounting,
}

/// The seqs of one conversation a connection holds: all up to `floor`,
/// and some above it.
#[derive(Debug, Default, Clone)]
pub struct SeqFloor {
    floor: u64,
    above: std::collections::BTreeSet<u64>,
}

impl SeqFloor {
    /// Records `seq` as held.
    pub fn hold(&mut self, seq: u64) {
        if seq <= self.floor {
            return;
        }
        if seq != self.floor + 1 {
            self.above.insert(seq);
            return;
        }
        // The next one, the usual case: no set to touch unless a gap
        // above it closes.
        self.floor = seq;
        while self.above.remove(&(self.floor + 1)) {
            self.floor += 1;
        }
    }

    /// Every seq up to this one is held.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Whether a seq above the floor is held, so one below it is missing.
    pub fn has_gap(&self) -> bool {
        !self.above.is_empty()
    }
}

/// How long a gap in a conversation may last before the connection fetches
/// it, as a client does: a push can overtake the answer to its own send
/// for a moment, and a real gap (a push the server could not route, e.g.
/// while the directory was down) stays.
const GAP_WAIT: Duration = Duration::from_secs(1);

/// Reconnect pacing: quick first tries (a killed gateway's clients find
/// the others at once), up to 5 s between tries.
fn reconnect_backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(5),
        max_attempts: None,
    }
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
    // Opening and reopening are boxed: their state (connect, TLS or QUIC
    // handshake, authentication) is the largest a connection goes through,
    // and inline it would size every connection's task for the whole run.
    let Some(mut session) = Box::pin(open(&shared, &users, index)).await else {
        shared.connect_failures.fetch_add(1, Ordering::Relaxed);
        return;
    };
    drop(permit);
    shared.established.fetch_add(1, Ordering::Relaxed);
    if matches!(role, Role::FanoutMember | Role::FanoutSender) {
        shared.members.fetch_add(1, Ordering::Relaxed);
    }
    let mut carry = Carry {
        next_counter: 1,
        ..Carry::default()
    };
    match &role {
        Role::Chat { conversation_id } => {
            carry
                .held
                .insert(conversation_id.clone(), SeqFloor::default());
        }
        Role::FanoutMember | Role::FanoutSender => {
            carry
                .held
                .insert(shared.plan.group.clone(), SeqFloor::default());
        }
        Role::Idle => {}
    }
    let mut resume = false;
    loop {
        let ended = drive(
            &shared, &users, index, &role, session, &mut carry, resume, &mut phase, &mut storm,
        )
        .await;
        match ended {
            Ended::Stop => break,
            Ended::Storm => {
                if *phase.borrow() == Phase::Stop {
                    break;
                }
                match Box::pin(open(&shared, &users, index)).await {
                    Some(next) => {
                        shared.reconnects.fetch_add(1, Ordering::Relaxed);
                        session = next;
                        resume = false;
                    }
                    None => {
                        shared.connect_failures.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
            Ended::Lost => {
                if *phase.borrow() == Phase::Stop {
                    break;
                }
                let dropped = Instant::now();
                shared
                    .outages
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .dropped();
                match Box::pin(reopen(&shared, &users, index, &mut phase)).await {
                    Some(next) => {
                        record(&shared.reconnect_latency, dropped.elapsed());
                        shared.reconnects.fetch_add(1, Ordering::Relaxed);
                        shared
                            .outages
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .back();
                        session = next;
                        resume = true;
                    }
                    // The run ended first.
                    None => break,
                }
            }
        }
    }
    // What was never acknowledged failed.
    shared
        .send_failures
        .fetch_add(carry.unacked.len() as u64, Ordering::Relaxed);
    shared
        .accounting
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .absorb(&carry.ledger);
}

/// Reconnects after a drop, with backoff, until it works or the run stops.
async fn reopen(
    shared: &Shared,
    users: &[User],
    index: usize,
    phase: &mut watch::Receiver<Phase>,
) -> Option<Session> {
    let backoff = reconnect_backoff();
    let mut attempt = 0;
    loop {
        let delay = backoff.delay(attempt, &mut rand::rng());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow() == Phase::Stop {
                    return None;
                }
                continue;
            }
        }
        if *phase.borrow() == Phase::Stop {
            return None;
        }
        if let Some(session) = open(shared, users, index).await {
            return Some(session);
        }
        attempt += 1;
    }
}

enum Ended {
    Stop,
    Storm,
    Lost,
}

/// The per-transport state of a connection's requests.
#[derive(Default)]
struct Requests {
    next_request_id: u64,
    /// Send request id -> the send's counter.
    sends: HashMap<u64, u64>,
    /// Fetch request id -> its conversation.
    fetches: HashMap<u64, String>,
    /// Highest seq received per conversation, not yet acknowledged.
    acks: FxHashMap<String, u64>,
    /// Sends refused with "later": counter -> when to send again.
    retry_at: BTreeMap<u64, Instant>,
    /// Conversations with a gap: since when (or since its last fetch).
    gaps: HashMap<String, Instant>,
}

impl Requests {
    fn next_id(&mut self) -> u64 {
        self.next_request_id += 1;
        self.next_request_id
    }
}

/// The frame sending `unacked` (counter `counter`) under a new request id.
fn send_frame(requests: &mut Requests, counter: u64, unacked: &Unacked) -> ClientFrame {
    let request_id = requests.next_id();
    requests.sends.insert(request_id, counter);
    ClientFrame {
        request_id,
        body: Some(client_frame::Body::Send(SendMessage {
            client_msg_id: unacked.client_msg_id.clone(),
            conversation_id: unacked.conversation_id.clone(),
            content_type: ContentType::Custom as i32,
            body: unacked.body.clone(),
        })),
    }
}

/// Fetch the messages of `conversation_id` after `after_seq`.
fn fetch_frame(requests: &mut Requests, conversation_id: &str, after_seq: u64) -> ClientFrame {
    let request_id = requests.next_id();
    requests
        .fetches
        .insert(request_id, conversation_id.to_string());
    ClientFrame {
        request_id,
        body: Some(client_frame::Body::Fetch(FetchMessages {
            conversation_id: conversation_id.to_string(),
            after_seq,
            until_seq: 0,
            limit: 200,
        })),
    }
}

/// When held delivery acks are due (never without a timer).
async fn ack_due(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match timer {
        Some(timer) => timer.as_mut().await,
        None => std::future::pending().await,
    }
}

/// The next tick of a timer a connection may not have (never, then).
async fn tick(timer: &mut Option<tokio::time::Interval>) {
    match timer {
        Some(timer) => {
            timer.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    shared: &Shared,
    users: &[User],
    index: usize,
    role: &Role,
    session: Session,
    carry: &mut Carry,
    resume: bool,
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
    let (mut sink, mut stream) = (connection.sink, connection.frames);
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
    // Timers only where they can fire: each is an allocation, and an idle
    // fleet of hundreds of thousands needs only its heartbeats.
    let delayed = |period| {
        let mut timer = tokio::time::interval(period);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer
    };
    let mut sender = send_period.map(delayed);
    // Stagger senders so a fleet does not send in lockstep.
    let offset = send_period.map_or(Duration::ZERO, |p| p.mul_f64(rand::random::<f64>()));
    if let Some(sender) = &mut sender {
        sender.reset_at(tokio::time::Instant::now() + offset);
    }
    // Sends refused with "later" go again from here.
    let mut retry = send_period.map(|_| delayed(Duration::from_millis(100)));
    // Gaps are looked at twice a second, only while there is one.
    let mut gap_check = (!carry.held.is_empty()).then(|| delayed(GAP_WAIT / 2));
    let mut requests = Requests {
        next_request_id: 1000,
        ..Requests::default()
    };
    let mut batch = Batch::default();
    // Delivery acks wait up to the ack delay from the first arrival after
    // the last ack, or ride with the next frame written (as in the SDK).
    let mut ack_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut ack_armed = false;

    let conversation_id = match role {
        Role::Chat { conversation_id } => conversation_id.clone(),
        _ => plan.group.clone(),
    };
    if resume {
        // Back after a drop: every unacknowledged send again (same
        // client_msg_id, so the server stores each once), then what this
        // connection missed, from where it holds everything.
        let mut frames = Vec::new();
        for counter in carry.unacked.keys() {
            shared.retries.retrying(me, *counter);
        }
        for (counter, unacked) in &carry.unacked {
            frames.push(send_frame(&mut requests, *counter, unacked));
        }
        shared
            .resent
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        for (conversation, held) in &carry.held {
            frames.push(fetch_frame(&mut requests, conversation, held.floor()));
        }
        for frame in frames {
            if sink.feed(frame).await.is_err() {
                return lost(shared, &mut requests);
            }
        }
        if sink.flush().await.is_err() {
            return lost(shared, &mut requests);
        }
    }
    loop {
        let result = tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(frame)) => {
                    // Handle everything already read, then acknowledge
                    // cumulatively: one ack per conversation per batch, as
                    // a real client does (the SDK too), not one per frame.
                    let mut followups = Vec::new();
                    let mut result = receive(shared, index as u64, me, frame, carry, &mut requests, &mut followups, &mut batch);
                    for _ in 0..DRAIN_PER_TURN {
                        if result.is_err() {
                            break;
                        }
                        match stream.next().now_or_never() {
                            Some(Some(Ok(frame))) => {
                                result = receive(shared, index as u64, me, frame, carry, &mut requests, &mut followups, &mut batch);
                            }
                            // The end or an error shows up again on the
                            // next poll of the select.
                            _ => break,
                        }
                    }
                    batch.record(shared);
                    match result {
                        Ok(()) if followups.is_empty() && !plan.ack_delay.is_zero() => {
                            if !ack_armed && !requests.acks.is_empty() {
                                let due = tokio::time::Instant::now() + plan.ack_delay;
                                match &mut ack_timer {
                                    Some(timer) => timer.as_mut().reset(due),
                                    None => ack_timer = Some(Box::pin(tokio::time::sleep_until(due))),
                                }
                                ack_armed = true;
                            }
                            Ok(())
                        }
                        Ok(()) => {
                            ack_armed = false;
                            send_followups(&mut sink, followups, &mut requests.acks).await
                        }
                        err => err,
                    }
                }
                _ => {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    return lost(shared, &mut requests);
                }
            },
            _ = ack_due(&mut ack_timer), if ack_armed => {
                ack_armed = false;
                send_followups(&mut sink, Vec::new(), &mut requests.acks).await
            }
            _ = heartbeat.tick() => {
                sink.send(ClientFrame {
                    request_id: 0,
                    body: Some(client_frame::Body::Ping(Ping { client_time_ms: (unix_micros() / 1000) as i64 })),
                }).await
            }
            _ = tick(&mut sender), if *phase.borrow() == Phase::Run => {
                let count = if matches!(role, Role::FanoutSender) { plan.burst.max(1) } else { 1 };
                let mut result = Ok(());
                for _ in 0..count {
                    let counter = carry.next_counter;
                    carry.next_counter += 1;
                    let unacked = Unacked {
                        client_msg_id: format!("{:x}-{index}-{counter}", shared.run_tag),
                        conversation_id: conversation_id.clone(),
                        body: encode_body(shared.run_tag, unix_micros(), counter, plan.body_size),
                        first_sent: Instant::now(),
                        refusals: 0,
                    };
                    let frame = send_frame(&mut requests, counter, &unacked);
                    carry.unacked.insert(counter, unacked);
                    result = sink.feed(frame).await;
                    if result.is_err() { break; }
                }
                match result {
                    Ok(()) => {
                        ack_armed = false;
                        flush_with_acks(&mut sink, &mut requests.acks).await
                    }
                    err => err,
                }
            }
            _ = tick(&mut retry), if !requests.retry_at.is_empty() => {
                let now = Instant::now();
                let due: Vec<u64> = requests
                    .retry_at
                    .iter()
                    .filter(|(_, at)| **at <= now)
                    .map(|(counter, _)| *counter)
                    .collect();
                let mut result = Ok(());
                for counter in due {
                    requests.retry_at.remove(&counter);
                    let Some(unacked) = carry.unacked.get(&counter) else { continue };
                    shared.retries.retrying(me, counter);
                    let frame = send_frame(&mut requests, counter, unacked);
                    shared.resent.fetch_add(1, Ordering::Relaxed);
                    result = sink.feed(frame).await;
                    if result.is_err() { break; }
                }
                match result {
                    Ok(()) => sink.flush().await,
                    err => err,
                }
            }
            _ = tick(&mut gap_check), if carry.held.values().any(SeqFloor::has_gap) => {
                let now = Instant::now();
                let mut result = Ok(());
                for (conversation, held) in &carry.held {
                    if !held.has_gap() {
                        requests.gaps.remove(conversation);
                        continue;
                    }
                    let since = *requests.gaps.entry(conversation.clone()).or_insert(now);
                    let fetching = requests.fetches.values().any(|c| c == conversation);
                    if now.duration_since(since) >= GAP_WAIT && !fetching {
                        requests.gaps.insert(conversation.clone(), now);
                        shared.gap_fetches.fetch_add(1, Ordering::Relaxed);
                        let frame = fetch_frame(&mut requests, conversation, held.floor());
                        result = sink.feed(frame).await;
                        if result.is_err() { break; }
                    }
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
                    return Ended::Stop;
                }
                if *phase.borrow() == Phase::Run {
                    // The send timer was not polled during the ramp, so its
                    // first tick is long due on every connection: restart it
                    // at this connection's own offset, or the whole fleet
                    // would send in lockstep from here on.
                    if let Some(sender) = &mut sender {
                        sender.reset_at(tokio::time::Instant::now() + offset);
                    }
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
            shared.errors.fetch_add(1, Ordering::Relaxed);
            return lost(shared, &mut requests);
        }
    }
}

/// The transport is gone: its requests with it (the sends stay unacked in
/// the carry, and go again on the next transport).
fn lost(shared: &Shared, requests: &mut Requests) -> Ended {
    shared.connected.fetch_sub(1, Ordering::Relaxed);
    requests.sends.clear();
    requests.fetches.clear();
    Ended::Lost
}

/// Frames handled per wake-up before the acks go out (or are held back).
const DRAIN_PER_TURN: usize = 256;

/// The next fetch pages the batch asked for, then one cumulative delivery
/// ack per conversation that received something.
async fn send_followups(
    sink: &mut pingme_client::transport::FrameSink,
    followups: Vec<ClientFrame>,
    acks: &mut FxHashMap<String, u64>,
) -> pingme_client::Result<()> {
    if acks.is_empty() && followups.is_empty() {
        return Ok(());
    }
    for frame in followups {
        sink.feed(frame).await?;
    }
    flush_with_acks(sink, acks).await
}

/// Writes what was fed, with a `DeliveryAck` for each conversation in
/// `acks` (drained) in front of the flush.
async fn flush_with_acks(
    sink: &mut pingme_client::transport::FrameSink,
    acks: &mut FxHashMap<String, u64>,
) -> pingme_client::Result<()> {
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

/// What one wake-up's frames add to the shared figures, added under one
/// lock each instead of one per delivery.
#[derive(Debug, Default)]
struct Batch {
    delivered: u64,
    /// Send-to-deliver of each delivery, in microseconds.
    latencies: Vec<u64>,
    /// When this wake-up's frames were taken, read once: they were all in
    /// hand at once (read together, or buffered), so one clock read
    /// stands for all of them.
    now_us: Option<u64>,
}

impl Batch {
    /// Unix time in microseconds at this wake-up.
    fn now_us(&mut self) -> u64 {
        *self.now_us.get_or_insert_with(unix_micros)
    }

    /// Adds the wake-up's figures to the shared ones and starts the next
    /// wake-up (the latency buffer is kept).
    fn record(&mut self, shared: &Shared) {
        self.now_us = None;
        if self.delivered > 0 {
            shared
                .delivered
                .fetch_add(std::mem::take(&mut self.delivered), Ordering::Relaxed);
        }
        if self.latencies.is_empty() {
            return;
        }
        for histogram in [&shared.deliver_latency, &shared.deliver_latency_second] {
            let mut histogram = histogram.lock().unwrap_or_else(|e| e.into_inner());
            for latency in &self.latencies {
                histogram.saturating_record((*latency).max(1));
            }
        }
        self.latencies.clear();
    }
}

/// One frame as read: a delivery is checked straight from its bytes (the
/// hot path of a fanout run); any other frame is decoded in full.
#[allow(clippy::too_many_arguments)]
fn receive(
    shared: &Shared,
    index: u64,
    me: u64,
    frame: Bytes,
    carry: &mut Carry,
    requests: &mut Requests,
    followups: &mut Vec<ClientFrame>,
    batch: &mut Batch,
) -> pingme_client::Result<()> {
    let protocol =
        |e: crate::frame_view::BadFrame| pingme_client::ClientError::Protocol(e.to_string());
    match crate::frame_view::view(&frame).map_err(protocol)? {
        FrameView::Delivered(message) => {
            arrived(
                shared,
                index,
                me,
                message,
                Path::Pushed,
                carry,
                &mut requests.acks,
                batch,
            );
            Ok(())
        }
        FrameView::Other => {
            let frame =
                pingme_protocol::decode_message(frame).map_err(pingme_client::ClientError::from)?;
            handle(shared, index, me, frame, carry, requests, followups, batch)
        }
    }
}

/// One message that reached this connection, pushed or fetched.
#[allow(clippy::too_many_arguments)]
fn arrived(
    shared: &Shared,
    index: u64,
    me: u64,
    message: DeliveredView<'_>,
    path: Path,
    carry: &mut Carry,
    acks: &mut FxHashMap<String, u64>,
    batch: &mut Batch,
) {
    if let Some(held) = carry.held.get_mut(message.conversation_id) {
        held.hold(message.seq);
    }
    let ours = decode_body(message.body).filter(|(tag, ..)| *tag == shared.run_tag);
    if let Some((_, sent_us, counter)) = ours
        && message.sender_id != me
    {
        batch.delivered += 1;
        let verdict = carry.ledger.arrive(
            Arrival {
                recipient: index,
                conversation_id: message.conversation_id,
                seq: message.seq,
                sender: message.sender_id,
                counter,
                path,
            },
            &shared.retries,
        );
        if !matches!(verdict, crate::accounting::Delivery::Overlap) {
            let now = batch.now_us();
            batch.latencies.push(now.saturating_sub(sent_us));
        }
    }
    // Acknowledged after the batch, so the ack write is not in the latency.
    match acks.get_mut(message.conversation_id) {
        Some(highest) => *highest = (*highest).max(message.seq),
        None => {
            acks.insert(message.conversation_id.to_owned(), message.seq);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn handle(
    shared: &Shared,
    index: u64,
    me: u64,
    frame: pingme_protocol::ServerFrame,
    carry: &mut Carry,
    requests: &mut Requests,
    followups: &mut Vec<ClientFrame>,
    batch: &mut Batch,
) -> pingme_client::Result<()> {
    match frame.body {
        Some(server_frame::Body::SendAck(ack)) => {
            let Some(counter) = requests.sends.remove(&frame.request_id) else {
                return Ok(());
            };
            // A send answered twice (sent again after a "later") counts once.
            let Some(unacked) = carry.unacked.remove(&counter) else {
                return Ok(());
            };
            requests.retry_at.remove(&counter);
            if let Some(held) = carry.held.get_mut(&ack.conversation_id) {
                held.hold(ack.seq);
            }
            let elapsed = unacked.first_sent.elapsed();
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
            carry.ledger.expect(recipients);
        }
        Some(server_frame::Body::Error(error)) => {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            if let Some(counter) = requests.sends.remove(&frame.request_id) {
                match carry.unacked.get_mut(&counter) {
                    // "Later": the same send again after a backoff delay
                    // (on this transport, or on the next one if this one
                    // closes).
                    Some(unacked) if ErrorCode::is_retryable_code(error.code) => {
                        let delay = reconnect_backoff().delay(unacked.refusals, &mut rand::rng());
                        unacked.refusals += 1;
                        requests.retry_at.insert(counter, Instant::now() + delay);
                    }
                    Some(_) => {
                        carry.unacked.remove(&counter);
                        shared.send_failures.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {}
                }
            }
            requests.fetches.remove(&frame.request_id);
            if error.fatal {
                return Err(pingme_client::ClientError::Server {
                    code: error.code,
                    message: error.message,
                    client_msg_id: error.client_msg_id,
                });
            }
        }
        Some(server_frame::Body::Deliver(deliver)) => {
            if let Some(message) = deliver.message {
                arrived(
                    shared,
                    index,
                    me,
                    DeliveredView::from(&message),
                    Path::Pushed,
                    carry,
                    &mut requests.acks,
                    batch,
                );
            }
        }
        Some(server_frame::Body::Page(page)) => {
            let Some(conversation_id) = requests.fetches.remove(&frame.request_id) else {
                return Ok(());
            };
            for message in &page.messages {
                arrived(
                    shared,
                    index,
                    me,
                    DeliveredView::from(message),
                    Path::Fetched,
                    carry,
                    &mut requests.acks,
                    batch,
                );
            }
            if page.has_more
                && let Some(last) = page.messages.last()
            {
                followups.push(fetch_frame(requests, &conversation_id, last.seq));
            }
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
    fn the_floor_rises_over_contiguous_seqs_and_a_gap_holds_it() {
        let mut held = SeqFloor::default();
        held.hold(1);
        held.hold(2);
        assert_eq!((held.floor(), held.has_gap()), (2, false));
        held.hold(5);
        held.hold(4);
        assert_eq!((held.floor(), held.has_gap()), (2, true));
        held.hold(3);
        assert_eq!((held.floor(), held.has_gap()), (5, false));
        held.hold(5);
        assert_eq!(held.floor(), 5);
    }

    #[test]
    fn bodies_carry_the_run_tag_and_send_time() {
        let body = encode_body(42, 1_700_000_000_000_000, 7, 64);
        assert_eq!(body.len(), 64);
        assert_eq!(decode_body(&body), Some((42, 1_700_000_000_000_000, 7)));
        assert_eq!(encode_body(1, 2, 3, 0).len(), MIN_BODY);
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

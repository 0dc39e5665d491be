//! The `pingme-loadgen` binary: parses the command line, provisions users,
//! runs a scenario (or merges reports) and exits non-zero when messages were
//! lost, duplicated or reordered.

mod accounting;
mod chart;
mod frame_view;
mod limits;
mod peers;
mod ramp_chart;
mod report;
mod run;
mod shard;
mod source;
mod users;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use pingme_client::{Endpoint, HttpApi};

use crate::report::Report;
use crate::run::{Plan, Scenario};
use crate::shard::Shard;
use crate::source::SourceAddrs;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator for pingme gateways.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a scenario.
    Run(Box<RunArgs>),
    /// Register users `{prefix}0..{prefix}M` and put them all in one new
    /// group owned by the first; prints its conversation id (`g:ID`). With
    /// `run huge-group -n N --group g:ID` the first N of them come online.
    Group(GroupArgs),
    /// The fanout scenario against another broker (NATS core pub/sub or
    /// MQTT QoS 0) through its usual client, every delivery checked: for
    /// side-by-side figures (`benches/peers.sh`).
    Peers(PeersArgs),
    /// Merge JSON reports of processes that ran side by side.
    Merge {
        /// Report files.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
        /// Write the merged report here (else print it).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Draw the merged per-second throughput and latency as a PNG here
        /// (per-second latencies of merged shards are the worst shard's).
        #[arg(long, value_name = "FILE")]
        timeline_png: Option<PathBuf>,
    },
    /// Draw a ramp's samples (connections, memory; see benches/million.sh)
    /// as a PNG.
    RampChart {
        /// Samples CSV: second,connections,gateways_rss_kib,
        /// loadgens_rss_kib,slab_kib,tcp_mem_pages,used_kib.
        samples: PathBuf,
        /// The PNG to write.
        #[arg(long)]
        png: PathBuf,
        /// The chart's title.
        #[arg(long, default_value = "ramp")]
        title: String,
    },
}

#[derive(Args, Debug)]
struct PeersArgs {
    /// Which broker.
    #[arg(value_enum)]
    peer: peers::Peer,
    /// Its address, host:port.
    #[arg(long)]
    address: String,
    /// Subscribers, one connection each.
    #[arg(long, short = 'n', default_value_t = 1000)]
    subscribers: u64,
    /// Messages per burst.
    #[arg(long, default_value_t = 100)]
    burst: u64,
    /// Milliseconds between bursts.
    #[arg(long, default_value_t = 50)]
    burst_interval_ms: u64,
    /// Message size in bytes (at least 16: counter, send time).
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to wait for outstanding deliveries after the last publish.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// The broker's process id: its CPU time over the run.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct GroupArgs {
    /// HTTP API base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    api: String,
    /// Members of the group, the owner included.
    #[arg(long)]
    members: u64,
    /// Username prefix (users are {prefix}{index}, as for `run --register`).
    #[arg(long, default_value = "lg")]
    user_prefix: String,
    /// Password of the users.
    #[arg(long, default_value = "loadgen-password")]
    password: String,
    /// The group's name.
    #[arg(long, default_value = "loadgen")]
    name: String,
    /// Concurrent HTTP requests while registering.
    #[arg(long, default_value_t = 64)]
    http_concurrency: usize,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// What the connections do.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Gateway: tcp://host:port, tls://host:port, quic://host:port,
    /// ws://host:port/v1/ws. Several, comma-separated: connection i goes to
    /// the (i mod n)-th, so chat partners are on different gateways.
    #[arg(long, default_value = "tcp://127.0.0.1:7000", value_delimiter = ',')]
    gateway: Vec<String>,
    /// HTTP API base URL (for --register).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    api: String,
    /// Users (= connections) in the whole run, across all shards.
    #[arg(long, short = 'n', default_value_t = 100)]
    connections: u64,
    /// This process's slice of the users: i/n.
    #[arg(long, default_value = "0/1")]
    shard: Shard,
    /// Register and log in the users through the HTTP API first.
    #[arg(long)]
    register: bool,
    /// Username prefix for --register (users are {prefix}{index}).
    #[arg(long, default_value = "lg")]
    user_prefix: String,
    /// Password for --register.
    #[arg(long, default_value = "loadgen-password")]
    password: String,
    /// Pre-provisioned users: a file of `user_id token` lines.
    #[arg(long, conflicts_with = "register")]
    tokens: Option<PathBuf>,
    /// Concurrent HTTP requests while registering.
    #[arg(long, default_value_t = 64)]
    http_concurrency: usize,
    /// New connections per second (0: as fast as possible).
    #[arg(long, default_value_t = 1000)]
    connect_rate: u64,
    /// Handshakes in flight at most.
    #[arg(long, default_value_t = 2000)]
    connect_concurrency: usize,
    /// Connect + auth timeout, seconds.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// TLS and QUIC: connections from one source address share a session
    /// cache, so after the first ones they resume (as the SDK's reconnects
    /// do). Off: every handshake is a full one.
    #[arg(long)]
    tls_resumption: bool,
    /// Local addresses to spread connections over: `a,b,first-last`.
    /// Default: 127.0.0.1.. (as many as needed) when the gateway is on
    /// loopback, the system's choice otherwise.
    #[arg(long)]
    source_addrs: Option<String>,
    /// Seconds of the measured phase (after the ramp).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to wait for outstanding deliveries after sending stops.
    #[arg(long, default_value_t = 3.0)]
    drain: f64,
    /// Heartbeat period in seconds (default: the server's).
    #[arg(long)]
    heartbeat: Option<f64>,
    /// Milliseconds a delivery ack waits so one frame acknowledges what
    /// arrived meanwhile (as the SDK does, `CoreConfig::ack_delay`); acks
    /// also ride with the next send. 0: ack after every read.
    #[arg(long, default_value_t = 100)]
    ack_delay_ms: u64,
    /// chat: messages per second per connection.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Message body size in bytes (at least 24: run tag, send time, counter).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// fanout, huge-group: the group conversation every user is a member
    /// of (g:ID; `pingme-loadgen group` makes one).
    #[arg(long, default_value = "g:1")]
    group: String,
    /// fanout, huge-group: messages per burst.
    #[arg(long, default_value_t = 10)]
    burst: u64,
    /// fanout, huge-group: milliseconds between bursts.
    #[arg(long, default_value_t = 1000)]
    burst_interval_ms: u64,
    /// reconnect-storm: fraction of connections dropped per storm.
    #[arg(long, default_value_t = 0.1)]
    fraction: f64,
    /// reconnect-storm: seconds between storms.
    #[arg(long, default_value_t = 5.0)]
    storm_interval: f64,
    /// The server's process id: its CPU time over the ramp and the run
    /// (per-core figures) and, for `idle`, its VmRSS before and after
    /// connecting (memory per connection).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write the per-second time series as CSV here (for plotting).
    #[arg(long)]
    timeline_csv: Option<PathBuf>,
    /// Draw the per-second time series as a PNG here: throughput
    /// (delivered/s, acked sends/s, connected) over send-to-deliver latency
    /// (p50, p99, and send-to-ack p99, in ms). No system fonts needed.
    #[arg(long, value_name = "FILE")]
    timeline_png: Option<PathBuf>,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
    /// Count every seq pushed again as redelivered, not duplicated (the
    /// router's at-least-once delivery: when a worker dies, the next owner
    /// of its partitions reads its uncommitted batches again and pushes
    /// them again; clients drop seqs they hold). Without it only pushes
    /// after the sender retried count so. A send stored under two seqs
    /// fails the run either way.
    #[arg(long)]
    accept_redelivery: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Merge {
            reports,
            report,
            timeline_png,
        } => merge(&reports, report.as_deref(), timeline_png.as_deref()),
        Command::Run(args) => on_runtime(run_scenario(*args)),
        Command::RampChart {
            samples,
            png,
            title,
        } => std::fs::read_to_string(&samples)
            .map_err(|e| anyhow::anyhow!("{}: {e}", samples.display()))
            .and_then(|text| ramp_chart::parse_samples(&text))
            .and_then(|parsed| ramp_chart::write_png(&parsed, &title, &png))
            .map(|()| true),
        Command::Group(args) => on_runtime(create_group(args)),
        Command::Peers(args) => on_runtime(run_peer(args)),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("FAILED: messages were lost, duplicated or reordered");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Runs `work` to the end on a multi-threaded runtime.
fn on_runtime(work: impl Future<Output = anyhow::Result<bool>>) -> anyhow::Result<bool> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(work))
}

fn merge(
    paths: &[PathBuf],
    out: Option<&std::path::Path>,
    timeline_png: Option<&std::path::Path>,
) -> anyhow::Result<bool> {
    let reports = paths
        .iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            serde_json::from_str::<Report>(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let merged = Report::merge(&reports).map_err(anyhow::Error::msg)?;
    let json = serde_json::to_string_pretty(&merged)?;
    match out {
        Some(path) => {
            std::fs::write(path, json)?;
            merged.print_summary();
        }
        None => println!("{json}"),
    }
    if let Some(path) = timeline_png {
        chart::write_png(&merged, path)?;
    }
    Ok(!merged.has_errors())
}

/// Registers and logs in `{prefix}{i}` for `range`, saying how long it took
/// (on stderr: stdout is the `group` command's answer).
async fn register(
    api: &HttpApi,
    prefix: &str,
    password: &str,
    range: std::ops::Range<u64>,
    concurrency: usize,
) -> anyhow::Result<Vec<users::User>> {
    let started = std::time::Instant::now();
    let users = users::register_and_login(api, prefix, password, range, concurrency).await?;
    eprintln!(
        "registered/logged in {} users in {:.1}s",
        users.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(users)
}

async fn run_peer(args: PeersArgs) -> anyhow::Result<bool> {
    limits::ensure_open_files(args.subscribers + 1).map_err(anyhow::Error::msg)?;
    if args.size < 16 {
        anyhow::bail!("--size must be at least 16 (counter, send time)");
    }
    let plan = peers::PeerPlan {
        peer: args.peer,
        address: args.address,
        subscribers: args.subscribers,
        burst: args.burst.max(1),
        burst_interval: Duration::from_millis(args.burst_interval_ms.max(1)),
        size: args.size,
        duration: Duration::from_secs_f64(args.duration),
        drain: Duration::from_secs_f64(args.drain),
        connect_concurrency: args.connect_concurrency,
        server_pid: args.server_pid,
    };
    let report = peers::run(plan).await?;
    report.print_summary();
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(!report.has_errors())
}

async fn create_group(args: GroupArgs) -> anyhow::Result<bool> {
    if args.members == 0 {
        anyhow::bail!("--members must be at least 1");
    }
    let started = std::time::Instant::now();
    let api = HttpApi::new(&args.api);
    let users = register(
        &api,
        &args.user_prefix,
        &args.password,
        0..args.members,
        args.http_concurrency,
    )
    .await?;
    let group = users::create_group(&api, &args.name, &users).await?;
    eprintln!(
        "group {} has {} members ({:.1}s in all)",
        group.conversation_id,
        group.member_count,
        started.elapsed().as_secs_f64()
    );
    println!("{}", group.conversation_id);
    Ok(true)
}

async fn run_scenario(args: RunArgs) -> anyhow::Result<bool> {
    let range = args.shard.users(args.connections);
    let local = range.end - range.start;
    limits::ensure_open_files(local).map_err(anyhow::Error::msg)?;
    let endpoints = args
        .gateway
        .iter()
        .map(|gateway| Endpoint::parse(gateway))
        .collect::<Result<Vec<_>, _>>()?;
    let on_loopback = endpoints
        .iter()
        .all(|endpoint| endpoint.addr().ip().is_loopback() && endpoint.addr().is_ipv4());
    let sources = match &args.source_addrs {
        Some(text) => Some(SourceAddrs::parse(text).map_err(anyhow::Error::msg)?),
        None if on_loopback => Some(SourceAddrs::loopback_for(local)),
        None => None,
    };
    if let Some(sources) = &sources
        && sources.capacity() < local
    {
        anyhow::bail!(
            "{local} connections need more than the {} source addresses given ({} ports each)",
            sources.len(),
            source::PORTS_PER_ADDRESS
        );
    }
    if args.size < run::MIN_BODY {
        anyhow::bail!(
            "--size must be at least {} (run tag, send time, counter)",
            run::MIN_BODY
        );
    }

    let users = if let Some(path) = &args.tokens {
        let file =
            std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        users::from_tokens_file(std::io::BufReader::new(file), range.clone())?
    } else if args.register {
        let api = HttpApi::new(&args.api);
        register(
            &api,
            &args.user_prefix,
            &args.password,
            range.clone(),
            args.http_concurrency,
        )
        .await?
    } else {
        anyhow::bail!("give --register or --tokens FILE");
    };

    let plan = Plan {
        scenario: args.scenario,
        endpoints,
        sources,
        connect_rate: args.connect_rate,
        connect_concurrency: args.connect_concurrency,
        connect_timeout: Duration::from_secs_f64(args.connect_timeout),
        tls_resumption: args.tls_resumption,
        duration: Duration::from_secs_f64(args.duration),
        drain: Duration::from_secs_f64(args.drain),
        heartbeat: args.heartbeat.map(Duration::from_secs_f64),
        ack_delay: Duration::from_millis(args.ack_delay_ms),
        rate_per_connection: args.rate,
        body_size: args.size,
        group: args.group.clone(),
        burst: args.burst,
        burst_interval: Duration::from_millis(args.burst_interval_ms.max(1)),
        storm_fraction: args.fraction.clamp(0.0, 1.0),
        storm_interval: Duration::from_secs_f64(args.storm_interval.max(0.1)),
        server_pid: args.server_pid,
        quiet: args.quiet,
        accept_redelivery: args.accept_redelivery,
    };
    let shard_label = format!("{}/{}", args.shard.index, args.shard.count);
    let report = run::run(plan, users, shard_label).await;
    report.print_summary();
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        println!("report written to {}", path.display());
    }
    if let Some(path) = &args.timeline_csv {
        std::fs::write(path, report.timeline_csv())?;
    }
    if let Some(path) = &args.timeline_png {
        chart::write_png(&report, path)?;
        println!("timeline chart written to {}", path.display());
    }
    Ok(!report.has_errors())
}

//! `reconnect_time`: how long a client takes from a reconnect to its first
//! message stored, with and without TLS session resumption. For each mode
//! one client connects over `--gateway` (tls:// or quic://), then
//! `--rounds` times asks for a reconnect ([`Client::reconnect`], what an
//! app does when the network comes back) and at once sends a message; the
//! time until that send's `SendAck` (new transport + TLS handshake +
//! `Hello` + `Authenticate` + the send's round trip) is recorded. Prints
//! p50/p90/p99 per mode and the handshake counts (full vs resumed) that
//! show which kind each mode got.
//!
//! ```text
//! cargo run --release -p pingme-client --example reconnect_time -- \
//!     --api http://127.0.0.1:21080 --gateway quic://127.0.0.1:21082 --rounds 1000
//! ```
//!
//! `benches/reconnect.sh` runs it over QUIC and TLS against a server with
//! a CA-signed RSA chain (what a real deployment sends and verifies).
//!
//! The server should allow the sends (`limits.messages_per_second`): a
//! refused send is retried after a backoff and would count in the figure.

use std::time::{Duration, Instant};

use clap::Parser;
use pingme_client::v1::ContentType;
use pingme_client::{Client, ClientConfig, Endpoint, Event, Events, HttpApi, Trust};

/// Reconnect-to-first-message timing against a running pingme.
#[derive(Parser, Debug)]
struct Args {
    /// HTTP API base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    api: String,
    /// Gateway: tls:// or quic:// (tcp:// and ws:// work but have no TLS).
    #[arg(long, default_value = "quic://127.0.0.1:7443")]
    gateway: String,
    /// Measured reconnects per mode.
    #[arg(long, default_value_t = 500)]
    rounds: usize,
    /// Unmeasured reconnects per mode first.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Verify the server's certificate against this CA (PEM) with name
    /// `localhost`, as a real app does; without it any certificate is
    /// accepted (the development policy) and no chain is verified.
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let api = HttpApi::new(&args.api);
    let endpoint = match (Endpoint::parse(&args.gateway)?, &args.ca) {
        (Endpoint::Tls { addr, .. }, Some(ca)) => Endpoint::Tls {
            addr,
            server_name: "localhost".into(),
            trust: Trust::CaFile(ca.clone()),
        },
        (Endpoint::Quic { addr, .. }, Some(ca)) => Endpoint::Quic {
            addr,
            server_name: "localhost".into(),
            trust: Trust::CaFile(ca.clone()),
        },
        (endpoint, _) => endpoint,
    };
    let run = std::process::id();
    let password = "reconnect-time-password";
    let me = format!("recon{run}a");
    let peer = format!("recon{run}b");
    let me_id = api.register(&me, password).await?;
    let peer_id = api.register(&peer, password).await?;
    let conversation = format!("dm:{}:{}", me_id.min(peer_id), me_id.max(peer_id));

    println!(
        "{} reconnects per mode over {} (after {} unmeasured), {}",
        args.rounds,
        args.gateway,
        args.warmup,
        match &args.ca {
            Some(ca) => format!("certificate verified against {}", ca.display()),
            None => "any certificate accepted".into(),
        }
    );
    for resumption in [true, false] {
        let device = format!("resumption-{resumption}");
        let login = api.login(&me, password, &device).await?;
        let mut config = ClientConfig::new(endpoint.clone(), login.token);
        config.connect_options.tls_resumption = resumption;
        let (client, mut events) = Client::connect(config).await?;
        let mut took = Vec::with_capacity(args.rounds);
        for round in 0..args.warmup + args.rounds {
            let started = Instant::now();
            client.reconnect()?;
            client
                .send(&conversation, ContentType::Text, format!("round {round}"))
                .await?;
            let elapsed = started.elapsed();
            if round >= args.warmup {
                took.push(elapsed);
            }
            // The reconnect's events, so the channel never fills.
            reconnected(&mut events).await?;
        }
        let handshakes = client.handshakes();
        client.close();
        took.sort();
        let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{:<22} p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  \
             (handshakes: {} full, {} resumed)",
            if resumption {
                "with resumption:"
            } else {
                "without resumption:"
            },
            ms(at(0.50)),
            ms(at(0.90)),
            ms(at(0.99)),
            ms(*took.last().expect("rounds > 0")),
            handshakes.full,
            handshakes.resumed
        );
    }
    Ok(())
}

/// Reads events up to the reconnect's `Connected`.
async fn reconnected(events: &mut Events) -> Result<(), Box<dyn std::error::Error>> {
    let wait = async {
        while let Some(event) = events.recv().await {
            match event {
                Event::Connected {
                    reconnected: true, ..
                } => return Ok(()),
                Event::Closed { reason } => return Err(reason),
                _ => {}
            }
        }
        Err("event stream ended".to_string())
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .map_err(|_| "no Connected within 30 s")?
        .map_err(Into::into)
}

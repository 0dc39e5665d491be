//! `sync_time`: how long a device takes to catch up on a backlog. Registers
//! a sender and a recipient, the sender stores `--messages` messages of
//! `--size` bytes in their DM while the recipient is offline, then the
//! recipient connects `--rounds` times, each time as a new device (its
//! watermarks start at zero, so every round syncs the whole backlog), and
//! the time from connecting to the SDK's `Synced` event is printed.
//!
//! ```text
//! cargo run --release -p pingme-client --example sync_time -- \
//!     --api http://127.0.0.1:18080 --gateway tcp://127.0.0.1:17000 --messages 10000 --size 100
//! ```
//!
//! Exits non-zero when a round misses a message or the connection is cut
//! (e.g. `SLOW_CONSUMER` on a server whose sync pages outgrow the
//! connection's queue).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use pingme_client::v1::ContentType;
use pingme_client::{Client, ClientConfig, Endpoint, Event, HttpApi};
use tokio::sync::Semaphore;

/// Offline sync timing against a running pingme.
#[derive(Parser, Debug)]
struct Args {
    /// HTTP API base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    api: String,
    /// Gateway: tcp://, tls://, quic:// or ws:// address.
    #[arg(long, default_value = "tcp://127.0.0.1:7000")]
    gateway: String,
    /// Messages in the backlog.
    #[arg(long, default_value_t = 10_000)]
    messages: u32,
    /// Body size of each message, bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Sends in flight while the backlog is written.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Times the recipient syncs the backlog (each as a new device).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Give up on a round after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let api = HttpApi::new(&args.api);
    let endpoint = Endpoint::parse(&args.gateway)?;
    // Unique names, so runs against one server do not meet.
    let run = std::process::id();
    let password = "sync-time-password";
    let sender_name = format!("sync{run}s");
    let recipient_name = format!("sync{run}r");
    let sender_id = api.register(&sender_name, password).await?;
    let recipient_id = api.register(&recipient_name, password).await?;
    let conversation = format!(
        "dm:{}:{}",
        sender_id.min(recipient_id),
        sender_id.max(recipient_id)
    );

    let login = api.login(&sender_name, password, "writer").await?;
    let (sender, _sender_events) =
        Client::connect(ClientConfig::new(endpoint.clone(), login.token)).await?;
    let sender = Arc::new(sender);
    let body = bytes::Bytes::from(vec![b'x'; args.size]);
    let gate = Arc::new(Semaphore::new(args.in_flight));
    let started = Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    for _ in 0..args.messages {
        let permit = gate.clone().acquire_owned().await?;
        let (sender, conversation, body) = (sender.clone(), conversation.clone(), body.clone());
        sends.spawn(async move {
            let _permit = permit;
            sender.send(&conversation, ContentType::Text, body).await
        });
    }
    while let Some(sent) = sends.join_next().await {
        sent??;
    }
    sender.close();
    let written = started.elapsed();
    let backlog_bytes = u64::from(args.messages) * args.size as u64;
    println!(
        "backlog: {} messages x {} B ({:.1} MiB) written in {:.2} s",
        args.messages,
        args.size,
        backlog_bytes as f64 / 1_048_576.0,
        written.as_secs_f64()
    );

    let mut failed = false;
    for round in 1..=args.rounds {
        let device = format!("reader-{round}");
        let login = api.login(&recipient_name, password, &device).await?;
        let started = Instant::now();
        let (client, mut events) =
            Client::connect(ClientConfig::new(endpoint.clone(), login.token)).await?;
        let mut received = 0u32;
        let outcome = tokio::time::timeout(Duration::from_secs_f64(args.timeout), async {
            while let Some(event) = events.recv().await {
                match event {
                    Event::Message(m) if m.conversation_id == conversation => received += 1,
                    Event::Synced => return Ok(()),
                    Event::Reconnecting { reason, .. } | Event::Closed { reason } => {
                        return Err(reason);
                    }
                    _ => {}
                }
            }
            Err("event stream ended".to_string())
        })
        .await;
        let took = started.elapsed().as_secs_f64();
        client.close();
        match outcome {
            Ok(Ok(())) if received == args.messages => println!(
                "round {round}: synced {received} messages in {took:.3} s \
                 ({:.0} messages/s, {:.1} MiB/s)",
                f64::from(received) / took,
                backlog_bytes as f64 / 1_048_576.0 / took
            ),
            Ok(Ok(())) => {
                failed = true;
                println!(
                    "round {round}: synced after {took:.3} s but with {received} of {} messages",
                    args.messages
                );
            }
            Ok(Err(reason)) => {
                failed = true;
                println!("round {round}: cut after {took:.3} s and {received} messages: {reason}");
            }
            Err(_) => {
                failed = true;
                println!(
                    "round {round}: not synced within {} s ({received} messages)",
                    args.timeout
                );
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
    Ok(())
}

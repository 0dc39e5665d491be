//! Throughput runs that print numbers (ignored by default; run with
//! `cargo test -p pingme-router --test throughput -- --ignored --nocapture`).
//! They assert completeness, never speed.

mod common;

use std::time::Instant;

use common::*;
use pingme_router::RouterConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints throughput; run on purpose"]
async fn one_to_one_sends_per_second() {
    const PAIRS: usize = 200;
    const PER_SENDER: u64 = 100;
    let h = Harness::start(RouterConfig::default());
    let users = h.users("u", PAIRS * 2).await;
    let sessions: Vec<_> = users.iter().map(|u| h.online(*u, "d", *u)).collect();
    // Closed loop, as clients behave: each sender keeps up to WINDOW
    // sends outstanding and waits for their acks before sending more.
    const WINDOW: u64 = 10;
    let started = Instant::now();
    for round in 0..PER_SENDER / WINDOW {
        for pair in 0..PAIRS {
            let (from, to) = (&sessions[2 * pair], &sessions[2 * pair + 1]);
            for i in round * WINDOW..(round + 1) * WINDOW {
                h.send(
                    from,
                    i + 1,
                    &dm(from.user, to.user),
                    &format!("{i}"),
                    "benchmark body of some length",
                );
            }
        }
        for pair in 0..PAIRS {
            h.answer(sessions[2 * pair].conn, (round + 1) * WINDOW)
                .await;
        }
    }
    let errors: Vec<_> = (0..PAIRS)
        .flat_map(|pair| h.outbox.frames(sessions[2 * pair].conn))
        .filter(|f| {
            matches!(
                f.body,
                Some(pingme_protocol::v1::server_frame::Body::Error(_))
            )
        })
        .collect();
    assert!(
        errors.is_empty(),
        "{} errors, first {:?}",
        errors.len(),
        errors.first()
    );
    let acked = started.elapsed();
    for pair in 0..PAIRS {
        h.deliveries(sessions[2 * pair + 1].conn, PER_SENDER as usize)
            .await;
    }
    let delivered = started.elapsed();
    let total = PAIRS as f64 * PER_SENDER as f64;
    println!(
        "1:1: {total} sends from {PAIRS} connections, {WINDOW} in flight each: all acked in {:.2?} ({:.0} msg/s durable), all delivered in {:.2?}",
        acked,
        total / acked.as_secs_f64(),
        delivered
    );
    h.router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints throughput; run on purpose"]
async fn large_group_deliveries_per_second() {
    const MEMBERS: usize = 10_000;
    const BURST: u64 = 50;
    let h = Harness::start(RouterConfig::default());
    let users = h.users("m", MEMBERS).await;
    let group = h.group(users[0], &users[1..]).await;
    let sessions: Vec<_> = users.iter().map(|u| h.online(*u, "d", *u)).collect();
    let started = Instant::now();
    for i in 0..BURST {
        h.send(&sessions[0], i + 1, &group, &format!("{i}"), "to everyone");
    }
    h.answer(sessions[0].conn, BURST).await;
    let acked = started.elapsed();
    for session in &sessions[1..] {
        h.deliveries(session.conn, BURST as usize).await;
    }
    let elapsed = started.elapsed();
    let deliveries = (MEMBERS - 1) as f64 * BURST as f64;
    println!(
        "fanout: {BURST} messages to a {MEMBERS}-member group: acked in {acked:.2?}, {deliveries} deliveries in {elapsed:.2?} ({:.0} deliveries/s)",
        deliveries / elapsed.as_secs_f64()
    );
    h.router.shutdown().await;
}

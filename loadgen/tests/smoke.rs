//! Runs the real `pingme-loadgen` binary against a tiny in-test gateway
//! (real TCP, `ServerCodec`, 1:1 routing) and checks the report: every
//! acknowledged chat message was delivered once, in order, also across a
//! gateway crash (reconnect, resend, fetch). Also checks the up-front
//! open-files refusal. The end-to-end run against the real server
//! belongs to integration.

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};

use futures::{SinkExt, StreamExt};
use pingme_protocol::v1::{self, AuthOk, Deliver, HelloAck, SendAck, client_frame, server_frame};
use pingme_protocol::{ServerCodec, ServerFrame};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

/// The in-test cluster's state: who is connected where, each
/// conversation's stored messages, the sends already stored (by
/// client_msg_id), and the crash plan.
#[derive(Default)]
struct Cluster {
    peers: HashMap<u64, mpsc::UnboundedSender<ServerFrame>>,
    conversations: HashMap<String, Vec<v1::Message>>,
    stored: HashMap<String, (String, u64)>,
    sends: u64,
    /// At this send (counted over the run), the gateway "dies": the send is
    /// stored and acknowledged but its push is lost, and every connection
    /// is cut. Clients reconnect to it afterwards (as through a balancer
    /// to a surviving gateway).
    crash_at_send: Option<u64>,
    crashes: u64,
    /// At this send, the push alone is lost (the gateway lives on), as
    /// when the directory could not locate the recipient.
    lose_push_at_send: Option<u64>,
}

type Routes = Arc<Mutex<Cluster>>;

fn frame(request_id: u64, body: server_frame::Body) -> ServerFrame {
    ServerFrame {
        request_id,
        body: Some(body),
    }
}

/// Tokens are the user id in text; a dm goes to the other member.
async fn gateway() -> std::net::SocketAddr {
    gateway_sharing(Arc::default(), Arc::default()).await
}

/// What the in-test gateway answers to one client frame from `me`;
/// whether the connections are to be cut after it.
fn answer(
    cluster: &mut Cluster,
    me: u64,
    incoming: pingme_protocol::ClientFrame,
) -> (Option<ServerFrame>, bool) {
    match incoming.body {
        Some(client_frame::Body::Ping(p)) => (
            Some(frame(
                0,
                server_frame::Body::Pong(v1::Pong {
                    client_time_ms: p.client_time_ms,
                    server_time_ms: 0,
                }),
            )),
            false,
        ),
        Some(client_frame::Body::Send(send)) => {
            // A retry gets the first answer, and nothing is delivered again.
            if let Some((conversation_id, seq)) = cluster.stored.get(&send.client_msg_id) {
                let ack = SendAck {
                    client_msg_id: send.client_msg_id,
                    msg_id: String::new(),
                    conversation_id: conversation_id.clone(),
                    seq: *seq,
                    server_time_ms: 0,
                };
                return (
                    Some(frame(incoming.request_id, server_frame::Body::SendAck(ack))),
                    false,
                );
            }
            cluster.sends += 1;
            let crash = cluster.crash_at_send == Some(cluster.sends);
            let stored = cluster
                .conversations
                .entry(send.conversation_id.clone())
                .or_default();
            let seq = stored.len() as u64 + 1;
            let message = v1::Message {
                conversation_id: send.conversation_id.clone(),
                seq,
                sender_id: me,
                client_msg_id: send.client_msg_id.clone(),
                body: send.body,
                ..Default::default()
            };
            stored.push(message.clone());
            cluster.stored.insert(
                send.client_msg_id.clone(),
                (send.conversation_id.clone(), seq),
            );
            let deliver = frame(
                0,
                server_frame::Body::Deliver(Deliver {
                    message: Some(message),
                }),
            );
            if crash {
                // Stored and acknowledged, but the push dies with the gateway.
                cluster.crashes += 1;
            } else if cluster.lose_push_at_send == Some(cluster.sends) {
                // Stored and acknowledged, never pushed.
            } else if send.conversation_id.starts_with("g:") {
                // A group: every other connected user is a member.
                for (user, peer) in &cluster.peers {
                    if *user != me {
                        let _ = peer.send(deliver.clone());
                    }
                }
            } else {
                let parts: Vec<u64> = send
                    .conversation_id
                    .split(':')
                    .skip(1)
                    .map(|p| p.parse().unwrap())
                    .collect();
                let peer = if parts[0] == me { parts[1] } else { parts[0] };
                if let Some(peer) = cluster.peers.get(&peer) {
                    let _ = peer.send(deliver);
                }
            }
            let ack = SendAck {
                client_msg_id: send.client_msg_id,
                msg_id: String::new(),
                conversation_id: send.conversation_id,
                seq,
                server_time_ms: 0,
            };
            (
                Some(frame(incoming.request_id, server_frame::Body::SendAck(ack))),
                crash,
            )
        }
        Some(client_frame::Body::Fetch(fetch)) => {
            let stored = cluster
                .conversations
                .get(&fetch.conversation_id)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let after: Vec<v1::Message> = stored
                .iter()
                .filter(|m| m.seq > fetch.after_seq)
                .cloned()
                .collect();
            let limit = fetch.limit.clamp(1, 200) as usize;
            let page = v1::MessagePage {
                conversation_id: fetch.conversation_id,
                has_more: after.len() > limit,
                messages: after.into_iter().take(limit).collect(),
            };
            (
                Some(frame(incoming.request_id, server_frame::Body::Page(page))),
                false,
            )
        }
        _ => (None, false),
    }
}

/// A gateway routing through `routes` (several gateways sharing it behave
/// as one cluster), counting the users it authenticated in `users`.
async fn gateway_sharing(routes: Routes, users: Arc<Mutex<Vec<u64>>>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Every connection ends when this ticks (the crash).
    let (cut, _) = tokio::sync::broadcast::channel::<()>(1);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let routes = routes.clone();
            let users = users.clone();
            let cut = cut.clone();
            let mut cut_here = cut.subscribe();
            socket.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let mut framed = Framed::new(socket, ServerCodec::default());
                let Some(Ok(_hello)) = framed.next().await else {
                    return;
                };
                let ack = HelloAck {
                    version: 1,
                    max_frame_size: 65536,
                    heartbeat_interval_ms: 1000,
                    idle_timeout_ms: 3000,
                    ..Default::default()
                };
                framed
                    .send(frame(1, server_frame::Body::HelloAck(ack)))
                    .await
                    .unwrap();
                let Some(Ok(auth)) = framed.next().await else {
                    return;
                };
                let Some(client_frame::Body::Authenticate(a)) = auth.body else {
                    return;
                };
                let me: u64 = a.token.parse().unwrap();
                users.lock().unwrap().push(me);
                let ok = AuthOk {
                    user_id: me,
                    device_id: "d".into(),
                    server_time_ms: 0,
                };
                framed
                    .send(frame(auth.request_id, server_frame::Body::AuthOk(ok)))
                    .await
                    .unwrap();
                let (tx, mut rx) = mpsc::unbounded_channel();
                routes.lock().unwrap().peers.insert(me, tx);
                loop {
                    tokio::select! {
                        incoming = framed.next() => {
                            let Some(Ok(incoming)) = incoming else { return };
                            let (reply, crash) = answer(&mut routes.lock().unwrap(), me, incoming);
                            if let Some(reply) = reply && framed.send(reply).await.is_err() { return; }
                            if crash {
                                let _ = cut.send(());
                                return;
                            }
                        }
                        out = rx.recv() => {
                            let Some(out) = out else { return };
                            if framed.send(out).await.is_err() { return; }
                        }
                        _ = cut_here.recv() => return,
                    }
                }
            });
        }
    });
    addr
}

/// Runs the binary with `args` against `addr` and returns its JSON report.
async fn run_loadgen(addr: std::net::SocketAddr, name: &str, args: &[&str]) -> serde_json::Value {
    run_loadgen_on(&format!("tcp://{addr}"), name, args).await
}

/// [`run_loadgen`] with the `--gateway` argument as given.
async fn run_loadgen_on(gateway: &str, name: &str, args: &[&str]) -> serde_json::Value {
    let gateway = gateway.to_string();
    let dir = std::env::temp_dir().join(format!("pingme-loadgen-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tokens = dir.join("tokens.txt");
    std::fs::write(
        &tokens,
        (1..=50)
            .map(|id| format!("{id} {id}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let report = dir.join("report.json");
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let output = tokio::task::spawn_blocking({
        let (tokens, report) = (tokens.clone(), report.clone());
        move || {
            Command::new(env!("CARGO_BIN_EXE_pingme-loadgen"))
                .args(&args)
                .arg("--quiet")
                .arg("--gateway")
                .arg(&gateway)
                .arg("--tokens")
                .arg(&tokens)
                .arg("--report")
                .arg(&report)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    report
}

/// With several gateways, connection i goes to gateway i mod n, so every
/// chat pair (i, i ^ 1) spans two gateways; the run still accounts for
/// every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_spread_over_several_gateways_round_robin() {
    let routes: Routes = Arc::default();
    let (on_a, on_b) = (Arc::default(), Arc::default());
    let a = gateway_sharing(routes.clone(), Arc::clone(&on_a)).await;
    let b = gateway_sharing(routes, Arc::clone(&on_b)).await;
    let report = run_loadgen_on(
        &format!("tcp://{a},tcp://{b}"),
        "spread",
        &[
            "run",
            "chat",
            "-n",
            "20",
            "--rate",
            "10",
            "--duration",
            "1",
            "--drain",
            "1",
        ],
    )
    .await;
    let mut on_a = on_a.lock().unwrap().clone();
    let mut on_b = on_b.lock().unwrap().clone();
    on_a.sort_unstable();
    on_b.sort_unstable();
    // Users 1..=20 in token-file order: even positions on a, odd on b.
    assert_eq!(on_a, (1..=20).step_by(2).collect::<Vec<u64>>());
    assert_eq!(on_b, (2..=20).step_by(2).collect::<Vec<u64>>());
    let deliveries = &report["deliveries"];
    assert!(
        report["send_to_ack"]["count"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_eq!(deliveries["delivered"], deliveries["expected"], "{report}");
    assert_eq!(deliveries["lost"], 0);
}

/// A gateway that dies mid-run (every connection cut; the send it was
/// handling stored and acknowledged but never pushed): each connection
/// reconnects, sends its unacknowledged sends again and fetches what it
/// missed, and the run accounts for every message: nothing lost, pushed
/// twice or reordered, one outage with everyone back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_crash_loses_nothing_and_everyone_comes_back() {
    let routes: Routes = Arc::new(Mutex::new(Cluster {
        crash_at_send: Some(60),
        ..Cluster::default()
    }));
    let addr = gateway_sharing(routes.clone(), Arc::default()).await;
    let report = run_loadgen(
        addr,
        "crash",
        &[
            "run",
            "chat",
            "-n",
            "10",
            "--rate",
            "20",
            "--duration",
            "2",
            "--drain",
            "2",
        ],
    )
    .await;
    assert_eq!(routes.lock().unwrap().crashes, 1, "the crash happened");
    let deliveries = &report["deliveries"];
    assert_eq!(deliveries["lost"], 0, "{report}");
    assert_eq!(deliveries["duplicated"], 0, "{report}");
    assert_eq!(deliveries["out_of_order"], 0, "{report}");
    assert_eq!(deliveries["stored_twice"], 0, "{report}");
    assert_eq!(deliveries["delivered"], deliveries["expected"], "{report}");
    assert!(
        deliveries["recovered"].as_u64().unwrap() >= 1,
        "the lost push was fetched: {deliveries}"
    );
    assert_eq!(report["reconnects"], 10, "{report}");
    assert_eq!(report["reconnect_latency"]["count"], 10);
    let outages = report["outages"].as_array().unwrap();
    assert_eq!(outages.len(), 1, "{outages:?}");
    assert_eq!(outages[0]["connections"], 10);
    assert!(
        outages[0]["all_back_unix_ms"].as_u64().is_some(),
        "{outages:?}"
    );
}

/// A push the server never sent (the connection stays up) leaves a gap
/// that the next message of the conversation shows: the connection fetches
/// it, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_that_never_came_is_fetched_from_the_gap_it_leaves() {
    let routes: Routes = Arc::new(Mutex::new(Cluster {
        lose_push_at_send: Some(30),
        ..Cluster::default()
    }));
    let addr = gateway_sharing(routes, Arc::default()).await;
    let report = run_loadgen(
        addr,
        "gap",
        &[
            "run",
            "chat",
            "-n",
            "2",
            "--rate",
            "20",
            "--duration",
            "3",
            "--drain",
            "3",
        ],
    )
    .await;
    let deliveries = &report["deliveries"];
    assert_eq!(deliveries["lost"], 0, "{report}");
    assert_eq!(deliveries["recovered"], 1, "{report}");
    assert_eq!(report["reconnects"], 0, "{report}");
    assert!(report["gap_fetches"].as_u64().unwrap() >= 1, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fanout_run_delivers_each_burst_to_every_other_member() {
    let addr = gateway().await;
    let report = run_loadgen(
        addr,
        "fanout",
        &[
            "run",
            "fanout",
            "-n",
            "20",
            "--burst",
            "5",
            "--burst-interval-ms",
            "200",
            "--duration",
            "1",
            "--drain",
            "1",
        ],
    )
    .await;
    let deliveries = &report["deliveries"];
    let acked = report["send_to_ack"]["count"].as_u64().unwrap();
    assert!(acked >= 5, "{report}");
    assert_eq!(deliveries["expected"].as_u64().unwrap(), acked * 19);
    assert_eq!(deliveries["delivered"], deliveries["expected"]);
    assert_eq!(deliveries["lost"], 0);
    assert_eq!(deliveries["out_of_order"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_reconnects_a_fraction_each_interval() {
    let addr = gateway().await;
    let report = run_loadgen(
        addr,
        "storm",
        &[
            "run",
            "reconnect-storm",
            "-n",
            "50",
            "--fraction",
            "0.5",
            "--storm-interval",
            "0.5",
            "--duration",
            "1.2",
            "--drain",
            "0.2",
            "--source-addrs",
            "127.0.0.2-127.0.0.9",
        ],
    )
    .await;
    let reconnects = report["reconnects"].as_u64().unwrap();
    // Two storms of about half of 50 connections each.
    assert!((20..=80).contains(&reconnects), "{reconnects}");
    assert_eq!(report["connect_failures"], 0);
    assert_eq!(
        report["connect_latency"]["count"].as_u64().unwrap(),
        50 + reconnects
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_run_reports_every_message_delivered_once() {
    let addr = gateway().await;
    let dir = std::env::temp_dir().join(format!("pingme-loadgen-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tokens = dir.join("tokens.txt");
    std::fs::write(
        &tokens,
        (1..=10)
            .map(|id| format!("{id} {id}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let report = dir.join("report.json");
    let chart = dir.join("timeline.png");
    let output = tokio::task::spawn_blocking({
        let (tokens, report, chart) = (tokens.clone(), report.clone(), chart.clone());
        move || {
            Command::new(env!("CARGO_BIN_EXE_pingme-loadgen"))
                .args([
                    "run",
                    "chat",
                    "-n",
                    "10",
                    "--rate",
                    "20",
                    "--duration",
                    "2",
                    "--drain",
                    "1",
                    "--quiet",
                ])
                .arg("--gateway")
                .arg(format!("tcp://{addr}"))
                .arg("--tokens")
                .arg(&tokens)
                .arg("--report")
                .arg(&report)
                .arg("--timeline-png")
                .arg(&chart)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["connections_established"], 10);
    let deliveries = &report["deliveries"];
    let expected = deliveries["expected"].as_u64().unwrap();
    assert!(
        expected >= 100,
        "10 connections at 20/s for 2 s: {deliveries}"
    );
    assert_eq!(deliveries["delivered"].as_u64().unwrap(), expected);
    assert_eq!(deliveries["lost"], 0);
    assert_eq!(deliveries["duplicated"], 0);
    assert_eq!(deliveries["out_of_order"], 0);
    assert_eq!(report["send_to_ack"]["count"].as_u64().unwrap(), expected);
    assert_eq!(
        report["send_to_deliver"]["count"].as_u64().unwrap(),
        expected
    );
    // Per-second send-to-deliver percentiles are in the timeline, and the
    // chart of it was drawn.
    let timeline = report["timeline"].as_array().unwrap();
    assert!(
        timeline
            .iter()
            .any(|s| s["deliver_p99_us"].as_u64().unwrap() > 0
                && s["deliver_p50_us"].as_u64().unwrap() <= s["deliver_p99_us"].as_u64().unwrap()),
        "{timeline:?}"
    );
    assert_eq!(png_size(&chart), Some((1200, 800)));

    // The merge subcommand reads it back and doubles the counts.
    let merged = dir.join("merged.json");
    let merged_chart = dir.join("merged.png");
    let status = Command::new(env!("CARGO_BIN_EXE_pingme-loadgen"))
        .arg("merge")
        .arg(dir.join("report.json"))
        .arg(dir.join("report.json"))
        .arg("--report")
        .arg(&merged)
        .arg("--timeline-png")
        .arg(&merged_chart)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(png_size(&merged_chart), Some((1200, 800)));
    let merged: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&merged).unwrap()).unwrap();
    assert_eq!(
        merged["deliveries"]["expected"].as_u64().unwrap(),
        2 * expected
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Width and height of a PNG file (signature and IHDR checked), if it is one.
fn png_size(path: &std::path::Path) -> Option<(u32, u32)> {
    let bytes = std::fs::read(path).ok()?;
    const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    if bytes.get(..8)? != SIGNATURE || bytes.get(12..16)? != b"IHDR" {
        return None;
    }
    let width = u32::from_be_bytes(bytes.get(16..20)?.try_into().ok()?);
    let height = u32::from_be_bytes(bytes.get(20..24)?.try_into().ok()?);
    Some((width, height))
}

#[test]
fn more_connections_than_open_files_fail_up_front() {
    let output = Command::new(env!("CARGO_BIN_EXE_pingme-loadgen"))
        .args(["run", "idle", "-n", "100000000", "--tokens", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("open files"), "{stderr}");
}

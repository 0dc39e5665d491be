//! Durability end to end: `pingme serve` is killed with SIGKILL in the middle
//! of a burst of sends from many clients, restarted on the same data, and
//! every message acknowledged before the kill must be stored exactly once,
//! with dense seqs, and reach every member by sync.

mod e2e;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e::{Conn, Server};

const SENDERS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("data")).await;
    let http = server.http();
    let (_hub, hub_token) = http.user("hub", "phone").await;
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        senders.push(http.user(&format!("sender{i}"), "phone").await);
    }
    let members: Vec<u64> = senders.iter().map(|(id, _)| *id).collect();
    let group = http.group(&hub_token, "burst", &members).await;

    // Every ack any sender received: client_msg_id -> (conversation, seq).
    let acked: Arc<Mutex<BTreeMap<String, (String, u64)>>> = Arc::default();
    // The one send each sender had in flight when the server died.
    let in_flight: Arc<Mutex<Vec<(String, String, String)>>> = Arc::default();
    let mut tasks = Vec::new();
    for (i, (_, token)) in senders.iter().enumerate() {
        let (tcp, token, group) = (server.tcp, token.clone(), group.clone());
        let (acked, in_flight) = (acked.clone(), in_flight.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(tcp, &token).await;
            for n in 0.. {
                let client_msg_id = format!("s{i}-{n}");
                match conn.try_send(&group, &client_msg_id, "burst").await {
                    Some(Ok(ack)) => {
                        acked
                            .lock()
                            .unwrap()
                            .insert(client_msg_id, (ack.conversation_id, ack.seq));
                    }
                    Some(Err(code)) => panic!("send refused: {code:?}"),
                    None => {
                        in_flight
                            .lock()
                            .unwrap()
                            .push((token, group, client_msg_id));
                        return;
                    }
                }
            }
        }));
    }
    // Let the burst run, then kill without warning.
    let burst = Duration::from_millis(700 + rand_millis(600));
    tokio::time::sleep(burst).await;
    server.kill();
    for task in tasks {
        task.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > SENDERS,
        "the burst acknowledged only {} messages",
        acked.len()
    );

    server.restart().await;
    // Each sender retries its in-flight send with the same client_msg_id, as
    // the SDK does after a reconnect: stored at most once either way.
    let mut retried = BTreeMap::new();
    let in_flight = in_flight.lock().unwrap().clone();
    for (token, group, client_msg_id) in in_flight {
        let mut conn = Conn::connect(server.tcp, &token).await;
        let ack = conn.send(&group, &client_msg_id, "burst").await.unwrap();
        retried.insert(client_msg_id, (ack.conversation_id, ack.seq));
    }

    let mut hub = Conn::connect(server.tcp, &hub_token).await;
    let stored = hub.sync().await;
    let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=stored.len() as u64).collect::<Vec<_>>(),
        "dense seqs after restart"
    );
    let ids: HashSet<&str> = stored.iter().map(|m| m.client_msg_id.as_str()).collect();
    assert_eq!(ids.len(), stored.len(), "no client_msg_id stored twice");
    let by_id: BTreeMap<&str, u64> = stored
        .iter()
        .map(|m| (m.client_msg_id.as_str(), m.seq))
        .collect();
    for (client_msg_id, (conversation, seq)) in acked.iter().chain(retried.iter()) {
        assert_eq!(conversation, &group);
        assert_eq!(
            by_id.get(client_msg_id.as_str()),
            Some(seq),
            "acknowledged {client_msg_id} lost or moved"
        );
    }
    // Every sender also sees the whole timeline after reconnecting.
    let (_, token) = &senders[0];
    let mut sender = Conn::connect(server.tcp, token).await;
    assert_eq!(sender.sync().await.len(), stored.len());
}

/// A small random delay, so the kill lands at a different point each run.
fn rand_millis(max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    u64::from(nanos) % max
}

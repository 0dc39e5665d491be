//! The router's send path end to end in one process: validation, per-
//! conversation seq assignment by the conversation workers, the batched
//! append into the embedded store, the ack, and the delivery to the other
//! member through a counting outbox (no sockets). Two stores: the durable
//! one (fsync per group commit) and the benchmark-only one without fsync,
//! which isolates the pipeline's own cost.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pingme_protocol::v1::{ContentType, SendMessage, client_frame};
use pingme_router::port::{ConnRef, Dispatch, Outbox, SessionInfo, UserId};
use pingme_router::{Router, RouterConfig};
use pingme_storage::embedded::{Durability, EmbeddedStore};
use pingme_storage::{ConversationId, Stores, UserStore};
use tokio::sync::Notify;

/// Sends in flight per measured batch, over this many conversations.
const SENDS: usize = 2_000;
const CONVERSATIONS: u64 = 200;

/// Counts acks (frames to a connection) and deliveries; wakes the bench
/// when a batch's acks are all in.
#[derive(Default)]
struct CountingOutbox {
    acks: AtomicUsize,
    deliveries: AtomicUsize,
    done: Notify,
    target: AtomicUsize,
}

impl Outbox for CountingOutbox {
    fn to_connection(&self, _conn: ConnRef, _frame: Bytes) -> bool {
        let acks = self.acks.fetch_add(1, Ordering::AcqRel) + 1;
        if acks == self.target.load(Ordering::Acquire) {
            self.done.notify_one();
        }
        true
    }

    fn to_users(&self, users: &[UserId], _frame: &Bytes, _skip: Option<ConnRef>) -> usize {
        self.deliveries.fetch_add(users.len(), Ordering::Relaxed);
        users.len()
    }

    fn online(&self, users: &[UserId]) -> Vec<bool> {
        vec![true; users.len()]
    }

    fn disconnect(&self, _user: UserId, _device: Option<&str>, _frame: Bytes) -> usize {
        0
    }
}

fn routing(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("routing");
    group.throughput(Throughput::Elements(SENDS as u64));
    group.sample_size(10);
    for (name, durability) in [
        ("durable_1to1_sends", Durability::Sync),
        ("no_fsync_1to1_sends", Durability::UnsafeNoSyncForBenchmarks),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (router, outbox, sessions) = runtime.block_on(async {
            let store = Arc::new(EmbeddedStore::open(dir.path(), durability).unwrap());
            // Users 1..=CONVERSATIONS each talk to user CONVERSATIONS + 1.
            let mut users = Vec::new();
            for i in 0..=CONVERSATIONS {
                users.push(
                    store
                        .create_user(&format!("user{i}"), "x", 0)
                        .await
                        .unwrap()
                        .id,
                );
            }
            let outbox = Arc::new(CountingOutbox::default());
            let router = Router::start(
                Stores::all_from(store),
                outbox.clone(),
                RouterConfig::default(),
            );
            let peer = *users.last().unwrap();
            let sessions: Vec<(SessionInfo, String)> = users[..CONVERSATIONS as usize]
                .iter()
                .enumerate()
                .map(|(i, user)| {
                    let session = SessionInfo {
                        user: *user,
                        device: Arc::from("bench"),
                        conn: ConnRef {
                            shard: 0,
                            conn_id: i as u64,
                        },
                    };
                    (
                        session,
                        ConversationId::direct(*user, peer).unwrap().to_string(),
                    )
                })
                .collect();
            (router, outbox, sessions)
        });
        let mut next_id = 0u64;
        group.bench_function(name, |b| {
            b.iter(|| {
                runtime.block_on(async {
                    outbox.acks.store(0, Ordering::Release);
                    outbox.target.store(SENDS, Ordering::Release);
                    let done = outbox.done.notified();
                    for i in 0..SENDS {
                        next_id += 1;
                        let (session, conversation) = &sessions[i % sessions.len()];
                        router.frame(
                            session,
                            next_id,
                            client_frame::Body::Send(SendMessage {
                                client_msg_id: format!("b{next_id}"),
                                conversation_id: conversation.clone(),
                                content_type: ContentType::Text as i32,
                                body: Bytes::from_static(&[b'x'; 100]),
                            }),
                        );
                    }
                    done.await;
                })
            })
        });
        runtime.block_on(router.shutdown());
    }
    group.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);

//! Embedded store micro benchmarks: durable append latency and throughput
//! (one call at a time, batched calls, and many concurrent callers sharing
//! group-commit rounds) and timeline page reads.
//!
//! `cargo bench -p pingme-benches --bench store`. For the sustained
//! throughput figure use `storage/examples/append_throughput.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pingme_storage::embedded::{Durability, EmbeddedStore};
use pingme_storage::{ConversationId, ConversationStore, MessageStore, NewMessage, UserStore};

/// Unique client_msg_ids across iterations, so every append stores.
static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

fn message(conversation: ConversationId, sender: u64) -> NewMessage {
    let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
    NewMessage {
        conversation,
        sender,
        sender_device: "bench".into(),
        client_msg_id: format!("c{key}"),
        msg_id: format!("m{key}"),
        content_type: 1,
        body: Bytes::from_static(&[b'x'; 100]),
        server_time_ms: 0,
    }
}

/// A store with one user and `groups` groups they belong to.
async fn store_with_groups(
    dir: &std::path::Path,
    durability: Durability,
    groups: usize,
) -> (Arc<EmbeddedStore>, u64, Vec<ConversationId>) {
    let store = EmbeddedStore::open(dir, durability).expect("open store");
    let user = store.create_user("bench", "h", 0).await.expect("user").id;
    let mut conversations = Vec::with_capacity(groups);
    for _ in 0..groups {
        let group = store.create_group(user, "g", &[], 0).await.expect("group");
        conversations.push(ConversationId::Group(group.id));
    }
    (Arc::new(store), user, conversations)
}

fn append(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, user, conversations) =
        runtime.block_on(store_with_groups(dir.path(), Durability::Sync, 64));

    let mut group = c.benchmark_group("store_append_sync");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));

    group.throughput(Throughput::Elements(1));
    group.bench_function("one_message_one_caller", |b| {
        b.to_async(&runtime).iter(|| {
            let store = store.clone();
            let batch = vec![message(conversations[0], user)];
            async move { store.append(batch).await.expect("append") }
        })
    });

    group.throughput(Throughput::Elements(64));
    group.bench_function("batch_of_64_one_caller", |b| {
        b.to_async(&runtime).iter(|| {
            let store = store.clone();
            let batch: Vec<_> = (0..64)
                .map(|i| message(conversations[i % conversations.len()], user))
                .collect();
            async move { store.append(batch).await.expect("append") }
        })
    });

    const CALLERS: usize = 256;
    group.throughput(Throughput::Elements(CALLERS as u64));
    group.bench_function("one_message_256_concurrent_callers", |b| {
        b.to_async(&runtime).iter(|| {
            let store = store.clone();
            let conversations = conversations.clone();
            async move {
                let calls: Vec<_> = (0..CALLERS)
                    .map(|i| {
                        let store = store.clone();
                        let batch = vec![message(conversations[i % conversations.len()], user)];
                        tokio::spawn(async move { store.append(batch).await.expect("append") })
                    })
                    .collect();
                for call in calls {
                    call.await.expect("task");
                }
            }
        })
    });
    group.finish();

    // Reads: a page of 100 from a 10,000-message timeline.
    let timeline = conversations[1];
    runtime.block_on(async {
        for _ in 0..100 {
            let batch: Vec<_> = (0..100).map(|_| message(timeline, user)).collect();
            store.append(batch).await.expect("fill");
        }
    });
    let mut reads = c.benchmark_group("store_read");
    reads
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    reads.throughput(Throughput::Elements(100));
    reads.bench_function("page_of_100", |b| {
        let mut after = 0u64;
        b.to_async(&runtime).iter(|| {
            let store = store.clone();
            after = (after + 997) % 9_900;
            let from = after;
            async move { store.messages(timeline, from, 0, 100).await.expect("page") }
        })
    });
    reads.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);

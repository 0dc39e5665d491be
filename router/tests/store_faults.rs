//! A store that fails: appends are retried with backoff, and when the
//! tries run out the sender gets `STORAGE_UNAVAILABLE` and nothing is
//! acknowledged; a later retry of the same send is stored once.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use pingme_protocol::ErrorCode;
use pingme_router::{Router, RouterConfig};
use pingme_storage::embedded::EmbeddedStore;
use pingme_storage::*;

/// The embedded store's messages, with the next `failing_appends` appends
/// failing; every other role is the embedded store itself.
struct FlakyMessages {
    inner: Arc<EmbeddedStore>,
    failing_appends: AtomicU32,
    appends: AtomicU32,
}

#[async_trait]
impl MessageStore for FlakyMessages {
    async fn append(&self, batch: Vec<NewMessage>) -> StoreResult<Vec<StoreResult<Appended>>> {
        self.appends.fetch_add(1, Ordering::SeqCst);
        let failing = self
            .failing_appends
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(StoreError::Unavailable("injected outage".into()));
        }
        self.inner.append(batch).await
    }
    async fn messages(
        &self,
        conversation: ConversationId,
        after: Seq,
        until: Seq,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        self.inner.messages(conversation, after, until, limit).await
    }
    async fn latest_seqs(&self, conversations: &[ConversationId]) -> StoreResult<Vec<Seq>> {
        self.inner.latest_seqs(conversations).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_are_retried_and_an_outage_is_reported_not_acked() {
    let (_dir, inner) = open_store();
    let store = Arc::new(FlakyMessages {
        inner: inner.clone(),
        failing_appends: AtomicU32::new(0),
        appends: AtomicU32::new(0),
    });
    let outbox = Arc::new(RecordingOutbox::default());
    let router = Router::start(
        Stores {
            messages: store.clone(),
            ..Stores::all_from(inner.clone())
        },
        outbox.clone(),
        RouterConfig {
            retry_initial_backoff: Duration::from_millis(5),
            ..RouterConfig::default()
        },
    );
    let alice = inner.create_user("alice", "h", 1).await.unwrap().id;
    let bob = inner.create_user("bob", "h", 1).await.unwrap().id;
    let a = offline_session(alice, "phone", 1);
    outbox.connect(alice, a.conn);
    let conversation = dm(alice, bob);
    let answer = |request_id| {
        let outbox = outbox.clone();
        async move {
            eventually(|| {
                outbox
                    .frames(a.conn)
                    .into_iter()
                    .find(|f| f.request_id == request_id)
            })
            .await
        }
    };

    // Two failures, then success: the third try stores it.
    store.failing_appends.store(2, Ordering::SeqCst);
    pingme_router::port::Dispatch::frame(&*router, &a, 1, send_body(&conversation, "c-1", 1, b"x"));
    assert_eq!(ack(&answer(1).await).seq, 1);
    assert_eq!(store.appends.load(Ordering::SeqCst), 3);

    // A longer outage: the sender is told, nothing is acknowledged.
    store.failing_appends.store(3, Ordering::SeqCst);
    pingme_router::port::Dispatch::frame(&*router, &a, 2, send_body(&conversation, "c-2", 1, b"y"));
    let refused = error(&answer(2).await);
    assert_eq!(
        (refused.code, refused.client_msg_id.as_str()),
        (ErrorCode::StorageUnavailable.code(), "c-2")
    );

    // The client's retry after the outage is stored once, as seq 2.
    pingme_router::port::Dispatch::frame(&*router, &a, 3, send_body(&conversation, "c-2", 1, b"y"));
    assert_eq!(ack(&answer(3).await).seq, 2);
    let stored = inner
        .messages(conversation.parse().unwrap(), 0, 0, 10)
        .await
        .unwrap();
    assert_eq!(
        stored
            .iter()
            .map(|m| m.client_msg_id.as_str())
            .collect::<Vec<_>>(),
        vec!["c-1", "c-2"]
    );
    router.shutdown().await;
}

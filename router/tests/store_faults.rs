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

/// The embedded store, with the next `failing_appends` appends failing.
struct FlakyStore {
    inner: Arc<EmbeddedStore>,
    failing_appends: AtomicU32,
    appends: AtomicU32,
}

#[async_trait]
impl UserStore for FlakyStore {
    async fn create_user(
        &self,
        username: &str,
        hash: &str,
        now_ms: i64,
    ) -> StoreResult<UserRecord> {
        self.inner.create_user(username, hash, now_ms).await
    }
    async fn user_by_name(&self, username: &str) -> StoreResult<Option<UserRecord>> {
        self.inner.user_by_name(username).await
    }
    async fn user_by_id(&self, id: UserId) -> StoreResult<Option<UserRecord>> {
        self.inner.user_by_id(id).await
    }
    async fn touch_device(
        &self,
        user: UserId,
        device: &str,
        now_ms: i64,
    ) -> StoreResult<DeviceRecord> {
        self.inner.touch_device(user, device, now_ms).await
    }
    async fn device(&self, user: UserId, device: &str) -> StoreResult<Option<DeviceRecord>> {
        self.inner.device(user, device).await
    }
    async fn bump_token_generation(&self, user: UserId, device: &str) -> StoreResult<u64> {
        self.inner.bump_token_generation(user, device).await
    }
}

#[async_trait]
impl ConversationStore for FlakyStore {
    async fn create_group(
        &self,
        owner: UserId,
        name: &str,
        members: &[UserId],
        now_ms: i64,
    ) -> StoreResult<GroupRecord> {
        self.inner.create_group(owner, name, members, now_ms).await
    }
    async fn group(&self, id: GroupId) -> StoreResult<Option<GroupRecord>> {
        self.inner.group(id).await
    }
    async fn add_members(&self, group: GroupId, members: &[Member]) -> StoreResult<u64> {
        self.inner.add_members(group, members).await
    }
    async fn remove_member(&self, group: GroupId, user: UserId) -> StoreResult<bool> {
        self.inner.remove_member(group, user).await
    }
    async fn member_role(&self, group: GroupId, user: UserId) -> StoreResult<Option<Role>> {
        self.inner.member_role(group, user).await
    }
    async fn is_member(&self, conversation: ConversationId, user: UserId) -> StoreResult<bool> {
        self.inner.is_member(conversation, user).await
    }
    async fn members_page(
        &self,
        group: GroupId,
        after: UserId,
        limit: usize,
    ) -> StoreResult<Vec<Member>> {
        self.inner.members_page(group, after, limit).await
    }
    async fn user_conversations(
        &self,
        user: UserId,
        after: Option<ConversationId>,
        limit: usize,
    ) -> StoreResult<Vec<ConversationId>> {
        self.inner.user_conversations(user, after, limit).await
    }
}

#[async_trait]
impl MessageStore for FlakyStore {
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

#[async_trait]
impl WatermarkStore for FlakyStore {
    async fn set_delivered(
        &self,
        user: UserId,
        device: &str,
        conversation: ConversationId,
        seq: Seq,
    ) -> StoreResult<()> {
        self.inner
            .set_delivered(user, device, conversation, seq)
            .await
    }
    async fn set_read(
        &self,
        user: UserId,
        conversation: ConversationId,
        seq: Seq,
    ) -> StoreResult<()> {
        self.inner.set_read(user, conversation, seq).await
    }
    async fn watermarks(
        &self,
        user: UserId,
        device: &str,
        conversations: &[ConversationId],
    ) -> StoreResult<Vec<Watermarks>> {
        self.inner.watermarks(user, device, conversations).await
    }
}

#[async_trait]
impl DeadLetterStore for FlakyStore {
    async fn put_dead_letter(&self, letter: DeadLetter) -> StoreResult<u64> {
        self.inner.put_dead_letter(letter).await
    }
    async fn dead_letters(&self, after: u64, limit: usize) -> StoreResult<Vec<DeadLetter>> {
        self.inner.dead_letters(after, limit).await
    }
    async fn remove_dead_letter(&self, id: u64) -> StoreResult<bool> {
        self.inner.remove_dead_letter(id).await
    }
    async fn dead_letter_count(&self) -> StoreResult<u64> {
        self.inner.dead_letter_count().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_are_retried_and_an_outage_is_reported_not_acked() {
    let (_dir, inner) = open_store();
    let store = Arc::new(FlakyStore {
        inner: inner.clone(),
        failing_appends: AtomicU32::new(0),
        appends: AtomicU32::new(0),
    });
    let outbox = Arc::new(RecordingOutbox::default());
    let router = Router::start(
        store.clone() as Arc<dyn Store>,
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

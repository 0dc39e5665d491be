//! What the integration tests of several pingme crates share, written once:
//! waiting for a condition without depending on timing ([`eventually`],
//! [`eventually_async`], bounded by [`PATIENCE`]), a recording
//! [`Outbox`](pingme_router::port::Outbox) standing in for the gateway
//! ([`RecordingOutbox`]), an embedded store in a temp dir ([`temp_store`])
//! names unique to a run ([`unique_suffix`]) and ports for servers the
//! tests start ([`free_port`]).

mod outbox;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use pingme_storage::embedded::{Durability, EmbeddedStore};

pub use outbox::{Disconnect, RecordingOutbox};

/// How long a test waits for something that must happen. Generous: the
/// machines tests run on are small and shared, and a wait that ends early
/// costs nothing.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(5);

/// Polls `probe` until it yields, failing the test after [`PATIENCE`].
pub async fn eventually<T>(mut probe: impl FnMut() -> Option<T>) -> T {
    eventually_async(|| std::future::ready(probe())).await
}

/// Polls an async `probe` until it yields, failing the test after
/// [`PATIENCE`].
pub async fn eventually_async<T, F, Fut>(mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting after {PATIENCE:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A port nothing listens on now, and never handed out before in this
/// test process. The listeners bind with SO_REUSEPORT, so two servers of
/// the tests running in parallel given the same port would silently share
/// it (and each other's clients); the kernel may hand a port it just
/// freed out again, so the ones given are remembered.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// An embedded store (fsync on every append, as in production) in a fresh
/// temp dir, deleted when the dir is dropped.
pub fn temp_store() -> (tempfile::TempDir, Arc<EmbeddedStore>) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Arc::new(EmbeddedStore::open(dir.path(), Durability::Sync).expect("a store"));
    (dir, store)
}

/// A suffix that keeps one test's topics, groups, key prefixes and
/// databases apart from every other run's on a shared service.
pub fn unique_suffix() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

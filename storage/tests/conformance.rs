//! Runs the conformance suite against the embedded store, one test per
//! behaviour, each on a fresh data directory.
//!
//! MySQL and ScyllaDB: when those backends exist, a test here will build
//! them from `MYSQL_URL` / `SCYLLA_URI` and call the same suite functions
//! (see `docs/storage.md`); there is no such backend yet, so no such test.

use std::sync::Arc;

use pingme_storage::Stores;
use pingme_storage::conformance::{self, StoreRole};
use pingme_storage::embedded::{Durability, EmbeddedStore};

fn open(durability: Durability) -> (tempfile::TempDir, Stores) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(dir.path(), durability).expect("open store");
    (dir, Stores::all_from(Arc::new(store)))
}

macro_rules! conformance_test {
    ($name:ident $(, $arg:expr)*) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (_dir, store) = open(Durability::Sync);
            conformance::$name(&store $(, $arg)*).await;
        }
    };
}

conformance_test!(users_and_devices);
conformance_test!(groups_and_membership);
conformance_test!(idempotency);
conformance_test!(concurrent_duplicates);
conformance_test!(dense_seqs_under_concurrency, 8, 32, 50);

/// Two appenders race on one conversation (an ownership move): no seq
/// assigned twice, no acknowledged message lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_appenders() {
    let (_dir, stores) = open(Durability::Sync);
    conformance::racing_appenders(&stores, &stores.clone(), 300).await;
}
conformance_test!(message_paging);
conformance_test!(latest_seqs);
conformance_test!(user_conversation_paging);
conformance_test!(watermarks_only_move_forward);
conformance_test!(dead_letters);
conformance_test!(bad_input_gets_typed_errors);

/// 100k members: registering 100k users with an fsync each would take
/// minutes, so this one check runs without fsync; membership code is the
/// same either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_group_member_paging() {
    let (_dir, store) = open(Durability::UnsafeNoSyncForBenchmarks);
    conformance::huge_group_member_paging(&store, 100_000).await;
}

/// Fresh stores without fsync, for the whole-suite runs.
fn fresh(dirs: &std::sync::Mutex<Vec<tempfile::TempDir>>) -> Stores {
    let (dir, stores) = open(Durability::UnsafeNoSyncForBenchmarks);
    dirs.lock().unwrap().push(dir);
    stores
}

/// The whole suite in one go, as another backend would run it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_on_fresh_stores() {
    let dirs = std::sync::Mutex::new(Vec::new());
    conformance::run_all(|| fresh(&dirs)).await;
}

/// One role's checks alone, as a backend serving only that role runs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_role_alone() {
    let dirs = std::sync::Mutex::new(Vec::new());
    conformance::run_role(StoreRole::Messages, || fresh(&dirs)).await;
}

/// Everything the suite checks still holds after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let reopen = || {
        Stores::all_from(Arc::new(
            EmbeddedStore::open(dir.path(), Durability::Sync).unwrap(),
        ))
    };
    {
        let stores = reopen();
        conformance::idempotency(&stores).await;
        conformance::dead_letters(&stores).await;
    }
    // A reopened store continues: fresh ids, no seq reused, keys remembered.
    let stores = reopen();
    conformance::idempotency(&stores).await;
    conformance::dead_letters(&stores).await;
    conformance::users_and_devices(&stores).await;
}

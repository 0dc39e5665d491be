//! The conformance suite against ScyllaDB, when `SCYLLA_URI` names a node
//! (`host:port`); each test in a keyspace of its own (`pingme_t_<random>`,
//! replication factor 1). No CQL server runs in CI or on the machines this
//! was written on, so without the variable these tests return at once,
//! saying so (CI included: there is no ScyllaDB to require there).
//! `docs/storage.md` records what has and has not run against a cluster.

use std::sync::Arc;
use std::time::Duration;

use pingme_storage::scylla::{ScyllaConfig, ScyllaStore};
use pingme_storage::{Stores, conformance};

async fn store() -> Option<Arc<ScyllaStore>> {
    let Ok(uri) = std::env::var("SCYLLA_URI") else {
        eprintln!("skipped: set SCYLLA_URI=127.0.0.1:9042 to run the ScyllaDB conformance tests");
        return None;
    };
    let keyspace = format!(
        "pingme_t_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..16]
    );
    let config = ScyllaConfig {
        nodes: uri.split(',').map(str::to_string).collect(),
        keyspace,
        replication_factor: 1,
        timeout: Duration::from_secs(10),
    };
    Some(Arc::new(
        ScyllaStore::connect(&config)
            .await
            .unwrap_or_else(|e| panic!("ScyllaDB at {uri} (SCYLLA_URI): {e}")),
    ))
}

macro_rules! conformance_test {
    ($name:ident $(, $arg:expr)*) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let Some(store) = store().await else { return };
            conformance::$name(&Stores::all_from(store) $(, $arg)*).await;
        }
    };
}

conformance_test!(users_and_devices);
conformance_test!(groups_and_membership);
conformance_test!(idempotency);
conformance_test!(concurrent_duplicates);
conformance_test!(dense_seqs_under_concurrency, 4, 8, 10);
conformance_test!(message_paging);
conformance_test!(latest_seqs);
conformance_test!(user_conversation_paging);
conformance_test!(watermarks_only_move_forward);
conformance_test!(dead_letters);
conformance_test!(bad_input_gets_typed_errors);
conformance_test!(huge_group_member_paging, 2_000);

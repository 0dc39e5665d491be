//! The conformance suite against MySQL/MariaDB, one test per behaviour,
//! each in a database of its own (`pingme_t_<random>`, dropped at the end),
//! plus what only a shared database can show: two stores (two servers)
//! appending to the same conversations.
//!
//! `MYSQL_URL` names the server (`mysql://user[:password]@host[:port]`; the
//! user needs the right to create `pingme_t_*` databases, which
//! `.ci/services.sh` grants its `pingme` user). Without it the tests skip
//! with a note, except under `CI=true`, where they fail: CI must never pass
//! without having run them.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use pingme_storage::conformance;
use pingme_storage::mysql::{MysqlConfig, MysqlStore, TestDatabase, server_from_env};
use pingme_storage::{ConversationId, MessageStore, StoreResult, Stores};

/// The server under test, or `None` (skip) outside CI without `MYSQL_URL`.
fn server() -> Option<MysqlConfig> {
    server_from_env("the MySQL conformance tests")
}

macro_rules! conformance_test {
    ($name:ident $(, $arg:expr)*) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let Some(server) = server() else { return };
            let database = TestDatabase::new(server);
            let store = Arc::new(database.store().await);
            conformance::$name(&Stores::all_from(store.clone()) $(, $arg)*).await;
            store.close().await;
        }
    };
}

conformance_test!(users_and_devices);
conformance_test!(groups_and_membership);
conformance_test!(idempotency);
conformance_test!(concurrent_duplicates);
conformance_test!(dense_seqs_under_concurrency, 8, 32, 30);
conformance_test!(message_paging);
conformance_test!(latest_seqs);
conformance_test!(user_conversation_paging);
conformance_test!(watermarks_only_move_forward);
conformance_test!(dead_letters);
conformance_test!(bad_input_gets_typed_errors);
// 3,000 users registered one commit each: pages of 1000 and the cap are
// what is being checked, not the count.
conformance_test!(huge_group_member_paging, 3_000);

/// The suite's race: two stores on one database (two servers) append to
/// one conversation at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_appenders() {
    let Some(server) = server() else { return };
    let database = TestDatabase::new(server);
    let (a, b) = (
        Arc::new(database.store().await),
        Arc::new(database.store().await),
    );
    conformance::racing_appenders(
        &Stores::all_from(a.clone()),
        &Stores::all_from(b.clone()),
        100,
    )
    .await;
    a.close().await;
    b.close().await;
}

/// Two stores on one database are two servers: appends to the same
/// conversations through both keep every timeline dense, store each key
/// once (also a key sent through both), and both read the same history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_seqs_and_idempotency() {
    let Some(server) = server() else { return };
    let database = TestDatabase::new(server);
    let (a, b) = (
        Arc::new(database.store().await),
        Arc::new(database.store().await),
    );
    let users = {
        let mut users = Vec::new();
        for i in 0..8 {
            use pingme_storage::UserStore;
            let name = format!("u{i}-{}", uuid::Uuid::new_v4().simple());
            users.push(a.create_user(&name, "h", 0).await.unwrap().id);
        }
        users
    };
    let groups: Vec<ConversationId> = {
        use pingme_storage::ConversationStore;
        let mut groups = Vec::new();
        for _ in 0..3 {
            let group = b.create_group(users[0], "g", &users, 0).await.unwrap();
            groups.push(ConversationId::Group(group.id));
        }
        groups
    };
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let (a, b, groups) = (a.clone(), b.clone(), groups.clone());
            let sender = users[t % users.len()];
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..20 {
                    let conversation = groups[(t + i) % groups.len()];
                    let key = format!("t{t}-m{i}");
                    let message = conformance::message(conversation, sender, &key);
                    // Every message through one server; every fourth also
                    // retried through the other at once.
                    let (first, other): (&MysqlStore, &MysqlStore) =
                        if (t + i) % 2 == 0 { (&a, &b) } else { (&b, &a) };
                    let first_answer = first.append(vec![message.clone()]);
                    let answers: Vec<StoreResult<_>> = if i % 4 == 0 {
                        let (x, y) = tokio::join!(first_answer, other.append(vec![message]));
                        vec![x.unwrap().remove(0), y.unwrap().remove(0)]
                    } else {
                        vec![first_answer.await.unwrap().remove(0)]
                    };
                    let answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();
                    assert!(
                        answers
                            .iter()
                            .all(|x| x.message.seq == answers[0].message.seq)
                    );
                    assert_eq!(answers.iter().filter(|x| !x.duplicate).count(), 1);
                    acked.push((conversation, answers[0].message.seq, key));
                }
                acked
            })
        })
        .collect();
    let mut acked: BTreeMap<ConversationId, Vec<u64>> = BTreeMap::new();
    for task in tasks {
        for (conversation, seq, _) in task.await.unwrap() {
            acked.entry(conversation).or_default().push(seq);
        }
    }
    for (conversation, mut seqs) in acked {
        seqs.sort_unstable();
        let n = seqs.len() as u64;
        assert_eq!(
            seqs,
            (1..=n).collect::<Vec<_>>(),
            "{conversation}: dense, no seq twice"
        );
        for store in [&a, &b] {
            let stored = store.messages(conversation, 0, 0, 1000).await.unwrap();
            let keys: HashSet<_> = stored
                .iter()
                .map(|m| (m.sender, m.client_msg_id.clone()))
                .collect();
            assert_eq!((stored.len() as u64, keys.len() as u64), (n, n));
            assert_eq!(store.latest_seqs(&[conversation]).await.unwrap(), [n]);
        }
    }
    a.close().await;
    b.close().await;
}

//! The conformance suite: the behaviour every backend must show, as async
//! functions over [`Stores`], grouped by role ([`StoreRole`], [`run_role`])
//! so a backend that serves only some roles (ScyllaDB for messages, MySQL
//! for the rest) runs the checks of those. Compiled with the cargo feature
//! `conformance`; `tests/conformance.rs` runs it against the embedded
//! store, and the MySQL and ScyllaDB backends run the same functions (see
//! `docs/storage.md`).
//!
//! Every check also needs users (and most need groups) to set up, so each
//! takes a whole [`Stores`]; the role says which handle it exercises.
//!
//! The checks never assume an empty database: names are unique per run,
//! ids are compared relative to each other, and counts relative to their
//! value before the check, so the suite can run against a shared server.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use bytes::Bytes;

use crate::{
    ConversationId, DeadLetter, DeliveredMark, GroupId, MAX_BODY_BYTES, MAX_PAGE, Member,
    MessageStore, NewAccount, NewMessage, Role, Seq, StoreError, StoreResult, Stores, UserId,
};

/// A user id no backend will have assigned.
const UNKNOWN_USER: UserId = u64::MAX - 7;
/// A group id no backend will have assigned.
const UNKNOWN_GROUP: GroupId = u64::MAX - 7;

/// The roles of [`Stores`], to run the checks of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreRole {
    /// [`crate::UserStore`].
    Users,
    /// [`crate::ConversationStore`].
    Conversations,
    /// [`crate::MessageStore`].
    Messages,
    /// [`crate::WatermarkStore`].
    Watermarks,
    /// [`crate::DeadLetterStore`].
    DeadLetters,
}

impl StoreRole {
    /// Every role.
    pub const ALL: [StoreRole; 5] = [
        StoreRole::Users,
        StoreRole::Conversations,
        StoreRole::Messages,
        StoreRole::Watermarks,
        StoreRole::DeadLetters,
    ];
}

/// Runs every check of `role`, each against fresh stores from `make`.
/// [`racing_appenders`] gets the same handles twice here (two tasks, so
/// two connections of one pool); a backend's own test may also call it
/// with a second, separately built handle on the same database.
pub async fn run_role(role: StoreRole, make: impl Fn() -> Stores) {
    match role {
        StoreRole::Users => {
            users_and_devices(&make()).await;
            bulk_import(&make()).await;
        }
        StoreRole::Conversations => {
            groups_and_membership(&make()).await;
            huge_group_member_paging(&make(), 10_000).await;
            user_conversation_paging(&make()).await;
        }
        StoreRole::Messages => {
            idempotency(&make()).await;
            concurrent_duplicates(&make()).await;
            dense_seqs_under_concurrency(&make(), 8, 16, 40).await;
            let stores = make();
            racing_appenders(&stores, &stores, 150).await;
            message_paging(&make()).await;
            latest_seqs(&make()).await;
            bad_input_gets_typed_errors(&make()).await;
        }
        StoreRole::Watermarks => watermarks_only_move_forward(&make()).await,
        StoreRole::DeadLetters => dead_letters(&make()).await,
    }
}

/// Runs every check of every role, each against fresh stores from `make`.
pub async fn run_all(make: impl Fn() -> Stores) {
    for role in StoreRole::ALL {
        run_role(role, &make).await;
    }
}

/// A name unique to this run, so checks can share a database.
fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

async fn new_user(stores: &Stores, prefix: &str) -> UserId {
    stores
        .users
        .create_user(&unique(prefix), "$argon2id$fake", 1_000)
        .await
        .expect("create user")
        .id
}

async fn new_users(stores: &Stores, count: usize) -> Vec<UserId> {
    let mut users = Vec::with_capacity(count);
    for _ in 0..count {
        users.push(new_user(stores, "u").await);
    }
    users
}

/// A message with a fresh msg_id and a 100-byte body.
pub fn message(conversation: ConversationId, sender: UserId, client_msg_id: &str) -> NewMessage {
    NewMessage {
        conversation,
        sender,
        sender_device: "phone".into(),
        client_msg_id: client_msg_id.into(),
        msg_id: uuid::Uuid::now_v7().to_string(),
        content_type: 1,
        body: Bytes::from(vec![b'x'; 100]),
        server_time_ms: 1_700_000_000_000,
    }
}

/// Appends one message and returns (seq, duplicate, msg_id).
async fn append_one(stores: &Stores, message: NewMessage) -> StoreResult<(Seq, bool, String)> {
    let mut out = stores.messages.append(vec![message]).await?;
    let appended = out.pop().expect("one answer per message")?;
    Ok((
        appended.message.seq,
        appended.duplicate,
        appended.message.msg_id,
    ))
}

fn is_not_found<T: std::fmt::Debug>(result: &StoreResult<T>) -> bool {
    matches!(result, Err(StoreError::NotFound(_)))
}

fn is_invalid<T: std::fmt::Debug>(result: &StoreResult<T>) -> bool {
    matches!(result, Err(StoreError::Invalid(_)))
}

/// Users: unique names, lookups, devices and token generations.
pub async fn users_and_devices(stores: &Stores) {
    let name = unique("alice");
    let alice = stores.users.create_user(&name, "hash-a", 42).await.unwrap();
    assert_ne!(alice.id, 0);
    assert_eq!(
        (
            alice.username.as_str(),
            alice.password_hash.as_str(),
            alice.created_ms
        ),
        (name.as_str(), "hash-a", 42)
    );
    let bob = new_user(stores, "bob").await;
    assert!(bob > alice.id, "ids ascend in registration order");

    let taken = stores.users.create_user(&name, "other", 43).await;
    assert!(
        matches!(taken, Err(StoreError::Conflict(_))),
        "duplicate username: {taken:?}"
    );
    assert_eq!(
        stores.users.user_by_name(&name).await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(
        stores.users.user_by_id(alice.id).await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(
        stores.users.user_by_name(&unique("nobody")).await.unwrap(),
        None
    );
    assert_eq!(stores.users.user_by_id(UNKNOWN_USER).await.unwrap(), None);

    assert_eq!(stores.users.device(alice.id, "laptop").await.unwrap(), None);
    let first = stores
        .users
        .touch_device(alice.id, "laptop", 100)
        .await
        .unwrap();
    assert_eq!((first.user, first.device_id.as_str()), (alice.id, "laptop"));
    assert_eq!(first.last_login_ms, 100);
    let bumped = stores
        .users
        .bump_token_generation(alice.id, "laptop")
        .await
        .unwrap();
    assert_eq!(bumped, first.token_generation + 1, "logout bumps by one");
    let again = stores
        .users
        .touch_device(alice.id, "laptop", 200)
        .await
        .unwrap();
    assert_eq!(again.token_generation, bumped, "login keeps the generation");
    assert_eq!(again.last_login_ms, 200);
    assert_eq!(
        stores.users.device(alice.id, "laptop").await.unwrap(),
        Some(again)
    );
    // Devices are per user and per device id.
    let phone = stores
        .users
        .touch_device(alice.id, "phone", 300)
        .await
        .unwrap();
    assert_eq!(phone.token_generation, first.token_generation);
    assert_eq!(stores.users.device(bob, "laptop").await.unwrap(), None);

    assert!(is_not_found(
        &stores
            .users
            .bump_token_generation(alice.id, "never-seen")
            .await
    ));
    assert!(is_not_found(
        &stores.users.touch_device(UNKNOWN_USER, "laptop", 1).await
    ));
}

/// Bulk import: every account is stored with its hash, in order, with
/// the named device at generation 0 (what a token minted at import
/// carries); a batch with a taken name is refused.
pub async fn bulk_import(stores: &Stores) {
    // More than one page, so a backend that chunks its statements is
    // checked across a chunk boundary.
    let accounts: Vec<NewAccount> = (0..MAX_PAGE + 5)
        .map(|i| NewAccount {
            username: unique(&format!("imp{i}")),
            password_hash: format!("$argon2id$v=19$m=8,t=1,p=1$c2FsdA$hash{i}"),
        })
        .collect();
    let imported = stores
        .users
        .import_accounts(&accounts, Some("bench"), 500)
        .await
        .unwrap();
    assert_eq!(imported.len(), accounts.len());
    let mut ids = BTreeSet::new();
    for (account, done) in accounts.iter().zip(&imported) {
        assert_eq!(done.user.username, account.username);
        assert!(ids.insert(done.user.id), "ids are distinct");
        let stored = stores
            .users
            .user_by_name(&account.username)
            .await
            .unwrap()
            .expect("imported user stored");
        assert_eq!(stored, done.user);
        assert_eq!(stored.password_hash, account.password_hash);
        assert_eq!(stored.created_ms, 500);
        let device = done.device.clone().expect("device asked for");
        assert_eq!(device.token_generation, 0, "a new device starts at 0");
        assert_eq!(
            stores.users.device(done.user.id, "bench").await.unwrap(),
            Some(device)
        );
    }

    // Without a device: users only.
    let plain = [NewAccount {
        username: unique("imp-plain"),
        password_hash: "$argon2id$fake".into(),
    }];
    let done = stores.users.import_accounts(&plain, None, 1).await.unwrap();
    assert_eq!(done[0].device, None);
    assert_eq!(
        stores.users.device(done[0].user.id, "bench").await.unwrap(),
        None
    );

    // A taken name fails the batch.
    let clash = [
        NewAccount {
            username: unique("imp-new"),
            password_hash: "h".into(),
        },
        accounts[0].clone(),
    ];
    let refused = stores.users.import_accounts(&clash, None, 2).await;
    assert!(
        matches!(refused, Err(StoreError::Conflict(_))),
        "taken name in a batch: {refused:?}"
    );
    let nameless = [NewAccount {
        username: String::new(),
        password_hash: "h".into(),
    }];
    assert!(is_invalid(
        &stores.users.import_accounts(&nameless, None, 3).await
    ));
}

/// Groups: creation, roles, adds, removes, membership of groups and DMs.
pub async fn groups_and_membership(stores: &Stores) {
    let users = new_users(stores, 4).await;
    let (owner, a, b, c) = (users[0], users[1], users[2], users[3]);
    let group = stores
        .conversations
        .create_group(owner, "friends", &[a, owner, a], 7)
        .await
        .unwrap();
    assert_eq!(
        (
            group.name.as_str(),
            group.owner,
            group.member_count,
            group.created_ms
        ),
        ("friends", owner, 2, 7),
        "owner added once, duplicates ignored"
    );
    let second = stores
        .conversations
        .create_group(a, "other", &[], 8)
        .await
        .unwrap();
    assert!(second.id > group.id, "group ids ascend");
    assert_eq!(
        stores.conversations.group(group.id).await.unwrap(),
        Some(group.clone())
    );
    assert_eq!(
        stores.conversations.group(UNKNOWN_GROUP).await.unwrap(),
        None
    );

    assert_eq!(
        stores
            .conversations
            .member_role(group.id, owner)
            .await
            .unwrap(),
        Some(Role::Owner)
    );
    assert_eq!(
        stores.conversations.member_role(group.id, a).await.unwrap(),
        Some(Role::Member)
    );
    assert_eq!(
        stores.conversations.member_role(group.id, b).await.unwrap(),
        None
    );

    let added = stores
        .conversations
        .add_members(
            group.id,
            &[
                Member {
                    user: a,
                    role: Role::Admin,
                },
                Member {
                    user: b,
                    role: Role::Admin,
                },
                Member {
                    user: c,
                    role: Role::Member,
                },
                Member {
                    user: c,
                    role: Role::Member,
                },
            ],
        )
        .await
        .unwrap();
    assert_eq!(added, 2, "only b and c are new");
    assert_eq!(
        stores.conversations.member_role(group.id, a).await.unwrap(),
        Some(Role::Member),
        "existing members keep their role"
    );
    assert_eq!(
        stores.conversations.member_role(group.id, b).await.unwrap(),
        Some(Role::Admin)
    );
    assert_eq!(
        stores
            .conversations
            .group(group.id)
            .await
            .unwrap()
            .unwrap()
            .member_count,
        4
    );

    let conversation = ConversationId::Group(group.id);
    assert!(
        stores
            .conversations
            .is_member(conversation, c)
            .await
            .unwrap()
    );
    assert!(
        stores
            .conversations
            .remove_member(group.id, c)
            .await
            .unwrap()
    );
    assert!(
        !stores
            .conversations
            .remove_member(group.id, c)
            .await
            .unwrap()
    );
    assert!(
        !stores
            .conversations
            .is_member(conversation, c)
            .await
            .unwrap()
    );
    assert_eq!(
        stores
            .conversations
            .group(group.id)
            .await
            .unwrap()
            .unwrap()
            .member_count,
        3
    );
    let removed_sends = append_one(stores, message(conversation, c, &unique("c"))).await;
    assert!(
        matches!(removed_sends, Err(StoreError::NotMember { user, .. }) if user == c),
        "{removed_sends:?}"
    );
    let page = stores
        .conversations
        .user_conversations(c, None, 100)
        .await
        .unwrap();
    assert!(
        !page.contains(&conversation),
        "removed member no longer lists it"
    );

    let dm = ConversationId::direct(a, b).unwrap();
    assert!(stores.conversations.is_member(dm, a).await.unwrap());
    assert!(stores.conversations.is_member(dm, b).await.unwrap());
    assert!(!stores.conversations.is_member(dm, c).await.unwrap());

    let with_unknown = stores
        .conversations
        .create_group(owner, "x", &[UNKNOWN_USER], 9)
        .await;
    assert!(is_not_found(&with_unknown), "{with_unknown:?}");
    let add_unknown = stores
        .conversations
        .add_members(
            group.id,
            &[Member {
                user: UNKNOWN_USER,
                role: Role::Member,
            }],
        )
        .await;
    assert!(is_not_found(&add_unknown), "{add_unknown:?}");
    let add_to_unknown = stores
        .conversations
        .add_members(
            UNKNOWN_GROUP,
            &[Member {
                user: a,
                role: Role::Member,
            }],
        )
        .await;
    assert!(is_not_found(&add_to_unknown), "{add_to_unknown:?}");
}

/// A repeat of (sender, client_msg_id) returns the first message, marked
/// duplicate, and stores nothing; also for repeats inside one batch.
pub async fn idempotency(stores: &Stores) {
    let users = new_users(stores, 2).await;
    let dm = ConversationId::direct(users[0], users[1]).unwrap();
    let key = unique("k");
    let first = message(dm, users[0], &key);
    let (seq, duplicate, msg_id) = append_one(stores, first.clone()).await.unwrap();
    assert_eq!((seq, duplicate), (1, false));
    assert_eq!(msg_id, first.msg_id);

    // A retry carries a new msg_id (the router mints one per attempt): the
    // answer is still the first message.
    let retry = message(dm, users[0], &key);
    let (seq2, duplicate2, msg_id2) = append_one(stores, retry).await.unwrap();
    assert_eq!(
        (seq2, duplicate2, msg_id2.as_str()),
        (1, true, msg_id.as_str())
    );
    assert_eq!(stores.messages.latest_seqs(&[dm]).await.unwrap(), [1]);
    assert_eq!(
        stores.messages.messages(dm, 0, 0, 100).await.unwrap().len(),
        1
    );

    // The same client_msg_id from another sender is another message.
    let (other_seq, other_dup, _) = append_one(stores, message(dm, users[1], &key))
        .await
        .unwrap();
    assert_eq!((other_seq, other_dup), (2, false));

    // Repeats inside one batch: stored once, answered in order.
    let (k1, k2) = (unique("b1"), unique("b2"));
    let batch = vec![
        message(dm, users[0], &k1),
        message(dm, users[0], &k1),
        message(dm, users[0], &k2),
        message(dm, users[0], &key),
        message(dm, users[0], &k2),
    ];
    let answers: Vec<_> = stores
        .messages
        .append(batch.clone())
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.unwrap())
        .collect();
    let shape: Vec<(Seq, bool)> = answers
        .iter()
        .map(|a| (a.message.seq, a.duplicate))
        .collect();
    assert_eq!(
        shape,
        [(3, false), (3, true), (4, false), (1, true), (4, true)]
    );
    assert_eq!(answers[1].message.msg_id, batch[0].msg_id);
    assert_eq!(answers[4].message.msg_id, batch[2].msg_id);
    let stored = stores.messages.messages(dm, 0, 0, 100).await.unwrap();
    let keys: Vec<&str> = stored.iter().map(|m| m.client_msg_id.as_str()).collect();
    assert_eq!(keys, [key.as_str(), key.as_str(), k1.as_str(), k2.as_str()]);
    assert_eq!(stored[0].body, first.body);
    assert_eq!(
        (stored[0].sender, stored[1].sender),
        (users[0], users[1]),
        "the other sender's message with the same key is its own"
    );
}

/// The same key sent concurrently from many tasks is stored exactly once.
pub async fn concurrent_duplicates(stores: &Stores) {
    let users = new_users(stores, 2).await;
    let dm = ConversationId::direct(users[0], users[1]).unwrap();
    let key = unique("race");
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (stores, message) = (stores.clone(), message(dm, users[0], &key));
            tokio::spawn(async move { append_one(&stores, message).await.unwrap() })
        })
        .collect();
    let mut fresh = 0;
    let mut msg_ids = HashSet::new();
    for task in tasks {
        let (seq, duplicate, msg_id) = task.await.unwrap();
        assert_eq!(seq, 1);
        fresh += usize::from(!duplicate);
        msg_ids.insert(msg_id);
    }
    assert_eq!(fresh, 1, "exactly one append stores the message");
    assert_eq!(msg_ids.len(), 1, "every answer names the stored message");
    assert_eq!(
        stores.messages.messages(dm, 0, 0, 100).await.unwrap().len(),
        1
    );
}

/// Many tasks append to many conversations at once: every conversation's
/// seqs are exactly 1..=n, each task's messages keep their order, and every
/// message reads back once.
pub async fn dense_seqs_under_concurrency(
    stores: &Stores,
    conversations: usize,
    tasks: usize,
    messages_per_task: usize,
) {
    let users = new_users(stores, tasks).await;
    let mut groups = Vec::with_capacity(conversations);
    for _ in 0..conversations {
        let group = stores
            .conversations
            .create_group(users[0], "busy", &users, 0)
            .await
            .unwrap();
        groups.push(ConversationId::Group(group.id));
    }
    let groups = Arc::new(groups);
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (stores, groups, sender) = (stores.clone(), groups.clone(), users[t]);
            tokio::spawn(async move {
                let mut acked = Vec::with_capacity(messages_per_task);
                for i in 0..messages_per_task {
                    let conversation = groups[(t + i) % groups.len()];
                    let key = format!("t{t}-m{i}");
                    // Alternate single appends and small batches.
                    let batch = if i % 3 == 0 {
                        vec![message(conversation, sender, &key)]
                    } else {
                        vec![
                            message(conversation, sender, &key),
                            message(conversation, sender, &key),
                        ]
                    };
                    let answers = stores.messages.append(batch).await.unwrap();
                    let first = answers[0].as_ref().unwrap();
                    assert!(!first.duplicate);
                    if let Some(repeat) = answers.get(1) {
                        let repeat = repeat.as_ref().unwrap();
                        assert!(repeat.duplicate);
                        assert_eq!(repeat.message.seq, first.message.seq);
                    }
                    acked.push((conversation, first.message.seq, key));
                }
                acked
            })
        })
        .collect();

    let mut by_conversation: BTreeMap<ConversationId, Vec<(Seq, String)>> = BTreeMap::new();
    for handle in handles {
        let acked = handle.await.unwrap();
        // One task's messages to one conversation get ascending seqs.
        let mut last: BTreeMap<ConversationId, Seq> = BTreeMap::new();
        for (conversation, seq, key) in acked {
            let previous = last.insert(conversation, seq).unwrap_or(0);
            assert!(seq > previous, "a task's messages keep their order");
            by_conversation
                .entry(conversation)
                .or_default()
                .push((seq, key));
        }
    }
    let total: usize = by_conversation.values().map(Vec::len).sum();
    assert_eq!(total, tasks * messages_per_task);
    for conversation in groups.iter() {
        let mut acked = by_conversation.remove(conversation).unwrap_or_default();
        acked.sort();
        let n = acked.len() as Seq;
        let seqs: Vec<Seq> = acked.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(
            seqs,
            (1..=n).collect::<Vec<_>>(),
            "dense seqs in {conversation}"
        );
        assert_eq!(
            stores.messages.latest_seqs(&[*conversation]).await.unwrap(),
            [n]
        );
        let mut stored = Vec::new();
        while (stored.len() as Seq) < n {
            let after = stored.len() as Seq;
            let page = stores
                .messages
                .messages(*conversation, after, 0, 100)
                .await
                .unwrap();
            assert!(!page.is_empty());
            stored.extend(page);
        }
        for (message, (seq, key)) in stored.iter().zip(&acked) {
            assert_eq!((message.seq, &message.client_msg_id), (*seq, key));
            assert_eq!(message.conversation, *conversation);
        }
    }
}

/// Seq ownership when a conversation changes owner: two appenders (`first`
/// and `second`, e.g. the old and the new owner of the conversation, two
/// nodes on one database) append to one group at the same time, in batches
/// of one to three, and both repeatedly send the same idempotency key.
/// Neither may assign a seq the other used, no acknowledged message may be
/// lost, the timeline stays dense, and each shared key is stored once.
pub async fn racing_appenders(first: &Stores, second: &Stores, batches_each: usize) {
    let users = new_users(first, 3).await;
    let (owner, old_node_sender, new_node_sender) = (users[0], users[1], users[2]);
    let group = first
        .conversations
        .create_group(owner, "moving", &users, 0)
        .await
        .unwrap();
    let group = ConversationId::Group(group.id);
    let run = "race-".to_string() + &unique("");
    let appender = |messages: Arc<dyn MessageStore>, sender: UserId, name: &'static str| {
        let run = run.clone();
        tokio::spawn(async move {
            // (seq, msg_id, client_msg_id, duplicate) of every acknowledged message.
            let mut acked = Vec::new();
            for i in 0..batches_each {
                let mut batch: Vec<NewMessage> = (0..1 + i % 3)
                    .map(|j| message(group, sender, &format!("{run}-{name}-{i}-{j}")))
                    .collect();
                if i % 10 == 0 {
                    // Both appenders send this key: stored once.
                    batch.push(message(group, owner, &format!("{run}-shared-{i}")));
                }
                for answer in messages.append(batch).await.unwrap() {
                    let answer = answer.unwrap();
                    acked.push((
                        answer.message.seq,
                        answer.message.msg_id,
                        answer.message.client_msg_id,
                        answer.duplicate,
                    ));
                }
            }
            acked
        })
    };
    let old = appender(first.messages.clone(), old_node_sender, "old");
    let new = appender(second.messages.clone(), new_node_sender, "new");
    let (old, new) = (old.await.unwrap(), new.await.unwrap());

    let mut by_seq: BTreeMap<Seq, (String, String)> = BTreeMap::new();
    let mut shared: BTreeMap<String, Vec<(Seq, bool)>> = BTreeMap::new();
    for (seq, msg_id, key, duplicate) in old.into_iter().chain(new) {
        if key.contains("-shared-") {
            shared
                .entry(key.clone())
                .or_default()
                .push((seq, duplicate));
        }
        if duplicate {
            continue;
        }
        let earlier = by_seq.insert(seq, (msg_id, key));
        assert!(earlier.is_none(), "seq {seq} assigned twice: {earlier:?}");
    }
    for (key, answers) in &shared {
        assert_eq!(answers.len(), 2, "{key}: one answer per appender");
        assert_eq!(answers[0].0, answers[1].0, "{key}: both name one seq");
        assert_eq!(
            answers.iter().filter(|(_, duplicate)| !duplicate).count(),
            1,
            "{key} stored once"
        );
    }
    let n = by_seq.len() as Seq;
    assert_eq!(
        by_seq.keys().copied().collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>(),
        "dense seqs"
    );
    assert_eq!(first.messages.latest_seqs(&[group]).await.unwrap(), [n]);
    let mut stored = Vec::new();
    while (stored.len() as Seq) < n {
        let page = second
            .messages
            .messages(group, stored.len() as Seq, 0, 100)
            .await
            .unwrap();
        assert!(!page.is_empty(), "acknowledged messages are missing");
        stored.extend(page);
    }
    for message in stored {
        let (msg_id, key) = &by_seq[&message.seq];
        assert_eq!(
            (&message.msg_id, &message.client_msg_id),
            (msg_id, key),
            "seq {} holds the acknowledged message",
            message.seq
        );
    }
}

/// `messages` honours after/until/limit, limit 0, the end, and MAX_PAGE.
pub async fn message_paging(stores: &Stores) {
    let users = new_users(stores, 2).await;
    let dm = ConversationId::direct(users[0], users[1]).unwrap();
    let total = MAX_PAGE as Seq + 10;
    let mut batch = Vec::new();
    for i in 1..=total {
        batch.push(message(dm, users[(i % 2) as usize], &format!("p{i}")));
    }
    for chunk in batch.chunks(250) {
        for answer in stores.messages.append(chunk.to_vec()).await.unwrap() {
            assert!(!answer.unwrap().duplicate);
        }
    }
    let seqs = |page: Vec<crate::StoredMessage>| page.iter().map(|m| m.seq).collect::<Vec<_>>();
    assert_eq!(
        seqs(stores.messages.messages(dm, 0, 0, 3).await.unwrap()),
        [1, 2, 3]
    );
    assert_eq!(
        seqs(stores.messages.messages(dm, 5, 8, 100).await.unwrap()),
        [6, 7, 8]
    );
    assert_eq!(
        seqs(stores.messages.messages(dm, 5, 8, 2).await.unwrap()),
        [6, 7]
    );
    assert_eq!(
        seqs(stores.messages.messages(dm, 5, 6, 100).await.unwrap()),
        [6]
    );
    assert!(
        stores
            .messages
            .messages(dm, 5, 5, 100)
            .await
            .unwrap()
            .is_empty(),
        "empty range"
    );
    assert!(
        stores
            .messages
            .messages(dm, 8, 5, 100)
            .await
            .unwrap()
            .is_empty(),
        "until below after"
    );
    assert!(
        stores
            .messages
            .messages(dm, 0, 0, 0)
            .await
            .unwrap()
            .is_empty(),
        "limit 0"
    );
    assert_eq!(
        seqs(
            stores
                .messages
                .messages(dm, total - 2, 0, 100)
                .await
                .unwrap()
        ),
        [total - 1, total]
    );
    assert!(
        stores
            .messages
            .messages(dm, total, 0, 100)
            .await
            .unwrap()
            .is_empty(),
        "at the end"
    );
    assert!(
        stores
            .messages
            .messages(dm, total + 50, 0, 100)
            .await
            .unwrap()
            .is_empty(),
        "beyond"
    );
    assert!(
        stores
            .messages
            .messages(dm, u64::MAX, 0, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        seqs(
            stores
                .messages
                .messages(dm, total - 1, total + 100, 100)
                .await
                .unwrap()
        ),
        [total],
        "until beyond the end"
    );
    let capped = stores
        .messages
        .messages(dm, 0, 0, MAX_PAGE + 5)
        .await
        .unwrap();
    assert_eq!(
        seqs(capped),
        (1..=MAX_PAGE as Seq).collect::<Vec<_>>(),
        "capped at MAX_PAGE"
    );
    let stored = stores.messages.messages(dm, 41, 42, 1).await.unwrap();
    assert_eq!(stored[0].client_msg_id, "p42");
    assert_eq!(stored[0].sender, users[0]);
    assert_eq!(stored[0].body.len(), 100);
}

/// `latest_seqs` answers in the order asked, 0 for silent conversations.
pub async fn latest_seqs(stores: &Stores) {
    let users = new_users(stores, 3).await;
    let ab = ConversationId::direct(users[0], users[1]).unwrap();
    let bc = ConversationId::direct(users[1], users[2]).unwrap();
    let group = ConversationId::Group(
        stores
            .conversations
            .create_group(users[0], "g", &users, 0)
            .await
            .unwrap()
            .id,
    );
    for i in 0..3 {
        append_one(stores, message(ab, users[0], &unique(&format!("ab{i}"))))
            .await
            .unwrap();
    }
    append_one(stores, message(group, users[2], &unique("g")))
        .await
        .unwrap();
    assert_eq!(
        stores
            .messages
            .latest_seqs(&[group, bc, ab, group])
            .await
            .unwrap(),
        [1, 0, 3, 1]
    );
    assert_eq!(
        stores
            .messages
            .latest_seqs(&[ConversationId::Group(UNKNOWN_GROUP)])
            .await
            .unwrap(),
        [0]
    );
    assert!(stores.messages.latest_seqs(&[]).await.unwrap().is_empty());
}

/// A huge group: `members` users added in pages of 1000 read back in pages,
/// all present once, ascending; a message is stored once, not per member.
pub async fn huge_group_member_paging(stores: &Stores, members: usize) {
    let owner = new_user(stores, "owner").await;
    let users = new_users(stores, members).await;
    let group = stores
        .conversations
        .create_group(owner, "huge", &[], 0)
        .await
        .unwrap();
    for page in users.chunks(1000) {
        let page: Vec<Member> = page
            .iter()
            .map(|&user| Member {
                user,
                role: Role::Member,
            })
            .collect();
        assert_eq!(
            stores
                .conversations
                .add_members(group.id, &page)
                .await
                .unwrap(),
            page.len() as u64
        );
    }
    let record = stores.conversations.group(group.id).await.unwrap().unwrap();
    assert_eq!(record.member_count, members as u64 + 1);

    let mut read = Vec::with_capacity(members + 1);
    let mut after = 0;
    loop {
        let page = stores
            .conversations
            .members_page(group.id, after, 1000)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 1000);
        after = page.last().unwrap().user;
        read.extend(page);
    }
    let mut expected: Vec<UserId> = users.clone();
    expected.push(owner);
    expected.sort();
    let ids: Vec<UserId> = read.iter().map(|m| m.user).collect();
    assert_eq!(ids, expected, "every member once, ascending");
    let owner_role = read.iter().find(|m| m.user == owner).unwrap().role;
    assert_eq!(owner_role, Role::Owner);
    let capped = stores
        .conversations
        .members_page(group.id, 0, MAX_PAGE * 5)
        .await
        .unwrap();
    assert_eq!(capped.len(), MAX_PAGE.min(members + 1));
    assert!(
        stores
            .conversations
            .members_page(group.id, 0, 0)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        stores
            .conversations
            .members_page(group.id, u64::MAX, 10)
            .await
            .unwrap()
            .is_empty()
    );

    let conversation = ConversationId::Group(group.id);
    let (seq, _, _) = append_one(
        stores,
        message(conversation, users[members / 2], &unique("h")),
    )
    .await
    .unwrap();
    assert_eq!(seq, 1);
    assert_eq!(
        stores
            .messages
            .messages(conversation, 0, 0, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// `user_conversations` lists groups joined and DMs with a message, once
/// each, in id order, page by page.
pub async fn user_conversation_paging(stores: &Stores) {
    let me = new_user(stores, "me").await;
    let peers = new_users(stores, 12).await;
    let mut expected = BTreeSet::new();
    for i in 0..25 {
        let group = stores
            .conversations
            .create_group(peers[i % 12], "g", &[me], 0)
            .await
            .unwrap();
        expected.insert(ConversationId::Group(group.id));
    }
    // A group I left and one I was never in are not listed.
    let left = stores
        .conversations
        .create_group(me, "left", &[], 0)
        .await
        .unwrap();
    stores
        .conversations
        .remove_member(left.id, me)
        .await
        .unwrap();
    stores
        .conversations
        .create_group(peers[0], "not mine", &[], 0)
        .await
        .unwrap();
    // DMs appear with their first message, for both users.
    for (i, &peer) in peers.iter().enumerate().take(10) {
        let dm = ConversationId::direct(me, peer).unwrap();
        let sender = if i % 2 == 0 { me } else { peer };
        append_one(stores, message(dm, sender, &unique("dm")))
            .await
            .unwrap();
        append_one(stores, message(dm, sender, &unique("dm2")))
            .await
            .unwrap();
        expected.insert(dm);
        assert!(
            stores
                .conversations
                .user_conversations(peer, None, MAX_PAGE)
                .await
                .unwrap()
                .contains(&dm)
        );
    }
    let silent = ConversationId::direct(me, peers[11]).unwrap();
    assert!(!expected.contains(&silent));

    let mut listed = Vec::new();
    let mut after = None;
    loop {
        let page = stores
            .conversations
            .user_conversations(me, after, 7)
            .await
            .unwrap();
        assert!(page.len() <= 7);
        match page.last() {
            None => break,
            Some(last) => after = Some(*last),
        }
        listed.extend(page);
    }
    assert_eq!(
        listed,
        expected.into_iter().collect::<Vec<_>>(),
        "once each, ascending"
    );
    assert!(
        stores
            .conversations
            .user_conversations(me, None, 0)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Delivered (per device) and read (per user) watermarks never go back.
pub async fn watermarks_only_move_forward(stores: &Stores) {
    let users = new_users(stores, 2).await;
    let (me, peer) = (users[0], users[1]);
    let dm = ConversationId::direct(me, peer).unwrap();
    let group = ConversationId::Group(
        stores
            .conversations
            .create_group(me, "g", &[peer], 0)
            .await
            .unwrap()
            .id,
    );
    let marks = |device: &'static str| {
        let stores = stores.clone();
        async move {
            stores
                .watermarks
                .watermarks(me, device, &[dm, group])
                .await
                .unwrap()
        }
    };
    assert_eq!(
        marks("phone").await,
        [Default::default(), Default::default()]
    );

    stores
        .watermarks
        .set_delivered(me, "phone", dm, 5)
        .await
        .unwrap();
    stores
        .watermarks
        .set_delivered(me, "phone", dm, 3)
        .await
        .unwrap();
    stores
        .watermarks
        .set_delivered(me, "laptop", dm, 2)
        .await
        .unwrap();
    stores.watermarks.set_read(me, dm, 4).await.unwrap();
    stores.watermarks.set_read(me, dm, 1).await.unwrap();
    stores
        .watermarks
        .set_delivered(me, "phone", group, 9)
        .await
        .unwrap();
    stores
        .watermarks
        .set_delivered(me, "phone", group, 10)
        .await
        .unwrap();

    let phone = marks("phone").await;
    assert_eq!((phone[0].delivered, phone[0].read), (5, 4));
    assert_eq!((phone[1].delivered, phone[1].read), (10, 0));
    let laptop = marks("laptop").await;
    assert_eq!(
        (laptop[0].delivered, laptop[0].read),
        (2, 4),
        "read is per user"
    );
    let peer_marks = stores
        .watermarks
        .watermarks(peer, "phone", &[dm])
        .await
        .unwrap();
    assert_eq!(peer_marks, [Default::default()], "watermarks are per user");

    // Many at once: the same rules, whatever their order, and a key asked
    // twice in one call keeps the higher seq.
    let mark = |device: &str, conversation, seq| DeliveredMark {
        user: me,
        device_id: device.to_string(),
        conversation,
        seq,
    };
    stores
        .watermarks
        .set_delivered_many(&[
            mark("phone", dm, 4),
            mark("laptop", dm, 7),
            mark("laptop", dm, 6),
            mark("tablet", group, 3),
            mark("phone", group, 12),
        ])
        .await
        .unwrap();
    stores.watermarks.set_delivered_many(&[]).await.unwrap();
    let phone = marks("phone").await;
    assert_eq!(
        (phone[0].delivered, phone[1].delivered),
        (5, 12),
        "never lowered, raised where higher"
    );
    let laptop = marks("laptop").await;
    assert_eq!(laptop[0].delivered, 7);
    let tablet = marks("tablet").await;
    assert_eq!((tablet[0].delivered, tablet[1].delivered), (0, 3));
}

/// Dead letters: ascending ids, paging, removal, count.
pub async fn dead_letters(stores: &Stores) {
    let before = stores.dead_letters.dead_letter_count().await.unwrap();
    let letter = |n: u32| DeadLetter {
        id: 0,
        kind: "push".into(),
        payload: vec![n as u8; 3],
        code: 50006,
        error: format!("attempt {n} failed"),
        attempts: n,
        created_ms: 77,
    };
    let mut ids = Vec::new();
    for n in 1..=3 {
        ids.push(
            stores
                .dead_letters
                .put_dead_letter(letter(n))
                .await
                .unwrap(),
        );
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids ascend: {ids:?}");
    assert_eq!(
        stores.dead_letters.dead_letter_count().await.unwrap(),
        before + 3
    );

    let page = stores
        .dead_letters
        .dead_letters(ids[0] - 1, 10)
        .await
        .unwrap();
    assert_eq!(page.len(), 3);
    assert_eq!(
        page[1],
        DeadLetter {
            id: ids[1],
            ..letter(2)
        }
    );
    let after_first = stores.dead_letters.dead_letters(ids[0], 1).await.unwrap();
    assert_eq!(
        after_first.iter().map(|l| l.id).collect::<Vec<_>>(),
        [ids[1]]
    );

    assert!(
        stores
            .dead_letters
            .remove_dead_letter(ids[1])
            .await
            .unwrap()
    );
    assert!(
        !stores
            .dead_letters
            .remove_dead_letter(ids[1])
            .await
            .unwrap()
    );
    assert_eq!(
        stores.dead_letters.dead_letter_count().await.unwrap(),
        before + 2
    );
    let rest: Vec<u64> = stores
        .dead_letters
        .dead_letters(ids[0] - 1, 10)
        .await
        .unwrap()
        .iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(rest, [ids[0], ids[2]]);
    let next = stores
        .dead_letters
        .put_dead_letter(letter(4))
        .await
        .unwrap();
    assert!(next > ids[2], "ids are never reused");
}

/// Bad input is answered with typed errors, per message, without touching
/// the good messages of the same batch.
pub async fn bad_input_gets_typed_errors(stores: &Stores) {
    let users = new_users(stores, 3).await;
    let (me, peer, stranger) = (users[0], users[1], users[2]);
    let dm = ConversationId::direct(me, peer).unwrap();
    let group = ConversationId::Group(
        stores
            .conversations
            .create_group(me, "g", &[peer], 0)
            .await
            .unwrap()
            .id,
    );
    let unknown_group = ConversationId::Group(UNKNOWN_GROUP);
    let unknown_dm = ConversationId::direct(me, UNKNOWN_USER).unwrap();

    let mut oversize = message(group, me, &unique("big"));
    oversize.body = Bytes::from(vec![0u8; MAX_BODY_BYTES + 1]);
    let mut at_limit = message(group, me, &unique("limit"));
    at_limit.body = Bytes::from(vec![0u8; MAX_BODY_BYTES]);
    let batch = vec![
        message(unknown_group, me, &unique("a")),
        message(unknown_dm, me, &unique("b")),
        message(group, stranger, &unique("c")),
        message(dm, stranger, &unique("d")),
        oversize,
        message(group, me, ""),
        message(group, me, &unique("ok")),
        at_limit,
    ];
    let answers = stores.messages.append(batch).await.unwrap();
    assert_eq!(answers.len(), 8);
    assert!(is_not_found(&answers[0]), "unknown group: {:?}", answers[0]);
    assert!(
        is_not_found(&answers[1]),
        "unknown user in DM: {:?}",
        answers[1]
    );
    assert!(
        matches!(&answers[2], Err(StoreError::NotMember { user, conversation })
            if *user == stranger && *conversation == group.to_string()),
        "{:?}",
        answers[2]
    );
    assert!(
        matches!(answers[3], Err(StoreError::NotMember { .. })),
        "{:?}",
        answers[3]
    );
    assert!(is_invalid(&answers[4]), "oversize body: {:?}", answers[4]);
    assert!(
        is_invalid(&answers[5]),
        "empty client_msg_id: {:?}",
        answers[5]
    );
    assert_eq!(
        answers[6].as_ref().unwrap().message.seq,
        1,
        "good message stored"
    );
    assert_eq!(
        answers[7].as_ref().unwrap().message.seq,
        2,
        "a body at the limit is fine"
    );
    assert_eq!(
        stores.messages.latest_seqs(&[group, dm]).await.unwrap(),
        [2, 0]
    );

    assert!(is_not_found(
        &stores.messages.messages(unknown_group, 0, 0, 10).await
    ));
    assert!(is_not_found(
        &stores.conversations.is_member(unknown_group, me).await
    ));
    assert!(is_not_found(
        &stores
            .conversations
            .members_page(UNKNOWN_GROUP, 0, 10)
            .await
    ));
    assert!(stores.messages.append(vec![]).await.unwrap().is_empty());
    let name = unique("dup");
    stores.users.create_user(&name, "h", 0).await.unwrap();
    assert!(matches!(
        stores.users.create_user(&name, "h", 0).await,
        Err(StoreError::Conflict(_))
    ));
}

//! Crash test: a child process appends from several tasks to several
//! conversations and reports every acknowledged message; the parent kills
//! it with SIGKILL at a random moment, reopens the store and checks that
//! every acknowledged message is there exactly once, that every
//! conversation's seqs are dense, and that re-sent keys are duplicates.
//!
//! The child is this test binary re-executed (`crash_child`, ignored in
//! normal runs) with `PINGME_CRASH_DIR` naming the data directory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pingme_storage::embedded::{Durability, EmbeddedStore};
use pingme_storage::{ConversationId, ConversationStore, MessageStore, NewMessage, UserStore};

const DIR_VAR: &str = "PINGME_CRASH_DIR";
const RUN_VAR: &str = "PINGME_CRASH_RUN";
const WRITERS: u64 = 8;
const USERS: u64 = 4;

/// The conversations the child writes to (set up by the parent): two
/// groups of all users and two direct conversations.
fn conversations() -> Vec<ConversationId> {
    vec![
        ConversationId::Group(1),
        ConversationId::Group(2),
        ConversationId::direct(1, 2).unwrap(),
        ConversationId::direct(3, 4).unwrap(),
    ]
}

/// A sender that belongs to the conversation.
fn sender_for(conversation: ConversationId, writer: u64) -> u64 {
    match conversation {
        ConversationId::Direct { low, high } => [low, high][(writer % 2) as usize],
        ConversationId::Group(_) => writer % USERS + 1,
    }
}

fn message(conversation: ConversationId, sender: u64, client_msg_id: String) -> NewMessage {
    NewMessage {
        conversation,
        sender,
        sender_device: "crash".into(),
        msg_id: format!("m-{client_msg_id}"),
        client_msg_id,
        content_type: 1,
        body: Bytes::from(vec![7u8; 100]),
        server_time_ms: 0,
    }
}

/// One acknowledged message, as the child reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Ack {
    conversation: ConversationId,
    seq: u64,
    sender: u64,
    client_msg_id: String,
}

/// `ack {conversation} {seq} {sender} {client_msg_id} end`: the trailing
/// `end` tells a complete line from one cut short by the kill.
fn parse_ack(line: &str) -> Option<Ack> {
    let parts: Vec<&str> = line.split(' ').collect();
    match parts.as_slice() {
        ["ack", conversation, seq, sender, key, "end"] => Some(Ack {
            conversation: conversation.parse().ok()?,
            seq: seq.parse().ok()?,
            sender: sender.parse().ok()?,
            client_msg_id: key.to_string(),
        }),
        _ => None,
    }
}

/// The child role: append forever, print each acknowledgement.
#[test]
#[ignore = "child process of crash_recovery_keeps_every_acknowledged_message"]
fn crash_child() {
    let Ok(dir) = std::env::var(DIR_VAR) else {
        return;
    };
    let run = std::env::var(RUN_VAR).unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = Arc::new(EmbeddedStore::open(Path::new(&dir), Durability::Sync).unwrap());
        let out = Arc::new(Mutex::new(std::io::stdout()));
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let (store, out, run) = (store.clone(), out.clone(), run.clone());
                tokio::spawn(async move {
                    let conversations = conversations();
                    for i in 0u64.. {
                        let conversation = conversations[((writer + i) % 4) as usize];
                        let sender = sender_for(conversation, writer);
                        let key = format!("r{run}-w{writer}-i{i}");
                        // Every third call sends a pair: the message and a retry of it.
                        let mut batch = vec![message(conversation, sender, key.clone())];
                        if i % 3 == 0 {
                            batch.push(message(conversation, sender, key.clone()));
                        }
                        let answers = store.append(batch).await.unwrap();
                        let seq = answers[0].as_ref().unwrap().message.seq;
                        let mut out = out.lock().unwrap();
                        writeln!(out, "ack {conversation} {seq} {sender} {key} end").unwrap();
                        out.flush().unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
    });
}

/// A small xorshift generator: kill moments need no crate.
struct Random(u64);

impl Random {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn set_up(dir: &Path) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = EmbeddedStore::open(dir, Durability::Sync).unwrap();
        for n in 1..=USERS {
            assert_eq!(
                store
                    .create_user(&format!("user{n}"), "h", 0)
                    .await
                    .unwrap()
                    .id,
                n
            );
        }
        let all: Vec<u64> = (1..=USERS).collect();
        for expected in 1..=2 {
            let group = store.create_group(1, "crash", &all, 0).await.unwrap();
            assert_eq!(group.id, expected);
        }
    });
}

/// Runs one child until a random moment after its first acknowledgement,
/// kills it, and returns what it acknowledged.
fn run_and_kill(dir: &Path, run: usize, random: &mut Random) -> Vec<Ack> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DIR_VAR, dir)
        .env(RUN_VAR, run.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (first_ack, first_ack_seen) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut acks = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(ack) = parse_ack(&line) {
                if acks.is_empty() {
                    let _ = first_ack.send(());
                }
                acks.push(ack);
            }
        }
        acks
    });
    first_ack_seen
        .recv_timeout(Duration::from_secs(30))
        .expect("child acknowledged nothing");
    std::thread::sleep(Duration::from_millis(20 + random.below(400)));
    // `Child::kill` is SIGKILL on Unix: no chance to flush or clean up.
    child.kill().expect("SIGKILL the child");
    child.wait().unwrap();
    reader.join().unwrap()
}

/// Checks the reopened store against everything acknowledged so far.
async fn verify(store: &EmbeddedStore, acked: &[Ack]) {
    let conversations = conversations();
    let latest = store.latest_seqs(&conversations).await.unwrap();
    let mut stored: HashMap<ConversationId, Vec<(u64, String)>> = HashMap::new();
    let mut keys = HashSet::new();
    for (conversation, latest) in conversations.iter().zip(latest) {
        let mut timeline = Vec::new();
        loop {
            let page = store
                .messages(*conversation, timeline.len() as u64, 0, 1000)
                .await
                .unwrap();
            if page.is_empty() {
                break;
            }
            for message in page {
                assert_eq!(
                    message.seq,
                    timeline.len() as u64 + 1,
                    "dense seqs in {conversation}"
                );
                assert!(
                    keys.insert((message.sender, message.client_msg_id.clone())),
                    "client_msg_id {} stored twice",
                    message.client_msg_id
                );
                timeline.push((message.sender, message.client_msg_id));
            }
        }
        assert_eq!(
            timeline.len() as u64,
            latest,
            "latest seq of {conversation}"
        );
        stored.insert(*conversation, timeline);
    }
    for ack in acked {
        let timeline = &stored[&ack.conversation];
        let at = timeline.get(ack.seq as usize - 1);
        assert_eq!(
            at,
            Some(&(ack.sender, ack.client_msg_id.clone())),
            "acknowledged message lost or moved: {ack:?}"
        );
    }
}

#[test]
fn crash_recovery_keeps_every_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    set_up(dir.path());
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut random = Random(seed | 1);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let started = Instant::now();
    let mut acked: Vec<Ack> = Vec::new();
    let mut kills = 0;
    while kills < 15 && started.elapsed() < Duration::from_secs(20) {
        let acks = run_and_kill(dir.path(), kills, &mut random);
        kills += 1;
        assert!(!acks.is_empty());
        acked.extend(acks);
        runtime.block_on(async {
            let store = EmbeddedStore::open(dir.path(), Durability::Sync).unwrap();
            verify(&store, &acked).await;
            // Re-sending acknowledged keys stores nothing new.
            for n in 0..5 {
                let ack = &acked[random.below(acked.len() as u64) as usize];
                let resent = message(ack.conversation, ack.sender, ack.client_msg_id.clone());
                let answer = store.append(vec![resent]).await.unwrap().remove(0).unwrap();
                assert!(answer.duplicate, "re-send {n} of {ack:?} was stored again");
                assert_eq!(answer.message.seq, ack.seq);
            }
            verify(&store, &acked).await;
        });
    }
    let per_conversation: BTreeMap<String, usize> =
        acked.iter().fold(BTreeMap::new(), |mut counts, ack| {
            *counts.entry(ack.conversation.to_string()).or_default() += 1;
            counts
        });
    println!(
        "{kills} kills in {:?}, {} acknowledged messages verified: {per_conversation:?}",
        started.elapsed(),
        acked.len()
    );
    assert!(kills >= 5, "too few kills in the time bound: {kills}");
}

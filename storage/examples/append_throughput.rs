//! Durable append throughput of the embedded store, or of the MySQL store.
//!
//! `cargo run --release -p pingme-storage --example append_throughput --
//!  [writers] [conversations] [messages] [sync|nosync] [batch] [embedded|mysql]`
//!
//! `writers` tasks append `messages` messages in total (100-byte bodies)
//! to `conversations` groups, `batch` messages per `append` call, and the
//! example prints acknowledged appends per second, the average group-commit
//! round size and append call latency percentiles. `mysql` uses the server
//! `MYSQL_URL` names, in a database of its own (`pingme_t_bench_<pid>`,
//! dropped at the end); `sync|nosync` applies to the embedded store only
//! (MySQL is as durable as the server is configured).
//! `PINGME_GROUP_COMMIT_US` sets the embedded store's group-commit interval
//! in microseconds (default: the store's own, 1 ms).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pingme_storage::embedded::{Durability, EmbeddedStore};
use pingme_storage::mysql::{MysqlConfig, MysqlStore};
use pingme_storage::{
    CommitStats, ConversationId, ConversationStore, Member, MessageStore, NewMessage, Role,
    UserStore,
};

/// The gateway binary runs on mimalloc; measure with the same allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Senders: each group has all of them as members.
const SENDERS: usize = 64;

fn arg<T: std::str::FromStr>(n: usize, default: T) -> T {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let writers: usize = arg(1, 512);
    let conversations: usize = arg(2, 1000);
    let total: usize = arg(3, 1_000_000);
    let durability = match std::env::args().nth(4).as_deref() {
        Some("nosync") => Durability::UnsafeNoSyncForBenchmarks,
        _ => Durability::Sync,
    };
    let batch: usize = arg(5, 1).max(1);
    let dir = match std::env::var("PINGME_BENCH_DIR") {
        Ok(dir) => std::path::PathBuf::from(dir),
        Err(_) => std::env::temp_dir().join(format!("pingme-append-{}", std::process::id())),
    };

    let mysql = match std::env::args().nth(6).as_deref() {
        Some("mysql") => {
            let url = std::env::var("MYSQL_URL")
                .expect("the mysql backend needs MYSQL_URL=mysql://user:password@host:port");
            let mut config = MysqlConfig::from_url(&url).expect("MYSQL_URL");
            config.database = format!("pingme_t_bench_{}", std::process::id());
            config.pool_size = 32;
            Some(config)
        }
        _ => None,
    };

    let (groups, store, commit_stats): (_, Arc<dyn MessageStore>, Box<dyn Fn() -> CommitStats>) =
        match &mysql {
            Some(config) => {
                let store = Arc::new(MysqlStore::connect(config).await.expect("MySQL"));
                let groups = set_up(&*store, conversations).await;
                let stats = store.clone();
                (groups, store, Box::new(move || stats.commit_stats()))
            }
            None => {
                // Set-up without fsync (it is not what is measured), then reopen.
                let groups = {
                    let store =
                        EmbeddedStore::open(&dir, Durability::UnsafeNoSyncForBenchmarks).unwrap();
                    set_up(&store, conversations).await
                };
                let interval = std::env::var("PINGME_GROUP_COMMIT_US")
                    .ok()
                    .and_then(|us| us.parse().ok())
                    .map(Duration::from_micros)
                    .unwrap_or(pingme_storage::embedded::DEFAULT_GROUP_COMMIT_INTERVAL);
                let store = Arc::new(EmbeddedStore::open_with(&dir, durability, interval).unwrap());
                let stats = store.clone();
                (groups, store, Box::new(move || stats.commit_stats()))
            }
        };
    let groups = Arc::new(groups);
    let body = Bytes::from(vec![b'x'; 100]);

    let per_writer = total / writers;
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (store, groups, body) = (store.clone(), groups.clone(), body.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_writer / batch + 1);
                let mut sent = 0;
                let mut i = w;
                while sent < per_writer {
                    let n = batch.min(per_writer - sent);
                    let mut messages = Vec::with_capacity(n);
                    for _ in 0..n {
                        let (conversation, senders) = &groups[i % groups.len()];
                        i += 7;
                        messages.push(NewMessage {
                            conversation: *conversation,
                            sender: senders[w % senders.len()],
                            sender_device: "bench".into(),
                            client_msg_id: format!("w{w}-{sent}"),
                            msg_id: format!("m{w}-{sent}"),
                            content_type: 1,
                            body: body.clone(),
                            server_time_ms: 0,
                        });
                        sent += 1;
                    }
                    let call = Instant::now();
                    for answer in store.append(messages).await.unwrap() {
                        assert!(!answer.unwrap().duplicate);
                    }
                    latencies.push(call.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed();
    let cpu = cpu_seconds();
    let appended = per_writer * writers;
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    let stats = commit_stats();
    let backend = if mysql.is_some() {
        "mysql".to_string()
    } else {
        format!("{durability:?}")
    };
    println!(
        "{backend}: {appended} appends by {writers} writers to {conversations} conversations, \
         {batch} per call, in {:.2}s = {:.0} appends/s; {} rounds, {:.0} messages/round; \
         call latency p50 {:?} p99 {:?} max {:?}; \
         CPU per append: {:.1} us in all threads, {:.1} us in the writer thread",
        elapsed.as_secs_f64(),
        appended as f64 / elapsed.as_secs_f64(),
        stats.rounds,
        stats.messages as f64 / stats.rounds.max(1) as f64,
        pct(0.5),
        pct(0.99),
        pct(1.0),
        (cpu.0 - cpu_before.0) * 1e6 / appended as f64,
        (cpu.1 - cpu_before.1) * 1e6 / appended as f64,
    );
    drop(store);
    if let Some(config) = mysql {
        drop_database(&config).await;
    } else if std::env::var("PINGME_BENCH_DIR").is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `SENDERS` users and `conversations` groups with all of them as members.
async fn set_up<S: UserStore + ConversationStore>(
    store: &S,
    conversations: usize,
) -> Vec<(ConversationId, Vec<u64>)> {
    let run = std::process::id();
    let mut senders = Vec::with_capacity(SENDERS);
    for n in 0..SENDERS {
        senders.push(
            store
                .create_user(&format!("sender{n}-{run}"), "h", 0)
                .await
                .unwrap()
                .id,
        );
    }
    let members: Vec<Member> = senders
        .iter()
        .map(|&user| Member {
            user,
            role: Role::Member,
        })
        .collect();
    let mut groups = Vec::with_capacity(conversations);
    for _ in 0..conversations {
        let group = store
            .create_group(senders[0], "bench", &[], 0)
            .await
            .unwrap();
        store.add_members(group.id, &members).await.unwrap();
        groups.push((ConversationId::Group(group.id), senders.clone()));
    }
    groups
}

/// Drops the benchmark's own database.
async fn drop_database(config: &MysqlConfig) {
    use sqlx::{ConnectOptions, Executor};
    let connection = sqlx::mysql::MySqlConnectOptions::new()
        .host(&config.host)
        .port(config.port)
        .username(&config.username)
        .password(&config.password)
        .ssl_mode(sqlx::mysql::MySqlSslMode::Disabled)
        .connect()
        .await;
    if let Ok(mut connection) = connection {
        let _ = connection
            .execute(format!("DROP DATABASE IF EXISTS `{}`", config.database).as_str())
            .await;
    }
}

/// (process, writer thread) CPU seconds so far, from /proc: the machine is
/// shared, so CPU per append says more than wall time about the code.
fn cpu_seconds() -> (f64, f64) {
    fn ticks(stat: &str) -> f64 {
        // Fields after the parenthesised command: utime and stime are 12 and 13.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (field(11) + field(12)) / 100.0
    }
    let process = ticks(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default());
    let mut writer = 0.0;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim() == "pingme-store-wr" {
                writer +=
                    ticks(&std::fs::read_to_string(task.path().join("stat")).unwrap_or_default());
            }
        }
    }
    (process, writer)
}

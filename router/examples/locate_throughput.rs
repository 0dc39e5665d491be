//! Located users per second: the Redis directory locating fanout pages
//! (`fanout_batch_size` users per `locate`, one Lua script call each)
//! against the server `REDIS_URL` names, under a key prefix of its own that
//! is deleted at the end.
//!
//! ```sh
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example locate_throughput -- \
//!     [USERS=100000] [PAGE=1000] [SECONDS=10] [CONCURRENCY=1]
//! ```
//!
//! USERS users are registered first, spread over four gateways (every
//! tenth user also on a second device elsewhere, every fourth user
//! offline), then pages of PAGE consecutive users are located for SECONDS
//! with CONCURRENCY callers at once. Prints one JSON line.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pingme_router::port::UserId;
use pingme_router::{
    ConnAddress, Directory, RedisDirectory, RedisDirectorySettings, Registration, SystemClock,
};

const GATEWAYS: [&str; 4] = ["gw-bench-1", "gw-bench-2", "gw-bench-3", "gw-bench-4"];

fn arg(index: usize, default: u64) -> u64 {
    std::env::args()
        .nth(index)
        .map(|a| a.parse().expect("numeric arguments"))
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let url = std::env::var("REDIS_URL").expect("set REDIS_URL=redis://127.0.0.1:6379");
    let (users, page, seconds, concurrency) =
        (arg(1, 100_000), arg(2, 1000), arg(3, 10), arg(4, 1));
    let settings = RedisDirectorySettings {
        url: url.clone(),
        key_prefix: format!("pingme-test-redis:bench-{}:", std::process::id()),
        ..RedisDirectorySettings::default()
    };
    let directories: Vec<Arc<RedisDirectory>> = GATEWAYS
        .iter()
        .map(|gateway| {
            Arc::new(RedisDirectory::new(&settings, gateway, Arc::new(SystemClock)).unwrap())
        })
        .collect();

    // Register: 64 registrations in flight per gateway.
    let started = Instant::now();
    let mut registering = Vec::new();
    for (index, directory) in directories.iter().enumerate() {
        let directory = directory.clone();
        let gateway: Arc<str> = Arc::from(GATEWAYS[index]);
        registering.push(tokio::spawn(async move {
            let online = (1..=users).filter(|user| user % 4 != 0);
            let mine: Vec<UserId> = online
                .filter(|user| {
                    (*user as usize % 4 == index)
                        || (user % 10 == 0 && (*user as usize + 1) % 4 == index)
                })
                .collect();
            for chunk in mine.chunks(64) {
                let calls = chunk.iter().map(|&user| {
                    let registration = Registration {
                        user,
                        device: Arc::from(if user as usize % 4 == index {
                            "phone"
                        } else {
                            "laptop"
                        }),
                        gateway: gateway.clone(),
                        conn: ConnAddress {
                            shard: 0,
                            conn_id: user,
                        },
                    };
                    let directory = directory.clone();
                    async move { directory.register(&registration).await.unwrap() }
                });
                futures::future::join_all(calls).await;
            }
        }));
    }
    for task in registering {
        task.await.unwrap();
    }
    let registered_in = started.elapsed();

    // Locate pages of consecutive users for `seconds`.
    let locator = directories[0].clone();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let calls_before = locator.calls();
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let locator = locator.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let (mut located, mut online) = (0u64, 0u64);
                let mut first = 1 + worker * page;
                while Instant::now() < deadline {
                    if first + page > users + 1 {
                        first = 1;
                    }
                    let ids: Vec<UserId> = (first..first + page).collect();
                    let began = Instant::now();
                    let answer = locator.locate(&ids, true).await.unwrap();
                    latencies.push(began.elapsed());
                    located += ids.len() as u64;
                    online += answer
                        .online
                        .iter()
                        .map(|(_, u)| u.len() as u64)
                        .sum::<u64>();
                    first += page * concurrency;
                }
                (located, online, latencies)
            })
        })
        .collect();
    let (mut located, mut online, mut latencies) = (0u64, 0u64, Vec::new());
    for worker in workers {
        let (l, o, mut lat) = worker.await.unwrap();
        located += l;
        online += o;
        latencies.append(&mut lat);
    }
    let elapsed = started.elapsed();
    let calls = locator.calls() - calls_before;
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    println!(
        "{{\"users\":{users},\"page\":{page},\"concurrency\":{concurrency},\
         \"registered_per_s\":{:.0},\"pages\":{},\"redis_calls\":{calls},\
         \"located_users_per_s\":{:.0},\"online_entries\":{online},\
         \"page_ms_p50\":{:.2},\"page_ms_p99\":{:.2},\"page_ms_max\":{:.2}}}",
        // Registrations made: the online users plus the second devices.
        ((users - users / 4) + users / 10 - users / 20) as f64 / registered_in.as_secs_f64(),
        latencies.len(),
        located as f64 / elapsed.as_secs_f64(),
        at(0.5),
        at(0.99),
        at(1.0),
    );

    // Delete the prefix's keys.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let pattern = format!("{}*", settings.key_prefix);
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut redis)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut redis)
                .await
                .unwrap();
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

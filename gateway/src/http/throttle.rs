//! Login throttling: failed logins are counted per username and per client
//! IP in a fixed window; once either count reaches its limit, every login
//! for that username or from that IP answers `LOGIN_RATE_LIMITED` until the
//! window ends, even with the right password (else a guesser would learn it
//! by the answer changing). Only failures count, so many users logging in
//! from one address (a NAT, a load generator) are not throttled.

use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::config::AuthConfig;

/// Past this many tracked keys, stale windows are swept on the next failure,
/// so guessing many usernames cannot grow the maps without bound.
const SWEEP_ABOVE: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

#[derive(Debug)]
struct Counter<K: Eq + Hash> {
    windows: DashMap<K, Window>,
    limit: u32,
    window: Duration,
}

impl<K: Eq + Hash + Clone> Counter<K> {
    fn new(limit: u32, window: Duration) -> Self {
        Counter {
            windows: DashMap::new(),
            limit,
            window,
        }
    }

    fn blocked(&self, key: &K, now: Instant) -> bool {
        self.windows.get(key).is_some_and(|w| {
            now.duration_since(w.started) < self.window && w.failures >= self.limit
        })
    }

    fn fail(&self, key: K, now: Instant) {
        if self.windows.len() > SWEEP_ABOVE {
            self.windows
                .retain(|_, w| now.duration_since(w.started) < self.window);
        }
        let mut entry = self.windows.entry(key).or_insert(Window {
            started: now,
            failures: 0,
        });
        if now.duration_since(entry.started) >= self.window {
            *entry = Window {
                started: now,
                failures: 0,
            };
        }
        entry.failures = entry.failures.saturating_add(1);
    }

    fn clear(&self, key: &K) {
        self.windows.remove(key);
    }
}

/// Counts failed logins per username and per IP.
#[derive(Debug)]
pub struct LoginThrottle {
    per_user: Counter<String>,
    per_ip: Counter<IpAddr>,
}

impl LoginThrottle {
    /// Limits from the `auth` config section.
    pub fn new(config: &AuthConfig) -> LoginThrottle {
        LoginThrottle {
            per_user: Counter::new(
                config.max_login_failures_per_user,
                config.login_failure_window,
            ),
            per_ip: Counter::new(
                config.max_login_failures_per_ip,
                config.login_failure_window,
            ),
        }
    }

    /// Whether a login for `username` from `ip` must be refused now.
    pub fn blocked(&self, username: &str, ip: Option<IpAddr>, now: Instant) -> bool {
        self.per_user.blocked(&username.to_string(), now)
            || ip.is_some_and(|ip| self.per_ip.blocked(&ip, now))
    }

    /// Counts a failed login.
    pub fn failed(&self, username: &str, ip: Option<IpAddr>, now: Instant) {
        self.per_user.fail(username.to_string(), now);
        if let Some(ip) = ip {
            self.per_ip.fail(ip, now);
        }
    }

    /// A successful login forgives the username's failures (not the IP's).
    pub fn succeeded(&self, username: &str) {
        self.per_user.clear(&username.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(per_user: u32, per_ip: u32) -> LoginThrottle {
        LoginThrottle::new(&AuthConfig {
            max_login_failures_per_user: per_user,
            max_login_failures_per_ip: per_ip,
            login_failure_window: Duration::from_secs(60),
            ..AuthConfig::default()
        })
    }

    #[test]
    fn failures_block_the_username_until_the_window_ends() {
        let t = throttle(3, 100);
        let ip = Some(IpAddr::from([10, 0, 0, 1]));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(!t.blocked("alice", ip, t0));
            t.failed("alice", ip, t0);
        }
        assert!(t.blocked("alice", ip, t0));
        assert!(!t.blocked("bob", ip, t0), "other users are not affected");
        assert!(!t.blocked("alice", ip, t0 + Duration::from_secs(61)));
        t.failed("alice", ip, t0 + Duration::from_secs(61));
        assert!(
            !t.blocked("alice", ip, t0 + Duration::from_secs(61)),
            "new window"
        );
    }

    #[test]
    fn failures_block_the_ip_across_usernames() {
        let t = throttle(100, 4);
        let ip = Some(IpAddr::from([10, 0, 0, 2]));
        let t0 = Instant::now();
        for n in 0..4 {
            t.failed(&format!("user{n}"), ip, t0);
        }
        assert!(t.blocked("someone_else", ip, t0));
        assert!(!t.blocked("someone_else", Some(IpAddr::from([10, 0, 0, 3])), t0));
    }

    #[test]
    fn success_clears_the_username() {
        let t = throttle(2, 100);
        let t0 = Instant::now();
        t.failed("carol", None, t0);
        t.succeeded("carol");
        t.failed("carol", None, t0);
        assert!(!t.blocked("carol", None, t0));
    }
}

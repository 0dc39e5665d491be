//! Login and registration throttling per username and per client IP, in
//! fixed windows.
//!
//! Logins: failed logins are counted per username and per IP; once either
//! count reaches its limit, every login for that username or from that IP
//! answers `LOGIN_RATE_LIMITED` until the window ends, even with the right
//! password (else a guesser would learn it by the answer changing). Only
//! failures count, so many users logging in one after another from one
//! address (a NAT, a load generator) are not throttled.
//!
//! The limits hold under concurrency: an attempt takes a slot
//! ([`LoginThrottle::begin`]) *before* its password is verified, and a slot
//! is only given while failures plus attempts in flight stay under the
//! limit. So 40 parallel guesses for one username with a limit of 5 get at
//! most 5 verifications; the others are refused without one. A slot whose
//! attempt ends without a verdict (the store failed, hashing was busy, the
//! client went away) is handed back uncounted.
//!
//! Registrations: each registration that reaches password hashing spends
//! one of the IP's registrations for the window ([`RegistrationThrottle`]);
//! it answers `RATE_LIMITED` beyond that.

use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::config::AuthConfig;

/// Past this many tracked keys, stale windows are swept on the next
/// reservation, so guessing many usernames cannot grow the maps without
/// bound.
const SWEEP_ABOVE: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    /// Attempts that counted in this window (failed logins, registrations).
    spent: u32,
    /// Slots handed out and not yet settled; survives a window change,
    /// because those attempts are still running.
    in_flight: u32,
}

/// Slots per key: `spent + in_flight` never exceeds `limit`.
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

    /// Takes a slot for `key` if one is free. The map's entry lock makes
    /// check and take one step.
    fn reserve(&self, key: K, now: Instant) -> bool {
        if self.windows.len() > SWEEP_ABOVE {
            self.windows
                .retain(|_, w| w.in_flight > 0 || now.duration_since(w.started) < self.window);
        }
        let mut entry = self.windows.entry(key).or_insert(Window {
            started: now,
            spent: 0,
            in_flight: 0,
        });
        if now.duration_since(entry.started) >= self.window {
            entry.started = now;
            entry.spent = 0;
        }
        if entry.spent.saturating_add(entry.in_flight) >= self.limit {
            return false;
        }
        entry.in_flight += 1;
        true
    }

    /// Settles a slot taken by [`Counter::reserve`]: `spent` counts it
    /// against the window, else it is handed back.
    fn settle(&self, key: &K, spent: bool, now: Instant) {
        if let Some(mut entry) = self.windows.get_mut(key) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
            if spent {
                if now.duration_since(entry.started) >= self.window {
                    entry.started = now;
                    entry.spent = 0;
                }
                entry.spent = entry.spent.saturating_add(1);
            }
        }
        self.windows
            .remove_if(key, |_, w| w.in_flight == 0 && w.spent == 0);
    }

    /// Slots of `key` taken and not yet settled.
    fn in_flight(&self, key: &K) -> u32 {
        self.windows.get(key).map_or(0, |w| w.in_flight)
    }

    /// Forgets what `key` spent (attempts in flight stay counted).
    fn forgive(&self, key: &K) {
        if let Some(mut entry) = self.windows.get_mut(key) {
            entry.spent = 0;
        }
        self.windows
            .remove_if(key, |_, w| w.in_flight == 0 && w.spent == 0);
    }
}

/// Counts failed logins per username and per IP.
#[derive(Debug)]
pub struct LoginThrottle {
    per_user: Counter<String>,
    per_ip: Counter<IpAddr>,
}

/// A login attempt holding a slot of its username and of its IP. Settle it
/// with [`LoginAttempt::failed`] or [`LoginAttempt::succeeded`]; dropped
/// unsettled, it hands its slots back without counting.
#[derive(Debug)]
#[must_use = "an attempt must be settled, or dropped to hand its slots back"]
pub struct LoginAttempt<'a> {
    throttle: &'a LoginThrottle,
    username: String,
    ip: Option<IpAddr>,
    settled: bool,
}

impl LoginAttempt<'_> {
    /// The password was wrong (or the user unknown): counts against the
    /// username and the IP.
    pub fn failed(mut self, now: Instant) {
        self.settle(true, now);
    }

    /// The password was right: forgives the username's failures (not the
    /// IP's).
    pub fn succeeded(mut self, now: Instant) {
        self.settle(false, now);
        self.throttle.per_user.forgive(&self.username);
    }

    fn settle(&mut self, failed: bool, now: Instant) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        self.throttle.per_user.settle(&self.username, failed, now);
        if let Some(ip) = self.ip {
            self.throttle.per_ip.settle(&ip, failed, now);
        }
    }
}

impl Drop for LoginAttempt<'_> {
    fn drop(&mut self) {
        self.settle(false, Instant::now());
    }
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

    /// A slot for one login of `username` from `ip`, or `None` when the
    /// attempt must be refused now (the username's or the IP's failures
    /// plus attempts in flight reached the limit).
    pub fn begin(
        &self,
        username: &str,
        ip: Option<IpAddr>,
        now: Instant,
    ) -> Option<LoginAttempt<'_>> {
        if !self.per_user.reserve(username.to_string(), now) {
            return None;
        }
        if let Some(ip) = ip
            && !self.per_ip.reserve(ip, now)
        {
            self.per_user.settle(&username.to_string(), false, now);
            return None;
        }
        Some(LoginAttempt {
            throttle: self,
            username: username.to_string(),
            ip,
            settled: false,
        })
    }

    /// Logins of `username` holding a slot now (being verified).
    pub fn in_flight(&self, username: &str) -> u32 {
        self.per_user.in_flight(&username.to_string())
    }
}

/// Counts registrations per client IP.
#[derive(Debug)]
pub struct RegistrationThrottle {
    per_ip: Counter<IpAddr>,
}

/// A registration holding one of its IP's slots. [`Registration::spent`]
/// counts it; dropped otherwise, the slot is handed back.
#[derive(Debug)]
#[must_use = "a registration must be spent, or dropped to hand its slot back"]
pub struct Registration<'a> {
    throttle: &'a RegistrationThrottle,
    ip: Option<IpAddr>,
    settled: bool,
}

impl Registration<'_> {
    /// The registration's password was hashed: it counts, whatever the
    /// store answered next.
    pub fn spent(mut self, now: Instant) {
        self.settle(true, now);
    }

    fn settle(&mut self, spent: bool, now: Instant) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        if let Some(ip) = self.ip {
            self.throttle.per_ip.settle(&ip, spent, now);
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.settle(false, Instant::now());
    }
}

impl RegistrationThrottle {
    /// Limits from the `auth` config section.
    pub fn new(config: &AuthConfig) -> RegistrationThrottle {
        RegistrationThrottle {
            per_ip: Counter::new(config.max_registrations_per_ip, config.registration_window),
        }
    }

    /// A slot for one registration from `ip`, or `None` when the IP used
    /// up its registrations for the window. Without an IP (no connect
    /// info) nothing is counted.
    pub fn begin(&self, ip: Option<IpAddr>, now: Instant) -> Option<Registration<'_>> {
        if let Some(ip) = ip
            && !self.per_ip.reserve(ip, now)
        {
            return None;
        }
        Some(Registration {
            throttle: self,
            ip,
            settled: false,
        })
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

    fn fail(t: &LoginThrottle, user: &str, ip: Option<IpAddr>, now: Instant) {
        t.begin(user, ip, now).expect("a free slot").failed(now);
    }

    #[test]
    fn failures_block_the_username_until_the_window_ends() {
        let t = throttle(3, 100);
        let ip = Some(IpAddr::from([10, 0, 0, 1]));
        let t0 = Instant::now();
        for _ in 0..3 {
            fail(&t, "alice", ip, t0);
        }
        assert!(t.begin("alice", ip, t0).is_none());
        assert!(
            t.begin("bob", ip, t0).is_some(),
            "other users are not affected"
        );
        let later = t0 + Duration::from_secs(61);
        fail(&t, "alice", ip, later);
        assert!(t.begin("alice", ip, later).is_some(), "new window");
    }

    #[test]
    fn failures_block_the_ip_across_usernames() {
        let t = throttle(100, 4);
        let ip = Some(IpAddr::from([10, 0, 0, 2]));
        let t0 = Instant::now();
        for n in 0..4 {
            fail(&t, &format!("user{n}"), ip, t0);
        }
        assert!(t.begin("someone_else", ip, t0).is_none());
        assert!(
            t.begin("someone_else", Some(IpAddr::from([10, 0, 0, 3])), t0)
                .is_some()
        );
    }

    #[test]
    fn success_clears_the_username() {
        let t = throttle(2, 100);
        let t0 = Instant::now();
        fail(&t, "carol", None, t0);
        t.begin("carol", None, t0).unwrap().succeeded(t0);
        fail(&t, "carol", None, t0);
        assert!(t.begin("carol", None, t0).is_some());
    }

    /// The race of the check-then-act throttle: attempts still being
    /// verified hold their slots, so the one after them is refused before
    /// its password is looked at, whatever it is.
    #[test]
    fn attempts_in_flight_hold_their_slots() {
        let t = throttle(5, 100);
        let ip = Some(IpAddr::from([10, 0, 0, 4]));
        let t0 = Instant::now();
        let guesses: Vec<_> = (0..5).map(|_| t.begin("dave", ip, t0).unwrap()).collect();
        assert!(
            t.begin("dave", ip, t0).is_none(),
            "the sixth waits for none"
        );
        for guess in guesses {
            guess.failed(t0);
        }
        assert!(t.begin("dave", ip, t0).is_none());
    }

    #[test]
    fn attempts_in_flight_hold_the_ips_slots_too() {
        let t = throttle(100, 3);
        let ip = Some(IpAddr::from([10, 0, 0, 5]));
        let t0 = Instant::now();
        let held: Vec<_> = (0..3)
            .map(|n| t.begin(&format!("u{n}"), ip, t0).unwrap())
            .collect();
        assert!(t.begin("u9", ip, t0).is_none());
        // The refused attempt handed its username slot back.
        assert!(t.begin("u9", None, t0).is_some());
        drop(held);
        assert!(t.begin("u9", ip, t0).is_some());
    }

    #[test]
    fn an_unsettled_attempt_hands_its_slots_back_uncounted() {
        let t = throttle(1, 1);
        let ip = Some(IpAddr::from([10, 0, 0, 6]));
        let t0 = Instant::now();
        drop(t.begin("erin", ip, t0).unwrap());
        fail(&t, "erin", ip, t0);
        assert!(t.begin("erin", ip, t0).is_none());
        assert!(t.per_user.windows.len() == 1 && t.per_ip.windows.len() == 1);
    }

    #[test]
    fn registrations_are_counted_per_ip() {
        let r = RegistrationThrottle::new(&AuthConfig {
            max_registrations_per_ip: 2,
            registration_window: Duration::from_secs(60),
            ..AuthConfig::default()
        });
        let ip = Some(IpAddr::from([10, 0, 0, 7]));
        let t0 = Instant::now();
        let first = r.begin(ip, t0).unwrap();
        let second = r.begin(ip, t0).unwrap();
        assert!(r.begin(ip, t0).is_none(), "two in flight use both slots");
        first.spent(t0);
        drop(second); // never hashed: handed back
        r.begin(ip, t0).unwrap().spent(t0);
        assert!(r.begin(ip, t0).is_none());
        assert!(r.begin(Some(IpAddr::from([10, 0, 0, 8])), t0).is_some());
        assert!(r.begin(None, t0).is_some(), "no address, no count");
        assert!(r.begin(ip, t0 + Duration::from_secs(60)).is_some());
    }
}

//! Reconnect pacing: exponential backoff with jitter, so a fleet of clients
//! cut off at once does not come back at once.

use std::time::Duration;

use rand::Rng;

/// How long to wait between reconnect attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Delay before the first retry.
    pub initial: Duration,
    /// The delay doubles per failed attempt up to this cap.
    pub max: Duration,
    /// Give up after this many failed attempts in a row (`None`: never).
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// The ceiling of the delay after `attempt` failures (0-based): initial
    /// doubled per attempt, capped.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.min(20);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// A delay drawn uniformly from the upper half of the ceiling: spread
    /// out, yet never much shorter than the schedule asks.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        let spread = (ceiling - half).as_micros() as u64;
        half + Duration::from_micros(rng.random_range(0..=spread))
    }

    /// Whether `attempts` consecutive failures exhaust the budget.
    pub fn exhausted(&self, attempts: u32) -> bool {
        self.max_attempts.is_some_and(|max| attempts >= max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_inside_the_upper_half() {
        let backoff = Backoff::default();
        assert_eq!(backoff.ceiling(0), Duration::from_millis(100));
        assert_eq!(backoff.ceiling(3), Duration::from_millis(800));
        assert_eq!(backoff.ceiling(40), Duration::from_secs(10));
        let mut rng = rand::rng();
        let delays: Vec<Duration> = (0..200).map(|_| backoff.delay(2, &mut rng)).collect();
        assert!(
            delays
                .iter()
                .all(|d| *d >= Duration::from_millis(200) && *d <= Duration::from_millis(400))
        );
        assert!(delays.iter().any(|d| *d != delays[0]), "jittered");
        assert!(!backoff.exhausted(1000));
        assert!(
            Backoff {
                max_attempts: Some(3),
                ..backoff
            }
            .exhausted(3)
        );
    }
}

//! Retry with exponential backoff: how long to wait before each next try
//! of a failed push, fanout step or append.

use std::future::Future;
use std::time::Duration;

use crate::config::RouterConfig;

/// Tries and waits between them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Total tries (at least 1).
    pub attempts: u32,
    /// Wait before the second try.
    pub initial: Duration,
    /// Longest wait.
    pub max: Duration,
    /// Growth of the wait per try.
    pub multiplier: f64,
}

impl RetryPolicy {
    /// The policy of a router config.
    pub fn from_config(config: &RouterConfig) -> Self {
        Self {
            attempts: config.message_retry_attempts.max(1),
            initial: config.retry_initial_backoff,
            max: config.retry_max_backoff,
            multiplier: config.retry_multiplier.max(1.0),
        }
    }

    /// One try, no waiting (used by replay).
    pub fn once() -> Self {
        Self {
            attempts: 1,
            initial: Duration::ZERO,
            max: Duration::ZERO,
            multiplier: 1.0,
        }
    }

    /// The wait after failed try number `try_index` (0-based).
    pub fn backoff(&self, try_index: u32) -> Duration {
        let factor = self.multiplier.powi(try_index.min(64) as i32);
        self.initial.mul_f64(factor).min(self.max)
    }

    /// Runs `op` until it succeeds or the tries are used up; returns the
    /// last error and the tries made. `stage` labels the retry metric.
    pub async fn run<T, E, F, Fut>(&self, stage: &'static str, mut op: F) -> Result<T, (E, u32)>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut try_index = 0;
        loop {
            match op().await {
                Ok(value) => return Ok(value),
                Err(error) if try_index + 1 >= self.attempts => {
                    return Err((error, try_index + 1));
                }
                Err(_) => {
                    metrics::counter!(crate::telemetry::RETRIES, "stage" => stage).increment(1);
                    tokio::time::sleep(self.backoff(try_index)).await;
                    try_index += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_100ms_and_caps_at_10s() {
        let policy = RetryPolicy::from_config(&RouterConfig::default());
        let waits: Vec<u128> = (0..10).map(|i| policy.backoff(i).as_millis()).collect();
        assert_eq!(
            waits,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_configured_tries() {
        let policy = RetryPolicy::from_config(&RouterConfig::default());
        let mut tries = 0;
        let started = tokio::time::Instant::now();
        let result: Result<(), (&str, u32)> = policy
            .run("test", || {
                tries += 1;
                async { Err("down") }
            })
            .await;
        assert_eq!(result, Err(("down", 3)));
        assert_eq!(tries, 3);
        // Virtual time: exactly the two waits, 100 ms then 200 ms.
        assert_eq!(started.elapsed(), Duration::from_millis(300));

        let mut tries = 0;
        let result: Result<u32, (&str, u32)> = policy
            .run("test", || {
                tries += 1;
                let t = tries;
                async move { if t < 2 { Err("blip") } else { Ok(t) } }
            })
            .await;
        assert_eq!(result, Ok(2));
    }
}

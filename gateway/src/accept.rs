//! What every accept loop (the binary gateway's TCP and TLS shards, the
//! HTTP API, the ops port) does when `accept` fails.
//!
//! Most failures belong to one connection that died in the backlog
//! (`ECONNABORTED`, `ECONNRESET`): the next accept is tried at once. The
//! others mean the process (`EMFILE`) or the system (`ENFILE`) is out of
//! file descriptors, or the kernel is out of memory: accepting again at
//! once would spin and log thousands of lines, so the loop pauses and
//! keeps going once descriptors are free again. It logs the first failure
//! and then at most one line per [`LOG_INTERVAL`], with the count of the
//! failures in between.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::time::Instant;

/// Accept failures by kind (`kind`: `out_of_files`, `other`).
pub const ACCEPT_ERRORS: &str = "pingme_accept_errors_total";

/// At most one log line per listener per interval.
pub const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// How long a listener pauses after a failure that is not one
/// connection's: long enough not to spin, short enough to notice freed
/// descriptors quickly.
pub const PAUSE: Duration = Duration::from_millis(100);

/// The accept-failure state of one listener.
#[derive(Debug)]
pub struct AcceptBackoff {
    listener: &'static str,
    last_logged: Option<Instant>,
    /// Failures since the last log line.
    unlogged: u64,
    /// Log lines written so far (tests check the rate limit with it).
    lines: u64,
}

impl AcceptBackoff {
    /// The state of the listener named `listener` in log lines.
    pub fn new(listener: &'static str) -> AcceptBackoff {
        AcceptBackoff {
            listener,
            last_logged: None,
            unlogged: 0,
            lines: 0,
        }
    }

    /// Accepts with `accept` until it succeeds or `stop` completes,
    /// handling failures in between; `None` when stopped.
    pub async fn next<T, A, F>(
        &mut self,
        mut accept: A,
        stop: impl Future<Output = ()>,
    ) -> Option<T>
    where
        A: FnMut() -> F,
        F: Future<Output = io::Result<T>>,
    {
        tokio::pin!(stop);
        loop {
            let accepted = tokio::select! {
                _ = &mut stop => return None,
                accepted = accept() => accepted,
            };
            match accepted {
                Ok(accepted) => return Some(accepted),
                Err(error) => {
                    tokio::select! {
                        _ = &mut stop => return None,
                        _ = self.failed(&error) => {}
                    }
                }
            }
        }
    }

    /// Handles one failed accept: returns at once for a failure of one
    /// connection, else logs (rate-limited) and pauses [`PAUSE`].
    pub async fn failed(&mut self, error: &io::Error) {
        if is_one_connections_failure(error) {
            return;
        }
        let out_of_files = matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
        metrics::counter!(
            ACCEPT_ERRORS,
            "kind" => if out_of_files { "out_of_files" } else { "other" }
        )
        .increment(1);
        self.unlogged += 1;
        let now = Instant::now();
        if self
            .last_logged
            .is_none_or(|last| now.duration_since(last) >= LOG_INTERVAL)
        {
            tracing::error!(
                listener = self.listener,
                %error,
                failures = self.unlogged,
                out_of_files,
                "accept failed; pausing the listener (at most one such line per {}s)",
                LOG_INTERVAL.as_secs()
            );
            self.last_logged = Some(now);
            self.unlogged = 0;
            self.lines += 1;
        }
        tokio::time::sleep(PAUSE).await;
    }

    /// Log lines written so far.
    pub fn lines_logged(&self) -> u64 {
        self.lines
    }
}

/// A failure of the one connection being accepted, not of the listener.
fn is_one_connections_failure(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn emfile() -> io::Error {
        io::Error::from_raw_os_error(libc::EMFILE)
    }

    /// Out of descriptors for a while, then free again: the loop keeps
    /// trying, pauses between tries (no spin) and logs one line for the
    /// whole burst. Virtual time, so no real waiting.
    #[tokio::test(start_paused = true)]
    async fn out_of_files_pauses_logs_once_and_recovers() {
        let mut backoff = AcceptBackoff::new("test");
        let calls = Cell::new(0u32);
        let started = Instant::now();
        let accepted = backoff
            .next(
                || {
                    calls.set(calls.get() + 1);
                    let n = calls.get();
                    async move { if n <= 30 { Err(emfile()) } else { Ok(n) } }
                },
                std::future::pending(),
            )
            .await;
        assert_eq!(accepted, Some(31), "serves again once files are free");
        assert_eq!(backoff.lines_logged(), 1, "one line for 30 failures");
        assert!(
            Instant::now() - started >= PAUSE * 30,
            "paused between tries"
        );

        // A later burst, after the interval, gets its own line.
        tokio::time::advance(LOG_INTERVAL).await;
        backoff.failed(&emfile()).await;
        backoff.failed(&emfile()).await;
        assert_eq!(backoff.lines_logged(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn one_connections_failure_is_retried_at_once_unlogged() {
        let mut backoff = AcceptBackoff::new("test");
        let started = Instant::now();
        for kind in [
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::ConnectionReset,
        ] {
            backoff.failed(&io::Error::from(kind)).await;
        }
        assert_eq!(Instant::now(), started);
        assert_eq!(backoff.lines_logged(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_the_wait() {
        let mut backoff = AcceptBackoff::new("test");
        let stopped = backoff
            .next(|| async { Err::<(), _>(emfile()) }, async {
                tokio::time::sleep(PAUSE * 3).await
            })
            .await;
        assert_eq!(stopped, None);
    }
}

//! The tokio runtime the Rust client runs on, owned by the binding objects
//! (shared by a [`crate::Pingme`] and the clients it connected). Foreign
//! callers poll UniFFI futures on their own threads or event loops; work
//! that needs tokio (sockets, timers, the client's driver task, HTTP) is
//! spawned here and only its result crosses back.

use std::future::Future;

use crate::error::PingmeError;

/// A runtime that is shut down without blocking when its last owner goes.
pub(crate) struct Runtime {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Runtime {
    /// One worker thread: a client moves little data, and a phone app
    /// should not pay for a thread per core.
    pub(crate) fn new() -> Result<Runtime, PingmeError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("pingme")
            .enable_all()
            .build()
            .map_err(|e| PingmeError::Internal {
                detail: format!("starting the runtime: {e}"),
            })?;
        Ok(Runtime {
            runtime: Some(runtime),
        })
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime
            .as_ref()
            .expect("the runtime is only taken on drop")
            .handle()
    }

    /// Runs `f` inside the runtime's context (for constructors that look
    /// for a runtime).
    pub(crate) fn enter<T>(&self, f: impl FnOnce() -> T) -> T {
        let _context = self.handle().enter();
        f()
    }

    /// Runs `work` on the runtime and waits for its result from any
    /// executor. If the caller stops waiting (a cancelled coroutine), the
    /// work still completes: a send that was handed to the client goes out.
    pub(crate) async fn run<T, E>(
        &self,
        work: impl Future<Output = Result<T, E>> + Send + 'static,
    ) -> Result<T, PingmeError>
    where
        T: Send + 'static,
        E: Into<PingmeError> + Send + 'static,
    {
        match self.handle().spawn(work).await {
            Ok(result) => result.map_err(Into::into),
            Err(e) => Err(PingmeError::Internal {
                detail: format!("task failed: {e}"),
            }),
        }
    }

    /// Runs blocking work (name resolution) on the runtime's blocking pool.
    pub(crate) async fn run_blocking<T, E>(
        &self,
        work: impl FnOnce() -> Result<T, E> + Send + 'static,
    ) -> Result<T, PingmeError>
    where
        T: Send + 'static,
        E: Into<PingmeError> + Send + 'static,
    {
        match self.handle().spawn_blocking(work).await {
            Ok(result) => result.map_err(Into::into),
            Err(e) => Err(PingmeError::Internal {
                detail: format!("task failed: {e}"),
            }),
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // The last owner may be dropped anywhere, even on one of the
        // runtime's own threads, where a blocking shutdown panics. The
        // client was closed by then (its last handle went first), so
        // nothing is left that needs a graceful end.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

//! The CPU priority of fjall's background worker (memtable flushes and
//! compactions).
//!
//! A flush of an 8 MiB memtable or a compaction takes a core for tens of
//! milliseconds at once. On a small machine that core is one the
//! conversation workers, the shards and the store writer need, and every
//! send queued behind the burst waits for it. So the worker runs under
//! `SCHED_IDLE`, where any other thread that wakes takes its core at once,
//! as long as it keeps up: a chat at 19,500 msg/s on two full cores had a
//! lower median in every measured pair, and a p99 of 74-138 ms against
//! 182-184 ms at normal priority in a slow hour (the same p99 in a fast
//! one); at 10,000 msg/s the difference is within run-to-run spread
//! (docs/benchmarks.md). When it falls behind (sealed memtables or
//! level-0 runs piling up, which fjall answers by stalling writes) it gets
//! normal priority back until it has caught up, so foreground load can
//! never starve the store's own upkeep.
//!
//! Leaving `SCHED_IDLE` needs `CAP_SYS_NICE` or an `RLIMIT_NICE` of at
//! least 20. Where the process may not, the worker is left at normal
//! priority: a worker that could not be brought back would be starved by a
//! busy machine. Linux only; elsewhere nothing changes.

use fjall::{AbstractTree, Keyspace};

/// Where fjall's worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    /// `SCHED_IDLE`: only when no other thread wants the core.
    Idle,
    /// `SCHED_OTHER` at nice 0, like every other thread of the process.
    Normal,
}

/// How far behind the background work is, over all keyspaces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Backlog {
    /// Most memtables sealed and waiting for their flush in one keyspace.
    pub sealed_memtables: usize,
    /// Most level-0 runs waiting for compaction in one keyspace.
    pub level0_runs: usize,
}

impl Backlog {
    pub(super) fn of(keyspaces: &[Keyspace]) -> Backlog {
        keyspaces
            .iter()
            .fold(Backlog::default(), |most, keyspace| Backlog {
                sealed_memtables: most
                    .sealed_memtables
                    .max(keyspace.tree.sealed_memtable_count()),
                level0_runs: most.level0_runs.max(keyspace.tree.l0_run_count()),
            })
    }
}

/// Behind: a second sealed memtable (one is the flush in progress), or
/// twice the level-0 runs a compaction starts at. fjall itself slows
/// writes at 4 sealed memtables and 20 runs; boosting well before that
/// keeps writers from ever meeting its stall.
const BEHIND_SEALED: usize = 2;
const BEHIND_LEVEL0: usize = 8;
/// Caught up: at most the flush in progress and a compaction's worth of
/// runs. The gap to "behind" keeps the class from flapping.
const CAUGHT_UP_SEALED: usize = 1;
const CAUGHT_UP_LEVEL0: usize = 4;

/// The class the worker should run in next, given where it runs now.
pub(super) fn next_class(current: Class, backlog: Backlog) -> Class {
    let behind = backlog.sealed_memtables >= BEHIND_SEALED || backlog.level0_runs >= BEHIND_LEVEL0;
    let caught_up =
        backlog.sealed_memtables <= CAUGHT_UP_SEALED && backlog.level0_runs <= CAUGHT_UP_LEVEL0;
    match current {
        Class::Idle if behind => Class::Normal,
        Class::Normal if caught_up => Class::Idle,
        unchanged => unchanged,
    }
}

/// How many polls the keeper looks for the database's workers: a thread
/// takes its name once it runs, shortly after the database opened.
const LOOKS: u32 = 500;

/// One database's fjall workers and the class they are in.
pub(super) struct WorkerPriority {
    /// fjall workers that were there before this database opened.
    others: Vec<os::Tid>,
    looks_left: u32,
    /// This database's workers, once found.
    threads: Vec<os::Tid>,
    class: Class,
    boosts: u64,
}

impl WorkerPriority {
    /// Called just before the database opens, whose workers are then the
    /// new ones. `None` where they are left at normal priority: the
    /// process could not bring them back from idle, or this is not Linux.
    pub(super) fn before_open() -> Option<WorkerPriority> {
        if !cfg!(target_os = "linux") {
            return None;
        }
        if !os::may_leave_idle() {
            tracing::info!(
                "fjall's background work stays at normal CPU priority: running it at idle \
                 priority needs CAP_SYS_NICE or RLIMIT_NICE 20 (systemd LimitNICE=20, \
                 docker --ulimit nice=20) to raise it again when it falls behind"
            );
            return None;
        }
        Some(WorkerPriority {
            others: os::fjall_workers(),
            looks_left: LOOKS,
            threads: Vec::new(),
            class: Class::Normal,
            boosts: 0,
        })
    }

    /// Finds the workers (first polls), then moves them between classes
    /// as the backlog asks.
    pub(super) fn poll(&mut self, backlog: impl FnOnce() -> Backlog) {
        if self.threads.is_empty() {
            if self.looks_left > 0 {
                self.looks_left -= 1;
                self.threads = os::fjall_workers()
                    .into_iter()
                    .filter(|thread| !self.others.contains(thread))
                    .collect();
                if !self.threads.is_empty() {
                    self.set(Class::Idle);
                }
            }
            return;
        }
        let backlog = backlog();
        let next = next_class(self.class, backlog);
        if next != self.class {
            tracing::debug!(?backlog, ?next, "fjall's background work changes priority");
            if next == Class::Normal {
                self.boosts += 1;
            }
            self.set(next);
        }
    }

    fn set(&mut self, class: Class) {
        for &thread in &self.threads {
            if let Err(error) = os::set_class(thread, class) {
                tracing::warn!(%error, ?class, thread, "could not change the priority of fjall's worker");
            }
        }
        self.class = class;
    }

    #[cfg(test)]
    pub(super) fn class(&self) -> Class {
        self.class
    }

    #[cfg(test)]
    pub(super) fn threads(&self) -> &[os::Tid] {
        &self.threads
    }

    #[cfg(test)]
    pub(super) fn boosts(&self) -> u64 {
        self.boosts
    }
}

// The scheduler calls have no safe wrapper in the dependencies; each
// block says why it is sound.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(super) mod os {
    use super::Class;

    pub type Tid = libc::pid_t;

    /// The process's threads fjall named as its workers (a database's
    /// are those that appear while it opens).
    pub fn fjall_workers() -> Vec<Tid> {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return Vec::new();
        };
        tasks
            .flatten()
            .filter(|task| {
                std::fs::read_to_string(task.path().join("comm"))
                    .is_ok_and(|name| name.trim_end() == "fjall:worker")
            })
            .filter_map(|task| task.file_name().to_str()?.parse().ok())
            .collect()
    }

    pub fn set_class(thread: Tid, class: Class) -> std::io::Result<()> {
        let policy = match class {
            Class::Idle => libc::SCHED_IDLE,
            Class::Normal => libc::SCHED_OTHER,
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid sched_param for the call's duration;
        // the thread id is one of this process's (a thread that has ended
        // makes the call fail with ESRCH, nothing else).
        if unsafe { libc::sched_setscheduler(thread, policy, &param) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// The thread's scheduling class, if it is one of the two.
    #[cfg(test)]
    pub fn class_of(thread: Tid) -> Option<Class> {
        // SAFETY: a plain query of a thread id; failure returns -1.
        match unsafe { libc::sched_getscheduler(thread) } {
            libc::SCHED_IDLE => Some(Class::Idle),
            libc::SCHED_OTHER => Some(Class::Normal),
            _ => None,
        }
    }

    /// Whether a thread of this process may go from idle back to normal:
    /// tried on a short-lived thread of its own, so capabilities, limits
    /// and security modules all have their say.
    pub fn may_leave_idle() -> bool {
        std::thread::Builder::new()
            .name("pingme-prio-probe".into())
            .spawn(|| {
                // SAFETY: gettid has no preconditions.
                let me = unsafe { libc::gettid() };
                set_class(me, Class::Idle).is_ok() && set_class(me, Class::Normal).is_ok()
            })
            .ok()
            .and_then(|probe| probe.join().ok())
            .unwrap_or(false)
    }
}

#[cfg(not(target_os = "linux"))]
pub(super) mod os {
    use super::Class;

    pub type Tid = i32;

    pub fn fjall_workers() -> Vec<Tid> {
        Vec::new()
    }

    pub fn set_class(_thread: Tid, _class: Class) -> std::io::Result<()> {
        Ok(())
    }

    pub fn may_leave_idle() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backlog(sealed_memtables: usize, level0_runs: usize) -> Backlog {
        Backlog {
            sealed_memtables,
            level0_runs,
        }
    }

    #[test]
    fn the_worker_is_raised_when_behind_and_lowered_once_caught_up() {
        use Class::{Idle, Normal};
        // A flush in progress and a few runs: idle stays idle.
        assert_eq!(next_class(Idle, backlog(1, 4)), Idle);
        // A second sealed memtable, or runs piling up: raised.
        assert_eq!(next_class(Idle, backlog(2, 0)), Normal);
        assert_eq!(next_class(Idle, backlog(0, 8)), Normal);
        // Between the two marks the class holds either way.
        assert_eq!(next_class(Normal, backlog(1, 6)), Normal);
        assert_eq!(next_class(Idle, backlog(1, 6)), Idle);
        // Caught up: lowered again.
        assert_eq!(next_class(Normal, backlog(1, 4)), Idle);
        assert_eq!(next_class(Normal, backlog(0, 0)), Idle);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn fjall_workers_run_idle_and_are_raised_when_behind() {
        // Tests open databases in parallel: another's workers may show up
        // (and end) here too, so threads that are gone are skipped; this
        // database's worker lives to the end of the test.
        fn classes(threads: &[os::Tid]) -> Vec<Class> {
            let classes: Vec<Class> = threads.iter().filter_map(|&t| os::class_of(t)).collect();
            assert!(!classes.is_empty(), "this database's worker is among them");
            classes
        }
        let Some(mut priority) = WorkerPriority::before_open() else {
            // CI runs as root; elsewhere an unprivileged process cannot
            // take a thread back from idle, so nothing is changed to test.
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must be able to leave SCHED_IDLE (CAP_SYS_NICE or RLIMIT_NICE 20)"
            );
            eprintln!("skipped: this process may not raise a thread from idle priority");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let _db = fjall::Database::builder(dir.path())
            .worker_threads(1)
            .open()
            .unwrap();
        // The worker names itself once it runs: look until it has.
        while priority.threads().is_empty() {
            assert!(priority.looks_left > 0, "fjall's worker was never found");
            priority.poll(|| backlog(0, 0));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            classes(priority.threads())
                .iter()
                .all(|&c| c == Class::Idle)
        );

        priority.poll(|| backlog(3, 0));
        assert_eq!((priority.class(), priority.boosts()), (Class::Normal, 1));
        assert!(
            classes(priority.threads())
                .iter()
                .all(|&c| c == Class::Normal)
        );

        priority.poll(|| backlog(0, 1));
        assert_eq!(priority.class(), Class::Idle);
        assert!(
            classes(priority.threads())
                .iter()
                .all(|&c| c == Class::Idle)
        );
    }
}

//! Frees the store's flushed memtables on a thread of its own.
//!
//! fjall frees a flushed memtable when it drops the last tree version that
//! refers to it, and it does that while holding the keyspace's version
//! lock, which every read and write of that keyspace waits for. Freeing an
//! 8 MiB memtable (a skiplist of tens of thousands of entries) takes about
//! 20 ms, so every few seconds the group-commit writer stalled that long
//! and a 10,000 msg/s chat's p99 with it (docs/benchmarks.md). The keeper
//! holds a reference to every keyspace's active memtable; once fjall has
//! replaced it and let go of it, the last reference is the keeper's, and
//! the memory is freed here, with no lock held.
//!
//! The same thread moves fjall's worker between idle and normal CPU
//! priority as its backlog asks (`background_priority`).

use std::any::Any;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use fjall::{AbstractTree, Keyspace};

use super::background_priority::{Backlog, WorkerPriority};

/// How often the active memtables are looked at. A memtable lives for
/// seconds under load; one replaced and flushed within a single period is
/// freed by fjall as before.
const POLL: Duration = Duration::from_millis(10);

/// A memtable, kept only to decide where it is freed.
type Held = Arc<dyn Any + Send + Sync>;

/// The keeper's state: which memtable is active per keyspace, and the
/// replaced ones fjall may still refer to.
pub(super) struct Kept {
    keyspaces: Vec<Keyspace>,
    active: Vec<Option<(u64, Held)>>,
    retired: Vec<Held>,
    freed: u64,
}

impl Kept {
    pub(super) fn new(keyspaces: Vec<Keyspace>) -> Kept {
        let active = keyspaces.iter().map(|_| None).collect();
        Kept {
            keyspaces,
            active,
            retired: Vec::new(),
            freed: 0,
        }
    }

    /// Takes hold of newly active memtables, retires replaced ones, and
    /// frees the retired ones nothing else refers to any more.
    pub(super) fn poll(&mut self) {
        for (keyspace, active) in self.keyspaces.iter().zip(&mut self.active) {
            let memtable = keyspace.tree.active_memtable();
            let id = memtable.id();
            if active.as_ref().map(|(held, _)| *held) != Some(id) {
                let memtable: Held = memtable;
                if let Some((_, replaced)) = active.replace((id, memtable)) {
                    self.retired.push(replaced);
                }
            }
        }
        let before = self.retired.len();
        // A count of one is the keeper's own reference: fjall hands out
        // clones only from its versions, which no longer hold this one.
        self.retired
            .retain(|memtable| Arc::strong_count(memtable) > 1);
        self.freed += (before - self.retired.len()) as u64;
    }

    fn keyspaces(&self) -> &[Keyspace] {
        &self.keyspaces
    }

    /// Replaced memtables freed here so far.
    #[cfg(test)]
    fn freed(&self) -> u64 {
        self.freed
    }

    /// Replaced memtables fjall still refers to (a sealed one waiting for
    /// its flush, or a flushed one in a version a reader holds).
    #[cfg(test)]
    fn retired(&self) -> usize {
        self.retired.len()
    }
}

/// The keeper thread; stops (and lets go of everything) when dropped.
pub(super) struct MemtableKeeper {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MemtableKeeper {
    /// Starts the thread; it also looks after the workers' priority, if
    /// they were put at idle priority.
    pub(super) fn start(
        keyspaces: Vec<Keyspace>,
        mut priority: Option<WorkerPriority>,
    ) -> std::io::Result<MemtableKeeper> {
        let (stop, stopped) = mpsc::channel::<()>();
        let mut kept = Kept::new(keyspaces);
        let thread = std::thread::Builder::new()
            .name("pingme-store-keeper".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(POLL) {
                    kept.poll();
                    if let Some(priority) = &mut priority {
                        priority.poll(|| Backlog::of(kept.keyspaces()));
                    }
                }
            })?;
        Ok(MemtableKeeper {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for MemtableKeeper {
    fn drop(&mut self) {
        // Dropping the sender ends the loop; joining releases the
        // keyspace handles so the directory can be reopened.
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fjall::{Database, KeyspaceCreateOptions};

    fn timeline(dir: &std::path::Path) -> (Database, Keyspace) {
        let db = Database::builder(dir).open().unwrap();
        let keyspace = db
            .keyspace("timeline", KeyspaceCreateOptions::default)
            .unwrap();
        (db, keyspace)
    }

    #[test]
    fn a_flushed_memtable_is_freed_by_the_keeper() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, keyspace) = timeline(dir.path());
        let mut kept = Kept::new(vec![keyspace.clone()]);
        keyspace.insert("a", "1").unwrap();
        kept.poll();
        assert_eq!(
            (kept.retired(), kept.freed()),
            (0, 0),
            "nothing replaced yet"
        );

        // The memtable holding "a" is flushed; fjall's current versions
        // still refer to it until its next clean-up.
        keyspace.rotate_memtable_and_wait().unwrap();
        kept.poll();
        assert_eq!((kept.retired(), kept.freed()), (1, 0));

        // The next flush's clean-up lets go of it: where fjall would have
        // freed it under the keyspace's version lock, the keeper's
        // reference is now the last, and the keeper frees it.
        keyspace.insert("b", "2").unwrap();
        keyspace.rotate_memtable_and_wait().unwrap();
        kept.poll();
        assert_eq!((kept.retired(), kept.freed()), (1, 1));
        assert_eq!(keyspace.get("a").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(keyspace.get("b").unwrap().as_deref(), Some(&b"2"[..]));
    }

    #[test]
    fn a_memtable_a_reader_still_holds_waits_for_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, keyspace) = timeline(dir.path());
        let mut kept = Kept::new(vec![keyspace.clone()]);
        keyspace.insert("a", "1").unwrap();
        kept.poll();

        // An open iterator holds the version with the first memtable.
        let mut reader = keyspace.iter();
        for key in ["b", "c"] {
            keyspace.rotate_memtable_and_wait().unwrap();
            keyspace.insert(key, "2").unwrap();
        }
        kept.poll();
        assert_eq!(kept.freed(), 0, "the reader still holds the first memtable");
        let first = reader.next().unwrap().key().unwrap();
        assert_eq!(&*first, b"a");
        drop(reader);

        keyspace.rotate_memtable_and_wait().unwrap();
        kept.poll();
        assert!(kept.freed() >= 1, "freed once the reader is gone");
    }
}

//! Tuning of the mimalloc global allocator the `pingme` binary runs on.
//!
//! With its defaults, mimalloc (v3) on Linux commits each 1 GiB arena it
//! reserves up front (`arena_eager_commit = 2`: "eager when the OS
//! overcommits") and advises the kernel to back it with transparent huge
//! pages. Idle sessions then fault in 2 MiB pages (`AnonHugePages` in
//! smaps): an idle authenticated TCP session cost about 1,450 bytes of
//! resident memory instead of about 960 with
//! `MIMALLOC_ARENA_EAGER_COMMIT=0` (`docs/gateway-connections.md`,
//! "Memory per idle connection"). [`tune`] gives that result without an
//! environment variable.
//!
//! Setting the commit option from `main` alone is too late: mimalloc
//! initialises at process load (a priority-101 constructor) and the Rust
//! runtime's first allocation reserves the first arena, eagerly committed,
//! before `main` runs. So [`tune`] does two things: it makes arenas reserved
//! from now on commit lazily, and it disables transparent huge pages for
//! the process (what mimalloc itself does for `MIMALLOC_ALLOW_THP=0`,
//! through `prctl(PR_SET_THP_DISABLE)`), which the kernel applies to later
//! page faults in the already reserved arena too. An operator who sets
//! `MIMALLOC_ARENA_EAGER_COMMIT` or `MIMALLOC_ALLOW_THP` keeps their value.

use std::os::raw::{c_int, c_long};

// Links the mimalloc library whose options `tune` sets, also into binaries
// (this crate's unit tests) that do not make it the global allocator.
extern crate mimalloc;

/// `mi_option_arena_eager_commit` in mimalloc v3's `mi_option_t` (the fifth
/// value). The `libmimalloc-sys` constants follow older numbering and have
/// no name for it, so the v3 header's values are spelled out here.
const MI_OPTION_ARENA_EAGER_COMMIT: c_int = 4;
/// `mi_option_allow_thp` in mimalloc v3's `mi_option_t` (the 44th value).
const MI_OPTION_ALLOW_THP: c_int = 43;

/// The allocator settings in effect after [`tune`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// mimalloc's `arena_eager_commit`: 0 lazy, 1 eager, 2 eager where the
    /// OS overcommits (mimalloc's default).
    pub arena_eager_commit: i64,
    /// Whether `tune` disabled transparent huge pages for this process (the
    /// kernel keeps that flag for child processes, too).
    pub disabled_huge_pages: bool,
}

/// Makes mimalloc commit arenas lazily and turns transparent huge pages off
/// for the process, unless the environment already chose either, and
/// returns the settings in effect.
///
/// Call it first thing in `main`, before the runtime and listeners allocate.
#[allow(unsafe_code)]
pub fn tune() -> Tuning {
    // Declared here rather than through `libmimalloc-sys`'s `extended`
    // feature: the functions are in the mimalloc library the global
    // allocator already links, and that feature's option constants do not
    // match v3.
    unsafe extern "C" {
        fn mi_option_set_default(option: c_int, value: c_long);
        fn mi_option_get(option: c_int) -> c_long;
    }
    // SAFETY: the two mimalloc functions take a plain option index and
    // value, touch only mimalloc's static option table and bounds-check the
    // index; 4 and 43 are `arena_eager_commit` and `allow_thp` in the v3
    // header this crate builds (libmimalloc-sys 0.1.49 without `v2`).
    // `mi_option_set_default` leaves an option alone once mimalloc has read
    // it from the environment, which is how an operator's variable wins.
    // `prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)` takes integers only and sets
    // a flag on this process; it cannot touch memory.
    unsafe {
        mi_option_set_default(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        mi_option_set_default(MI_OPTION_ALLOW_THP, 0);
        let allow_thp = mi_option_get(MI_OPTION_ALLOW_THP) != 0;
        #[cfg(target_os = "linux")]
        let thp_disabled = !allow_thp && libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0;
        #[cfg(not(target_os = "linux"))]
        let thp_disabled = !allow_thp;
        Tuning {
            // `c_long` is `i64` here but 32 bits on some targets.
            arena_eager_commit: mi_option_get(MI_OPTION_ARENA_EAGER_COMMIT) as i64,
            disabled_huge_pages: thp_disabled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EAGER_COMMIT: &str = "MIMALLOC_ARENA_EAGER_COMMIT";
    const ALLOW_THP: &str = "MIMALLOC_ALLOW_THP";

    /// The kernel's view of this process: `THP_enabled` in /proc/self/status.
    #[cfg(target_os = "linux")]
    fn kernel_allows_thp() -> bool {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("THP_enabled:"))
            .unwrap();
        line.ends_with('1')
    }

    #[test]
    fn tune_makes_commit_lazy_and_pages_small_unless_the_environment_chose() {
        if std::env::var_os(EAGER_COMMIT).is_some() {
            // The child below: the operator chose eager commit and THP.
            let tuning = tune();
            assert_eq!(tuning.arena_eager_commit, 1);
            assert!(!tuning.disabled_huge_pages);
            return;
        }
        let tuning = tune();
        assert_eq!(
            tuning,
            Tuning {
                arena_eager_commit: 0,
                disabled_huge_pages: true
            }
        );
        #[cfg(target_os = "linux")]
        assert!(!kernel_allows_thp());
        // Run this test again in a child whose operator chose otherwise.
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "allocator::tests::tune_makes_commit_lazy_and_pages_small_unless_the_environment_chose",
                "--exact",
                "--quiet",
            ])
            .env(EAGER_COMMIT, "1")
            .env(ALLOW_THP, "1")
            .status()
            .unwrap();
        assert!(status.success(), "tune overrode the environment's choice");
    }
}

//! The open-files limit: every connection is a file descriptor, so a run
//! that asks for more connections than the limit allows fails up front with
//! a clear message instead of dying halfway with EMFILE.

/// Descriptors kept for everything that is not a gateway connection
/// (stdio, HTTP clients, the report file, the runtime).
pub const RESERVED_FDS: u64 = 64;

/// Raises the soft limit to the hard limit if needed, then checks that
/// `connections` fit. Returns the usable limit.
pub fn ensure_open_files(connections: u64) -> Result<u64, String> {
    let needed = connections + RESERVED_FDS;
    let (soft, hard) = open_files_limit()?;
    if soft >= needed {
        return Ok(soft);
    }
    if hard >= needed {
        set_soft_limit(hard)?;
        return Ok(hard);
    }
    Err(open_files_error(connections, soft, hard))
}

/// The message for a limit that is too low.
pub fn open_files_error(connections: u64, soft: u64, hard: u64) -> String {
    format!(
        "{connections} connections need about {} open files, but the limit is {soft} \
         (hard limit {hard}). Raise it (e.g. `ulimit -n {}` as root, or LimitNOFILE= \
         in the service unit), or split the run over several processes with --shard i/n.",
        connections + RESERVED_FDS,
        connections + RESERVED_FDS
    )
}

#[allow(unsafe_code)]
fn open_files_limit() -> Result<(u64, u64), String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we pass, which lives on
    // our stack for the duration of the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if rc != 0 {
        return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

#[allow(unsafe_code)]
fn set_soft_limit(soft: u64) -> Result<(), String> {
    let (_, hard) = open_files_limit()?;
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit only reads the struct we pass, alive for the call.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    if rc != 0 {
        return Err(format!("setrlimit: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_connections_fail_with_advice() {
        let error = ensure_open_files(u64::MAX / 2).unwrap_err();
        assert!(error.contains("open files"), "{error}");
        assert!(error.contains("--shard"), "{error}");
        assert!(ensure_open_files(10).unwrap() >= 10 + RESERVED_FDS);
    }
}

//! Process limits: the open-file limit, raised at start (as nginx's `worker_rlimit_nofile` and
//! HAProxy do), and how many client connections it allows.

use tracing::{info, warn};

/// Descriptors kept aside for everything that is not a client connection: listeners, etcd,
/// health checks, logs.
const RESERVE: u64 = 256;

/// A failure of the proxy's own resources (open files, memory, local ports), not of the peer it
/// was connecting to: requests answer it 503 and health checks give no verdict, so it is never
/// counted against an instance.
pub fn is_local_shortage(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS | libc::EADDRNOTAVAIL)
    )
}

/// The open-file limits (soft, hard) of this process.
#[allow(unsafe_code)] // getrlimit(2)
fn open_files() -> std::io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(lim)
}

/// Open files this process may have now (the soft limit); 1024 if unknown.
pub fn open_file_limit() -> usize {
    match open_files() {
        Ok(lim) if lim.rlim_cur == libc::RLIM_INFINITY => usize::MAX,
        Ok(lim) => usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX),
        Err(_) => 1024,
    }
}

/// Raises the soft open-file limit to the hard limit; returns the limit now in force.
#[allow(unsafe_code)] // setrlimit(2)
pub fn raise_open_files() -> u64 {
    let mut lim = match open_files() {
        Ok(lim) => lim,
        Err(e) => {
            warn!(error = %e, "could not read the open-file limit");
            return 1024;
        }
    };
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass, which lives for the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        } else {
            warn!(error = %std::io::Error::last_os_error(), soft = lim.rlim_cur, hard = lim.rlim_max,
                "could not raise the open-file limit");
        }
    }
    lim.rlim_cur
}

/// Client connections that `open_files` descriptors carry: each may need one towards an
/// instance, besides a reserve for the rest of the process.
pub fn client_capacity(open_files: u64) -> usize {
    (open_files.saturating_sub(RESERVE) / 2).max(16) as usize
}

/// Raises the limit and logs what it allows; returns the client connection bound in force
/// (`configured`, or the capacity when 0).
pub fn client_connection_limit(configured: usize) -> usize {
    let open_files = raise_open_files();
    let capacity = client_capacity(open_files);
    let limit = if configured == 0 {
        capacity
    } else {
        configured
    };
    if configured > capacity {
        warn!(open_files, configured, capacity,
            "proxy.max_client_connections is above what the open-file limit carries (2 descriptors per connection)");
    }
    info!(
        open_files,
        max_client_connections = limit,
        "connection capacity"
    );
    limit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_keeps_a_reserve_and_two_descriptors_per_connection() {
        assert_eq!(client_capacity(1024), 384);
        assert_eq!(client_capacity(1_048_576), 524_160);
        assert_eq!(client_capacity(100), 16);
        assert!(raise_open_files() >= 16);
    }
}

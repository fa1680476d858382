//! The two clocks every layer reads: wall time for what operators see, a process-local
//! monotonic clock in milliseconds for what fits in an atomic.

use std::sync::LazyLock;
use std::time::{Instant, SystemTime};

/// Unix time in milliseconds (0 for times before the epoch).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Milliseconds on a process-local monotonic clock, never 0 (0 can mean "not set" in an atomic).
pub fn clock_ms() -> u64 {
    static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
    EPOCH.elapsed().as_millis() as u64 + 1
}

//! Recent notable events (registry errors, re-lists, health flips, upstream failures), kept in a
//! small ring for the status page and `/api/events`. Recording takes a short lock; it happens on
//! state changes and failures only, never on the successful request path.

use crate::sync::lock;
use std::collections::VecDeque;
use std::sync::{LazyLock, Mutex};
use std::time::SystemTime;

/// How many events are kept.
pub const CAPACITY: usize = 100;

#[derive(Debug, Clone, serde::Serialize)]
pub struct RecentEvent {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    /// Fixed category: "registry", "health", "upstream".
    pub kind: &'static str,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct RecentEvents {
    ring: Mutex<VecDeque<RecentEvent>>,
}

impl RecentEvents {
    pub fn record(&self, kind: &'static str, message: impl Into<String>) {
        let at_ms = crate::clock::unix_ms(SystemTime::now());
        let mut ring = lock(&self.ring);
        if ring.len() == CAPACITY {
            ring.pop_front();
        }
        ring.push_back(RecentEvent {
            at_ms,
            kind,
            message: message.into(),
        });
    }

    /// Newest first.
    pub fn snapshot(&self) -> Vec<RecentEvent> {
        lock(&self.ring).iter().rev().cloned().collect()
    }
}

/// The process-wide ring.
pub static RECENT: LazyLock<RecentEvents> = LazyLock::new(RecentEvents::default);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_events_first_and_is_bounded() {
        let r = RecentEvents::default();
        for i in 0..CAPACITY + 5 {
            r.record("registry", format!("e{i}"));
        }
        let s = r.snapshot();
        assert_eq!(s.len(), CAPACITY);
        assert_eq!(s[0].message, format!("e{}", CAPACITY + 4));
        assert_eq!(s.last().map(|e| e.message.as_str()), Some("e5"));
    }
}

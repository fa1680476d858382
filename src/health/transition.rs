//! Health flips: consecutive-result thresholds, the flip itself, and reporting it once (log,
//! recent events, counters, and the subscribers that follow flips).

use std::sync::Arc;

use tracing::{info, warn};

use super::CheckSpec;
use crate::routing::{Health, InstanceState};

/// Consecutive-result thresholds of one instance.
#[derive(Debug)]
pub struct Tracker {
    // thresholds are 1-100 (validated), counts saturate: a tracker is 6 bytes per instance
    healthy_threshold: u8,
    unhealthy_threshold: u8,
    passes: u8,
    failures: u8,
    /// Health as of our last observation: a different current value means someone else (passive
    /// detection) flipped it, and the count starts over.
    last: Option<Health>,
}

impl Tracker {
    pub fn new(spec: &CheckSpec) -> Tracker {
        Tracker {
            healthy_threshold: spec.healthy_threshold.clamp(1, 255) as u8,
            unhealthy_threshold: spec.unhealthy_threshold.clamp(1, 255) as u8,
            passes: 0,
            failures: 0,
            last: None,
        }
    }

    /// Whether one passing check admits a pending instance.
    pub fn admits_on_first_pass(&self) -> bool {
        self.healthy_threshold <= 1
    }

    /// Records one result for an instance whose health is `current`; returns the health it should
    /// move to, if any. A pending instance that fails is unhealthy at once (it never had traffic).
    pub fn observe(&mut self, current: Health, passed: bool) -> Option<Health> {
        if self.last.is_some_and(|l| l != current) {
            self.passes = 0;
            self.failures = 0;
        }
        let next = if passed {
            self.passes = self.passes.saturating_add(1);
            self.failures = 0;
            (current != Health::Healthy && self.passes >= self.healthy_threshold)
                .then_some(Health::Healthy)
        } else {
            self.failures = self.failures.saturating_add(1);
            self.passes = 0;
            match current {
                Health::Pending => Some(Health::Unhealthy),
                Health::Healthy if self.failures >= self.unhealthy_threshold => {
                    Some(Health::Unhealthy)
                }
                _ => None,
            }
        };
        self.last = Some(next.unwrap_or(current));
        next
    }
}

/// Every health flip, as the name of the instance's service, for whoever follows them (the
/// Consul API's blocking queries). A receiver that lags behind is told so and looks at all.
static TRANSITIONS: std::sync::LazyLock<tokio::sync::broadcast::Sender<Arc<str>>> =
    std::sync::LazyLock::new(|| tokio::sync::broadcast::channel(1024).0);

/// Follows every health flip from now on (see [`report_transition`]).
pub fn subscribe_transitions() -> tokio::sync::broadcast::Receiver<Arc<str>> {
    TRANSITIONS.subscribe()
}

/// Logs a health flip once, counts it and tells [`subscribe_transitions`]' receivers.
pub fn report_transition(service: &Arc<str>, key: &str, from: Health, to: Health, reason: &str) {
    match (from, to) {
        (Health::Healthy, Health::Unhealthy) => warn!(
            service = %service, instance = %key, from = from.as_str(), to = to.as_str(),
            reason = %reason, "instance ejected: unhealthy"
        ),
        (_, Health::Healthy) => info!(
            service = %service, instance = %key, from = from.as_str(), to = to.as_str(),
            reason = %reason, "instance healthy: receiving traffic"
        ),
        _ => info!(
            service = %service, instance = %key, from = from.as_str(), to = to.as_str(),
            reason = %reason, "instance not admitted: check failed"
        ),
    }
    // a never-admitted instance failing its first check is not news for the status page
    if from != Health::Pending || to != Health::Unhealthy {
        crate::events::RECENT.record(
            "health",
            format!(
                "{service} {key}: {} -> {} ({reason})",
                from.as_str(),
                to.as_str()
            ),
        );
    }
    crate::metrics::health_counters(service).transition(to.as_str());
    // no receiver (no Consul API) is the common case, not an error
    let _ = TRANSITIONS.send(service.clone());
}

/// Moves an instance from `from` to `to` as an active check decided; one that becomes healthy
/// starts its passive failure count over. False if its health was not `from` any more.
pub(super) fn flip(state: &InstanceState, from: Health, to: Health) -> bool {
    let flipped = state.transition(from, to);
    if flipped && to == Health::Healthy {
        state
            .connect_failures
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }
    flipped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::fixtures::spec;

    #[test]
    fn thresholds_count_consecutive_results() {
        let mut t = Tracker::new(&spec()); // healthy 2, unhealthy 3
        use Health::*;
        assert_eq!(t.observe(Pending, true), None);
        assert_eq!(t.observe(Pending, true), Some(Healthy));
        assert_eq!(t.observe(Healthy, false), None);
        assert_eq!(t.observe(Healthy, false), None);
        assert_eq!(t.observe(Healthy, true), None, "a pass resets the failures");
        assert_eq!(t.observe(Healthy, false), None);
        assert_eq!(t.observe(Healthy, false), None);
        assert_eq!(t.observe(Healthy, false), Some(Unhealthy));
        assert_eq!(t.observe(Unhealthy, true), None);
        assert_eq!(t.observe(Unhealthy, true), Some(Healthy));
        // a pending instance that fails is unhealthy at once
        let mut t = Tracker::new(&spec());
        assert_eq!(t.observe(Pending, false), Some(Unhealthy));
    }

    #[test]
    fn an_outside_flip_restarts_the_count() {
        let mut s = spec();
        s.healthy_threshold = 2;
        let mut t = Tracker::new(&s);
        use Health::*;
        assert_eq!(t.observe(Pending, true), None);
        assert_eq!(t.observe(Pending, true), Some(Healthy));
        assert_eq!(t.observe(Healthy, true), None);
        // passive detection ejected it: two new passes are needed
        assert_eq!(t.observe(Unhealthy, true), None);
        assert_eq!(t.observe(Unhealthy, true), Some(Healthy));
    }
}

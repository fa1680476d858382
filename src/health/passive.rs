//! Passive detection: failures and successes the request paths (the engine and the gateway)
//! observe, ejecting an instance without waiting for its next check.

use tracing::debug;

use super::report_transition;
use crate::routing::{Health, Instance, Service};

/// Passive detection, called by the proxy when connecting to `inst` failed or its response timed
/// out: after `svc.passive_failures` consecutive failures a healthy instance is ejected, until an
/// active check passes again or, with active checks off, for `svc.passive_cooldown` (after which
/// requests try it again: one success re-admits it, one failure starts another cool-down, as
/// nginx's `max_fails` / `fail_timeout`). Only atomics are touched unless the instance flips.
pub fn passive_failure(svc: &Service, inst: &Instance, error: &dyn std::fmt::Display) {
    let n = inst
        .state
        .connect_failures
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        + 1;
    if svc.passive_failures == 0 || n < svc.passive_failures {
        return;
    }
    if inst.state.transition(Health::Healthy, Health::Unhealthy) {
        let until = match svc.passive_cooldown {
            Some(c) => {
                inst.state.cool_down(c);
                format!(", out for {} ms", c.as_millis())
            }
            None => String::new(),
        };
        report_transition(
            &svc.name,
            &inst.key,
            Health::Healthy,
            Health::Unhealthy,
            &format!("{n} consecutive connection failures{until}, last: {error}"),
        );
    } else if let Some(c) = svc.passive_cooldown {
        if inst.state.cooled_down() {
            // tried again after its cool-down, and failed again
            inst.state.cool_down(c);
            debug!(service = %svc.name, instance = %inst.key, error = %error,
                "instance failed again after its cool-down: out for another {} ms", c.as_millis());
        }
    }
}

/// Passive detection: the instance answered, so its connection-failure count starts over, and an
/// instance tried again after a passive cool-down is healthy again.
#[inline]
pub fn passive_success(svc: &Service, inst: &Instance) {
    use std::sync::atomic::Ordering::Relaxed;
    let state = &inst.state;
    // read first: most responses find 0 and leave the cache line shared
    if state.connect_failures.load(Relaxed) != 0 {
        state.connect_failures.store(0, Relaxed);
        if state.end_cool_down() && state.transition(Health::Unhealthy, Health::Healthy) {
            report_transition(
                &svc.name,
                &inst.key,
                Health::Unhealthy,
                Health::Healthy,
                "answered after its passive cool-down",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::routing::ServiceSettings;

    /// A healthy instance alone in service `name` (for the passive-detection tests).
    fn alone(name: &str, key: &str, settings: &ServiceSettings) -> (Arc<Instance>, Service) {
        let i = Instance::for_test(key, 1, Health::Healthy);
        let svc = Service::new(name.into(), vec![i.clone()], 0, settings);
        (i, svc)
    }

    #[test]
    fn passive_failures_eject_and_success_resets() {
        let settings = ServiceSettings {
            passive_failures: 2,
            ..Default::default()
        };
        let (i, svc) = alone("p", "/s/p/1", &settings);
        passive_failure(&svc, &i, &"refused");
        passive_success(&svc, &i);
        passive_failure(&svc, &i, &"refused");
        assert_eq!(i.state.health(), Health::Healthy, "the counter was reset");
        passive_failure(&svc, &i, &"refused");
        assert_eq!(i.state.health(), Health::Unhealthy);
        // disabled
        let (j, svc) = alone("p", "/s/p/2", &ServiceSettings::default());
        for _ in 0..10 {
            passive_failure(&svc, &j, &"refused");
        }
        assert_eq!(j.state.health(), Health::Healthy);
    }

    #[test]
    fn without_checks_a_passive_ejection_lasts_the_cool_down() {
        let settings = ServiceSettings {
            passive_failures: 1,
            passive_cooldown: Some(Duration::from_millis(50)),
            ..Default::default()
        };
        let (i, svc) = alone("c", "/s/c/1", &settings);
        passive_failure(&svc, &i, &"timed out");
        assert_eq!(i.state.health(), Health::Unhealthy);
        assert!(!i.usable(), "out during the cool-down");
        assert!(svc.select(&[], None).is_none());
        std::thread::sleep(Duration::from_millis(60));
        assert!(i.usable(), "tried again after it");
        assert!(svc.select(&[], None).is_some());
        // the trial fails: out for another cool-down
        passive_failure(&svc, &i, &"timed out");
        assert!(!i.usable());
        std::thread::sleep(Duration::from_millis(60));
        assert!(i.usable());
        // the trial answers: healthy, no cool-down left
        passive_success(&svc, &i);
        assert_eq!(i.state.health(), Health::Healthy);
        assert!(!i.state.cooled_down());
        assert_eq!(
            i.state
                .connect_failures
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );

        // with active checks (no cool-down) only a check re-admits
        let checked = ServiceSettings {
            passive_failures: 1,
            ..Default::default()
        };
        let (j, svc) = alone("c", "/s/c/2", &checked);
        passive_failure(&svc, &j, &"refused");
        passive_success(&svc, &j);
        assert_eq!(j.state.health(), Health::Unhealthy);
        assert!(!j.usable());
    }
}

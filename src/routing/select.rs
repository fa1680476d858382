//! Selection policies: which instance of a service takes the next request.
//!
//! Every policy only considers *usable* instances (weight > 0 and healthy) that the current
//! request has not tried yet, so retries move to another instance.
//!
//! - [`Policy::RoundRobin`] (default): smooth weighted round robin, as nginx does it: over a cycle
//!   each instance gets requests in proportion to its weight, interleaved rather than in bursts.
//! - [`Policy::Random`]: weighted random.
//! - [`Policy::LeastRequest`]: power of two choices on in-flight requests, weighted.
//! - [`Policy::P2cEwma`]: power of two choices on a cost of peak-EWMA latency × (in-flight + 1)
//!   / weight (linkerd's and Finagle's balancer): a slow instance gets fewer requests at once,
//!   without waiting for it to fail. An instance never measured costs nothing, so it is tried
//!   and measured.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use rand::Rng;
use serde::Deserialize;

use super::Instance;

/// A service's load-balancing policy (config key `policy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    #[default]
    RoundRobin,
    Random,
    LeastRequest,
    /// `p2c_ewma`.
    P2cEwma,
}

/// Per-snapshot selection state of one service.
#[derive(Debug)]
pub enum Selector {
    /// Current weights of smooth WRR, one per instance (same order as `Service::instances`).
    RoundRobin(Mutex<Vec<i64>>),
    Random,
    LeastRequest,
    P2cEwma,
}

impl Selector {
    pub fn new(policy: Policy, instances: &[Arc<Instance>]) -> Self {
        match policy {
            Policy::RoundRobin => Selector::RoundRobin(Mutex::new(vec![0; instances.len()])),
            Policy::Random => Selector::Random,
            Policy::LeastRequest => Selector::LeastRequest,
            Policy::P2cEwma => Selector::P2cEwma,
        }
    }

    pub fn select(
        &self,
        instances: &[Arc<Instance>],
        exclude: &[Arc<str>],
    ) -> Option<Arc<Instance>> {
        self.select_where(instances, exclude, false)
    }

    /// Like [`Selector::select`]; with `fail_open`, every non-draining instance is eligible,
    /// healthy or not (used when a fail-open service has no healthy instance).
    pub fn select_where(
        &self,
        instances: &[Arc<Instance>],
        exclude: &[Arc<str>],
        fail_open: bool,
    ) -> Option<Arc<Instance>> {
        let eligible = |i: &Arc<Instance>| {
            (if fail_open { !i.draining() } else { i.usable() })
                && !exclude.iter().any(|k| *k == i.key)
        };
        match self {
            Selector::RoundRobin(current) => {
                // A poisoned lock only means another request panicked mid-update; the weights
                // are still integers, so keep going with them.
                let mut current = current.lock().unwrap_or_else(|p| p.into_inner());
                let mut total: i64 = 0;
                let mut best: Option<usize> = None;
                for (idx, inst) in instances.iter().enumerate() {
                    if !eligible(inst) {
                        continue;
                    }
                    let w = inst.weight as i64;
                    current[idx] += w;
                    total += w;
                    if best.is_none_or(|b| current[idx] > current[b]) {
                        best = Some(idx);
                    }
                }
                let best = best?;
                current[best] -= total;
                Some(instances[best].clone())
            }
            Selector::Random => {
                let total: u64 = instances
                    .iter()
                    .filter(|i| eligible(i))
                    .map(|i| i.weight as u64)
                    .sum();
                if total == 0 {
                    return None;
                }
                let mut pick = rand::thread_rng().gen_range(0..total);
                for inst in instances.iter().filter(|i| eligible(i)) {
                    let w = inst.weight as u64;
                    if pick < w {
                        return Some(inst.clone());
                    }
                    pick -= w;
                }
                None
            }
            Selector::LeastRequest => two_choices(instances, eligible, |i| {
                i.state.inflight.load(Ordering::Relaxed) as f64
            }),
            Selector::P2cEwma => two_choices(instances, eligible, |i| {
                let inflight = i.state.inflight.load(Ordering::Relaxed) as f64;
                i.state.latency_us() as f64 * (inflight + 1.0)
            }),
        }
    }
}

/// Power of two choices: two eligible instances at random, the one with the lower `load` per
/// unit of weight.
fn two_choices(
    instances: &[Arc<Instance>],
    eligible: impl Fn(&Arc<Instance>) -> bool,
    load: impl Fn(&Instance) -> f64,
) -> Option<Arc<Instance>> {
    let candidates: Vec<&Arc<Instance>> = instances.iter().filter(|i| eligible(i)).collect();
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0].clone()),
        n => {
            let mut rng = rand::thread_rng();
            let a = candidates[rng.gen_range(0..n)];
            let b = candidates[rng.gen_range(0..n)];
            // load per unit of weight, compared without division
            let (la, lb) = (load(a) * b.weight as f64, load(b) * a.weight as f64);
            Some(if la <= lb { a.clone() } else { b.clone() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Health;
    use std::collections::HashMap;

    fn inst(key: &str, weight: u32) -> Arc<Instance> {
        Instance::for_test(key, weight, Health::Healthy)
    }

    fn counts(sel: &Selector, insts: &[Arc<Instance>], n: usize) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for _ in 0..n {
            let i = sel.select(insts, &[]).expect("an instance");
            *m.entry(i.key.to_string()).or_default() += 1;
        }
        m
    }

    #[test]
    fn smooth_wrr_is_exact_and_interleaved() {
        let insts = vec![inst("a", 5), inst("b", 1), inst("c", 1)];
        let sel = Selector::new(Policy::RoundRobin, &insts);
        let seq: Vec<String> = (0..7)
            .map(|_| sel.select(&insts, &[]).unwrap().key.to_string())
            .collect();
        // nginx's documented sequence for weights 5,1,1
        assert_eq!(seq, ["a", "a", "b", "a", "c", "a", "a"]);
        let c = counts(&sel, &insts, 700);
        assert_eq!((c["a"], c["b"], c["c"]), (500, 100, 100));
    }

    #[test]
    fn draining_unhealthy_and_excluded_are_skipped() {
        let insts = vec![inst("a", 1), inst("b", 0), inst("c", 1), inst("d", 1)];
        insts[2].state.set_health(Health::Unhealthy);
        for policy in [
            Policy::RoundRobin,
            Policy::Random,
            Policy::LeastRequest,
            Policy::P2cEwma,
        ] {
            let sel = Selector::new(policy, &insts);
            let c = counts(&sel, &insts, 100);
            assert!(
                !c.contains_key("b") && !c.contains_key("c"),
                "{policy:?}: {c:?}"
            );
            let excl: Vec<Arc<str>> = vec!["a".into()];
            assert_eq!(&*sel.select(&insts, &excl).unwrap().key, "d");
            let excl: Vec<Arc<str>> = vec!["a".into(), "d".into()];
            assert!(sel.select(&insts, &excl).is_none());
        }
    }

    #[test]
    fn all_weights_zero_selects_nothing() {
        let insts = vec![inst("a", 0), inst("b", 0)];
        for policy in [
            Policy::RoundRobin,
            Policy::Random,
            Policy::LeastRequest,
            Policy::P2cEwma,
        ] {
            assert!(Selector::new(policy, &insts).select(&insts, &[]).is_none());
        }
        assert!(Selector::new(Policy::RoundRobin, &[])
            .select(&[], &[])
            .is_none());
    }

    #[test]
    fn fail_open_routes_to_non_draining_instances_only_when_none_is_healthy() {
        use crate::routing::{AllUnhealthy, Service, ServiceSettings};
        let insts = vec![inst("a", 1), inst("b", 1), inst("c", 0)];
        for i in &insts {
            i.state.set_health(Health::Unhealthy);
        }
        let strict = Service::new("s".into(), insts.clone(), 0, &ServiceSettings::default());
        assert!(!strict.routable());
        assert!(strict.select(&[]).is_none());
        let open = Service::new(
            "o".into(),
            insts.clone(),
            0,
            &ServiceSettings {
                all_unhealthy: AllUnhealthy::FailOpen,
                ..Default::default()
            },
        );
        assert!(open.routable());
        let picked: Vec<String> = (0..4)
            .map(|_| open.select(&[]).unwrap().key.to_string())
            .collect();
        assert!(picked.contains(&"a".into()) && picked.contains(&"b".into()));
        assert!(!picked.contains(&"c".into()), "draining is never picked");
        let tried: Vec<Arc<str>> = vec!["a".into()];
        assert!(open.has_candidate(&tried));
        let tried: Vec<Arc<str>> = vec!["a".into(), "b".into()];
        assert!(!open.has_candidate(&tried));
        // one healthy again: only it is used
        insts[1].state.set_health(Health::Pending);
        insts[0].state.set_health(Health::Healthy);
        for _ in 0..4 {
            assert_eq!(&*open.select(&[]).unwrap().key, "a");
        }
        let tried: Vec<Arc<str>> = vec!["a".into()];
        assert!(
            open.select(&tried).is_none(),
            "no failing open while one is healthy"
        );
    }

    #[test]
    fn random_respects_weights_roughly() {
        let insts = vec![inst("a", 3), inst("b", 1)];
        let c = counts(&Selector::new(Policy::Random, &insts), &insts, 4000);
        assert!(c["a"] > 2600 && c["a"] < 3400, "{c:?}");
    }

    #[test]
    fn p2c_ewma_sends_less_to_a_slow_instance() {
        use std::time::Duration;
        let insts = vec![inst("fast", 1), inst("slow", 1)];
        insts[0].state.observe_latency(Duration::from_millis(1));
        insts[1].state.observe_latency(Duration::from_millis(50));
        let c = counts(&Selector::new(Policy::P2cEwma, &insts), &insts, 4000);
        // the slow one wins only when both choices are it: about a quarter
        assert!(c["slow"] > 700 && c["slow"] < 1300, "{c:?}");
        // in-flight requests make the fast one costlier: with 100 on it, the slow one is cheaper
        insts[0].state.inflight.store(100, Ordering::Relaxed);
        let c = counts(&Selector::new(Policy::P2cEwma, &insts), &insts, 4000);
        assert!(c["slow"] > 2700, "{c:?}");
    }

    #[test]
    fn peak_ewma_takes_a_slower_sample_at_once_and_a_faster_one_gradually() {
        use std::time::Duration;
        let s = &inst("a", 1).state;
        assert_eq!(s.latency_us(), 0);
        s.observe_latency(Duration::from_millis(2));
        assert_eq!(s.latency_us(), 2000);
        s.observe_latency(Duration::from_millis(40));
        assert_eq!(s.latency_us(), 40_000, "a peak is taken at once");
        s.observe_latency(Duration::from_millis(1));
        let after = s.latency_us();
        assert!(
            after > 30_000 && after <= 40_000,
            "decays gradually: {after}"
        );
    }
}

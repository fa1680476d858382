//! Selection policies: which instance of a service takes the next request.
//!
//! Every policy only considers the instances a [`Pick`] allows: normally the *usable* ones
//! (weight > 0, healthy, not ejected), in panic mode every admitted non-draining one, and only
//! those in the proxy's zone while zone preference holds; never one the current request already
//! tried, so retries move to another instance. Weights are scaled down during an instance's
//! slow start ([`Pick::weight`]).
//!
//! - [`Policy::RoundRobin`] (default): smooth weighted round robin, as nginx does it: over a cycle
//!   each instance gets requests in proportion to its weight, interleaved rather than in bursts.
//! - [`Policy::Random`]: weighted random.
//! - [`Policy::LeastRequest`]: power of two choices on in-flight requests, weighted.
//! - [`Policy::P2cEwma`]: power of two choices on a cost of peak-EWMA latency × (in-flight + 1)
//!   / weight (linkerd's and Finagle's balancer): a slow instance gets fewer requests at once,
//!   without waiting for it to fail. An instance never measured costs nothing, so it is tried
//!   and measured.
//! - [`Policy::Hash`]: consistent hashing of a request key ([`super::hash`]); requests without
//!   the key are balanced as by `random`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use rand::Rng;
use serde::Deserialize;

use super::hash::Ring;
use super::{Health, Instance};
use crate::sync::lock;

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
    /// Consistent hashing on `hash_on`.
    Hash,
}

/// Which instances a selection may pick from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eligible {
    /// Usable ones (the normal case).
    Usable,
    /// Every non-draining instance that was admitted once (healthy, unhealthy or ejected):
    /// too few are usable (`panic_threshold_percent`).
    Panic,
    /// Every non-draining instance: none is usable and `all_unhealthy = "fail_open"`.
    FailOpen,
}

/// What one selection may pick from, decided per request by
/// [`Service::select`](super::Service::select).
#[derive(Debug, Clone, Copy)]
pub struct Pick<'a> {
    /// Instances this request already tried.
    pub exclude: &'a [Arc<str>],
    pub mode: Eligible,
    /// Slow start: the ramp's length in ms (0: off) and the time now ([`crate::clock::clock_ms`]).
    pub ramp_ms: u64,
    pub now: u64,
    /// Zone preference: only instances marked true (same order as the instances).
    pub local: Option<&'a [bool]>,
    /// The request's key, for [`Policy::Hash`].
    pub key: Option<u64>,
}

impl<'a> Pick<'a> {
    /// Usable instances not in `exclude`, no slow start, no zone, no key.
    pub fn usable(exclude: &'a [Arc<str>]) -> Pick<'a> {
        Pick {
            exclude,
            mode: Eligible::Usable,
            ramp_ms: 0,
            now: 0,
            local: None,
            key: None,
        }
    }

    /// May instance `idx` take this request?
    #[inline]
    pub fn eligible(&self, idx: usize, inst: &Instance) -> bool {
        let by_state = match self.mode {
            Eligible::Usable => inst.usable(),
            Eligible::Panic => !inst.draining() && inst.state.health() != Health::Pending,
            Eligible::FailOpen => !inst.draining(),
        };
        by_state
            && self
                .local
                .is_none_or(|l| l.get(idx).copied().unwrap_or(false))
            && !self.exclude.contains(&inst.key)
    }

    /// The instance's weight in thousandths, scaled by slow start: from 10 % of it when it
    /// became usable to all of it `ramp_ms` later (linearly).
    #[inline]
    pub fn weight(&self, inst: &Instance) -> u64 {
        let w = inst.weight as u64 * 1000;
        if self.ramp_ms == 0 {
            return w;
        }
        let since = self.now.saturating_sub(inst.state.admitted_at());
        if since >= self.ramp_ms {
            w
        } else {
            (w * (100 + 900 * since / self.ramp_ms) / 1000).max(1)
        }
    }
}

/// Per-snapshot selection state of one service.
#[derive(Debug)]
pub enum Selector {
    /// Current weights of smooth WRR, one per instance (same order as `Service::instances`).
    RoundRobin(Mutex<Vec<i64>>),
    Random,
    LeastRequest,
    P2cEwma,
    Hash(Ring),
}

impl Selector {
    pub fn new(policy: Policy, instances: &[Arc<Instance>]) -> Self {
        match policy {
            Policy::RoundRobin => Selector::RoundRobin(Mutex::new(vec![0; instances.len()])),
            Policy::Random => Selector::Random,
            Policy::LeastRequest => Selector::LeastRequest,
            Policy::P2cEwma => Selector::P2cEwma,
            Policy::Hash => Selector::Hash(Ring::new(instances)),
        }
    }

    /// A usable instance not in `exclude` (no slow start, zone or key).
    pub fn select(
        &self,
        instances: &[Arc<Instance>],
        exclude: &[Arc<str>],
    ) -> Option<Arc<Instance>> {
        self.select_with(instances, &Pick::usable(exclude))
    }

    /// An instance that `pick` allows, by the policy.
    pub fn select_with(
        &self,
        instances: &[Arc<Instance>],
        pick: &Pick<'_>,
    ) -> Option<Arc<Instance>> {
        match self {
            Selector::RoundRobin(current) => {
                let mut current = lock(current);
                let mut total: i64 = 0;
                let mut best: Option<usize> = None;
                for (idx, inst) in instances.iter().enumerate() {
                    if !pick.eligible(idx, inst) {
                        continue;
                    }
                    let w = pick.weight(inst) as i64;
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
            Selector::Random => weighted_random(instances, pick),
            Selector::LeastRequest => two_choices(instances, pick, |i| {
                i.state.inflight.load(Ordering::Relaxed) as f64
            }),
            Selector::P2cEwma => {
                let now = crate::clock::clock_ms();
                two_choices(instances, pick, |i| {
                    let inflight = i.state.inflight.load(Ordering::Relaxed) as f64;
                    i.state.latency_us_at(now) * (inflight + 1.0)
                })
            }
            Selector::Hash(ring) => {
                let Some(key) = pick.key else {
                    return weighted_random(instances, pick);
                };
                let idx = ring.find(key, |idx| {
                    let inst = &instances[idx];
                    if !pick.eligible(idx, inst) {
                        return false;
                    }
                    // slow start: a ramping instance takes its share of the keys (the same keys
                    // while it ramps), the others pass over it to the next point
                    let full = inst.weight as u64 * 1000;
                    let w = pick.weight(inst);
                    w >= full || super::hash::hash(&(key ^ idx as u64).to_le_bytes()) % full < w
                });
                match idx {
                    Some(i) => Some(instances[i].clone()),
                    // every eligible instance is ramping and passed over: the first one
                    None => (instances.iter().enumerate())
                        .find(|(i, inst)| pick.eligible(*i, inst))
                        .map(|(_, inst)| inst.clone()),
                }
            }
        }
    }
}

/// Weighted random over the instances `pick` allows.
fn weighted_random(instances: &[Arc<Instance>], pick: &Pick<'_>) -> Option<Arc<Instance>> {
    let eligible = || {
        (instances.iter().enumerate())
            .filter(|(i, inst)| pick.eligible(*i, inst))
            .map(|(_, inst)| inst)
    };
    let total: u64 = eligible().map(|i| pick.weight(i)).sum();
    if total == 0 {
        return None;
    }
    let mut at = rand::thread_rng().gen_range(0..total);
    for inst in eligible() {
        let w = pick.weight(inst);
        if at < w {
            return Some(inst.clone());
        }
        at -= w;
    }
    None
}

/// Power of two choices: two distinct eligible instances at random, the one with the lower `load`
/// per unit of (slow-start scaled) weight. Distinct: drawn with replacement, the worst of n
/// instances would win whenever it is drawn twice, 1/n² of the requests (11 % of them to a slow
/// one of three), whatever its cost.
fn two_choices(
    instances: &[Arc<Instance>],
    pick: &Pick<'_>,
    load: impl Fn(&Instance) -> f64,
) -> Option<Arc<Instance>> {
    let candidates: Vec<&Arc<Instance>> = (instances.iter().enumerate())
        .filter(|(i, inst)| pick.eligible(*i, inst))
        .map(|(_, inst)| inst)
        .collect();
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0].clone()),
        n => {
            let mut rng = rand::thread_rng();
            let (ia, ib) = if pick.ramp_ms == 0 {
                let ia = rng.gen_range(0..n);
                let k = rng.gen_range(0..n - 1);
                (ia, if k >= ia { k + 1 } else { k })
            } else {
                // with slow start on, the two are drawn by (ramped) weight, the second among the
                // others: drawn uniformly, an instance just admitted would win as often as any
                // other whenever the loads are equal
                let weights: Vec<u64> = candidates.iter().map(|i| pick.weight(i)).collect();
                let ia = weighted_index(&weights, u64::MAX, &mut rng);
                let ib = weighted_index(&weights, ia as u64, &mut rng);
                (ia, ib)
            };
            let (a, b) = (candidates[ia], candidates[ib]);
            // load per unit of weight, compared without division; an instance never measured
            // (cost 0) in slow start still counts its share: + 1 keeps the weight in the cost
            let (wa, wb) = (pick.weight(a) as f64, pick.weight(b) as f64);
            let (la, lb) = ((load(a) + 1.0) * wb, (load(b) + 1.0) * wa);
            Some(if la <= lb { a.clone() } else { b.clone() })
        }
    }
}

/// An index drawn with probability proportional to `weights`, never `skip` (pass `u64::MAX` to
/// skip none); uniform over the allowed ones when they weigh nothing.
fn weighted_index(weights: &[u64], skip: u64, rng: &mut impl Rng) -> usize {
    let allowed = |i: usize| i as u64 != skip;
    let total: u64 = (weights.iter().enumerate())
        .filter(|(i, _)| allowed(*i))
        .map(|(_, w)| *w)
        .sum();
    if total > 0 {
        let mut at = rng.gen_range(0..total);
        for (i, w) in weights.iter().enumerate().filter(|(i, _)| allowed(*i)) {
            if at < *w {
                return i;
            }
            at -= w;
        }
    }
    let others: Vec<usize> = (0..weights.len()).filter(|i| allowed(*i)).collect();
    others
        .get(rng.gen_range(0..others.len().max(1)))
        .copied()
        .unwrap_or(0)
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
        assert!(strict.select(&[], None).is_none());
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
            .map(|_| open.select(&[], None).unwrap().key.to_string())
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
            assert_eq!(&*open.select(&[], None).unwrap().key, "a");
        }
        let tried: Vec<Arc<str>> = vec!["a".into()];
        assert!(
            open.select(&tried, None).is_none(),
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
        // the two choices are distinct: the slow one never wins while nothing is in flight
        assert_eq!(c.get("slow"), None, "{c:?}");
        // in-flight requests make the fast one costlier: with 100 on it, the slow one is cheaper
        insts[0].state.inflight.store(100, Ordering::Relaxed);
        let c = counts(&Selector::new(Policy::P2cEwma, &insts), &insts, 4000);
        assert!(c["slow"] > 2700, "{c:?}");
    }

    #[test]
    fn an_idle_estimate_decays_so_a_once_slow_instance_is_tried_again() {
        use std::time::Duration;
        let s = &inst("a", 1).state;
        s.observe_latency(Duration::from_millis(50));
        let at = crate::clock::clock_ms();
        assert!(s.latency_us_at(at) > 45_000.0);
        // e^-4 of 50 ms after 40 s without a sample
        let later = s.latency_us_at(at + 40_000);
        assert!(later < 1_000.0 && later > 800.0, "{later}");
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

    fn service(
        insts: &[Arc<Instance>],
        traffic: crate::routing::TrafficSettings,
    ) -> crate::routing::Service {
        let settings = crate::routing::ServiceSettings {
            traffic: Arc::new(traffic),
            ..Default::default()
        };
        crate::routing::Service::new("s".into(), insts.to_vec(), 0, &settings)
    }

    #[test]
    fn slow_start_ramps_a_new_instances_share_from_a_tenth_for_every_policy() {
        let insts = vec![inst("a", 1), inst("b", 1)];
        insts[0].state.set_admitted_at(1_000);
        insts[1].state.set_admitted_at(100_000);
        let at = |now: u64| Pick {
            ramp_ms: 10_000,
            now,
            ..Pick::usable(&[])
        };
        let rr = Selector::new(Policy::RoundRobin, &insts);
        let count = |sel: &Selector, pick: &Pick<'_>, n: usize| {
            let mut b = 0;
            for _ in 0..n {
                b += (&*sel.select_with(&insts, pick).unwrap().key == "b") as usize;
            }
            b
        };
        // just admitted: 10 % of its weight, exactly with round robin
        assert_eq!(count(&rr, &at(100_000), 1100), 100);
        // half-way: 55 %
        assert_eq!(count(&rr, &at(105_000), 1550), 550);
        // done: equal
        assert_eq!(count(&rr, &at(110_000), 1000), 500);
        for policy in [Policy::Random, Policy::LeastRequest, Policy::P2cEwma] {
            let sel = Selector::new(policy, &insts);
            let b = count(&sel, &at(100_000), 4000);
            assert!(b < 1000, "{policy:?}: the ramping instance got {b} of 4000");
        }
    }

    #[test]
    fn panic_mode_spreads_over_admitted_instances_when_too_few_are_usable() {
        use crate::routing::{Eligible, TrafficSettings};
        let insts = vec![
            inst("a", 1),
            inst("b", 1),
            inst("c", 1),
            inst("d", 1),
            inst("e", 0),
        ];
        for i in &insts[1..4] {
            i.state.set_health(Health::Unhealthy);
        }
        // 1 of 4 usable (the draining one does not count) < 50 %: panic
        let svc = service(&insts, TrafficSettings::default());
        assert_eq!(svc.eligibility(), Eligible::Panic);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..40 {
            seen.insert(svc.select(&[], None).unwrap().key.to_string());
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["a", "b", "c", "d"]);
        // a never-admitted instance stays out even in panic
        insts[3].state.set_health(Health::Pending);
        for _ in 0..20 {
            assert_ne!(&*svc.select(&[], None).unwrap().key, "d");
        }
        // 2 of 4 usable is not below 50 %: only those
        insts[1].state.set_health(Health::Healthy);
        insts[3].state.set_health(Health::Unhealthy);
        assert_eq!(svc.eligibility(), Eligible::Usable);
        // threshold 0: never
        insts[1].state.set_health(Health::Unhealthy);
        let off = service(
            &insts,
            TrafficSettings {
                panic_threshold_percent: 0,
                ..Default::default()
            },
        );
        for _ in 0..20 {
            assert_eq!(&*off.select(&[], None).unwrap().key, "a");
        }
        // none usable: all_unhealthy decides (503 by default), not panic
        insts[0].state.set_health(Health::Unhealthy);
        assert!(svc.select(&[], None).is_none());
    }

    #[test]
    fn zone_preference_keeps_requests_in_zone_and_spills_over_below_the_minimum() {
        use crate::routing::TrafficSettings;
        let zoned = |key: &str, zone: &str| {
            let i = Instance::for_test(key, 1, Health::Healthy);
            let meta = [("zone".to_string(), zone.to_string())]
                .into_iter()
                .collect();
            Arc::new(Instance::new(
                i.key.clone(),
                key,
                &i.registered(),
                i.addr,
                1,
                meta,
                i.state.clone(),
            ))
        };
        let insts = vec![
            zoned("a1", "z1"),
            zoned("a2", "z1"),
            zoned("a3", "z1"),
            zoned("b1", "z2"),
            zoned("b2", "z2"),
        ];
        let svc = service(
            &insts,
            TrafficSettings {
                zone: Some("z1".into()),
                ..Default::default()
            },
        );
        let picks = |n: usize, exclude: &[Arc<str>]| {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..n {
                seen.insert(svc.select(exclude, None).unwrap().key.to_string());
            }
            seen.into_iter().collect::<Vec<_>>()
        };
        assert_eq!(picks(30, &[]), ["a1", "a2", "a3"]);
        // a retry that tried the whole zone goes to another
        let tried: Vec<Arc<str>> = vec!["a1".into(), "a2".into(), "a3".into()];
        assert_eq!(picks(20, &tried), ["b1", "b2"]);
        // 2 of 3 usable in zone (67 %) is below 70 %: every zone
        insts[0].state.set_health(Health::Unhealthy);
        assert_eq!(picks(60, &[]), ["a2", "a3", "b1", "b2"]);
    }
}

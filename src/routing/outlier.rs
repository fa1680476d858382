//! Outlier detection on answers: an instance that answers badly is ejected for a while, even
//! though it accepts connections and passes its health check (Envoy's outlier detection).
//!
//! ```text
//! request paths (engine, gateway) ──observe(svc, inst, Answer)──▶ OutlierState (atomics)
//!        n consecutive 5xx / gateway errors ──▶ eject ──▶ ejected_until (clock_ms)
//! sweeper task, every outlier_interval_ms ──▶ success-rate outliers ──▶ eject
//!                                         ──▶ ejections that ran out end (logged), multipliers decay
//! health checker: a real check passing after the ejection began ──▶ end_on_check
//! ```
//!
//! - An ejection lasts `base_ejection × (times ejected)`, at most `max_ejection`; the count goes
//!   down by one every interval the instance spends in service.
//! - At most `max_ejection_percent` of a service's non-draining instances are ejected at once,
//!   rounded down but at least one when there are two or more: Envoy's small-cluster trap (10 %
//!   of 3 instances rounds to 0 in older versions, so nothing is ever ejected; or a high cap
//!   ejects all) is avoided, and with 3 instances and the default 50 % at most 1 is out. A
//!   service of one instance never ejects it.
//! - Success rate: over one interval, an instance with at least `success_rate_min_requests`
//!   requests whose success rate is more than `success_rate_gap_percent` points below the
//!   median of the other such instances' rates is ejected (the median of the others, unlike
//!   Envoy's mean − 1.9 σ, also finds the one bad instance of 2 or 3).
//!
//! State lives in the instance's [`InstanceState`](super::InstanceState) (keyed by its etcd key),
//! so a snapshot rebuild, a weight or a metadata change neither ends an ejection nor forgets it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use tracing::{info, warn};

use super::{Instance, RoutingTable, Service};
use crate::clock::clock_ms;
use crate::sync::lock;

/// Why an instance was ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `consecutive_5xx` answers 500-599 (or requests that failed after they were sent) in a row.
    Consecutive5xx,
    /// `consecutive_gateway_errors` answers 502, 503, 504 (or failures after sending) in a row.
    GatewayErrors,
    /// Its success rate over an interval was far below the other instances'.
    SuccessRate,
}

impl Reason {
    /// Every reason, in the order of the `reason` label's values.
    pub const ALL: [Reason; 3] = [
        Reason::Consecutive5xx,
        Reason::GatewayErrors,
        Reason::SuccessRate,
    ];

    /// Its `reason` label ([`crate::metrics::EJECTION_REASONS`]).
    pub fn as_str(self) -> &'static str {
        crate::metrics::EJECTION_REASONS[self.index()]
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Validated outlier detection settings of one service (`[traffic]` keys `outlier_*`, overridden
/// per service in `[services.<name>]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierSettings {
    /// 5xx answers in a row that eject (default 5; 0: off).
    pub consecutive_5xx: u32,
    /// 502/503/504 answers in a row that eject (default 5; 0: off).
    pub consecutive_gateway_errors: u32,
    /// The first ejection's length; the n-th lasts n times as long (default 30 s).
    pub base_ejection: Duration,
    /// The longest ejection (default 300 s).
    pub max_ejection: Duration,
    /// Instances out at once, as a share of the non-draining ones (default 50; see the module).
    pub max_ejection_percent: u32,
    /// Requests an instance needs in an interval for its success rate to count (default 20).
    pub success_rate_min_requests: u64,
    /// Points below the others' median success rate that eject (default 20; 0: off).
    pub success_rate_gap_percent: u32,
    /// A real active check (not protocol "none") that passes after an ejection began ends it
    /// (default true, as Envoy's `successful_active_health_check_uneject_host`).
    pub uneject_on_check: bool,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        OutlierSettings {
            consecutive_5xx: 5,
            consecutive_gateway_errors: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 50,
            success_rate_min_requests: 20,
            success_rate_gap_percent: 20,
            uneject_on_check: true,
        }
    }
}

/// The current ejection of an instance, for operators.
#[derive(Debug, Clone)]
pub struct Ejection {
    pub reason: Reason,
    /// What was seen ("5 consecutive 5xx answers", "success rate 62 % ...").
    pub detail: String,
    /// When it began and ends, on [`clock_ms`].
    pub since_ms: u64,
    pub until_ms: u64,
    /// Ejections counted for the length of the next one.
    pub times: u32,
}

/// Outlier state of one instance, inside its `InstanceState`.
#[derive(Debug, Default)]
pub struct OutlierState {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Answers counted as failures since the last sweep (success rate).
    failed: AtomicU64,
    /// The instance's `requests` at the last sweep (success rate); written by the sweeper only.
    requests_seen: AtomicU64,
    /// Ejected until this time ([`clock_ms`]); 0: not ejected. The hot path reads only this.
    until: AtomicU64,
    /// Ejections that count for the length of the next one.
    times: AtomicU32,
    /// The current (or last) ejection, for operators.
    detail: Mutex<Option<Ejection>>,
}

impl OutlierState {
    /// Out at `now` ([`clock_ms`])?
    #[inline]
    pub fn ejected_at(&self, now: u64) -> bool {
        let until = self.until.load(Relaxed);
        until != 0 && now < until
    }

    /// Out right now? (Reads the clock only for an instance with an ejection on record.)
    #[inline]
    pub fn ejected(&self) -> bool {
        let until = self.until.load(Relaxed);
        until != 0 && clock_ms() < until
    }

    /// The current ejection, if the instance is out.
    pub fn ejection(&self) -> Option<Ejection> {
        if !self.ejected() {
            return None;
        }
        lock(&self.detail).clone()
    }
}

/// What an instance did with one request, as outlier detection counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A response head with this status.
    Status(u16),
    /// The request was sent and no response came (reset, closed, timed out).
    Failed,
}

/// Counts one answer of `inst` (called by both request paths once per answer) and ejects it
/// when it crosses a threshold. A good answer costs two loads unless it ends a streak.
#[inline]
pub fn observe(svc: &Service, inst: &Instance, answer: Answer) {
    let o = &inst.state.outlier;
    let (bad, gateway) = match answer {
        Answer::Status(s) => ((500..=599).contains(&s), matches!(s, 502..=504)),
        Answer::Failed => (true, true),
    };
    if !bad {
        // read first: most answers find 0 and leave the cache line shared
        if o.consecutive_5xx.load(Relaxed) != 0 {
            o.consecutive_5xx.store(0, Relaxed);
        }
        if o.consecutive_gateway.load(Relaxed) != 0 {
            o.consecutive_gateway.store(0, Relaxed);
        }
        return;
    }
    o.failed.fetch_add(1, Relaxed);
    let n5 = o.consecutive_5xx.fetch_add(1, Relaxed) + 1;
    let ng = if gateway {
        o.consecutive_gateway.fetch_add(1, Relaxed) + 1
    } else {
        o.consecutive_gateway.store(0, Relaxed);
        0
    };
    let s = &svc.traffic.outlier;
    if s.consecutive_5xx > 0 && n5 >= s.consecutive_5xx {
        let detail = format!("{n5} consecutive 5xx answers or failures");
        eject(svc, inst, Reason::Consecutive5xx, detail, clock_ms());
    } else if s.consecutive_gateway_errors > 0 && ng >= s.consecutive_gateway_errors {
        let detail = format!("{ng} consecutive gateway errors (502, 503, 504 or no answer)");
        eject(svc, inst, Reason::GatewayErrors, detail, clock_ms());
    }
}

/// How many of `instances` non-draining instances may be out at once with `percent`.
pub fn max_ejected(instances: usize, percent: u32) -> usize {
    if instances < 2 {
        return 0;
    }
    (instances * percent.min(100) as usize / 100).max(1)
}

/// Ejects `inst` unless it is out already or the service's cap is reached; true if it did.
fn eject(svc: &Service, inst: &Instance, reason: Reason, detail: String, now: u64) -> bool {
    let o = &inst.state.outlier;
    let prev = o.until.load(Relaxed);
    if prev != 0 && now < prev {
        return false;
    }
    let s = &svc.traffic.outlier;
    let candidates = svc.instances.iter().filter(|i| !i.draining()).count();
    let cap = max_ejected(candidates, s.max_ejection_percent);
    let out = |svc: &Service| {
        (svc.instances.iter())
            .filter(|i| i.state.outlier.ejected_at(now))
            .count()
    };
    if out(svc) >= cap {
        // the streak goes on counting: it ejects as soon as there is room
        return false;
    }
    let times = o.times.load(Relaxed).saturating_add(1);
    let base = s.base_ejection.as_millis() as u64;
    let length = base
        .saturating_mul(times as u64)
        .min((s.max_ejection.as_millis() as u64).max(base))
        .max(1);
    let until = now.saturating_add(length);
    if o.until
        .compare_exchange(prev, until, Relaxed, Relaxed)
        .is_err()
    {
        return false; // another request ejected it first
    }
    // two requests ejecting two instances at once may both have seen room for one: the one that
    // finds the cap exceeded steps back (both may; then the next answer tries again)
    if out(svc) > cap {
        o.until.store(prev, Relaxed);
        return false;
    }
    o.times.store(times, Relaxed);
    o.consecutive_5xx.store(0, Relaxed);
    o.consecutive_gateway.store(0, Relaxed);
    *lock(&o.detail) = Some(Ejection {
        reason,
        detail: detail.clone(),
        since_ms: now,
        until_ms: until,
        times,
    });
    svc.metrics().ejections[reason.index()].inc();
    warn!(service = %svc.name, instance = %inst.key, reason = reason.as_str(), detail = %detail,
        ejection_ms = length, times, "instance ejected: outlier");
    crate::events::RECENT.record(
        "outlier",
        format!(
            "{} {}: ejected for {length} ms ({}: {detail})",
            svc.name,
            inst.key,
            reason.as_str()
        ),
    );
    true
}

/// Ends `inst`'s ejection because a real active check passed after it began (`check_started`
/// on [`clock_ms`]); true if it did.
pub fn end_on_check(service: &str, inst: &Instance, settings: &OutlierSettings, started: u64) {
    let o = &inst.state.outlier;
    let until = o.until.load(Relaxed);
    if !settings.uneject_on_check || until == 0 || started >= until {
        return;
    }
    let since = lock(&o.detail).as_ref().map(|e| e.since_ms);
    if since.is_none_or(|s| started <= s) {
        return; // the check began before the ejection: it says nothing new
    }
    if o.until.compare_exchange(until, 0, Relaxed, Relaxed).is_ok() {
        inst.state.mark_admitted();
        back(service, inst, "an active check passed");
    }
}

fn back(service: &str, inst: &Instance, why: &str) {
    info!(service = %service, instance = %inst.key, why, "instance back from an outlier ejection");
    crate::events::RECENT.record(
        "outlier",
        format!("{service} {}: back in service ({why})", inst.key),
    );
}

/// One pass over every service: ejections that ran out end, multipliers of instances in service
/// decay, success-rate outliers are ejected. Run every `outlier_interval_ms` by [`run`].
pub fn sweep(table: &RoutingTable, now: u64) {
    for svc in table.services.values() {
        sweep_service(svc, now);
    }
}

fn sweep_service(svc: &Service, now: u64) {
    let s = &svc.traffic.outlier;
    // (instance, requests, failures) over the interval, for the success rate
    let mut rates: Vec<(&Instance, f64)> = Vec::new();
    for inst in &svc.instances {
        let o = &inst.state.outlier;
        let until = o.until.load(Relaxed);
        if until != 0
            && now >= until
            && o.until.compare_exchange(until, 0, Relaxed, Relaxed).is_ok()
        {
            inst.state.mark_admitted();
            back(&svc.name, inst, "its ejection time is over");
        } else if until == 0 {
            let t = o.times.load(Relaxed);
            if t > 0 {
                o.times.store(t - 1, Relaxed);
            }
        }
        let requests = inst.state.requests.load(Relaxed);
        let seen = o.requests_seen.swap(requests, Relaxed);
        let failed = o.failed.swap(0, Relaxed);
        let total = requests.saturating_sub(seen);
        if s.success_rate_gap_percent > 0
            && total >= s.success_rate_min_requests.max(1)
            && !inst.draining()
            && !o.ejected_at(now)
        {
            let ok = total.saturating_sub(failed) as f64;
            rates.push((inst, ok * 100.0 / total as f64));
        }
    }
    if rates.len() < 2 {
        return;
    }
    let gap = s.success_rate_gap_percent as f64;
    let outliers: Vec<(&Instance, f64, f64)> = (0..rates.len())
        .filter_map(|i| {
            let mut others: Vec<f64> = (rates.iter().enumerate())
                .filter(|(j, _)| *j != i)
                .map(|(_, r)| r.1)
                .collect();
            let median = median(&mut others);
            (rates[i].1 < median - gap).then_some((rates[i].0, rates[i].1, median))
        })
        .collect();
    for (inst, rate, median) in outliers {
        let detail = format!(
            "success rate {rate:.0} % over the last interval, the others' median {median:.0} %"
        );
        eject(svc, inst, Reason::SuccessRate, detail, now);
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Sweeps the current snapshot every `interval` until `shutdown` turns true.
pub async fn run(
    table: super::SharedTable,
    interval: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => sweep(&table.load(), clock_ms()),
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{Health, ServiceSettings, TrafficSettings};
    use std::sync::Arc;

    /// A service of `n` healthy instances; `name` keeps its metrics apart from other tests'.
    fn service(name: &str, n: usize, outlier: OutlierSettings) -> Service {
        let insts = (0..n)
            .map(|i| Instance::for_test(&format!("i{i}"), 1, Health::Healthy))
            .collect();
        let settings = ServiceSettings {
            traffic: Arc::new(TrafficSettings {
                outlier,
                ..Default::default()
            }),
            ..Default::default()
        };
        Service::new(name.into(), insts, 0, &settings)
    }

    #[test]
    fn the_cap_keeps_most_of_a_small_service_in() {
        assert_eq!(max_ejected(1, 50), 0, "a lone instance is never ejected");
        assert_eq!(max_ejected(2, 50), 1);
        assert_eq!(
            max_ejected(3, 50),
            1,
            "3 instances: at most 1 out by default"
        );
        assert_eq!(max_ejected(3, 10), 1, "a low percentage still allows one");
        assert_eq!(max_ejected(10, 50), 5);
        assert_eq!(max_ejected(3, 100), 3);
        assert_eq!(max_ejected(3, 250), 3);
    }

    #[test]
    fn consecutive_5xx_eject_and_a_success_resets_the_streak() {
        let svc = service("o-streak", 3, OutlierSettings::default());
        let a = &svc.instances[0];
        for _ in 0..4 {
            observe(&svc, a, Answer::Status(500));
        }
        observe(&svc, a, Answer::Status(200));
        for _ in 0..4 {
            observe(&svc, a, Answer::Status(500));
        }
        assert!(a.usable(), "4 in a row after a success: not yet");
        observe(&svc, a, Answer::Status(500));
        assert!(!a.usable(), "the 5th in a row ejects");
        let e = a.state.outlier.ejection().expect("an ejection on record");
        assert_eq!((e.reason, e.times), (Reason::Consecutive5xx, 1));
        assert_eq!(a.state_label(), "ejected");
        assert_eq!(svc.metrics().ejections[0].get(), 1);
    }

    #[test]
    fn gateway_errors_count_502_to_504_and_failures_only() {
        let settings = OutlierSettings {
            consecutive_5xx: 0,
            consecutive_gateway_errors: 3,
            ..Default::default()
        };
        let svc = service("o-gateway", 2, settings);
        let a = &svc.instances[0];
        observe(&svc, a, Answer::Status(503));
        observe(&svc, a, Answer::Failed);
        observe(&svc, a, Answer::Status(500)); // not a gateway error: the streak starts over
        observe(&svc, a, Answer::Status(502));
        observe(&svc, a, Answer::Status(504));
        assert!(a.usable());
        observe(&svc, a, Answer::Status(503));
        assert!(!a.usable());
        let e = a.state.outlier.ejection().expect("ejected");
        assert_eq!(e.reason, Reason::GatewayErrors);
    }

    #[test]
    fn with_three_instances_at_most_one_is_out() {
        let svc = service("o-cap", 3, OutlierSettings::default());
        for inst in &svc.instances {
            for _ in 0..10 {
                observe(&svc, inst, Answer::Status(500));
            }
        }
        let out = svc.instances.iter().filter(|i| !i.usable()).count();
        assert_eq!(out, 1);
    }

    #[test]
    fn ejections_grow_with_each_one_up_to_the_maximum_and_end_on_time() {
        let settings = OutlierSettings {
            base_ejection: Duration::from_millis(1000),
            max_ejection: Duration::from_millis(2500),
            ..Default::default()
        };
        let svc = service("o-grow", 2, settings);
        let a = &svc.instances[0];
        let o = &a.state.outlier;
        let mut now = 1_000_000;
        for expect in [1000, 2000, 2500, 2500] {
            assert!(eject(&svc, a, Reason::Consecutive5xx, "test".into(), now));
            let until = o.until.load(Relaxed);
            assert_eq!(until - now, expect);
            assert!(o.ejected_at(until - 1) && !o.ejected_at(until));
            // the sweep after it ran out ends it
            now = until;
            sweep_service(&svc, now);
            assert_eq!(o.until.load(Relaxed), 0);
        }
        // every interval in service takes one off the count
        let times = o.times.load(Relaxed);
        sweep_service(&svc, now);
        assert_eq!(o.times.load(Relaxed), times - 1);
    }

    #[test]
    fn a_success_rate_outlier_is_ejected_and_uniform_failure_is_not() {
        let svc = service("o-rate", 3, OutlierSettings::default());
        let answer = |i: usize, n: u64, failed: u64| {
            let inst = &svc.instances[i];
            inst.state.requests.fetch_add(n, Relaxed);
            for k in 0..n {
                // one failure every n / failed answers: no streak ejects
                let bad = failed > 0 && k % (n / failed) == 0;
                observe(&svc, inst, Answer::Status(if bad { 503 } else { 200 }));
            }
        };
        // everyone 25 % failures: nobody stands out
        for i in 0..3 {
            answer(i, 100, 25);
        }
        sweep_service(&svc, clock_ms());
        assert!(svc.instances.iter().all(|i| i.usable()));
        // one at 25 %, the others fine: that one is out
        answer(0, 100, 25);
        answer(1, 100, 0);
        answer(2, 100, 0);
        sweep_service(&svc, clock_ms());
        assert!(!svc.instances[0].usable());
        assert!(svc.instances[1].usable() && svc.instances[2].usable());
        let e = svc.instances[0].state.outlier.ejection().expect("ejected");
        assert_eq!(e.reason, Reason::SuccessRate);
        assert!(e.detail.contains("75 %"), "{}", e.detail);
    }

    #[test]
    fn a_check_that_began_after_the_ejection_ends_it() {
        let svc = service("o-check", 2, OutlierSettings::default());
        let a = &svc.instances[0];
        let now = clock_ms();
        assert!(eject(&svc, a, Reason::Consecutive5xx, "test".into(), now));
        let s = OutlierSettings::default();
        end_on_check("svc", a, &s, now.saturating_sub(5));
        assert!(
            !a.usable(),
            "a check from before the ejection changes nothing"
        );
        let off = OutlierSettings {
            uneject_on_check: false,
            ..Default::default()
        };
        end_on_check("svc", a, &off, now + 1);
        assert!(!a.usable(), "turned off");
        end_on_check("svc", a, &s, now + 1);
        assert!(a.usable());
    }
}

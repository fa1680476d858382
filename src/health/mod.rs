//! Health: active probes, passive detection, and the scheduler that flips instance health.
//!
//! ```text
//! registry ──generation──▶ HealthChecker::reconcile (changed services only)
//!                              │ one task per instance key (same key + same state + same target: kept)
//!                              ▼
//!                          probe loop: first check at once, then every interval - jitter
//!                              │ semaphore: at most max_concurrent checks at a time
//!                              ▼
//!                          Tracker (consecutive thresholds) ──▶ InstanceState::transition (atomic)
//! proxy: connect failures ──▶ passive_failure ─────────────────▶ InstanceState::transition
//! ```
//!
//! Health lives in the instance's [`InstanceState`] (atomics shared with the request path), so
//! nothing here takes a lock the proxy also takes. A deregistered key's task is aborted on the next
//! registry generation and its entry dropped: nothing of it remains.
//!
//! Per-instance overrides come from registration metadata: `health_protocol` (`http`, `tcp`,
//! `grpc`, `none`), `health_path`, `health_port`, `health_grpc_service`, `health_expected_statuses`,
//! `health_interval_ms`, `health_timeout_ms`.

pub mod probe;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde::Deserialize;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::metrics::METRICS;
use crate::registry::codec::HostPort;
use crate::routing::{Health, Instance, InstanceState, Service, SharedTable};
pub use probe::{
    GrpcHealthCheck, HealthCheck, HttpHealthCheck, NoHealthCheck, ProbeError, TcpHealthCheck,
};

/// How an instance is checked (config key `protocol`, metadata `health_protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// `GET path`, healthy on an expected status (default).
    #[default]
    Http,
    /// Healthy when a TCP connection opens.
    Tcp,
    /// `grpc.health.v1.Health/Check`, healthy on SERVING.
    Grpc,
    /// No active check: admitted at once; passive ejections end at the next (trivial) check.
    None,
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "http" => Ok(Protocol::Http),
            "tcp" => Ok(Protocol::Tcp),
            "grpc" => Ok(Protocol::Grpc),
            "none" => Ok(Protocol::None),
            other => Err(format!("{other:?} is not one of http, tcp, grpc, none")),
        }
    }
}

/// Set of HTTP statuses, written like `"200-299"` or `"200,204,300-399"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSet(Vec<(u16, u16)>);

impl StatusSet {
    pub fn parse(text: &str) -> Result<StatusSet, String> {
        let mut ranges = Vec::new();
        for part in text.split(',').map(str::trim) {
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            let code = |s: &str| {
                s.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|c| (100..=599).contains(c))
            };
            match (code(lo), code(hi)) {
                (Some(lo), Some(hi)) if lo <= hi => ranges.push((lo, hi)),
                _ => {
                    return Err(format!(
                        "{text:?}: {part:?} is not a status (100-599) or a range like 200-299"
                    ))
                }
            }
        }
        Ok(StatusSet(ranges))
    }

    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status))
    }
}

/// A validated check definition: `[health]`, possibly overridden by `[services.<name>.health]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    pub protocol: Protocol,
    /// HTTP path (default `/health`).
    pub path: String,
    /// Port to probe; `None` = the instance's own port.
    pub port: Option<u16>,
    /// HTTP statuses counted as healthy (default 200-299).
    pub expected: StatusSet,
    /// gRPC service name to ask about ("" = the whole server).
    pub grpc_service: String,
    /// Time between the starts of two checks (default 1 s).
    pub interval: Duration,
    /// Time one check may take (default 1 s).
    pub timeout: Duration,
    /// Each wait is shortened by a random 0..=jitter, so checks spread out (default 100 ms).
    pub jitter: Duration,
    /// Consecutive passes that admit a pending or unhealthy instance (default 1).
    pub healthy_threshold: u32,
    /// Consecutive failures that eject a healthy instance (default 2).
    pub unhealthy_threshold: u32,
}

/// Validated `[health]` configuration.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// false: no active checks, no passive ejection, new instances are healthy at once.
    pub enabled: bool,
    /// New instances take traffic before their first check passes.
    pub admit_immediately: bool,
    /// Checks running at the same time, at most (default 256).
    pub max_concurrent: usize,
    /// The check of services without their own.
    pub default: CheckSpec,
    /// Services whose check differs from `default`.
    pub services: BTreeMap<String, CheckSpec>,
}

impl HealthConfig {
    pub fn spec_for(&self, service: &str) -> &CheckSpec {
        self.services.get(service).unwrap_or(&self.default)
    }

    /// Health of a newly registered instance.
    pub fn initial_health(&self) -> Health {
        if !self.enabled || self.admit_immediately {
            Health::Healthy
        } else {
            Health::Pending
        }
    }
}

/// What one instance's probe task checks: the service's spec with the instance's metadata
/// overrides applied, and the address to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub spec: CheckSpec,
    pub addr: SocketAddr,
    /// Host header for HTTP checks.
    pub host: String,
}

impl Target {
    /// Resolves `inst`'s target; invalid metadata values are reported and ignored.
    pub fn for_instance(inst: &Instance, base: &CheckSpec) -> (Target, Vec<String>) {
        let mut spec = base.clone();
        let mut errors = Vec::new();
        let meta = |k: &str| inst.metadata.get(k).map(|v| v.trim());
        if let Some(v) = meta("health_protocol") {
            match v.parse() {
                Ok(p) => spec.protocol = p,
                Err(e) => errors.push(format!("health_protocol: {e}")),
            }
        }
        if let Some(v) = meta("health_path") {
            if v.starts_with('/') && !v.contains([' ', '\r', '\n']) {
                spec.path = v.to_string();
            } else {
                errors.push(format!("health_path: {v:?} must start with '/'"));
            }
        }
        if let Some(v) = meta("health_port") {
            match v.parse::<u16>() {
                Ok(p) if p > 0 => spec.port = Some(p),
                _ => errors.push(format!("health_port: {v:?} is not a port")),
            }
        }
        if let Some(v) = meta("health_grpc_service") {
            spec.grpc_service = v.to_string();
        }
        if let Some(v) = meta("health_expected_statuses") {
            match StatusSet::parse(v) {
                Ok(s) => spec.expected = s,
                Err(e) => errors.push(format!("health_expected_statuses: {e}")),
            }
        }
        let ms = |k: &str, errors: &mut Vec<String>| -> Option<Duration> {
            let v = meta(k)?;
            match v.parse::<u64>() {
                Ok(n) if (1..=3_600_000).contains(&n) => Some(Duration::from_millis(n)),
                _ => {
                    errors.push(format!("{k}: {v:?} is not 1-3600000"));
                    None
                }
            }
        };
        if let Some(d) = ms("health_interval_ms", &mut errors) {
            spec.interval = d;
            spec.jitter = spec.jitter.min(d / 2);
        }
        if let Some(d) = ms("health_timeout_ms", &mut errors) {
            spec.timeout = d;
        }
        let port = spec.port.unwrap_or(inst.addr.port());
        let target = Target {
            addr: SocketAddr::new(inst.addr.ip(), port),
            host: HostPort {
                host: inst.registered.host.clone(),
                port,
            }
            .to_string(),
            spec,
        };
        (target, errors)
    }

    fn build(&self) -> Result<Box<dyn HealthCheck>, ProbeError> {
        Ok(match self.spec.protocol {
            Protocol::Http => Box::new(HttpHealthCheck {
                addr: self.addr,
                host: self.host.clone(),
                path: self.spec.path.clone(),
                expected: self.spec.expected.clone(),
            }),
            Protocol::Tcp => Box::new(TcpHealthCheck { addr: self.addr }),
            Protocol::Grpc => Box::new(GrpcHealthCheck::new(
                self.addr,
                self.spec.grpc_service.clone(),
                self.spec.timeout,
            )?),
            Protocol::None => Box::new(NoHealthCheck),
        })
    }
}

/// Consecutive-result thresholds of one instance.
#[derive(Debug)]
pub struct Tracker {
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    passes: u32,
    failures: u32,
    /// Health as of our last observation: a different current value means someone else (passive
    /// detection) flipped it, and the count starts over.
    last: Option<Health>,
}

impl Tracker {
    pub fn new(spec: &CheckSpec) -> Tracker {
        Tracker {
            healthy_threshold: spec.healthy_threshold,
            unhealthy_threshold: spec.unhealthy_threshold,
            passes: 0,
            failures: 0,
            last: None,
        }
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

/// Logs a health flip once, counts it and refreshes the service's per-state gauges.
pub fn report_transition(
    service: &str,
    svc: Option<&Service>,
    key: &str,
    from: Health,
    to: Health,
    reason: &str,
) {
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
    METRICS
        .health_transitions
        .with_label_values(&[service, to.as_str()])
        .inc();
    if let Some(svc) = svc {
        crate::registry::set_service_gauges(service, svc);
    }
}

/// Passive detection, called by the proxy when connecting to `inst` failed: after
/// `svc.passive_failures` consecutive failures a healthy instance is ejected until an active check
/// passes again. Only atomics are touched unless the instance flips.
pub fn passive_failure(svc: &Service, inst: &Instance, error: &dyn std::fmt::Display) {
    let n = inst
        .state
        .connect_failures
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        + 1;
    if svc.passive_failures > 0
        && n >= svc.passive_failures
        && inst.state.transition(Health::Healthy, Health::Unhealthy)
    {
        report_transition(
            &svc.name,
            Some(svc),
            &inst.key,
            Health::Healthy,
            Health::Unhealthy,
            &format!("{n} consecutive connection failures, last: {error}"),
        );
    }
}

/// Passive detection: the instance answered, so its connection-failure count starts over.
#[inline]
pub fn passive_success(state: &InstanceState) {
    use std::sync::atomic::Ordering::Relaxed;
    // read first: most responses find 0 and leave the cache line shared
    if state.connect_failures.load(Relaxed) != 0 {
        state.connect_failures.store(0, Relaxed);
    }
}

/// A running probe task; aborted when dropped.
struct ProbeTask {
    state: Arc<InstanceState>,
    target: Target,
    /// The first check (on the checker's runtime), or the whole loop without a probe runtime.
    handle: JoinHandle<()>,
    /// The steady-state loop on the probe runtime, once the first check handed over to it.
    steady: Arc<std::sync::Mutex<Option<tokio::task::AbortHandle>>>,
}

impl Drop for ProbeTask {
    fn drop(&mut self) {
        self.handle.abort();
        if let Some(h) = self.steady.lock().ok().and_then(|mut g| g.take()) {
            h.abort();
        }
    }
}

/// Follows registry generations and keeps exactly one probe task per registered instance key.
/// Starts the thread and single-threaded runtime that run the steady-state checks.
fn start_probe_runtime(
) -> std::io::Result<(tokio::runtime::Handle, tokio::sync::oneshot::Sender<()>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("health-probes".into())
        .spawn(move || {
            // runs until the checker drops `stop` (or sends), then drops every probe task
            let _ = rt.block_on(stopped);
        })?;
    Ok((handle, stop))
}

/// Concurrent first checks of new instances (separate from `max_concurrent`).
const ADMISSION_PERMITS: usize = 64;

pub struct HealthChecker {
    table: SharedTable,
    config: Arc<HealthConfig>,
    generations: watch::Receiver<u64>,
    semaphore: Arc<Semaphore>,
    /// Permits for first checks only: admission of a new instance never queues behind the
    /// steady-state checks of thousands of others.
    admission: Arc<Semaphore>,
    /// Runtime of the steady-state checks (a thread of its own, started by `run`); `None` runs
    /// everything on the caller's runtime (unit tests).
    steady: Option<tokio::runtime::Handle>,
    /// Ends the steady-state runtime's thread when dropped.
    steady_stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Services as last reconciled: unchanged `Arc`s are skipped.
    services: HashMap<Arc<str>, Arc<Service>>,
    probes: HashMap<Arc<str>, ProbeTask>,
}

impl HealthChecker {
    pub fn new(
        table: SharedTable,
        config: HealthConfig,
        generations: watch::Receiver<u64>,
    ) -> HealthChecker {
        HealthChecker {
            table,
            semaphore: Arc::new(Semaphore::new(config.max_concurrent)),
            admission: Arc::new(Semaphore::new(ADMISSION_PERMITS)),
            steady: None,
            steady_stop: None,
            config: Arc::new(config),
            generations,
            services: HashMap::new(),
            probes: HashMap::new(),
        }
    }

    /// Instance keys currently probed.
    pub fn probed(&self) -> usize {
        self.probes.len()
    }

    /// Runs until `shutdown` turns true; every probe task ends with it.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        info!(
            max_concurrent = self.config.max_concurrent,
            "health checker starting"
        );
        match start_probe_runtime() {
            Ok((handle, stop)) => {
                self.steady = Some(handle);
                self.steady_stop = Some(stop);
            }
            Err(e) => {
                warn!(error = %e, "cannot start the probe runtime; checks share the checker's thread")
            }
        }
        let mut registry_alive = true;
        loop {
            if *shutdown.borrow() {
                break;
            }
            self.reconcile();
            tokio::select! {
                _ = shutdown.changed() => break,
                r = self.generations.changed(), if registry_alive => {
                    // registry gone: keep probing what we have until shutdown
                    registry_alive = r.is_ok();
                }
            }
        }
        self.probes.clear();
        info!("health checker stopped");
    }

    /// Brings the probe tasks in line with the current snapshot. Only services whose `Arc`
    /// changed since the last call are looked at.
    pub fn reconcile(&mut self) {
        let table = self.table.load_full();
        let mut spawned = 0usize;
        let mut stopped = 0usize;
        for (name, svc) in &table.services {
            let old = self.services.get(name).cloned();
            if old.as_ref().is_some_and(|o| Arc::ptr_eq(o, svc)) {
                continue;
            }
            let base = self.config.spec_for(name).clone();
            for inst in &svc.instances {
                spawned += self.ensure(name, inst, &base) as usize;
            }
            if let Some(old) = old {
                let now: HashSet<&Arc<str>> = svc.instances.iter().map(|i| &i.key).collect();
                for i in &old.instances {
                    if !now.contains(&i.key) && self.probes.remove(&i.key).is_some() {
                        stopped += 1;
                    }
                }
            }
        }
        for (name, old) in &self.services {
            if !table.services.contains_key(name) {
                for i in &old.instances {
                    stopped += self.probes.remove(&i.key).is_some() as usize;
                }
            }
        }
        self.services = table.services.clone();
        if spawned > 0 || stopped > 0 {
            debug!(
                spawned,
                stopped,
                probed = self.probes.len(),
                "health probes reconciled"
            );
        }
    }

    /// Makes sure `inst` has a probe task for its current state and target; true if one started.
    fn ensure(&mut self, service: &Arc<str>, inst: &Arc<Instance>, base: &CheckSpec) -> bool {
        let (target, errors) = Target::for_instance(inst, base);
        if let Some(p) = self.probes.get(&inst.key) {
            if Arc::ptr_eq(&p.state, &inst.state) && p.target == target {
                return false;
            }
        }
        for e in &errors {
            warn!(service = %service, instance = %inst.key, error = %e, "ignoring invalid health metadata");
        }
        let steady_slot = Arc::new(std::sync::Mutex::new(None));
        let handle = tokio::spawn(probe_loop(
            Probe {
                service: service.clone(),
                key: inst.key.clone(),
                state: inst.state.clone(),
                target: target.clone(),
                table: self.table.clone(),
            },
            self.semaphore.clone(),
            self.admission.clone(),
            self.steady.clone().map(|h| (h, steady_slot.clone())),
        ));
        // replacing the old entry aborts its task
        self.probes.insert(
            inst.key.clone(),
            ProbeTask {
                state: inst.state.clone(),
                target,
                handle,
                steady: steady_slot,
            },
        );
        true
    }
}

/// Checks one instance forever: at once, then every `interval` (minus jitter) measured from the
/// start of the previous check.
/// Runs an instance's checks. With a probe runtime, the first check runs here, on the checker's
/// own runtime, which does little else, so admitting a new instance never waits behind the
/// steady-state checks of thousands of others; the loop then moves to the probe runtime and this
/// task ends (its abort handle goes into `slot`, where dropping the `ProbeTask` finds it).
async fn probe_loop(
    probe: Probe,
    semaphore: Arc<Semaphore>,
    admission: Arc<Semaphore>,
    steady: Option<(
        tokio::runtime::Handle,
        Arc<std::sync::Mutex<Option<tokio::task::AbortHandle>>>,
    )>,
) {
    let Some((runtime, slot)) = steady else {
        probe.checks(&admission, &semaphore, None).await;
        return;
    };
    let Some(tracker) = probe.checks(&admission, &semaphore, Some(1)).await else {
        return;
    };
    // no await between spawning and storing: an abort cannot fall in between
    let rest = runtime.spawn(async move {
        probe.resume(tracker, &semaphore).await;
    });
    if let Ok(mut g) = slot.lock() {
        *g = Some(rest.abort_handle());
    };
}

/// One instance's checks.
struct Probe {
    service: Arc<str>,
    key: Arc<str>,
    state: Arc<InstanceState>,
    target: Target,
    table: SharedTable,
}

impl Probe {
    /// Checks at once, then every `interval` (minus jitter) measured from the start of the
    /// previous check; the first check takes an `admission` permit, the others `steady` ones.
    /// Stops after `limit` checks (returning the tracker) or never.
    async fn checks(
        &self,
        admission: &Semaphore,
        steady: &Semaphore,
        limit: Option<usize>,
    ) -> Option<Tracker> {
        let tracker = Tracker::new(&self.target.spec);
        self.run(tracker, Some(admission), steady, limit, false)
            .await
    }

    /// Continues after `checks(.., Some(n))`: waits one interval first.
    async fn resume(&self, tracker: Tracker, steady: &Semaphore) {
        self.run(tracker, None, steady, None, true).await;
    }

    async fn run(
        &self,
        mut tracker: Tracker,
        mut first_permits: Option<&Semaphore>,
        steady: &Semaphore,
        limit: Option<usize>,
        wait_first: bool,
    ) -> Option<Tracker> {
        let (service, key, state, spec) =
            (&self.service, &self.key, &self.state, &self.target.spec);
        let check = match self.target.build() {
            Ok(c) => c,
            Err(e) => {
                warn!(service = %service, instance = %key, error = %e, "cannot build health check");
                return None;
            }
        };
        let passed = METRICS
            .health_checks
            .with_label_values(&[service, "success"]);
        let failed = METRICS
            .health_checks
            .with_label_values(&[service, "failure"]);
        if wait_first {
            tokio::time::sleep(spec.interval.saturating_sub(jitter(spec))).await;
        }
        let mut done = 0usize;
        loop {
            let started = Instant::now();
            let result = {
                let permits = first_permits.take().unwrap_or(steady);
                let Ok(_permit) = permits.acquire().await else {
                    return None;
                };
                match tokio::time::timeout(spec.timeout, check.check()).await {
                    Ok(r) => r,
                    Err(_) => Err(ProbeError::Timeout(spec.timeout)),
                }
            };
            match &result {
                Ok(()) => passed.inc(),
                Err(_) => failed.inc(),
            }
            state.record_check(crate::routing::CheckRecord {
                at: std::time::SystemTime::now(),
                ok: result.is_ok(),
                detail: match &result {
                    Ok(()) => "ok".to_string(),
                    Err(e) => e.to_string(),
                },
                took: started.elapsed(),
            });
            let current = state.health();
            if let Some(next) = tracker.observe(current, result.is_ok()) {
                if state.transition(current, next) {
                    if next == Health::Healthy {
                        state
                            .connect_failures
                            .store(0, std::sync::atomic::Ordering::Relaxed);
                    }
                    let reason = match &result {
                        Ok(()) => format!("{:?} check passed", spec.protocol).to_lowercase(),
                        Err(e) => e.to_string(),
                    };
                    let snapshot = self.table.load();
                    report_transition(
                        service,
                        snapshot.service(service).map(|s| &**s),
                        key,
                        current,
                        next,
                        &reason,
                    );
                }
            }
            done += 1;
            if limit.is_some_and(|l| done >= l) {
                return Some(tracker);
            }
            tokio::time::sleep_until(started + spec.interval.saturating_sub(jitter(spec))).await;
        }
    }
}

/// A random 0..=jitter shortening of the next wait.
fn jitter(spec: &CheckSpec) -> Duration {
    if spec.jitter.is_zero() {
        Duration::ZERO
    } else {
        Duration::from_millis(rand::thread_rng().gen_range(0..=spec.jitter.as_millis() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{new_shared_table, RoutingTable, ServiceSettings};
    use tokio::net::TcpListener;

    fn spec() -> CheckSpec {
        CheckSpec {
            protocol: Protocol::Tcp,
            path: "/health".into(),
            port: None,
            expected: StatusSet::parse("200-299").unwrap(),
            grpc_service: String::new(),
            interval: Duration::from_millis(1000),
            timeout: Duration::from_millis(1000),
            jitter: Duration::ZERO,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }

    fn config(spec: CheckSpec) -> HealthConfig {
        HealthConfig {
            enabled: true,
            admit_immediately: false,
            max_concurrent: 4,
            default: spec,
            services: BTreeMap::new(),
        }
    }

    fn inst(key: &str, addr: SocketAddr, meta: &[(&str, &str)]) -> Arc<Instance> {
        Arc::new(Instance {
            key: key.into(),
            id: key.into(),
            registered: HostPort {
                host: addr.ip().to_string(),
                port: addr.port(),
            },
            addr,
            weight: 1,
            metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            state: Arc::new(InstanceState::new(Health::Pending)),
        })
    }

    fn publish(table: &SharedTable, services: &[(&str, Vec<Arc<Instance>>)]) {
        let mut t = RoutingTable::default();
        for (name, insts) in services {
            t.services.insert(
                Arc::from(*name),
                Arc::new(Service::new(
                    Arc::from(*name),
                    insts.clone(),
                    0,
                    &ServiceSettings::default(),
                )),
            );
        }
        table.store(Arc::new(t));
    }

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

    #[test]
    fn status_sets_parse_lists_and_ranges() {
        let s = StatusSet::parse("200-204, 301,404").unwrap();
        assert!(s.contains(200) && s.contains(204) && s.contains(301) && s.contains(404));
        assert!(!s.contains(205) && !s.contains(500));
        for bad in ["", "2xx", "300-200", "99", "200-700"] {
            assert!(StatusSet::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn metadata_overrides_the_service_spec() {
        let addr: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let i = inst(
            "/s/a/1",
            addr,
            &[
                ("health_protocol", "http"),
                ("health_path", "/ready"),
                ("health_port", "9000"),
                ("health_interval_ms", "50"),
                ("health_timeout_ms", "nope"),
            ],
        );
        let mut base = spec();
        base.jitter = Duration::from_millis(100);
        let (t, errors) = Target::for_instance(&i, &base);
        assert_eq!(t.spec.protocol, Protocol::Http);
        assert_eq!(t.spec.path, "/ready");
        assert_eq!(t.addr.to_string(), "127.0.0.1:9000");
        assert_eq!(t.host, "127.0.0.1:9000");
        assert_eq!(t.spec.interval, Duration::from_millis(50));
        assert!(t.spec.jitter <= Duration::from_millis(25));
        assert_eq!(t.spec.timeout, base.timeout);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("health_timeout_ms"));
    }

    #[test]
    fn passive_failures_eject_and_success_resets() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let i = inst("/s/p/1", addr, &[]);
        i.state.set_health(Health::Healthy);
        let settings = ServiceSettings {
            passive_failures: 2,
            ..Default::default()
        };
        let svc = Service::new("p".into(), vec![i.clone()], 0, &settings);
        passive_failure(&svc, &i, &"refused");
        passive_success(&i.state);
        passive_failure(&svc, &i, &"refused");
        assert_eq!(i.state.health(), Health::Healthy, "the counter was reset");
        passive_failure(&svc, &i, &"refused");
        assert_eq!(i.state.health(), Health::Unhealthy);
        // disabled
        let j = inst("/s/p/2", addr, &[]);
        j.state.set_health(Health::Healthy);
        let svc = Service::new("p".into(), vec![j.clone()], 0, &ServiceSettings::default());
        for _ in 0..10 {
            passive_failure(&svc, &j, &"refused");
        }
        assert_eq!(j.state.health(), Health::Healthy);
    }

    async fn wait_for(state: &InstanceState, want: Health) {
        for _ in 0..200 {
            if state.health() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("health stayed {:?}, wanted {want:?}", state.health());
    }

    #[tokio::test]
    async fn first_check_is_immediate_and_failures_eject() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let table = new_shared_table();
        let mut s = spec();
        s.healthy_threshold = 1;
        s.unhealthy_threshold = 2;
        s.interval = Duration::from_millis(100);
        let (tx, rx) = watch::channel(0u64);
        let mut checker = HealthChecker::new(table.clone(), config(s), rx);
        let i = inst("/s/a/1", addr, &[]);
        publish(&table, &[("a", vec![i.clone()])]);
        let started = std::time::Instant::now();
        checker.reconcile();
        wait_for(&i.state, Health::Healthy).await;
        assert!(
            started.elapsed() < Duration::from_millis(90),
            "first check was not immediate: {:?}",
            started.elapsed()
        );
        drop(listener);
        wait_for(&i.state, Health::Unhealthy).await;
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn probe_tasks_follow_keys_and_state_survives_weight_changes() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let table = new_shared_table();
        let (_tx, rx) = watch::channel(0u64);
        let mut s = spec();
        s.protocol = Protocol::None;
        s.healthy_threshold = 1;
        let mut checker = HealthChecker::new(table.clone(), config(s), rx);
        let a = inst("/s/a/1", addr, &[]);
        let b = inst("/s/a/2", addr, &[]);
        let c = inst("/s/c/1", addr, &[]);
        publish(
            &table,
            &[("a", vec![a.clone(), b.clone()]), ("c", vec![c.clone()])],
        );
        checker.reconcile();
        assert_eq!(checker.probed(), 3);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let handle_a = checker.probes["/s/a/1"].handle.id();
        // weight change: same key, same state, new Instance value -> same task
        let a2 = Arc::new(Instance {
            key: a.key.clone(),
            id: a.id.clone(),
            registered: a.registered.clone(),
            addr,
            weight: 5,
            metadata: Default::default(),
            state: a.state.clone(),
        });
        publish(&table, &[("a", vec![a2]), ("c", vec![c.clone()])]);
        checker.reconcile();
        assert_eq!(checker.probed(), 2, "b's probe stopped");
        assert_eq!(checker.probes["/s/a/1"].handle.id(), handle_a);
        assert_eq!(a.state.health(), Health::Healthy);
        // service c disappears entirely
        publish(&table, &[("a", vec![a.clone()])]);
        checker.reconcile();
        assert_eq!(checker.probed(), 1);
        assert!(!checker.probes.contains_key("/s/c/1"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_target_fails_by_timeout() {
        // accepts (the kernel does) and never answers
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let table = new_shared_table();
        let (_tx, rx) = watch::channel(0u64);
        let mut s = spec();
        s.protocol = Protocol::Http;
        s.timeout = Duration::from_millis(300);
        s.interval = Duration::from_millis(500);
        let mut checker = HealthChecker::new(table.clone(), config(s), rx);
        let i = inst("/s/h/1", addr, &[]);
        i.state.set_health(Health::Healthy);
        publish(&table, &[("h", vec![i.clone()])]);
        checker.reconcile();
        // unhealthy_threshold 3: checks at 0, 500, 1000 ms each time out after 300 ms
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(i.state.health(), Health::Healthy);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(i.state.health(), Health::Unhealthy);
        drop(listener);
    }
}

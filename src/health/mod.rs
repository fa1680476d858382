//! Health: active probes, passive detection, and the scheduler that flips instance health.
//!
//! ```text
//! registry ──generation──▶ HealthChecker::reconcile (changed services only)
//!                              │ one compact entry per instance key (same key + state + target: kept)
//!                              ▼
//!                          Schedule: new entries ──▶ urgent queue (first checks, newest batch first)
//!                                    checked ones ──▶ deadline heap (start + interval - jitter)
//!                              │ one task: at most max_concurrent checks running, the last
//!                              │ max_concurrent/8 slots only for first checks
//!                              ├──▶ first checks: the admission thread (own runtime; a pass with
//!                              │    healthy_threshold 1 admits there), connection handed back
//!                              ▼
//!                          probe::check (HTTP keeps its connection) ──▶ Tracker (thresholds)
//!                              ──▶ InstanceState::transition (atomic)
//! proxy: connect failures ──▶ passive_failure ─────────────────▶ InstanceState::transition
//! ```
//!
//! Health lives in the instance's [`InstanceState`] (atomics shared with the request path), so
//! nothing here takes a lock the proxy also takes. A deregistered key's entry is dropped on the
//! next registry generation, with its kept connection; a check of it still running is ignored
//! when it ends. Nothing exists per instance but its entry: no task, no timer, and one shared
//! [`CheckSpec`] per service.
//!
//! Per-instance overrides come from registration metadata: `health_protocol` (`http`, `https`,
//! `tcp`, `grpc`, `none`), `health_path`, `health_port`, `health_grpc_service`,
//! `health_expected_statuses`, `health_interval_ms`, `health_timeout_ms`,
//! `health_healthy_threshold`, `health_unhealthy_threshold`.

pub mod https;
pub mod probe;
pub mod schedule;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::Either;
use futures::{FutureExt, StreamExt};
use rand::Rng;
use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::metrics::{HealthCounters, METRICS};
use crate::registry::codec::HostPort;
use crate::routing::{Health, Instance, InstanceState, RoutingTable, Service, SharedTable};
pub use probe::{
    Conn, GrpcHealthCheck, HealthCheck, HttpHealthCheck, NoHealthCheck, ProbeError, TcpHealthCheck,
};
use schedule::{Id, Schedule};

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
    /// `GET path` over TLS (as the proxy reaches `https`/`h2` instances), healthy on an expected
    /// status.
    Https,
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
            "https" => Ok(Protocol::Https),
            "none" => Ok(Protocol::None),
            other => Err(format!(
                "{other:?} is not one of http, https, tcp, grpc, none"
            )),
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
    /// Each wait is shortened by a random 0..=jitter, so checks spread out (default 100 ms); the
    /// wait after the first check by up to interval/2 (unless jitter is 0).
    pub jitter: Duration,
    /// Consecutive passes that admit a pending or unhealthy instance (default 1).
    pub healthy_threshold: u32,
    /// Consecutive failures that eject a healthy instance (default 2).
    pub unhealthy_threshold: u32,
    /// TLS of `https` checks: the service's upstream TLS (`None`: the system roots).
    pub tls: Option<TlsSettings>,
}

/// The upstream TLS settings an HTTPS check verifies with (equal when they are the same ones).
#[derive(Debug, Clone)]
pub struct TlsSettings(pub Arc<crate::upstream::ClientTls>);

impl PartialEq for TlsSettings {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for TlsSettings {}

/// Validated `[health]` configuration.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// false: no active checks, no passive ejection, new instances are healthy at once.
    pub enabled: bool,
    /// New instances take traffic before their first check passes.
    pub admit_immediately: bool,
    /// Checks running at the same time, at most (default 256); steady checks leave
    /// `max_concurrent / 8` (at most 64) of them to first checks of new instances.
    pub max_concurrent: usize,
    /// HTTP checks keep their connection for the next check when the response allows it
    /// (default true).
    pub reuse_connection: bool,
    /// Kept-alive check connections at most; above it checks use one-shot connections.
    /// `None` (default): half the open-file limit (`RLIMIT_NOFILE`).
    pub max_idle_connections: Option<usize>,
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

/// What one instance's checks go to: the service's spec (shared; a copy only for an instance
/// whose metadata overrides it) and the address to probe. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub spec: Arc<CheckSpec>,
    pub addr: SocketAddr,
    /// Host header for HTTP checks when it is not `addr` itself (an instance registered by
    /// DNS name).
    pub host: Option<Box<str>>,
}

impl Target {
    /// Resolves `inst`'s target; invalid metadata values are reported and ignored.
    pub fn for_instance(inst: &Instance, base: &Arc<CheckSpec>) -> (Target, Vec<String>) {
        let mut errors = Vec::new();
        let by_protocol = by_protocol(inst, base);
        let spec = if inst.metadata.keys().any(|k| k.starts_with("health_")) {
            let mut spec = Self::override_spec(inst, base, &mut errors);
            if let (Some(p), false) = (by_protocol, inst.metadata.contains_key("health_protocol")) {
                spec.protocol = p;
            }
            Arc::new(spec)
        } else if let Some(p) = by_protocol {
            Arc::new(CheckSpec {
                protocol: p,
                ..(**base).clone()
            })
        } else {
            base.clone()
        };
        let port = spec.port.unwrap_or(inst.addr.port());
        let addr = SocketAddr::new(inst.addr.ip(), port);
        let host = HostPort {
            host: inst.registered_host().into_owned(),
            port,
        }
        .to_string();
        let target = Target {
            host: (host != addr.to_string()).then(|| host.into_boxed_str()),
            addr,
            spec,
        };
        (target, errors)
    }

    /// The Host header of HTTP checks.
    pub fn host(&self) -> std::borrow::Cow<'_, str> {
        match &self.host {
            Some(h) => std::borrow::Cow::Borrowed(h),
            None => std::borrow::Cow::Owned(self.addr.to_string()),
        }
    }

    fn override_spec(inst: &Instance, base: &CheckSpec, errors: &mut Vec<String>) -> CheckSpec {
        let mut spec = base.clone();
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
        if let Some(d) = ms("health_interval_ms", errors) {
            spec.interval = d;
            spec.jitter = spec.jitter.min(d / 2);
        }
        if let Some(d) = ms("health_timeout_ms", errors) {
            spec.timeout = d;
        }
        for (k, threshold) in [
            ("health_healthy_threshold", &mut spec.healthy_threshold),
            ("health_unhealthy_threshold", &mut spec.unhealthy_threshold),
        ] {
            if let Some(v) = meta(k) {
                match v.parse::<u32>() {
                    Ok(n) if (1..=100).contains(&n) => *threshold = n,
                    _ => errors.push(format!("{k}: {v:?} is not 1-100")),
                }
            }
        }
        spec
    }
}

/// The check an instance's registered `protocol` calls for when the service's check is the
/// default HTTP one: gRPC health for `grpc` (a gRPC server answers no HTTP/1.1 check), the HTTP
/// check over TLS for `https`/`h2`.
fn by_protocol(inst: &Instance, base: &CheckSpec) -> Option<Protocol> {
    if base.protocol != Protocol::Http {
        return None;
    }
    match crate::upstream::registered_protocol(inst)? {
        crate::upstream::Protocol::Grpc => Some(Protocol::Grpc),
        crate::upstream::Protocol::Https | crate::upstream::Protocol::H2 => Some(Protocol::Https),
        _ => None,
    }
}

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
    crate::metrics::health_counters(service).transition(to);
    // no receiver (no Consul API) is the common case, not an error
    let _ = TRANSITIONS.send(service.clone());
}

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

/// Moves an instance from `from` to `to` as an active check decided; one that becomes healthy
/// starts its passive failure count over. False if its health was not `from` any more.
fn flip(state: &InstanceState, from: Health, to: Health) -> bool {
    let flipped = state.transition(from, to);
    if flipped && to == Health::Healthy {
        state
            .connect_failures
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }
    flipped
}

/// Share of `max_concurrent` kept for first checks: steady checks never take the last
/// `max_concurrent / 8` (at most 64) slots, so a new instance's check starts at once even when
/// thousands of others are overdue.
fn admission_reserve(max_concurrent: usize) -> usize {
    (max_concurrent / 8).min(64)
}

/// Checks started, and results handled, per turn of the scheduler loop at most: between two
/// turns it looks at the registry again, so admission does not wait for a backlog.
const BATCH: usize = 256;

/// Open files this process may have (soft `RLIMIT_NOFILE`); 1024 if unknown.
fn open_file_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    if ok && limit.rlim_cur != libc::RLIM_INFINITY {
        usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
    } else if ok {
        usize::MAX
    } else {
        1024
    }
}

/// Kept-alive check connections at most: `health.max_idle_connections`, or half the open-file
/// limit when unset (the other half is for clients, upstreams and etcd).
pub fn idle_connection_cap(config: &HealthConfig) -> usize {
    if !config.reuse_connection {
        return 0;
    }
    config
        .max_idle_connections
        .unwrap_or_else(|| open_file_limit() / 2)
}

/// One registered instance in the schedule: at most 96 bytes (a unit test checks), plus a slot
/// in the key map and one in the deadline heap; no task, no timer, nothing per service.
struct Probe {
    /// The instance as of the last snapshot that changed it (its key and state).
    instance: Arc<Instance>,
    /// Its service's result counters, with the service's name.
    counters: Arc<HealthCounters>,
    target: Target,
    tracker: Tracker,
    /// What the last check kept: an idle HTTP connection or a gRPC channel.
    conn: Option<Conn>,
}

/// A finished check, back at the scheduler.
struct Done {
    id: Id,
    started: Instant,
    result: Result<(), ProbeError>,
    conn: Option<Conn>,
    /// The check held one of the `max_idle_connections`.
    counted: bool,
    /// It was the entry's first check.
    first: bool,
    /// The admission thread already moved the instance from pending to healthy.
    admitted: bool,
}

/// The thread that runs the first checks of new instances, on a runtime of its own: there they
/// wait only for their own I/O, not for the scheduler's turns over thousands of steady checks
/// (at 100,000 instances one turn takes milliseconds, and a check needs several). A passing
/// first check admits its instance right there; the scheduler learns the result as from any
/// check, keeps the (parked) connection the check kept, and logs the change. Stops when dropped.
struct Admission {
    handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Admission {
    fn start() -> std::io::Result<Admission> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("health-admission".into())
            .spawn(move || {
                // a dropped sender ends it: the runtime and any check still running go with it
                let _ = rt.block_on(stopped);
            })?;
        Ok(Admission {
            handle,
            _stop: stop,
        })
    }
}

type InFlight = futures::stream::FuturesUnordered<
    std::pin::Pin<Box<dyn std::future::Future<Output = Done> + Send>>,
>;

/// Follows registry generations and checks every registered instance key from one task: a
/// deadline-ordered [`Schedule`] of compact entries, at most `max_concurrent` checks in flight.
/// A check that cannot start on time starts late: intervals stretch, memory does not grow
/// (`switchyard_health_schedule_lag_seconds` shows by how much).
pub struct HealthChecker {
    table: SharedTable,
    config: Arc<HealthConfig>,
    generations: watch::Receiver<u64>,
    /// The snapshot last reconciled: services whose `Arc` did not change since are skipped.
    last: Arc<RoutingTable>,
    /// `config.default`, shared by every service without a spec of its own.
    default_spec: Arc<CheckSpec>,
    /// The specs of services configured with their own, each shared by its instances.
    own_specs: HashMap<String, Arc<CheckSpec>>,
    keys: HashMap<Arc<str>, Id>,
    schedule: Schedule<Probe>,
    running: InFlight,
    /// Run first checks on their own thread ([`Admission`], started by `run`).
    admission_thread: bool,
    admission: Option<Admission>,
    /// Steady checks start only while fewer than this many checks run.
    steady_limit: usize,
    idle_cap: usize,
    /// Kept-alive connections: idle in entries or in use by a running check.
    connections: usize,
}

impl HealthChecker {
    pub fn new(
        table: SharedTable,
        config: HealthConfig,
        generations: watch::Receiver<u64>,
    ) -> HealthChecker {
        let max = config.max_concurrent.max(1);
        let default_spec = Arc::new(config.default.clone());
        let own_specs = (config.services.iter())
            .map(|(name, spec)| (name.clone(), Arc::new(spec.clone())))
            .collect();
        HealthChecker {
            table,
            steady_limit: max - admission_reserve(max),
            idle_cap: idle_connection_cap(&config),
            config: Arc::new(config),
            generations,
            last: Arc::new(RoutingTable::default()),
            default_spec,
            own_specs,
            keys: HashMap::new(),
            schedule: Schedule::default(),
            running: InFlight::new(),
            admission_thread: true,
            admission: None,
            connections: 0,
        }
    }

    /// First checks run on the scheduler's own task, queued with the steady checks' I/O, instead
    /// of on the admission thread (for tests on paused time, which another thread does not see).
    pub fn first_checks_in_task(mut self) -> Self {
        self.admission_thread = false;
        self
    }

    /// Instance keys currently probed.
    pub fn probed(&self) -> usize {
        self.schedule.len()
    }

    /// Checks running right now.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Runs until `shutdown` turns true; running checks end with it.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        info!(
            max_concurrent = self.config.max_concurrent,
            reuse_connection = self.config.reuse_connection,
            max_idle_connections = self.idle_cap,
            "health checker starting"
        );
        if self.admission_thread && self.admission.is_none() {
            match Admission::start() {
                Ok(a) => self.admission = Some(a),
                Err(e) => warn!(error = %e,
                    "cannot start the admission thread: first checks run with the steady ones"),
            }
        }
        let mut registry_alive = true;
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        self.reconcile();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let now = Instant::now();
            let more = self.start_checks(now);
            METRICS.health_checks_running.set(self.running.len() as i64);
            METRICS
                .health_first_checks_queued
                .set(self.schedule.urgent_len() as i64);
            METRICS.health_connections.set(self.connections as i64);
            // wake for the next due check only when there is room to start it; at once when a
            // full batch started and more may be waiting
            let wake = if more {
                Some(now)
            } else if self.running.len() < self.steady_limit {
                self.schedule.next_due()
            } else {
                None
            };
            if let Some(at) = wake {
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                r = self.generations.changed(), if registry_alive => {
                    // registry gone: keep probing what we have until shutdown
                    registry_alive = r.is_ok();
                    self.reconcile();
                }
                Some(done) = self.running.next(), if !self.running.is_empty() => {
                    self.complete(done);
                    for _ in 1..BATCH {
                        match self.running.next().now_or_never() {
                            Some(Some(done)) => self.complete(done),
                            _ => break,
                        }
                    }
                }
                _ = &mut timer, if wake.is_some() => {}
            }
        }
        METRICS.health_checks_running.set(0);
        METRICS.health_first_checks_queued.set(0);
        METRICS.health_connections.set(0);
        info!("health checker stopped");
    }

    /// Starts first checks (any free slot), then due steady checks (below `steady_limit`), one
    /// batch at most; true if the batch was full (more may be startable).
    fn start_checks(&mut self, now: Instant) -> bool {
        let max = self.config.max_concurrent.max(1);
        for _ in 0..BATCH {
            if self.running.len() >= max {
                return false;
            }
            if let Some(id) = self.schedule.pop_urgent() {
                self.start(id, now, true);
                continue;
            }
            if self.running.len() >= self.steady_limit {
                return false;
            }
            match self.schedule.pop_due(now) {
                Some((id, due)) => {
                    METRICS
                        .health_schedule_lag
                        .observe(now.saturating_duration_since(due).as_secs_f64());
                    self.start(id, now, false);
                }
                None => return false,
            }
        }
        true
    }

    fn start(&mut self, id: Id, now: Instant, first: bool) {
        let Some(p) = self.schedule.get_mut(id) else {
            return;
        };
        let conn = p.conn.take();
        let mut counted = matches!(conn, Some(Conn::Http(_)));
        let http = p.target.spec.protocol == Protocol::Http;
        if http && !counted && self.connections < self.idle_cap {
            self.connections += 1;
            counted = true;
        }
        let target = p.target.clone(); // an Arc and an address: nothing to allocate
        let check = match (first, &conn, &self.admission) {
            (true, None, Some(lane)) => {
                let state = p.instance.state.clone();
                let admit = p.tracker.admits_on_first_pass();
                let task = lane.handle.spawn(async move {
                    let (result, conn) = probe::check(&target, None, counted).await;
                    let admitted =
                        admit && result.is_ok() && flip(&state, Health::Pending, Health::Healthy);
                    (result, conn.filter(Conn::portable), admitted)
                });
                Either::Left(async move {
                    let (result, conn, admitted) = task.await.unwrap_or_else(|e| {
                        let e = std::io::Error::other(format!("first check task ended: {e}"));
                        (Err(ProbeError::Io(e)), None, false)
                    });
                    (result, conn, admitted)
                })
            }
            _ => Either::Right(async move {
                let (result, conn) = probe::check(&target, conn, counted).await;
                (result, conn, false)
            }),
        };
        self.running.push(Box::pin(async move {
            let (result, conn, admitted) = check.await;
            Done {
                id,
                started: now,
                result,
                conn,
                counted,
                first,
                admitted,
            }
        }));
    }

    /// Records a result: counters, last check, thresholds, a flip; schedules the next check.
    fn complete(&mut self, done: Done) {
        let Some(p) = self.schedule.get_mut(done.id) else {
            // the key went away (or changed target) while its check ran
            if done.counted {
                self.connections -= 1;
            }
            return;
        };
        match done.conn {
            Some(conn) => p.conn = Some(conn),
            None if done.counted => self.connections -= 1,
            None => {}
        }
        let spec = &p.target.spec;
        let ok = done.result.is_ok();
        p.counters.check(ok);
        p.instance.state.record_check(crate::routing::CheckRecord {
            at: std::time::SystemTime::now(),
            ok,
            detail: match &done.result {
                Ok(()) => "ok".into(),
                Err(e) => e.to_string().into(),
            },
            took: done.started.elapsed(),
        });
        // an instance the admission thread admitted was pending when its check ended
        let current = if done.admitted {
            Health::Pending
        } else {
            p.instance.state.health()
        };
        if let Some(next) = p.tracker.observe(current, ok) {
            if done.admitted || flip(&p.instance.state, current, next) {
                let reason = match &done.result {
                    Ok(()) => format!("{:?} check passed", spec.protocol).to_lowercase(),
                    Err(e) => e.to_string(),
                };
                let (service, key) = (&p.counters.service, &p.instance.key);
                report_transition(service, key, current, next, &reason);
            }
        }
        let due = done.started + spec.interval.saturating_sub(jitter(spec, done.first));
        self.schedule.at(done.id, due);
    }

    /// Brings the schedule in line with the current snapshot. Only services whose `Arc` changed
    /// since the last call are looked at ([`ServiceMap::changes`] skips the shards both snapshots
    /// share, so a registry change costs its own size, not the number of services); the
    /// instances they added are checked first, ahead of every due check.
    ///
    /// [`ServiceMap::changes`]: crate::routing::ServiceMap::changes
    pub fn reconcile(&mut self) {
        let table = self.table.load_full();
        if Arc::ptr_eq(&table, &self.last) {
            return;
        }
        let last = std::mem::replace(&mut self.last, table.clone());
        let mut added = Vec::new();
        if self.schedule.is_empty() {
            // the first snapshot (or the first after all went away): room for all of it at once
            let n = table.instance_count();
            self.schedule.reserve(n);
            self.keys.reserve(n);
            added.reserve(n);
        }
        let mut removed = 0usize;
        for (name, old, now) in table.services.changes(&last.services) {
            let Some(svc) = now else {
                // the service went away entirely
                for i in old.map(|o| &o.instances[..]).unwrap_or_default() {
                    removed += self.remove(&i.key) as usize;
                }
                continue;
            };
            let spec = self.spec_for(name);
            let mut counters = None;
            for inst in &svc.instances {
                if let Some(id) = self.ensure(name, &spec, &mut counters, inst) {
                    added.push(id);
                }
            }
            if let Some(old) = old {
                let now: HashSet<&Arc<str>> = svc.instances.iter().map(|i| &i.key).collect();
                for i in &old.instances {
                    if !now.contains(&i.key) {
                        removed += self.remove(&i.key) as usize;
                    }
                }
            }
        }
        let started = added.len();
        if !added.is_empty() {
            self.schedule.urgent(added);
        }
        if started > 0 || removed > 0 {
            debug!(
                started,
                removed,
                probed = self.schedule.len(),
                "health probes reconciled"
            );
        }
    }

    /// The check spec of service `name`: its own, or the default shared by all the others.
    fn spec_for(&self, name: &str) -> Arc<CheckSpec> {
        self.own_specs
            .get(name)
            .unwrap_or(&self.default_spec)
            .clone()
    }

    /// Makes sure `inst` has an entry for its current state and target; returns the id of a new
    /// one (a new key, a re-registered key with new state, or a new target: the count starts
    /// over, the health stays in the instance's state).
    /// `counters` is the service's, looked up on the first new entry of a reconcile.
    fn ensure(
        &mut self,
        service: &Arc<str>,
        spec: &Arc<CheckSpec>,
        counters: &mut Option<Arc<HealthCounters>>,
        inst: &Arc<Instance>,
    ) -> Option<Id> {
        let (target, errors) = Target::for_instance(inst, spec);
        if let Some(p) = self
            .keys
            .get(&inst.key)
            .and_then(|id| self.schedule.get_mut(*id))
        {
            if Arc::ptr_eq(&p.instance.state, &inst.state) && p.target == target {
                // the same instance in a new value (a weight or metadata change)
                p.instance = inst.clone();
                return None;
            }
        }
        for e in &errors {
            warn!(service = %service, instance = %inst.key, error = %e, "ignoring invalid health metadata");
        }
        self.remove(&inst.key);
        let counters = counters.get_or_insert_with(|| crate::metrics::health_counters(service));
        let id = self.schedule.insert(Probe {
            instance: inst.clone(),
            counters: counters.clone(),
            tracker: Tracker::new(&target.spec),
            target,
            conn: None,
        });
        self.keys.insert(inst.key.clone(), id);
        Some(id)
    }

    /// Drops `key`'s entry and whatever it kept; a check of it still running is ignored.
    fn remove(&mut self, key: &Arc<str>) -> bool {
        let Some(id) = self.keys.remove(key) else {
            return false;
        };
        if let Some(p) = self.schedule.remove(id) {
            if matches!(p.conn, Some(Conn::Http(_))) {
                self.connections -= 1;
            }
        }
        true
    }
}

/// A random shortening of the next wait: 0..=jitter, or after an entry's first check
/// 0..=interval/2. Instances registered together (an initial list of thousands) are first checked
/// in one burst; without the wider spread, every later round would repeat that burst and its
/// CPU peak, which is what new instances' admission then waits behind. No jitter, no spread.
fn jitter(spec: &CheckSpec, first: bool) -> Duration {
    if spec.jitter.is_zero() {
        return Duration::ZERO;
    }
    let max = if first {
        spec.interval / 2
    } else {
        spec.jitter
    };
    Duration::from_millis(rand::thread_rng().gen_range(0..=max.as_millis() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{new_shared_table, RoutingTable, ServiceSettings};
    use tokio::net::TcpListener;

    fn spec() -> CheckSpec {
        CheckSpec {
            tls: None,
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
            reuse_connection: true,
            max_idle_connections: Some(16),
            default: spec,
            services: BTreeMap::new(),
        }
    }

    fn inst(key: &str, addr: SocketAddr, meta: &[(&str, &str)]) -> Arc<Instance> {
        Arc::new(Instance::new(
            key.into(),
            key,
            &HostPort {
                host: addr.ip().to_string(),
                port: addr.port(),
            },
            addr,
            1,
            meta.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            Arc::new(InstanceState::new(Health::Pending)),
        ))
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
        let base = Arc::new(base);
        let (t, errors) = Target::for_instance(&i, &base);
        assert_eq!(t.spec.protocol, Protocol::Http);
        assert_eq!(t.spec.path, "/ready");
        assert_eq!(t.addr.to_string(), "127.0.0.1:9000");
        assert_eq!(t.host(), "127.0.0.1:9000");
        assert_eq!(t.host, None, "an IP registration needs no Host of its own");
        assert_eq!(t.spec.interval, Duration::from_millis(50));
        assert!(t.spec.jitter <= Duration::from_millis(25));
        assert_eq!(t.spec.timeout, base.timeout);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("health_timeout_ms"));
        let named = Instance::new(
            "/s/a/2".into(),
            "2",
            &HostPort {
                host: "localhost".into(),
                port: 8000,
            },
            addr,
            1,
            Default::default(),
            Arc::new(InstanceState::new(Health::Pending)),
        );
        let (t, _) = Target::for_instance(&named, &base);
        assert_eq!(t.host(), "localhost:8000");
    }

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
        assert!(svc.select(&[]).is_none());
        std::thread::sleep(Duration::from_millis(60));
        assert!(i.usable(), "tried again after it");
        assert!(svc.select(&[]).is_some());
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

    #[test]
    fn schedule_entries_stay_compact() {
        let size = std::mem::size_of::<Probe>();
        assert!(size <= 96, "a schedule entry is {size} bytes");
    }

    #[test]
    fn instances_without_health_metadata_share_the_service_spec() {
        let addr: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let base = Arc::new(spec());
        let (plain, _) = Target::for_instance(&inst("/s/a/1", addr, &[("zone", "b")]), &base);
        assert!(Arc::ptr_eq(&plain.spec, &base), "no copy per instance");
        let (own, _) =
            Target::for_instance(&inst("/s/a/2", addr, &[("health_path", "/ready")]), &base);
        assert!(!Arc::ptr_eq(&own.spec, &base));
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

    /// A checker running in the background, told about new snapshots like the registry does.
    struct Background {
        generation: watch::Sender<u64>,
        _shutdown: watch::Sender<bool>,
    }

    impl Background {
        /// `in_task`: first checks on the scheduler's task (paused time), else on their thread.
        fn start(table: &SharedTable, config: HealthConfig, in_task: bool) -> Background {
            let (generation, rx) = watch::channel(0u64);
            let (shutdown, stop) = watch::channel(false);
            let mut checker = HealthChecker::new(table.clone(), config, rx);
            if in_task {
                checker = checker.first_checks_in_task();
            }
            tokio::spawn(checker.run(stop));
            Background {
                generation,
                _shutdown: shutdown,
            }
        }

        fn publish(&self, table: &SharedTable, services: &[(&str, Vec<Arc<Instance>>)]) {
            publish(table, services);
            self.generation.send_modify(|g| *g += 1);
        }
    }

    impl HealthChecker {
        /// One turn by hand: start what may start at `now`, then wait for all of it to end.
        async fn turn(&mut self, now: Instant) -> usize {
            self.start_checks(now);
            let started = self.running.len();
            while let Some(done) = self.running.next().await {
                self.complete(done);
            }
            started
        }
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
        let checker = Background::start(&table, config(s), false);
        let i = inst("/s/a/1", addr, &[]);
        let started = std::time::Instant::now();
        checker.publish(&table, &[("a", vec![i.clone()])]);
        wait_for(&i.state, Health::Healthy).await;
        assert!(
            started.elapsed() < Duration::from_millis(90),
            "first check was not immediate: {:?}",
            started.elapsed()
        );
        drop(listener);
        wait_for(&i.state, Health::Unhealthy).await;
    }

    /// A new instance of a keep-alive HTTP server, published to a checker whose first checks run
    /// on the admission thread. Returns it, the server's connection and request counters, and
    /// the checker (running while it is held).
    async fn admitted_over_http(
        healthy_threshold: u32,
        interval_ms: u64,
    ) -> (
        Arc<Instance>,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<std::sync::atomic::AtomicUsize>,
        Background,
    ) {
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let (addr, conns, reqs) = probe::tests::keep_alive_server(ok, 0).await;
        let table = new_shared_table();
        let mut s = spec();
        s.protocol = Protocol::Http;
        s.healthy_threshold = healthy_threshold;
        s.interval = Duration::from_millis(interval_ms);
        let checker = Background::start(&table, config(s), false);
        let i = inst("/s/a/1", addr, &[]);
        checker.publish(&table, &[("a", vec![i.clone()])]);
        (i, conns, reqs, checker)
    }

    #[tokio::test]
    async fn first_checks_on_their_thread_admit_and_hand_their_connection_over() {
        use std::sync::atomic::Ordering::SeqCst;
        let (i, conns, reqs, _checker) = admitted_over_http(1, 50).await;
        wait_for(&i.state, Health::Healthy).await;
        // the steady checks after it run on the scheduler's runtime, on the same connection
        for _ in 0..200 {
            if reqs.load(SeqCst) >= 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(reqs.load(SeqCst) >= 4, "steady checks did not follow");
        assert_eq!(
            conns.load(SeqCst),
            1,
            "the steady checks should reuse the first check's connection"
        );
        assert_eq!(i.state.health(), Health::Healthy);
    }

    #[tokio::test]
    async fn a_first_pass_on_the_admission_thread_respects_the_healthy_threshold() {
        use std::sync::atomic::Ordering::SeqCst;
        let (i, _conns, reqs, _checker) = admitted_over_http(2, 400).await;
        for _ in 0..200 {
            if reqs.load(SeqCst) >= 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(reqs.load(SeqCst), 1, "the first check should have run");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            i.state.health(),
            Health::Pending,
            "one pass of two must not admit"
        );
        wait_for(&i.state, Health::Healthy).await;
    }

    #[tokio::test(start_paused = true)]
    async fn entries_follow_keys_and_state_survives_weight_changes() {
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
        assert_eq!(checker.turn(Instant::now()).await, 3);
        assert_eq!(a.state.health(), Health::Healthy);
        let id_a = checker.keys["/s/a/1"];
        // weight change: same key, same state, new Instance value -> same entry
        let a2 = Arc::new(Instance::new(
            a.key.clone(),
            a.id(),
            &a.registered(),
            addr,
            5,
            Default::default(),
            a.state.clone(),
        ));
        publish(&table, &[("a", vec![a2]), ("c", vec![c.clone()])]);
        checker.reconcile();
        assert_eq!(checker.probed(), 2, "b's entry is gone");
        assert_eq!(checker.keys["/s/a/1"], id_a);
        assert_eq!(a.state.health(), Health::Healthy);
        // service c disappears entirely, with its shared spec
        publish(&table, &[("a", vec![a.clone()])]);
        checker.reconcile();
        assert_eq!(checker.probed(), 1);
        assert!(!checker.keys.contains_key("/s/c/1"));
        // nothing of b or c is checked again
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(checker.turn(Instant::now()).await, 1);
    }

    #[tokio::test]
    async fn unchanged_services_are_skipped_and_vanished_ones_dropped() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let table = new_shared_table();
        let (_tx, rx) = watch::channel(0u64);
        let mut s = spec();
        s.protocol = Protocol::None;
        let mut cfg = config(s.clone());
        let mut own = s;
        own.interval = Duration::from_millis(123);
        cfg.services.insert("d".into(), own);
        let mut checker = HealthChecker::new(table.clone(), cfg, rx);
        let service = |name: &str, keys: &[&str]| {
            let insts = keys.iter().map(|k| inst(k, addr, &[])).collect();
            Arc::new(Service::new(
                name.into(),
                insts,
                0,
                &ServiceSettings::default(),
            ))
        };
        let store = |services: &[&Arc<Service>]| {
            let mut t = RoutingTable::default();
            for svc in services {
                t.services.insert(svc.name.clone(), Arc::clone(svc));
            }
            table.store(Arc::new(t));
        };
        let a = service("a", &["/s/a/1", "/s/a/2"]);
        let b = service("b", &["/s/b/1"]);
        store(&[&a, &b]);
        checker.reconcile();
        assert_eq!(checker.probed(), 3);
        let id = checker.keys["/s/a/1"];
        // a is the same Arc, b is gone, c is new
        let c = service("c", &["/s/c/1"]);
        store(&[&a, &c]);
        checker.reconcile();
        assert_eq!(checker.probed(), 3);
        assert!(!checker.keys.contains_key("/s/b/1"));
        assert_eq!(checker.keys["/s/a/1"], id);
        // c changes (one instance more), a does not
        let c2 = service("c", &["/s/c/1", "/s/c/2"]);
        let d = service("d", &["/s/d/1", "/s/d/2"]);
        store(&[&a, &c2, &d]);
        checker.reconcile();
        assert_eq!(checker.probed(), 6);
        let spec_of = |key: &str| {
            checker
                .schedule
                .get(checker.keys[key])
                .unwrap()
                .target
                .spec
                .clone()
        };
        assert!(
            Arc::ptr_eq(&spec_of("/s/a/1"), &spec_of("/s/c/2")),
            "services without their own spec share the default"
        );
        let own = spec_of("/s/d/1");
        assert_eq!(
            own.interval,
            Duration::from_millis(123),
            "d has its own spec"
        );
        assert!(
            Arc::ptr_eq(&own, &spec_of("/s/d/2")),
            "shared by d's instances"
        );
        // everything goes
        store(&[]);
        checker.reconcile();
        assert_eq!(checker.probed(), 0);
        assert!(checker.keys.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn new_instances_go_first_and_at_most_max_concurrent_run() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let table = new_shared_table();
        let (_tx, rx) = watch::channel(0u64);
        let mut s = spec();
        s.protocol = Protocol::None;
        s.healthy_threshold = 1;
        let mut c = config(s);
        c.max_concurrent = 16; // 2 kept for first checks
        let mut checker = HealthChecker::new(table.clone(), c, rx);
        let old: Vec<Arc<Instance>> = (0..1000)
            .map(|i| inst(&format!("/s/old/{i:04}"), addr, &[]))
            .collect();
        publish(&table, &[("old", old.clone())]);
        checker.reconcile();
        // the initial list: first checks use every slot
        let mut first = 0;
        while first < old.len() {
            let n = checker.turn(Instant::now()).await;
            assert_eq!(n, 16.min(old.len() - first), "checks running at once");
            first += n;
        }
        assert!(old.iter().all(|i| i.state.health() == Health::Healthy));
        // every old instance is overdue; a new one registers
        tokio::time::sleep(Duration::from_secs(5)).await;
        let marker = std::time::SystemTime::now();
        let new = inst("/s/new/1", addr, &[]);
        publish(&table, &[("old", old.clone()), ("new", vec![new.clone()])]);
        checker.reconcile();
        let now = Instant::now();
        checker.start_checks(now);
        assert_eq!(checker.running(), 14, "steady checks leave 2 slots free");
        while let Some(done) = checker.running.next().await {
            checker.complete(done);
        }
        assert_eq!(
            new.state.health(),
            Health::Healthy,
            "the new instance was checked in the first turn"
        );
        let rechecked = old
            .iter()
            .filter(|i| i.state.last_check().is_some_and(|c| c.at >= marker))
            .count();
        assert_eq!(rechecked, 13, "the rest of the turn went to overdue checks");
        assert_eq!(checker.turn(Instant::now()).await, 14);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_target_fails_by_timeout() {
        // accepts (the kernel does) and never answers
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let table = new_shared_table();
        let mut s = spec();
        s.protocol = Protocol::Http;
        s.timeout = Duration::from_millis(300);
        s.interval = Duration::from_millis(500);
        let checker = Background::start(&table, config(s), true);
        let i = inst("/s/h/1", addr, &[]);
        i.state.set_health(Health::Healthy);
        checker.publish(&table, &[("h", vec![i.clone()])]);
        // unhealthy_threshold 3: checks at 0, 500, 1000 ms each time out after 300 ms
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(i.state.health(), Health::Healthy);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(i.state.health(), Health::Unhealthy);
        drop(listener);
    }
}

//! The routing snapshot: everything a request needs, behind one `ArcSwap`.
//!
//! A [`RoutingTable`] is immutable once published. The registry builds a new one for every applied
//! change and swaps it in whole; a request does one `load()` and sees a consistent table.
//! [`Instance`]s are shared between snapshots through their [`InstanceState`], which is keyed by the
//! instance's etcd key and therefore survives rebuilds, weight and metadata changes.

mod address;
pub(crate) mod budget;
pub(crate) mod hash;
pub(crate) mod outlier;
pub(crate) mod route;
pub(crate) mod select;
pub(crate) mod services;
pub(crate) mod traffic;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Deserialize;

use crate::clock::clock_ms;
use crate::sync::lock;
pub use address::HostPort;
pub use route::{RouteMatch, Router};
pub use select::{Eligible, Pick, Policy, Selector};
pub use services::ServiceMap;
pub use traffic::TrafficSettings;

/// Every value [`Instance::state_label`] takes (the `state` label of the instance gauges).
pub const INSTANCE_STATES: [&str; 5] = ["healthy", "unhealthy", "pending", "draining", "ejected"];

/// Health of an instance, stored in an atomic inside [`InstanceState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Registered, not yet probed; gets no traffic while admission is gated.
    Pending = 0,
    Healthy = 1,
    Unhealthy = 2,
}

impl Health {
    fn from_u8(v: u8) -> Health {
        match v {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Pending,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Pending => "pending",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// Identity-stable state of one instance (one etcd key). Shared by every snapshot that contains
/// the key, and by the health checker.
#[derive(Debug)]
pub struct InstanceState {
    health: AtomicU8,
    /// Requests currently being proxied to this instance.
    pub inflight: AtomicUsize,
    /// Requests sent to this instance since it was registered.
    pub requests: AtomicU64,
    /// Consecutive connection failures seen by the proxy (passive detection).
    pub connect_failures: AtomicU64,
    /// Result of the most recent active health check (None before the first). Written by the
    /// health checker, read by the admin API; never touched on the request path.
    pub last_check: std::sync::Mutex<Option<CheckRecord>>,
    /// Passively ejected with no active check to bring it back: from this time on ([`clock_ms`](crate::clock::clock_ms))
    /// it takes requests again, on trial. 0: not ejected that way.
    readmit_at: AtomicU64,
    /// Peak-EWMA of the time to the first response byte, in microseconds (0: no sample yet), and
    /// when it was last updated ([`clock_ms`](crate::clock::clock_ms)): the latency half of `p2c_ewma`'s cost.
    latency_us: AtomicU64,
    latency_at: AtomicU64,
    /// When it last became usable ([`clock_ms`]; 0: never): the start of its slow start.
    admitted_at: AtomicU64,
    /// Outlier detection on its answers ([`outlier`]).
    pub outlier: outlier::OutlierState,
}

/// How fast an old latency sample is forgotten (peak-EWMA's decay time, as linkerd's default).
const LATENCY_DECAY_MS: f64 = 10_000.0;

/// One active health check result, for operators.
#[derive(Debug, Clone)]
pub struct CheckRecord {
    pub at: std::time::SystemTime,
    pub ok: bool,
    /// "ok" or why it failed (borrowed for "ok": no allocation per passing check).
    pub detail: std::borrow::Cow<'static, str>,
    pub took: std::time::Duration,
}

impl InstanceState {
    pub fn new(initial: Health) -> Self {
        InstanceState {
            health: AtomicU8::new(initial as u8),
            inflight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            last_check: std::sync::Mutex::new(None),
            readmit_at: AtomicU64::new(0),
            latency_us: AtomicU64::new(0),
            latency_at: AtomicU64::new(0),
            admitted_at: AtomicU64::new(if initial == Health::Healthy {
                clock_ms()
            } else {
                0
            }),
            outlier: outlier::OutlierState::default(),
        }
    }

    /// It became usable now (admitted, healthy again, back from an ejection): its slow start
    /// begins.
    pub fn mark_admitted(&self) {
        self.admitted_at.store(clock_ms(), Ordering::Relaxed);
    }

    /// When it last became usable ([`clock_ms`]; 0: never).
    #[inline]
    pub fn admitted_at(&self) -> u64 {
        self.admitted_at.load(Ordering::Relaxed)
    }

    /// Records one request's time to its first response byte (peak-EWMA, as linkerd and Finagle:
    /// a slower sample is taken at once, a faster one pulls the average down with a weight that
    /// grows with the time since the last sample). Racing updates may lose one sample; no lock.
    pub fn observe_latency(&self, rtt: std::time::Duration) {
        let sample = (rtt.as_micros() as u64).max(1);
        let now = clock_ms();
        let prev = self.latency_us.load(Ordering::Relaxed);
        let at = self.latency_at.swap(now, Ordering::Relaxed);
        let next = if prev == 0 || sample > prev {
            sample
        } else {
            let w = (-(now.saturating_sub(at) as f64) / LATENCY_DECAY_MS).exp();
            (prev as f64 * w + sample as f64 * (1.0 - w)) as u64
        };
        self.latency_us.store(next.max(1), Ordering::Relaxed);
    }

    /// The current latency estimate in microseconds (0: never measured).
    pub fn latency_us(&self) -> u64 {
        self.latency_us.load(Ordering::Relaxed)
    }

    /// The estimate as of `now` ([`clock_ms`]): decayed towards 0 with the time since its last
    /// sample (as linkerd's peak-EWMA), so an instance that was slow once and got no request since
    /// is tried again in time instead of never (a slow instance's estimate of 50 ms costs as much
    /// as a 1 ms one after about 40 s without samples).
    pub fn latency_us_at(&self, now: u64) -> f64 {
        let estimate = self.latency_us.load(Ordering::Relaxed) as f64;
        let idle = now.saturating_sub(self.latency_at.load(Ordering::Relaxed)) as f64;
        estimate * (-idle / LATENCY_DECAY_MS).exp()
    }

    /// Ejected passively and its cool-down is over: requests may try it again.
    #[inline]
    pub fn cooled_down(&self) -> bool {
        let at = self.readmit_at.load(Ordering::Relaxed);
        at != 0 && clock_ms() >= at
    }

    /// Keeps a passively ejected instance out for `cooldown` from now.
    pub fn cool_down(&self, cooldown: std::time::Duration) {
        let until = clock_ms().saturating_add(cooldown.as_millis() as u64);
        self.readmit_at.store(until, Ordering::Relaxed);
    }

    /// Ends a cool-down; true if there was one.
    pub fn end_cool_down(&self) -> bool {
        self.readmit_at.swap(0, Ordering::Relaxed) != 0
    }

    pub fn record_check(&self, record: CheckRecord) {
        *lock(&self.last_check) = Some(record);
    }

    pub fn last_check(&self) -> Option<CheckRecord> {
        lock(&self.last_check).clone()
    }

    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
    }

    /// Sets the health and returns the previous value.
    pub fn set_health(&self, health: Health) -> Health {
        let prev = Health::from_u8(self.health.swap(health as u8, Ordering::Relaxed));
        if health == Health::Healthy && prev != Health::Healthy {
            self.mark_admitted();
        }
        prev
    }

    /// Sets the health to `new` only if it is `current`; true if it changed. Lets the health
    /// checker and the proxy's passive detection flip the same instance without a lock, and each
    /// flip be reported exactly once.
    pub fn transition(&self, current: Health, new: Health) -> bool {
        let changed = current != new
            && self
                .health
                .compare_exchange(
                    current as u8,
                    new as u8,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if changed && new == Health::Healthy {
            self.mark_admitted();
        }
        changed
    }
}

/// One registered instance as of one snapshot. Kept small (there may be 100,000): the id is a
/// part of the key, and the registered host is only stored when it is not `addr`'s IP.
#[derive(Debug)]
pub struct Instance {
    /// Full etcd key: the instance's identity.
    pub key: Arc<str>,
    /// Where the instance id starts in `key`.
    id_at: u32,
    /// 0 = draining.
    pub weight: u32,
    /// The host as registered when it is a DNS name (or an IP spelled otherwise than `addr`
    /// prints it); `None`: `addr`'s IP.
    host: Option<Box<str>>,
    /// Resolved socket address we connect to.
    pub addr: SocketAddr,
    pub metadata: BTreeMap<String, String>,
    pub state: Arc<InstanceState>,
}

impl Instance {
    /// `id` is the key's last part (the whole key if it is not a suffix of it); `registered` is
    /// the address as written in etcd, `addr` what it resolved to.
    pub fn new(
        key: Arc<str>,
        id: &str,
        registered: &HostPort,
        addr: SocketAddr,
        weight: u32,
        metadata: BTreeMap<String, String>,
        state: Arc<InstanceState>,
    ) -> Instance {
        let id_at = match key.strip_suffix(id) {
            Some(head) if !id.is_empty() => u32::try_from(head.len()).unwrap_or(0),
            _ => 0,
        };
        // an IP spelled as `addr` prints it is the only host that need not be kept
        let host =
            (registered.host != addr.ip().to_string()).then(|| registered.host.as_str().into());
        Instance {
            key,
            id_at,
            weight,
            host,
            addr,
            metadata,
            state,
        }
    }

    /// Instance id (the key's last part).
    pub fn id(&self) -> &str {
        self.key.get(self.id_at as usize..).unwrap_or(&self.key)
    }

    /// Host as registered (IP or DNS name).
    pub fn registered_host(&self) -> std::borrow::Cow<'_, str> {
        match &self.host {
            Some(h) => std::borrow::Cow::Borrowed(h),
            None => std::borrow::Cow::Owned(self.addr.ip().to_string()),
        }
    }

    /// Address as registered (IP or DNS name, and the port).
    pub fn registered(&self) -> HostPort {
        HostPort {
            host: self.registered_host().into_owned(),
            port: self.addr.port(),
        }
    }

    /// Can this instance take a new request? Healthy and not ejected as an outlier, or
    /// (without active checks) passively ejected and past its cool-down.
    #[inline]
    pub fn usable(&self) -> bool {
        self.weight > 0
            && match self.state.health() {
                Health::Healthy => !self.state.outlier.ejected(),
                Health::Unhealthy => self.state.cooled_down(),
                Health::Pending => false,
            }
    }

    pub fn draining(&self) -> bool {
        self.weight == 0
    }

    /// The state operators see: "draining" (weight 0) before health, "ejected" for a healthy
    /// instance ejected as an outlier, else the health.
    pub fn state_label(&self) -> &'static str {
        match self.state.health() {
            _ if self.draining() => "draining",
            Health::Healthy if self.state.outlier.ejected() => "ejected",
            h => h.as_str(),
        }
    }
}

#[cfg(test)]
impl InstanceState {
    /// Sets when it became usable, for slow-start tests.
    pub fn set_admitted_at(&self, ms: u64) {
        self.admitted_at.store(ms, Ordering::Relaxed);
    }
}

#[cfg(test)]
impl Instance {
    /// An instance at 127.0.0.1:1, for unit tests.
    pub fn for_test(key: &str, weight: u32, health: Health) -> Arc<Instance> {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        Arc::new(Instance::new(
            key.into(),
            key,
            &HostPort {
                host: "127.0.0.1".into(),
                port: 1,
            },
            addr,
            weight,
            Default::default(),
            Arc::new(InstanceState::new(health)),
        ))
    }
}

/// What a service does when none of its (non-draining) instances is healthy
/// (config key `health.all_unhealthy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AllUnhealthy {
    /// Answer 503 (default).
    #[default]
    Fail,
    /// Route to every non-draining instance, healthy or not: health checks may be wrong, the
    /// instances may not be.
    FailOpen,
}

/// Per-service settings that the snapshot carries (from config).
#[derive(Debug, Clone, Default)]
pub struct ServiceSettings {
    pub policy: Policy,
    pub all_unhealthy: AllUnhealthy,
    /// Consecutive connection failures that mark an instance unhealthy at once (0 = never).
    pub passive_failures: u64,
    /// Without active checks: how long a passive ejection lasts. None: until a check passes.
    pub passive_cooldown: Option<std::time::Duration>,
    /// Protocol and TLS towards the instances (`[services.<name>] protocol`, `.tls`).
    pub upstream: crate::upstream::UpstreamSettings,
    /// Outlier detection, retries, slow start, panic, hashing, zones.
    pub traffic: Arc<TrafficSettings>,
}

/// One service in one snapshot: its instances and selection state.
#[derive(Debug)]
pub struct Service {
    pub name: Arc<str>,
    /// Instances sorted by key (stable order for selection and display).
    pub instances: Vec<Arc<Instance>>,
    /// Registrations under this service that could not be decoded.
    pub invalid: usize,
    pub selector: Selector,
    pub all_unhealthy: AllUnhealthy,
    /// Consecutive connection failures that mark an instance unhealthy (0 = never).
    pub passive_failures: u64,
    /// How long a passive ejection lasts when no active check will end it.
    pub passive_cooldown: Option<std::time::Duration>,
    /// Protocol and TLS towards the instances.
    pub upstream: crate::upstream::UpstreamSettings,
    /// Outlier detection, retries, slow start, panic, hashing, zones.
    pub traffic: Arc<TrafficSettings>,
    /// Per instance (same order): in the proxy's zone (`proxy.zone`); empty without one.
    local: Box<[bool]>,
    /// Some instance may need more than HTTP/1.1 over TCP (h2c, grpc, https, h2): the native
    /// engine hands requests for this service to the gateway ([`crate::gateway`]).
    pub gateway: bool,
    /// The retry budget's window, resolved on the first retry (kept per name, like metrics).
    budget: std::sync::OnceLock<Arc<budget::BudgetWindow>>,
    /// Request metric handles, resolved on the first request (not at snapshot build, which
    /// would cost every service of a large registry a few label lookups up front).
    metrics: std::sync::OnceLock<Arc<crate::metrics::ServiceMetrics>>,
}

impl Service {
    pub fn new(
        name: Arc<str>,
        mut instances: Vec<Arc<Instance>>,
        invalid: usize,
        settings: &ServiceSettings,
    ) -> Self {
        instances.sort_by(|a, b| a.key.cmp(&b.key));
        let selector = Selector::new(settings.policy, &instances);
        let gateway = crate::upstream::any_needs_gateway(&instances, &settings.upstream);
        let local = match &settings.traffic.zone {
            Some(zone) => (instances.iter())
                .map(|i| i.metadata.get("zone").is_some_and(|z| **z == **zone))
                .collect(),
            None => Box::default(),
        };
        Service {
            name,
            instances,
            invalid,
            selector,
            all_unhealthy: settings.all_unhealthy,
            passive_failures: settings.passive_failures,
            passive_cooldown: settings.passive_cooldown,
            upstream: settings.upstream.clone(),
            traffic: settings.traffic.clone(),
            local,
            gateway,
            metrics: std::sync::OnceLock::new(),
            budget: std::sync::OnceLock::new(),
        }
    }

    /// This service's retry budget window.
    pub fn budget(&self) -> &budget::BudgetWindow {
        self.budget.get_or_init(|| budget::of(&self.name))
    }

    /// This service's request metric handles.
    #[inline]
    pub fn metrics(&self) -> &crate::metrics::ServiceMetrics {
        self.metrics
            .get_or_init(|| crate::metrics::ServiceMetrics::of(&self.name))
    }

    /// Which instances requests may go to now: usable ones; in panic mode (at least one usable
    /// but fewer than `panic_threshold_percent` of the admitted non-draining ones) all of those;
    /// with none usable and `all_unhealthy = "fail_open"`, every non-draining one. The scan
    /// stops as soon as enough are usable (halfway through a healthy service at the default
    /// 50 %), and does not run at all with panic off and fail-open unset.
    #[inline]
    pub fn eligibility(&self) -> Eligible {
        let threshold = self.traffic.panic_threshold_percent.min(100) as usize;
        let fail_open = self.all_unhealthy == AllUnhealthy::FailOpen;
        if threshold == 0 && !fail_open {
            return Eligible::Usable;
        }
        let enough = threshold * self.instances.len();
        let (mut usable, mut admitted) = (0usize, 0usize);
        for i in &self.instances {
            if i.usable() {
                usable += 1;
                if threshold > 0 && usable * 100 >= enough {
                    return Eligible::Usable;
                }
            }
            if !i.draining() && i.state.health() != Health::Pending {
                admitted += 1;
            }
        }
        if usable == 0 {
            if fail_open {
                Eligible::FailOpen
            } else {
                Eligible::Usable
            }
        } else if usable * 100 < threshold * admitted {
            Eligible::Panic
        } else {
            Eligible::Usable
        }
    }

    /// Zone preference holds: the proxy has a zone, and at least `zone_min_usable_percent` of
    /// the (non-draining) instances in it, and at least one, are usable.
    fn prefer_local(&self) -> bool {
        if self.local.is_empty() {
            return false;
        }
        let (mut usable, mut there) = (0usize, 0usize);
        for (i, local) in self.instances.iter().zip(self.local.iter()) {
            if *local && !i.draining() {
                there += 1;
                usable += i.usable() as usize;
            }
        }
        usable > 0 && usable * 100 >= self.traffic.zone_min_usable_percent as usize * there
    }

    /// Picks an instance for a new request, skipping the ones in `exclude` (already tried);
    /// `key` is the request's hash key (policy `hash`).
    pub fn select(&self, exclude: &[Arc<str>], key: Option<u64>) -> Option<Arc<Instance>> {
        let ramp_ms = self.traffic.slow_start.as_millis() as u64;
        let mut pick = Pick {
            exclude,
            mode: self.eligibility(),
            ramp_ms,
            now: if ramp_ms > 0 { clock_ms() } else { 0 },
            local: None,
            key,
        };
        if pick.mode == Eligible::Usable && self.prefer_local() {
            pick.local = Some(&self.local);
            if let Some(i) = self.selector.select_with(&self.instances, &pick) {
                return Some(i);
            }
            // every same-zone instance was tried: another zone
            pick.local = None;
        }
        self.selector.select_with(&self.instances, &pick)
    }

    /// The request's key when this service balances by `hash`: `header(name)` gives a header's
    /// values (any case of the name). None for other policies and requests without the key.
    pub fn hash_key<'a>(
        &self,
        header: impl Fn(&str) -> hash::Values<'a>,
        client_ip: &str,
    ) -> Option<u64> {
        match (&self.selector, &self.traffic.hash_on) {
            (Selector::Hash(_), Some(on)) => on.key(header, client_ip),
            _ => None,
        }
    }

    /// Can a request be routed at all (a usable instance, or failing open to a non-draining one)?
    pub fn routable(&self) -> bool {
        self.has_candidate(&[])
    }

    /// Is there an instance, other than those in `exclude`, that [`Service::select`] could pick?
    pub fn has_candidate(&self, exclude: &[Arc<str>]) -> bool {
        let pick = Pick {
            mode: self.eligibility(),
            ..Pick::usable(exclude)
        };
        (self.instances.iter().enumerate()).any(|(idx, i)| pick.eligible(idx, i))
    }

    /// Instances by [`Instance::state_label`], in [`INSTANCE_STATES`] order.
    pub fn state_counts(&self) -> [usize; INSTANCE_STATES.len()] {
        let mut counts = [0; INSTANCE_STATES.len()];
        for i in &self.instances {
            let label = i.state_label();
            if let Some(n) = INSTANCE_STATES.iter().position(|s| *s == label) {
                counts[n] += 1;
            }
        }
        counts
    }

    pub fn usable_count(&self) -> usize {
        self.instances.iter().filter(|i| i.usable()).count()
    }

    /// A short reason why the service has no usable instance, for 503 bodies.
    pub fn unavailable_reason(&self) -> String {
        if self.instances.is_empty() {
            if self.invalid > 0 {
                return format!(
                    "no valid instance registered ({} invalid registration(s))",
                    self.invalid
                );
            }
            return "no instance registered".to_string();
        }
        let draining = self.instances.iter().filter(|i| i.draining()).count();
        let unhealthy = self.instances.len() - draining;
        format!(
            "no usable instance ({} registered: {draining} draining, {unhealthy} not healthy)",
            self.instances.len()
        )
    }
}

/// The immutable routing snapshot.
#[derive(Debug, Default)]
pub struct RoutingTable {
    /// Shared with the snapshots before and after it but for the shards a change wrote to.
    pub services: ServiceMap,
    /// etcd revision this snapshot reflects.
    pub revision: i64,
}

impl RoutingTable {
    #[inline]
    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.get(name)
    }

    pub fn instance_count(&self) -> usize {
        self.services.values().map(|s| s.instances.len()).sum()
    }
}

/// Shared handle to the current snapshot.
pub type SharedTable = Arc<ArcSwap<RoutingTable>>;

pub fn new_shared_table() -> SharedTable {
    Arc::new(ArcSwap::from_pointee(RoutingTable::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(key: &str, id: &str, registered: &str, addr: &str) -> Instance {
        let (host, port) = registered.rsplit_once(':').unwrap();
        let registered = HostPort {
            host: host.trim_start_matches('[').trim_end_matches(']').into(),
            port: port.parse().unwrap(),
        };
        Instance::new(
            key.into(),
            id,
            &registered,
            addr.parse().unwrap(),
            1,
            Default::default(),
            Arc::new(InstanceState::new(Health::Pending)),
        )
    }

    #[test]
    fn an_instance_keeps_its_id_and_registered_address_without_copies() {
        let ip = instance("/s/a/i-1", "i-1", "10.0.0.7:80", "10.0.0.7:80");
        assert_eq!(
            (ip.id(), ip.registered().to_string()),
            ("i-1", "10.0.0.7:80".into())
        );
        assert!(ip.host.is_none(), "an IP registration stores no host");
        let v6 = instance("/s/a/x/y", "x/y", "[::1]:80", "[::1]:80");
        assert_eq!(
            (v6.id(), v6.registered().to_string()),
            ("x/y", "[::1]:80".into())
        );
        assert!(v6.host.is_none());
        let dns = instance("/s/a/1", "1", "backend.test:8080", "127.0.0.9:8080");
        assert_eq!(dns.registered().to_string(), "backend.test:8080");
        assert_eq!(dns.registered_host(), "backend.test");
        // another spelling of the same IP is shown as registered
        let long = instance("/s/a/1", "1", "[0:0:0:0:0:0:0:1]:80", "[::1]:80");
        assert_eq!(long.registered().to_string(), "[0:0:0:0:0:0:0:1]:80");
        // an id that is not the key's end: the whole key
        assert_eq!(
            instance("/s/a/1", "2", "10.0.0.7:80", "10.0.0.7:80").id(),
            "/s/a/1"
        );
    }
}

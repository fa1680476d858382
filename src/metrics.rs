//! Every metric family switchyard exports, registered once in the default `prometheus` registry
//! (the one `pingora-prometheus` and pingora's own metrics use, so one scrape gets them all).
//!
//! Label values come only from the registry (service names) and fixed sets (code classes, states):
//! requests for services that do not exist are counted under `service="(unknown)"`, never under a
//! name the client sent.
//!
//! The per-service families are not `prometheus` children but written at scrape time
//! ([`gather_text`]): a child costs about 520 bytes (it carries its own copy of the family's
//! description and its label pairs), so 10,000 services × 4 instance states × … cost 30 MiB, and
//! a service's request series (seven counters, two histograms) cost 5.6 KiB.
//! - `switchyard_requests_total{service,code}`, `switchyard_retries_total{service}`,
//!   `switchyard_request_duration_seconds{service}` and
//!   `switchyard_upstream_response_seconds{service}`, `switchyard_retry_budget_exhausted_total{service}`
//!   and `switchyard_outlier_ejections_total{service,reason}` are atomics in a [`ServiceMetrics`]
//!   per service that has served a request (about 450 bytes);
//! - `switchyard_upstream_instances{service,state}` is counted from the routing snapshot being
//!   served (the admin endpoint counts it and hands the samples to [`gather_text`]), so it is
//!   never stale and costs nothing between scrapes;
//! - `switchyard_health_checks_total{service,result}` and
//!   `switchyard_health_transitions_total{service,state}` are atomics in a [`HealthCounters`] per
//!   service (48 bytes), kept for the life of the process like the other per-service counters.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use prometheus::{
    register_histogram, register_histogram_vec, register_int_counter, register_int_gauge,
    register_int_gauge_vec, Histogram, HistogramVec, IntCounter, IntGauge, IntGaugeVec,
};

use crate::sync::lock;

/// Label used for requests that matched no known service.
pub const UNKNOWN_SERVICE: &str = "(unknown)";

pub struct Metrics {
    pub client_connections: IntGaugeVec,
    pub client_connections_refused: IntCounter,
    pub local_errors: IntCounter,
    /// `switchyard_gateway_connections{protocol}`: client connections served by the gateway.
    pub gateway_connections: IntGaugeVec,
    pub tls_handshake_failures: IntCounter,
    pub health_checks_running: IntGauge,
    pub health_first_checks_queued: IntGauge,
    pub health_connections: IntGauge,
    pub health_schedule_lag: Histogram,
    pub registry_connected: IntGauge,
    pub registry_revision: IntGauge,
    pub registry_events: IntCounter,
    pub registry_invalid: IntCounter,
    pub registry_invalid_current: IntGauge,
    pub registry_relists: IntCounter,
    pub registry_reconnects: IntCounter,
    pub registry_last_update: IntGauge,
    pub registry_dns_names: IntGauge,
    pub registry_dns_failing: IntGauge,
    pub registry_dns_failures: IntCounter,
    pub snapshot_updates: IntCounter,
    pub snapshot_apply_seconds: HistogramVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

const APPLY_BUCKETS: &[f64] = &[
    0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5,
];

const LAG_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

// Registration fails only on a duplicate name or invalid label, both programming errors caught by
// the first test that touches METRICS.
fn build() -> Result<Metrics, prometheus::Error> {
    Ok(Metrics {
        client_connections: register_int_gauge_vec!(
            "switchyard_client_connections",
            "Open client connections, by proxy thread (native engine; threads are numbered in the order they got their first connection).",
            &["thread"]
        )?,
        client_connections_refused: register_int_counter!(
            "switchyard_client_connections_refused_total",
            "Client connections answered 503 and closed because proxy.max_client_connections were open."
        )?,
        local_errors: register_int_counter!(
            "switchyard_proxy_local_errors_total",
            "Connections to instances (of requests and of health checks) that failed for a shortage on the proxy's side (open files, memory, local ports): requests are answered 503, checks give no verdict; never counted against the instance."
        )?,
        gateway_connections: register_int_gauge_vec!(
            "switchyard_gateway_connections",
            "Open client connections served by the gateway, by protocol: h2c (HTTP/2 with prior knowledge), h2 (HTTP/2 over TLS), https (HTTP/1.1 over TLS), http (HTTP/1.1 handed over by the native engine for a service with non-HTTP/1.1 instances).",
            &["protocol"]
        )?,
        tls_handshake_failures: register_int_counter!(
            "switchyard_tls_handshake_failures_total",
            "TLS handshakes on the TLS listener that failed or timed out."
        )?,
        health_checks_running: register_int_gauge!(
            "switchyard_health_checks_running",
            "Active health checks in flight (at most health.max_concurrent)."
        )?,
        health_first_checks_queued: register_int_gauge!(
            "switchyard_health_first_checks_queued",
            "New instances waiting for their first health check to start (they take no traffic until it passes)."
        )?,
        health_connections: register_int_gauge!(
            "switchyard_health_connections",
            "Kept-alive HTTP health check connections, idle or in use (at most health.max_idle_connections)."
        )?,
        health_schedule_lag: register_histogram!(
            "switchyard_health_schedule_lag_seconds",
            "How late steady health checks start after they are due (the checker cannot keep up when this grows).",
            LAG_BUCKETS.to_vec()
        )?,
        registry_connected: register_int_gauge!(
            "switchyard_registry_connected",
            "1 while the etcd watch delivers (confirmed after a list), else 0; see /api/registry stale_since."
        )?,
        registry_revision: register_int_gauge!(
            "switchyard_registry_revision",
            "etcd revision of the routing snapshot in use."
        )?,
        registry_events: register_int_counter!(
            "switchyard_registry_events_total",
            "etcd watch events received."
        )?,
        registry_invalid: register_int_counter!(
            "switchyard_registry_invalid_entries_total",
            "Registrations skipped because their key or value was invalid."
        )?,
        registry_invalid_current: register_int_gauge!(
            "switchyard_registry_invalid_entries",
            "Invalid registrations currently in etcd."
        )?,
        registry_relists: register_int_counter!(
            "switchyard_registry_relists_total",
            "Full lists of the prefix (start, every reconnect, compaction, resync)."
        )?,
        registry_reconnects: register_int_counter!(
            "switchyard_registry_reconnects_total",
            "Times the etcd watch was re-established after an error."
        )?,
        registry_last_update: register_int_gauge!(
            "switchyard_registry_last_update_timestamp_seconds",
            "Unix time of the last routing snapshot update."
        )?,
        registry_dns_names: register_int_gauge!(
            "switchyard_registry_dns_names",
            "DNS names used by registrations (resolved off the registry task, every etcd.dns_refresh_ms)."
        )?,
        registry_dns_failing: register_int_gauge!(
            "switchyard_registry_dns_failing_names",
            "Registered DNS names whose last lookup failed (instances keep their last good address)."
        )?,
        registry_dns_failures: register_int_counter!(
            "switchyard_registry_dns_lookup_failures_total",
            "Lookups of registered DNS names that failed or timed out."
        )?,
        snapshot_updates: register_int_counter!(
            "switchyard_snapshot_updates_total",
            "Routing snapshots published."
        )?,
        snapshot_apply_seconds: register_histogram_vec!(
            "switchyard_snapshot_apply_seconds",
            "Time to apply one registry update and publish the snapshot, by kind (list, watch).",
            &["kind"],
            APPLY_BUCKETS.to_vec()
        )?,
    })
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| match build() {
    Ok(m) => m,
    Err(e) => panic!("metric registration failed (a programming error): {e}"),
});

/// The code classes of `switchyard_requests_total`, in [`class_index`] order.
pub const CODE_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

/// The `reason` label of `switchyard_outlier_ejections_total`, in the order of
/// [`ServiceMetrics::ejections`].
pub const EJECTION_REASONS: [&str; 3] = ["consecutive_5xx", "gateway_errors", "success_rate"];

/// Index of a status in [`CODE_CLASSES`].
#[inline]
pub fn class_index(status: u16) -> usize {
    match status {
        100..=599 => (status / 100 - 1) as usize,
        _ => 5,
    }
}

/// A counter written at scrape time.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram over [`LATENCY_BUCKETS`], written at scrape time.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations per bucket, not cumulative; the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    #[inline]
    pub fn observe(&self, seconds: f64) {
        // the first bucket whose bound is at least the value (a bucket counts values <= its bound)
        let i = LATENCY_BUCKETS.partition_point(|b| *b < seconds);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = (seconds.max(0.0) * 1e9) as u64;
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Cumulative counts per bound (`+Inf` last) and the sum in seconds.
    fn snapshot(&self) -> ([u64; LATENCY_BUCKETS.len() + 1], f64) {
        let mut counts = [0; LATENCY_BUCKETS.len() + 1];
        let mut total = 0;
        for (c, b) in counts.iter_mut().zip(&self.buckets) {
            total += b.load(Ordering::Relaxed);
            *c = total;
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        (counts, sum)
    }
}

/// One service's request metrics: atomics, written at scrape time. Made on the service's first
/// request and kept for the life of the process (counters must not go back), shared by every
/// snapshot's copy of the service.
#[derive(Debug, Default)]
pub struct ServiceMetrics {
    requests: [Counter; 6],
    pub duration: LatencyHistogram,
    pub upstream: LatencyHistogram,
    pub retries: Counter,
    /// Retries the retry budget refused.
    pub budget_exhausted: Counter,
    /// Outlier ejections, by reason in [`EJECTION_REASONS`] order.
    pub ejections: [Counter; 3],
}

/// Per-service values kept for the life of the process (counters must not go back), by name,
/// each made on first use; the map shares the caller's name string.
struct PerService<T>(LazyLock<Mutex<HashMap<Arc<str>, Arc<T>>>>);

impl<T> PerService<T> {
    const fn new() -> Self {
        PerService(LazyLock::new(Default::default))
    }

    fn get_or_make(&self, name: &Arc<str>, make: impl FnOnce() -> T) -> Arc<T> {
        let mut all = lock(&self.0);
        all.entry(name.clone())
            .or_insert_with(|| Arc::new(make()))
            .clone()
    }

    /// Every entry, by name.
    fn sorted(&self) -> Vec<(Arc<str>, Arc<T>)> {
        let mut all: Vec<_> = (lock(&self.0).iter())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

static SERVICE_METRICS: PerService<ServiceMetrics> = PerService::new();

impl ServiceMetrics {
    /// The metrics of `service`, made on first use.
    pub fn of(service: &Arc<str>) -> Arc<ServiceMetrics> {
        SERVICE_METRICS.get_or_make(service, ServiceMetrics::default)
    }

    #[inline]
    pub fn request(&self, status: u16) -> &Counter {
        &self.requests[class_index(status)]
    }

    /// Requests answered so far, every status.
    pub fn answered(&self) -> u64 {
        self.requests.iter().map(Counter::get).sum()
    }
}

/// Metrics for requests that matched no service.
pub static UNKNOWN_METRICS: LazyLock<Arc<ServiceMetrics>> =
    LazyLock::new(|| ServiceMetrics::of(&UNKNOWN_SERVICE.into()));

/// One service's health check results and health flips.
#[derive(Debug)]
pub struct HealthCounters {
    /// The service's name (the same string as the registry's).
    pub service: Arc<str>,
    passed: Counter,
    failed: Counter,
    /// By the new state, in [`HEALTH_STATES`] order.
    became: [Counter; 3],
}

/// The states an instance's health can flip to (the `state` label of the transitions).
pub const HEALTH_STATES: [&str; 3] = ["healthy", "unhealthy", "pending"];

impl HealthCounters {
    pub fn check(&self, ok: bool) {
        let c = if ok { &self.passed } else { &self.failed };
        c.inc();
    }

    /// A flip to `to`, one of [`HEALTH_STATES`].
    pub fn transition(&self, to: &str) {
        if let Some(i) = HEALTH_STATES.iter().position(|s| *s == to) {
            self.became[i].inc();
        }
    }
}

static HEALTH_COUNTERS: PerService<HealthCounters> = PerService::new();

/// The health counters of `service` (made on first use; callers keep the `Arc`). The map and
/// the counters share the caller's name string.
pub fn health_counters(service: &Arc<str>) -> Arc<HealthCounters> {
    HEALTH_COUNTERS.get_or_make(service, || HealthCounters {
        service: service.clone(),
        passed: Counter::default(),
        failed: Counter::default(),
        became: Default::default(),
    })
}

/// One `switchyard_upstream_instances` sample: service, state, instances.
pub type InstanceSample<'a> = (&'a str, &'a str, u64);

/// Prometheus text exposition: everything in the default registry, then the per-service
/// families: `instances` (sorted by service, counted by the caller from the snapshot it
/// serves), the health counters and the request counters (see the module comment).
pub fn gather_text<'a>(instances: impl IntoIterator<Item = InstanceSample<'a>>) -> Vec<u8> {
    use prometheus::Encoder;
    LazyLock::force(&METRICS);
    let mut buf = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&prometheus::gather(), &mut buf) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    let mut text = String::from_utf8(buf).unwrap_or_default();
    write_service_families(&mut text, instances);
    write_request_families(&mut text);
    text.into_bytes()
}

fn write_service_families<'a>(
    out: &mut String,
    instances: impl IntoIterator<Item = InstanceSample<'a>>,
) {
    family(
        out,
        "switchyard_upstream_instances",
        "gauge",
        "Registered instances by service and state (healthy, unhealthy, pending, draining, ejected: healthy but out as an outlier).",
    );
    for (name, state, n) in instances {
        sample(
            out,
            "switchyard_upstream_instances",
            name,
            Some(("state", state)),
            n,
        );
    }

    let health = HEALTH_COUNTERS.sorted();
    labelled_counters(
        out,
        "switchyard_health_checks_total",
        "Active health check results, by service and result (success, failure).",
        "result",
        &health,
        |c| [("success", c.passed.get()), ("failure", c.failed.get())],
    );
    labelled_counters(
        out,
        "switchyard_health_transitions_total",
        "Instance health changes, by service and new state.",
        "state",
        &health,
        |c| {
            let states = HEALTH_STATES.into_iter();
            states.zip(c.became.iter().map(Counter::get))
        },
    );
}

/// The request families of every service that has served a request: counters only where
/// non-zero, both histograms in full.
fn write_request_families(out: &mut String) {
    let all = SERVICE_METRICS.sorted();
    labelled_counters(
        out,
        "switchyard_requests_total",
        "Requests answered, by service and status code class (2xx..5xx).",
        "code",
        &all,
        |m| {
            let counts = m.requests.iter().map(Counter::get);
            CODE_CLASSES.into_iter().zip(counts)
        },
    );
    let retries = "switchyard_retries_total";
    family(
        out,
        retries,
        "counter",
        "Requests tried again on another instance (connect failures, replays, retry_on), by service.",
    );
    for (name, m) in &all {
        if m.retries.get() > 0 {
            sample(out, retries, name, None, m.retries.get());
        }
    }
    let exhausted = "switchyard_retry_budget_exhausted_total";
    family(
        out,
        exhausted,
        "counter",
        "Retries not made because the service's retry budget was spent, by service.",
    );
    for (name, m) in &all {
        if m.budget_exhausted.get() > 0 {
            sample(out, exhausted, name, None, m.budget_exhausted.get());
        }
    }
    labelled_counters(
        out,
        "switchyard_outlier_ejections_total",
        "Instances ejected by outlier detection, by service and reason.",
        "reason",
        &all,
        |m| {
            let counts = m.ejections.iter().map(Counter::get);
            EJECTION_REASONS.into_iter().zip(counts)
        },
    );
    for (family_name, help, pick) in [
        (
            "switchyard_request_duration_seconds",
            "Time from request start to the end of the response, by service.",
            (|m: &ServiceMetrics| &m.duration) as fn(&ServiceMetrics) -> &LatencyHistogram,
        ),
        (
            "switchyard_upstream_response_seconds",
            "Time from sending the request to an instance to its response header, by service.",
            |m: &ServiceMetrics| &m.upstream,
        ),
    ] {
        family(out, family_name, "histogram", help);
        for (name, m) in &all {
            let (counts, sum) = pick(m).snapshot();
            let service = escaped(name);
            for (bound, n) in LATENCY_BUCKETS.iter().zip(&counts) {
                let _ = writeln!(
                    out,
                    "{family_name}_bucket{{service=\"{service}\",le=\"{bound}\"}} {n}"
                );
            }
            let total = counts[LATENCY_BUCKETS.len()];
            let _ = writeln!(
                out,
                "{family_name}_bucket{{service=\"{service}\",le=\"+Inf\"}} {total}\n\
                 {family_name}_sum{{service=\"{service}\"}} {sum}\n\
                 {family_name}_count{{service=\"{service}\"}} {total}"
            );
        }
    }
}

/// A label value as the text format wants it.
fn escaped(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 2);
    for ch in value.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
}

/// A counter family with a series per service and value of `label` (from `counts`), leaving out
/// the series still at zero.
fn labelled_counters<'a, T, I>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    all: &'a [(Arc<str>, Arc<T>)],
    counts: impl Fn(&'a T) -> I,
) where
    I: IntoIterator<Item = (&'a str, u64)>,
{
    family(out, name, "counter", help);
    for (service, v) in all {
        for (value, n) in counts(v) {
            if n > 0 {
                sample(out, name, service, Some((label, value)), n);
            }
        }
    }
}

/// One sample with label `service` and maybe one more, in name order as `prometheus` writes
/// them. Service names are `[A-Za-z0-9._-]+` (the registry rejects others), so they need no
/// escaping; this escapes anyway, as the format says.
fn sample(out: &mut String, family: &str, service: &str, label: Option<(&str, &str)>, n: u64) {
    out.push_str(family);
    out.push('{');
    if let Some((label, value)) = label.filter(|(l, _)| *l < "service") {
        let _ = write!(out, "{label}=\"{value}\",");
    }
    let _ = write!(out, "service=\"{}\"", escaped(service));
    if let Some((label, value)) = label.filter(|(l, _)| *l > "service") {
        let _ = write!(out, ",{label}=\"{value}\"");
    }
    let _ = writeln!(out, "}} {n}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_register_and_render() {
        let m = ServiceMetrics::of(&"svc".into());
        assert!(Arc::ptr_eq(&m, &ServiceMetrics::of(&"svc".into())));
        m.request(200).inc();
        m.duration.observe(0.003);
        m.duration.observe(0.0005);
        m.duration.observe(60.0);
        m.ejections[2].inc();
        m.budget_exhausted.inc();
        m.budget_exhausted.inc();
        let instances = [
            ("m-svc", "healthy", 2),
            ("m-svc", "unhealthy", 0),
            ("m-svc", "pending", 1),
            ("m-svc", "draining", 1),
        ];
        let c = health_counters(&"m-svc".into());
        assert!(Arc::ptr_eq(&c, &health_counters(&"m-svc".into())));
        c.check(true);
        c.check(true);
        c.transition("unhealthy");

        let text = String::from_utf8(gather_text(instances)).unwrap();
        assert!(text.contains("switchyard_requests_total{code=\"2xx\",service=\"svc\"} 1"));
        for line in [
            "# TYPE switchyard_requests_total counter\n",
            "# TYPE switchyard_request_duration_seconds histogram\n",
            // a bucket counts values up to and including its bound, cumulatively
            "switchyard_request_duration_seconds_bucket{service=\"svc\",le=\"0.0005\"} 1\n",
            "switchyard_request_duration_seconds_bucket{service=\"svc\",le=\"0.0025\"} 1\n",
            "switchyard_request_duration_seconds_bucket{service=\"svc\",le=\"0.005\"} 2\n",
            "switchyard_request_duration_seconds_bucket{service=\"svc\",le=\"30\"} 2\n",
            "switchyard_request_duration_seconds_bucket{service=\"svc\",le=\"+Inf\"} 3\n",
            "switchyard_request_duration_seconds_sum{service=\"svc\"} 60.0035\n",
            "switchyard_request_duration_seconds_count{service=\"svc\"} 3\n",
            "switchyard_upstream_response_seconds_count{service=\"svc\"} 0\n",
            "switchyard_upstream_instances{service=\"m-svc\",state=\"healthy\"} 2\n",
            "switchyard_upstream_instances{service=\"m-svc\",state=\"unhealthy\"} 0\n",
            "switchyard_upstream_instances{service=\"m-svc\",state=\"pending\"} 1\n",
            "switchyard_upstream_instances{service=\"m-svc\",state=\"draining\"} 1\n",
            "switchyard_health_checks_total{result=\"success\",service=\"m-svc\"} 2\n",
            "switchyard_health_transitions_total{service=\"m-svc\",state=\"unhealthy\"} 1\n",
            "switchyard_outlier_ejections_total{reason=\"success_rate\",service=\"svc\"} 1\n",
            "switchyard_retry_budget_exhausted_total{service=\"svc\"} 2\n",
            "# TYPE switchyard_outlier_ejections_total counter\n",
            "# TYPE switchyard_retry_budget_exhausted_total counter\n",
            "# TYPE switchyard_upstream_instances gauge\n",
            "# TYPE switchyard_health_checks_total counter\n",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // no series for counts that never happened
        assert!(!text.contains("code=\"5xx\",service=\"svc\""));
        assert!(!text.contains("reason=\"consecutive_5xx\",service=\"svc\""));
        assert!(!text.contains("result=\"failure\",service=\"m-svc\""));
        assert!(!text.contains("service=\"m-svc\",state=\"healthy\"} 0"));
        assert!(text.contains("switchyard_registry_connected"));
        for (status, class) in [
            (0, "other"),
            (99, "other"),
            (100, "1xx"),
            (204, "2xx"),
            (302, "3xx"),
            (404, "4xx"),
            (503, "5xx"),
            (599, "5xx"),
            (600, "other"),
            (999, "other"),
        ] {
            assert_eq!(CODE_CLASSES[class_index(status)], class, "{status}");
        }
    }
}

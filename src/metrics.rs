//! Every metric family switchyard exports, registered once in the default `prometheus` registry
//! (the one `pingora-prometheus` and pingora's own metrics use, so one scrape gets them all).
//!
//! Label values come only from the registry (service names) and fixed sets (code classes, states):
//! requests for services that do not exist are counted under `service="(unknown)"`, never under a
//! name the client sent.

use std::sync::LazyLock;

use prometheus::{
    register_histogram, register_histogram_vec, register_int_counter, register_int_counter_vec,
    register_int_gauge, register_int_gauge_vec, Histogram, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec,
};

/// Label used for requests that matched no known service.
pub const UNKNOWN_SERVICE: &str = "(unknown)";

pub struct Metrics {
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_response: HistogramVec,
    pub retries: IntCounterVec,
    pub client_connections: IntGaugeVec,
    pub upstream_instances: IntGaugeVec,
    pub health_checks: IntCounterVec,
    pub health_transitions: IntCounterVec,
    pub health_checks_running: IntGauge,
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
        requests: register_int_counter_vec!(
            "switchyard_requests_total",
            "Requests answered, by service and status code class (2xx..5xx).",
            &["service", "code"]
        )?,
        request_duration: register_histogram_vec!(
            "switchyard_request_duration_seconds",
            "Time from request start to the end of the response, by service.",
            &["service"],
            LATENCY_BUCKETS.to_vec()
        )?,
        upstream_response: register_histogram_vec!(
            "switchyard_upstream_response_seconds",
            "Time from sending the request to an instance to its response header, by service.",
            &["service"],
            LATENCY_BUCKETS.to_vec()
        )?,
        retries: register_int_counter_vec!(
            "switchyard_retries_total",
            "Requests tried again on another instance after a connection failure, by service.",
            &["service"]
        )?,
        client_connections: register_int_gauge_vec!(
            "switchyard_client_connections",
            "Open client connections, by proxy thread (native engine; threads are numbered in the order they got their first connection).",
            &["thread"]
        )?,
        upstream_instances: register_int_gauge_vec!(
            "switchyard_upstream_instances",
            "Registered instances by service and state (healthy, unhealthy, pending, draining).",
            &["service", "state"]
        )?,
        health_checks: register_int_counter_vec!(
            "switchyard_health_checks_total",
            "Active health check results, by service and result (success, failure).",
            &["service", "result"]
        )?,
        health_transitions: register_int_counter_vec!(
            "switchyard_health_transitions_total",
            "Instance health changes, by service and new state.",
            &["service", "state"]
        )?,
        health_checks_running: register_int_gauge!(
            "switchyard_health_checks_running",
            "Active health checks in flight (at most health.max_concurrent)."
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
            "1 while the etcd watch is established, else 0."
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
            "Full lists of the prefix (start, compaction, resync, etcd reset)."
        )?,
        registry_reconnects: register_int_counter!(
            "switchyard_registry_reconnects_total",
            "Times the etcd watch was re-established after an error."
        )?,
        registry_last_update: register_int_gauge!(
            "switchyard_registry_last_update_timestamp_seconds",
            "Unix time of the last routing snapshot update."
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

/// Index of a status in [`CODE_CLASSES`].
#[inline]
pub fn class_index(status: u16) -> usize {
    match status {
        100..=599 => (status / 100 - 1) as usize,
        _ => 5,
    }
}

/// One service's request metric handles, resolved once: `with_label_values` hashes the labels
/// and takes a lock, which the request path should not pay three times per request.
pub struct ServiceMetrics {
    requests: [IntCounter; 6],
    pub duration: Histogram,
    pub upstream: Histogram,
    pub retries: IntCounter,
}

impl std::fmt::Debug for ServiceMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServiceMetrics")
    }
}

impl ServiceMetrics {
    pub fn new(service: &str) -> ServiceMetrics {
        let m = &*METRICS;
        ServiceMetrics {
            requests: CODE_CLASSES.map(|c| m.requests.with_label_values(&[service, c])),
            duration: m.request_duration.with_label_values(&[service]),
            upstream: m.upstream_response.with_label_values(&[service]),
            retries: m.retries.with_label_values(&[service]),
        }
    }

    #[inline]
    pub fn request(&self, status: u16) -> &IntCounter {
        &self.requests[class_index(status)]
    }
}

/// Handles for requests that matched no service.
pub static UNKNOWN_METRICS: LazyLock<ServiceMetrics> =
    LazyLock::new(|| ServiceMetrics::new(UNKNOWN_SERVICE));

/// Status code class label: "2xx" .. "5xx", or "other".
pub fn code_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// Prometheus text exposition of everything in the default registry.
pub fn gather_text() -> Vec<u8> {
    use prometheus::Encoder;
    LazyLock::force(&METRICS);
    let mut buf = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&prometheus::gather(), &mut buf) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_register_and_render() {
        METRICS.requests.with_label_values(&["svc", "2xx"]).inc();
        let text = String::from_utf8(gather_text()).unwrap();
        assert!(text.contains("switchyard_requests_total{code=\"2xx\",service=\"svc\"} 1"));
        assert!(text.contains("switchyard_registry_connected"));
        assert_eq!(code_class(503), "5xx");
        for status in [0, 99, 100, 204, 302, 404, 503, 599, 600, 999] {
            assert_eq!(
                CODE_CLASSES[class_index(status)],
                code_class(status),
                "{status}"
            );
        }
    }
}

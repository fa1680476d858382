//! What a request path shares whatever the protocol: the routing decision ([`route_request`]:
//! request → service, or our own 404/503), the in-flight count the shutdown drain waits for,
//! request metrics and the access log. The HTTP/1.1 path is [`crate::engine`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tracing::info;

use crate::metrics::UNKNOWN_METRICS;
use crate::routing::route::strip_path;
use crate::routing::{Instance, RouteMatch, Router, RoutingTable, Service};

/// Requests currently being handled by the proxy (from context creation to its drop); the
/// shutdown drain waits for this to reach zero.
pub static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Counts one request in [`IN_FLIGHT`] while it lives.
pub struct InFlight(());

impl InFlight {
    pub fn new() -> InFlight {
        IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
        InFlight(())
    }
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight::new()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What to do with a request, decided from the snapshot (shared by every request path).
pub enum Outcome {
    /// Proxy to an instance of `service`; `rewrite` is the new path and query when a prefix was
    /// stripped.
    Proxy {
        service: Arc<Service>,
        rewrite: Option<String>,
    },
    /// Answer ourselves (404, 503). `label`/`service`: what the request is counted under.
    Answer {
        status: u16,
        body: String,
        label: Option<Arc<str>>,
        service: Option<Arc<Service>>,
    },
}

/// Routes a request: 404 for no matching service, 503 for a service without a usable instance.
pub fn route_request(
    router: &Router,
    table: &RoutingTable,
    host: Option<&str>,
    path: &str,
) -> Outcome {
    let (name, strip, explicit) = match router.route(table, host, path) {
        RouteMatch::Explicit { service, strip } => (service, strip, true),
        RouteMatch::Implicit { service, strip } => (service, strip, false),
        RouteMatch::Unknown { name } => {
            let shown: String = name.chars().take(64).collect();
            let body = if shown.is_empty() {
                "switchyard: no service matches this request (use Host: <service> or /<service>/...)\n".to_string()
            } else {
                format!("switchyard: unknown service {shown:?}\n")
            };
            return Outcome::Answer {
                status: 404,
                body,
                label: None,
                service: None,
            };
        }
    };
    let Some(service) = table.service(&name).cloned() else {
        // only explicit routes can name a service the table lacks
        debug_assert!(explicit);
        return Outcome::Answer {
            status: 503,
            body: format!("switchyard: service {name:?} has no instance registered\n"),
            label: Some(name),
            service: None,
        };
    };
    if !service.routable() {
        let reason = service.unavailable_reason();
        return Outcome::Answer {
            status: 503,
            body: format!("switchyard: service {name:?}: {reason}\n"),
            label: Some(name),
            service: Some(service),
        };
    }
    let rewrite = (strip > 0).then(|| strip_path(path, strip));
    Outcome::Proxy { service, rewrite }
}

/// One finished request, as the access log shows it (shared by every request path).
struct AccessLine<'a> {
    pub service: &'a str,
    pub instance: Option<&'a Instance>,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub elapsed: std::time::Duration,
    pub tries: usize,
    pub error: &'a str,
}

/// Writes one access-log line (target `switchyard::access`).
fn access_line(a: &AccessLine<'_>) {
    info!(
        target: "switchyard::access",
        service = %a.service,
        instance = a.instance.map(|i| i.addr.to_string()).unwrap_or_default(),
        method = %a.method,
        path = %a.path,
        status = a.status,
        duration_ms = a.elapsed.as_secs_f64() * 1000.0,
        tries = a.tries,
        error = a.error,
        "request"
    );
}

/// One finished request, as every request path reports it.
pub struct Finished<'a> {
    pub service: Option<&'a Arc<Service>>,
    /// The explicit route's service name when the service has nothing registered.
    pub label: Option<&'a str>,
    pub instance: Option<&'a Instance>,
    /// Method and path, when the access log is on.
    pub log: Option<&'a (String, String)>,
    pub status: u16,
    pub elapsed: std::time::Duration,
    pub tries: usize,
    pub error: &'a str,
}

/// Ends a request: counts it ([`record_request`]) and, with the access log on, logs it under its
/// service, its route's label, or the unknown-service label.
pub fn finish_request(f: &Finished<'_>) {
    record_request(f.service, f.label, f.status, f.elapsed);
    if let Some((method, path)) = f.log {
        let name = f
            .service
            .map(|s| &*s.name)
            .or(f.label)
            .unwrap_or(crate::metrics::UNKNOWN_SERVICE);
        access_line(&AccessLine {
            service: name,
            instance: f.instance,
            method,
            path,
            status: f.status,
            elapsed: f.elapsed,
            tries: f.tries,
            error: f.error,
        });
    }
}

/// Counts a finished request in the metrics: under its service, the label of an explicit route
/// to a service with nothing registered, or the unknown-service label.
pub fn record_request(
    service: Option<&Arc<Service>>,
    label: Option<&str>,
    status: u16,
    elapsed: std::time::Duration,
) {
    match (service, label) {
        (Some(svc), _) => {
            let m = svc.metrics();
            m.request(status).inc();
            m.duration.observe(elapsed.as_secs_f64());
        }
        // rare: look the service's metrics up by name
        (None, Some(label)) => {
            let m = crate::metrics::ServiceMetrics::of(&label.into());
            m.request(status).inc();
            m.duration.observe(elapsed.as_secs_f64());
        }
        (None, None) => {
            UNKNOWN_METRICS.request(status).inc();
            UNKNOWN_METRICS.duration.observe(elapsed.as_secs_f64());
        }
    }
}

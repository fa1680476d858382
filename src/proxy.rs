//! The pingora `ProxyHttp` implementation: request → service → instance → peer.
//!
//! - `request_filter` routes the request against the current snapshot (one `load()`, kept in the
//!   request context) and answers 404/503 itself;
//! - `upstream_peer` selects an instance not yet tried by this request;
//! - `fail_to_connect` retries a connection failure on another instance: nothing reached the
//!   upstream, so this is safe for every method; repeated failures eject the instance
//!   ([`crate::health::passive_failure`]), a response resets the count;
//! - `error_while_proxy` retries an idempotent request whose connection closed before any
//!   response header (the instance died mid-request) on another instance;
//! - `fail_to_proxy` turns the final error into 502/504 with a body naming the service;
//! - `logging` records metrics and the optional access log.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::{Error, ErrorSource, ErrorType};
use smallvec::SmallVec;
use tracing::info;

use crate::config::ProxyConfig;
use crate::metrics::{UNKNOWN_METRICS, UNKNOWN_SERVICE};
use crate::routing::route::strip_path;
use crate::routing::{
    Instance, InstanceState, RouteMatch, Router, RoutingTable, Service, SharedTable,
};

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

/// What to do with a request, decided from the snapshot (shared by both engines).
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

/// One finished request, as the access log shows it (shared by both engines).
pub struct AccessLine<'a> {
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
pub fn access_line(a: &AccessLine<'_>) {
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

/// Everything the proxy needs, shared by all requests.
pub struct SwitchyardProxy {
    pub table: SharedTable,
    pub router: Router,
    pub cfg: ProxyConfig,
    pub access_log: bool,
}

/// Per-request state.
pub struct Ctx {
    start: Instant,
    service: Option<Arc<Service>>,
    /// Service label for metrics (registry name or UNKNOWN_SERVICE).
    label: Option<Arc<str>>,
    /// New path and query for the upstream, when a prefix was stripped.
    rewrite: Option<String>,
    instance: Option<Arc<Instance>>,
    /// Keys of instances this request already tried (inline: no allocation per request).
    tried: SmallVec<[Arc<str>; 4]>,
    /// In-flight accounting for the instance currently in use.
    inflight: Option<Arc<InstanceState>>,
    upstream_start: Option<Instant>,
    /// Status we answered ourselves (404/503/502/504), for logging.
    own_status: Option<u16>,
    /// The client's IP address, looked up once per downstream connection.
    client_ip: Option<Arc<str>>,
    _in_flight: InFlight,
}

impl Ctx {
    fn release_inflight(&mut self) {
        if let Some(st) = self.inflight.take() {
            st.inflight.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn service_name(&self) -> &str {
        self.label.as_deref().unwrap_or(UNKNOWN_SERVICE)
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        self.release_inflight();
    }
}

async fn respond(session: &mut Session, status: u16, body: String) -> Result<()> {
    let body = Bytes::from(body);
    let mut resp = ResponseHeader::build(status, Some(3))?;
    resp.insert_header("content-type", "text/plain; charset=utf-8")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    // Keep the client connection for the next request unless an unread request body is still on
    // it (our own answers never read the body).
    if !session.is_body_empty() {
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

fn request_host(req: &RequestHeader) -> Option<&str> {
    req.headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.host())
}

#[async_trait]
impl ProxyHttp for SwitchyardProxy {
    type CTX = Ctx;

    /// No downstream modules: pingora's default adds a (disabled) response compression module
    /// whose per-request context and filter calls cost every request something.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            service: None,
            label: None,
            rewrite: None,
            instance: None,
            tried: SmallVec::new(),
            inflight: None,
            upstream_start: None,
            own_status: None,
            client_ip: None,
            _in_flight: InFlight::new(),
        }
    }

    fn persist_connection_context(
        &self,
        _session: &Session,
        ctx: &Ctx,
    ) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        ctx.client_ip
            .clone()
            .map(|ip| Box::new(ip) as Box<dyn std::any::Any + Send + Sync>)
    }

    fn on_connection_reuse(
        &self,
        _session: &mut Session,
        ctx: &mut Ctx,
        prev: Box<dyn std::any::Any + Send + Sync>,
    ) {
        if let Ok(ip) = prev.downcast::<Arc<str>>() {
            ctx.client_ip = Some(*ip);
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        session.set_read_timeout(Some(self.cfg.downstream_read_timeout));
        let table = self.table.load();
        let req = session.req_header();
        let path = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        match route_request(&self.router, &table, request_host(req), path) {
            Outcome::Proxy { service, rewrite } => {
                ctx.rewrite = rewrite;
                ctx.label = Some(service.name.clone());
                ctx.service = Some(service);
                Ok(false)
            }
            Outcome::Answer {
                status,
                body,
                label,
                service,
            } => {
                ctx.own_status = Some(status);
                ctx.label = label;
                ctx.service = service;
                respond(session, status, body).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.release_inflight();
        let Some(service) = ctx.service.clone() else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "upstream_peer called without a routed service",
            ));
        };
        let Some(instance) = service.select(&ctx.tried) else {
            let status = if ctx.tried.is_empty() { 503 } else { 502 };
            return Err(Error::explain(
                ErrorType::HTTPStatus(status),
                format!("no usable instance left after {} tries", ctx.tried.len()),
            ));
        };
        if !ctx.tried.is_empty() {
            service.metrics().retries.inc();
        }
        ctx.tried.push(instance.key.clone());
        instance.state.inflight.fetch_add(1, Ordering::Relaxed);
        instance.state.requests.fetch_add(1, Ordering::Relaxed);
        ctx.inflight = Some(instance.state.clone());
        let mut peer = HttpPeer::new(instance.addr, false, String::new());
        let o = &mut peer.options;
        o.connection_timeout = Some(self.cfg.connect_timeout);
        o.total_connection_timeout = Some(self.cfg.connect_timeout);
        o.read_timeout = Some(self.cfg.read_timeout);
        o.write_timeout = Some(self.cfg.write_timeout);
        o.idle_timeout = Some(self.cfg.idle_timeout);
        ctx.instance = Some(instance);
        ctx.upstream_start = Some(Instant::now());
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let (Some(svc), Some(inst)) = (&ctx.service, &ctx.instance) {
            crate::health::passive_failure(svc, inst, &e);
        }
        // Nothing reached the instance: safe to retry on another one for any method.
        let has_other = ctx
            .service
            .as_ref()
            .is_some_and(|s| s.has_candidate(&ctx.tried));
        e.set_retry(ctx.tried.len() < self.cfg.max_tries && has_other);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
            return e;
        }
        // pingora retries a connection that closed before the response header only if it was
        // reused. An instance that dies (kill -9) mid-request closes fresh connections too: an
        // idempotent request that got no response header yet goes to another instance.
        let no_response_yet = ctx.upstream_start.is_some();
        let has_other = ctx.tried.len() < self.cfg.max_tries
            && ctx
                .service
                .as_ref()
                .is_some_and(|s| s.has_candidate(&ctx.tried));
        e.retry
            .decide_reuse(client_reused || (no_response_yet && has_other));
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(path) = &ctx.rewrite {
            let uri: http::Uri = path.parse().map_err(|e| {
                Error::because(
                    ErrorType::InternalError,
                    "rewritten path is not a valid uri",
                    e,
                )
            })?;
            upstream.set_uri(uri);
        }
        if ctx.client_ip.is_none() {
            // once per connection: later requests on it get it from the previous request's
            // context (persist_connection_context), saving a getpeername(2) per request
            ctx.client_ip = session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| Arc::from(a.ip().to_string()));
        }
        if let Some(ip) = ctx.client_ip.as_deref() {
            let xff = match upstream
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
                _ => ip.to_string(),
            };
            upstream.insert_header("x-forwarded-for", xff)?;
        }
        upstream.insert_header("x-forwarded-proto", "http")?;
        if let Some(host) = session
            .req_header()
            .headers
            .get(http::header::HOST)
            .cloned()
        {
            upstream.insert_header("x-forwarded-host", host)?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        _upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let (Some(inst), Some(svc)) = (&ctx.instance, &ctx.service) {
            crate::health::passive_success(svc, inst);
        }
        if let (Some(start), Some(svc)) = (ctx.upstream_start.take(), ctx.service.as_ref()) {
            svc.metrics()
                .upstream
                .observe(start.elapsed().as_secs_f64());
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let service = ctx.service_name().to_string();
        let (code, reason) = match e.etype() {
            ErrorType::HTTPStatus(code) => {
                (*code, e.context.as_ref().map(|c| c.as_str().to_string()))
            }
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if e.esource() == &ErrorSource::Upstream =>
            {
                (504, Some("upstream timed out".to_string()))
            }
            ErrorType::ConnectTimedout => (
                502,
                Some(format!(
                    "connecting to the upstream timed out after {} tries",
                    ctx.tried.len()
                )),
            ),
            _ => match e.esource() {
                ErrorSource::Upstream => (
                    502,
                    Some(format!(
                        "upstream error after {} tries: {}",
                        ctx.tried.len(),
                        e.etype().as_str()
                    )),
                ),
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                        (0, None)
                    }
                    ErrorType::ReadTimedout => (408, Some("request read timed out".to_string())),
                    _ => (400, Some("bad request".to_string())),
                },
                ErrorSource::Internal | ErrorSource::Unset => {
                    (500, Some("internal error".to_string()))
                }
            },
        };
        ctx.own_status = Some(code);
        if code == 504 {
            // An instance that accepts but never answers (frozen, overloaded) counts towards
            // passive ejection like a refused connection, so it leaves rotation before its next
            // active checks notice.
            if let (Some(svc), Some(inst)) = (&ctx.service, &ctx.instance) {
                crate::health::passive_failure(svc, inst, e);
            }
        }
        if code >= 500 {
            let instance = ctx.instance.as_ref().map(|i| i.addr.to_string());
            crate::events::RECENT.record(
                "upstream",
                format!(
                    "service {service:?}: {code} {} (last instance {})",
                    reason.as_deref().unwrap_or(""),
                    instance.as_deref().unwrap_or("none")
                ),
            );
        }
        if code > 0 && session.response_written().is_none() {
            let body = match reason {
                Some(r) => format!("switchyard: service {service:?}: {r}\n"),
                None => format!("switchyard: service {service:?}: error {code}\n"),
            };
            if let Err(err) = respond(session, code, body).await {
                tracing::debug!(error = %err, "could not send error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        ctx.release_inflight();
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .or(ctx.own_status)
            .unwrap_or(0);
        let elapsed = ctx.start.elapsed();
        record_request(ctx.service.as_ref(), ctx.label.as_deref(), status, elapsed);
        if self.access_log {
            let req = session.req_header();
            access_line(&AccessLine {
                service: ctx.service_name(),
                instance: ctx.instance.as_deref(),
                method: req.method.as_str(),
                path: req.uri.path(),
                status,
                elapsed,
                tries: ctx.tried.len(),
                error: e.map(|e| e.etype().as_str()).unwrap_or(""),
            });
        }
    }
}

//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/api/services[/<name>]` and a status
//! page at `/`. Kept off the proxy port (default `127.0.0.1:9090`).

mod page;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde::Serialize;
use serde_json::{json, Value};

use crate::clock::unix_ms;
use crate::metrics::gather_text;
use crate::registry::RegistryStatus;
use crate::routing::{Instance, Service, SharedTable, INSTANCE_STATES};

pub struct AdminApp {
    pub table: SharedTable,
    pub status: Arc<RegistryStatus>,
    pub started: Instant,
    pub etcd_endpoints: Vec<String>,
    pub prefix: String,
    /// The proxy listener: `/readyz` says ready only once it has accepted a connection (pingora
    /// binds it on another thread, and the admin listener may answer first). `None`: no check.
    pub proxy: Option<ProxyListener>,
}

/// Whether the proxy listener accepts connections yet, found out once.
#[derive(Debug)]
pub struct ProxyListener {
    /// Where a client on this host reaches it (a wildcard listen address means loopback).
    addr: SocketAddr,
    accepting: AtomicBool,
}

impl ProxyListener {
    pub fn new(listen: SocketAddr) -> ProxyListener {
        let ip = match listen.ip() {
            std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
            ip => ip,
        };
        ProxyListener {
            addr: SocketAddr::new(ip, listen.port()),
            accepting: AtomicBool::new(false),
        }
    }

    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::Relaxed)
    }

    /// Connects once (and closes) unless a connection already succeeded.
    async fn confirm(&self) {
        if self.accepting() {
            return;
        }
        let connect = tokio::net::TcpStream::connect(self.addr);
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), connect).await {
            self.accepting.store(true, Ordering::Relaxed);
        }
    }
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    let len = resp.body().len();
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    resp
}

/// JSON: compact, or indented when the query has `pretty` (as Consul's API does). At 100,000
/// instances the indented `/api/services` is twice the size.
fn json_reply(status: u16, v: &impl Serialize, pretty: bool) -> Response<Vec<u8>> {
    let mut body = Vec::new();
    let written = if pretty {
        serde_json::to_writer_pretty(&mut body, v)
    } else {
        serde_json::to_writer(&mut body, v)
    };
    if let Err(e) = written {
        tracing::warn!(error = %e, "encoding JSON failed");
        body.clear();
        body.extend_from_slice(b"{\"error\":\"encoding failed\"}");
    }
    body.push(b'\n');
    reply(status, "application/json", body)
}

// The API's JSON is written straight from the snapshot by these views (fields in name order, as
// before): no `serde_json::Value` tree, which at 100,000 instances was over 100 MB of small
// allocations for one request.

/// One instance as the API shows it.
#[derive(Serialize)]
struct InstanceView<'a> {
    addr: SocketAddr,
    connect_failures: u64,
    health: &'static str,
    id: &'a str,
    inflight: usize,
    key: &'a str,
    last_check: Option<CheckView>,
    metadata: &'a BTreeMap<String, String>,
    /// The current outlier ejection, if any.
    outlier: Option<EjectionView>,
    registered_addr: String,
    requests: u64,
    /// During its slow start: the share of its weight it gets now (10-99); else null.
    slow_start_percent: Option<u64>,
    state: &'static str,
    weight: u32,
}

#[derive(Serialize)]
struct EjectionView {
    detail: String,
    /// How many ejections count for its length (the n-th lasts n × the base time).
    ejections: u32,
    reason: &'static str,
    remaining_ms: u64,
}

#[derive(Serialize)]
struct CheckView {
    at_unix_ms: u64,
    detail: Cow<'static, str>,
    ok: bool,
    took_ms: f64,
}

impl<'a> InstanceView<'a> {
    fn new(i: &'a Instance, slow_start: std::time::Duration) -> Self {
        let pick = crate::routing::Pick {
            ramp_ms: slow_start.as_millis() as u64,
            now: crate::clock::clock_ms(),
            ..crate::routing::Pick::usable(&[])
        };
        let full = i.weight as u64 * 1000;
        let ramped = pick.weight(i);
        InstanceView {
            addr: i.addr,
            connect_failures: i.state.connect_failures.load(Ordering::Relaxed),
            health: i.state.health().as_str(),
            id: i.id(),
            inflight: i.state.inflight.load(Ordering::Relaxed),
            key: &i.key,
            last_check: i.state.last_check().map(|c| CheckView {
                at_unix_ms: unix_ms(c.at),
                detail: c.detail,
                ok: c.ok,
                took_ms: c.took.as_secs_f64() * 1000.0,
            }),
            metadata: &i.metadata,
            outlier: i.state.outlier.ejection().map(|e| EjectionView {
                remaining_ms: e.until_ms.saturating_sub(crate::clock::clock_ms()),
                detail: e.detail,
                ejections: e.times,
                reason: e.reason.as_str(),
            }),
            registered_addr: i.registered().to_string(),
            requests: i.state.requests.load(Ordering::Relaxed),
            slow_start_percent: (i.usable() && ramped < full).then(|| ramped * 100 / full),
            state: i.state_label(),
            weight: i.weight,
        }
    }
}

/// One service with its instances, each made only while it is written.
struct ServiceView<'a>(&'a Service);

impl Serialize for ServiceView<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let s = self.0;
        let mut st = ser.serialize_struct("Service", 4)?;
        st.serialize_field(
            "instances",
            &Seq(|| {
                s.instances
                    .iter()
                    .map(|i| InstanceView::new(i, s.traffic.slow_start))
            }),
        )?;
        st.serialize_field("invalid_registrations", &s.invalid)?;
        st.serialize_field("name", &*s.name)?;
        st.serialize_field("usable", &s.usable_count())?;
        st.end()
    }
}

/// A JSON array of what `0` yields, made while it is written.
struct Seq<F>(F);

impl<F, I> Serialize for Seq<F>
where
    F: Fn() -> I,
    I: Iterator,
    I::Item: Serialize,
{
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_seq((self.0)())
    }
}

impl AdminApp {
    fn services_view<'a>(&self, services: &'a [&'a Arc<Service>]) -> impl Serialize + 'a {
        #[derive(Serialize)]
        struct ServicesView<V: Serialize> {
            registry: Value,
            services: V,
            uptime_seconds: u64,
        }
        ServicesView {
            registry: self.registry_json(),
            services: Seq(move || services.iter().map(|s| ServiceView(s))),
            uptime_seconds: self.started.elapsed().as_secs(),
        }
    }
}

impl AdminApp {
    pub fn registry_json(&self) -> Value {
        json!({
            "ready": self.status.ready(),
            "connected": self.status.connected(),
            "stale_since": self.status.stale_since().map(crate::registry::rfc3339),
            "stale": self.status.stale_detail(),
            "revision": self.status.revision(),
            "endpoints": self.etcd_endpoints,
            "prefix": self.prefix,
            "last_error": self.status.last_error(),
            "last_update_unix": self.status.last_update().map(|t| unix_ms(t) / 1000),
            "relists": self.status.relists.load(Ordering::Relaxed),
            "reconnects": self.status.reconnects.load(Ordering::Relaxed),
            "dns_failing": self.status.failing_names().into_iter()
                .map(|n| json!({
                    "name": n.name,
                    "since": crate::registry::rfc3339(n.since),
                    "error": n.error,
                    "last_good": n.last_good.map(|ip| ip.to_string()),
                }))
                .collect::<Vec<_>>(),
            "invalid_registrations": self.status.invalid_entries().into_iter()
                .map(|(key, reason)| json!({"key": key, "reason": reason}))
                .collect::<Vec<_>>(),
        })
    }

    /// The exposition, with the instance gauges counted from the snapshot being served.
    fn metrics_text(&self) -> Vec<u8> {
        let table = self.table.load();
        let mut services: Vec<&Arc<Service>> = table.services.values().collect();
        services.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let samples = services.iter().flat_map(|svc| {
            let counts = INSTANCE_STATES.iter().zip(svc.state_counts());
            counts.map(|(state, n)| (&*svc.name, *state, n as u64))
        });
        gather_text(samples)
    }

    fn services_json(&self, pretty: bool) -> Response<Vec<u8>> {
        let table = self.table.load();
        let mut services: Vec<&Arc<Service>> = table.services.values().collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        let view = self.services_view(&services);
        json_reply(200, &view, pretty)
    }

    fn route(&self, path: &str, query: Option<&str>) -> Response<Vec<u8>> {
        let pretty = query_pairs(query).any(|(k, _)| k == "pretty");
        match path {
            "/healthz" => reply(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                let proxy = self.proxy.as_ref().filter(|p| !p.accepting());
                if let (true, Some(p)) = (self.status.ready(), proxy) {
                    let why = format!(
                        "not ready: the proxy listener ({}) does not accept connections yet\n",
                        p.addr
                    );
                    reply(503, "text/plain", why.into_bytes())
                } else if self.status.ready() {
                    // still ready: the last snapshot keeps routing; say that it may lag etcd
                    let body = match self.status.stale_detail() {
                        Some(stale) => format!("ready (registry {stale})\n"),
                        None => "ready\n".to_string(),
                    };
                    reply(200, "text/plain", body.into_bytes())
                } else {
                    let why = match self.status.last_error() {
                        Some(e) => format!("not ready: no complete etcd list yet ({e})\n"),
                        None => "not ready: no complete etcd list yet\n".to_string(),
                    };
                    reply(503, "text/plain", why.into_bytes())
                }
            }
            "/metrics" => reply(200, "text/plain; version=0.0.4", self.metrics_text()),
            "/api/services" => self.services_json(pretty),
            "/api/registry" => json_reply(200, &self.registry_json(), pretty),
            "/api/events" => json_reply(200, &json!(crate::events::RECENT.snapshot()), pretty),
            "/" | "/index.html" => reply(
                200,
                "text/html; charset=utf-8",
                page::render(self, query_param(query, "service")).into_bytes(),
            ),
            p => {
                if let Some(name) = p.strip_prefix("/api/services/") {
                    let table = self.table.load();
                    return match table.service(name) {
                        Some(s) => json_reply(200, &ServiceView(s), pretty),
                        None => json_reply(
                            404,
                            &json!({"error": format!("unknown service {name:?}")}),
                            pretty,
                        ),
                    };
                }
                reply(404, "text/plain", b"not found\n".to_vec())
            }
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let uri = session.req_header().uri.clone();
        if session.req_header().method != http::Method::GET
            && session.req_header().method != http::Method::HEAD
        {
            return reply(405, "text/plain", b"method not allowed\n".to_vec());
        }
        if let (Some(p), "/readyz", true) = (&self.proxy, uri.path(), self.status.ready()) {
            p.confirm().await;
        }
        let response = self.route(uri.path(), uri.query());
        if response.body().len() >= crate::memory::LARGE_BODY {
            // a scrape or listing of a large registry: give its memory back once it is written
            crate::memory::release_after(std::time::Duration::from_millis(500));
        }
        response
    }
}

/// A query string's `key=value` pairs, taken as they are (the admin API's values, service names,
/// need no decoding); a key without `=` has no value.
fn query_pairs(query: Option<&str>) -> impl Iterator<Item = (&str, Option<&str>)> {
    query
        .unwrap_or("")
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (kv, None),
        })
}

/// The value of `name` in a query string.
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query_pairs(query).find_map(|(k, v)| if k == name { v } else { None })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An admin app over an empty snapshot, waiting for `proxy` when given.
    fn app(proxy: Option<ProxyListener>) -> AdminApp {
        AdminApp {
            table: crate::routing::new_shared_table(),
            status: Default::default(),
            started: Instant::now(),
            etcd_endpoints: vec![],
            prefix: "/s/".into(),
            proxy,
        }
    }

    #[tokio::test]
    async fn readyz_waits_until_the_proxy_listener_accepts() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let app = app(Some(ProxyListener::new(
            format!("0.0.0.0:{port}").parse().unwrap(),
        )));
        let readyz = |app: &AdminApp| {
            let r = app.route("/readyz", None);
            (
                r.status().as_u16(),
                String::from_utf8_lossy(r.body()).into_owned(),
            )
        };
        let proxy = app.proxy.as_ref().unwrap();
        assert!(readyz(&app).1.contains("no complete etcd list"));
        app.status.set_ready();
        proxy.confirm().await;
        let (code, body) = readyz(&app);
        assert_eq!(code, 503, "{body}");
        assert!(
            body.contains(&format!("proxy listener (127.0.0.1:{port})")),
            "{body}"
        );
        let _listening = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        proxy.confirm().await;
        assert_eq!(readyz(&app), (200, "ready\n".to_string()));
    }

    #[test]
    fn instance_gauges_are_counted_from_the_snapshot() {
        use crate::routing::{Health, RoutingTable, ServiceSettings};
        let instances = vec![
            Instance::for_test("a", 1, Health::Healthy),
            Instance::for_test("b", 1, Health::Healthy),
            Instance::for_test("c", 1, Health::Pending),
            Instance::for_test("d", 0, Health::Healthy),
        ];
        let mut table = RoutingTable::default();
        let svc = Service::new("g-svc".into(), instances, 0, &ServiceSettings::default());
        table.services.insert("g-svc".into(), Arc::new(svc));
        let app = app(None);
        app.table.store(Arc::new(table));
        let text = String::from_utf8(app.metrics_text()).unwrap();
        for line in [
            "switchyard_upstream_instances{service=\"g-svc\",state=\"healthy\"} 2\n",
            "switchyard_upstream_instances{service=\"g-svc\",state=\"unhealthy\"} 0\n",
            "switchyard_upstream_instances{service=\"g-svc\",state=\"pending\"} 1\n",
            "switchyard_upstream_instances{service=\"g-svc\",state=\"draining\"} 1\n",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn query_parameters() {
        assert_eq!(query_param(Some("service=api"), "service"), Some("api"));
        assert_eq!(query_param(Some("a=1&service=x.y"), "service"), Some("x.y"));
        assert_eq!(query_param(Some("services=x"), "service"), None);
        assert_eq!(query_param(Some("service"), "service"), None);
        assert_eq!(query_param(None, "service"), None);
    }
}

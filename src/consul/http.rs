//! The HTTP side: the listener (hyper, HTTP/1.1), the ACL token, routing to the endpoints,
//! query parameters, blocking queries and Consul's response headers.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::Request;
use rand::Rng;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::decode::{check_update, parse_go_duration, Status};
use super::view::View;
use super::{ApiError, ConsulApi};

/// Largest request body accepted (a registration is a few hundred bytes).
const MAX_BODY: usize = 1 << 20;
/// A blocking query's `wait` when none is given, and the most it may be (Consul's).
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);

/// The API's metrics.
struct Metrics {
    /// `switchyard_consul_blocking_queries`: blocking queries being held now.
    blocking: prometheus::IntGauge,
    /// `switchyard_consul_requests_total{method, code}`: requests answered.
    requests: prometheus::IntCounterVec,
}

// Registration fails only on a duplicate name or invalid label, both programming errors caught by
// the first test that starts the API.
fn build_metrics() -> Result<Metrics, prometheus::Error> {
    Ok(Metrics {
        blocking: prometheus::register_int_gauge!(
            "switchyard_consul_blocking_queries",
            "Consul API blocking queries being held (waiting for a change or their wait time)."
        )?,
        requests: prometheus::register_int_counter_vec!(
            "switchyard_consul_requests_total",
            "Consul API requests answered, by method (GET, PUT, other) and status code.",
            &["method", "code"]
        )?,
    })
}

static METRICS: std::sync::LazyLock<Metrics> = std::sync::LazyLock::new(|| match build_metrics() {
    Ok(m) => m,
    Err(e) => panic!("metric registration failed (a programming error): {e}"),
});

/// Makes the API's metric families exist (at 0) from the start.
pub(super) fn init_metrics() {
    std::sync::LazyLock::force(&METRICS);
}

/// Counts a blocking query as held while it lives.
struct Held;

impl Held {
    fn new() -> Held {
        METRICS.blocking.inc();
        Held
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        METRICS.blocking.dec();
    }
}

/// Query parameters, decoded; a key may repeat (`tag=a&tag=b`).
#[derive(Debug, Default)]
pub struct Query(Vec<(String, String)>);

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A path segment: like a query value, but `+` is a plus.
fn decode_segment(s: &str) -> String {
    percent_decode(&s.replace('+', "%2B"))
}

impl Query {
    pub fn parse(q: Option<&str>) -> Query {
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn all(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// `?flag`, `?flag=1`, `?flag=true` → true; absent → false.
    fn flag(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None => Ok(false),
            Some("" | "1" | "true" | "t" | "T" | "TRUE" | "True") => Ok(true),
            Some("0" | "false" | "f" | "F" | "FALSE" | "False") => Ok(false),
            Some(_) => Err(ApiError::BadRequest(format!("Invalid value for ?{key}"))),
        }
    }

    /// `index` and `wait` of a blocking query; `None` for a plain query.
    fn blocking(&self) -> Result<Option<(u64, Duration)>, ApiError> {
        let index = match self.get("index") {
            None | Some("") => return Ok(None),
            Some(v) => v
                .parse::<u64>()
                .map_err(|_| ApiError::BadRequest("Invalid index".into()))?,
        };
        if index == 0 {
            return Ok(None);
        }
        let wait = match self.get("wait") {
            None | Some("") => DEFAULT_WAIT,
            Some(v) => parse_go_duration(v)
                .map_err(|_| ApiError::BadRequest("Invalid wait time".into()))?,
        };
        Ok(Some((index, wait.min(MAX_WAIT))))
    }
}

/// A successful answer: JSON (or nothing), and the index for `X-Consul-Index`.
struct Reply {
    /// 200, but for the agent's health endpoints (429 warning, 503 critical).
    status: StatusCode,
    /// JSON, but for the agent's health endpoints' `?format=text`.
    content_type: &'static str,
    body: Option<Bytes>,
    index: Option<u64>,
}

impl Reply {
    fn empty() -> Reply {
        Reply {
            status: StatusCode::OK,
            content_type: "application/json",
            body: None,
            index: None,
        }
    }
    fn rendered(body: Bytes, index: Option<u64>) -> Reply {
        Reply {
            status: StatusCode::OK,
            content_type: "application/json",
            body: Some(body),
            index,
        }
    }
}

/// The status code of the agent's health endpoints: passing 200, warning 429, critical 503.
fn health_code(status: Status) -> StatusCode {
    match status {
        Status::Passing => StatusCode::OK,
        Status::Warning => StatusCode::TOO_MANY_REQUESTS,
        Status::Critical => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// JSON text of `v`, compact or indented (`?pretty`), with a final newline.
fn render(v: &Value, pretty: bool) -> Bytes {
    let mut body = if pretty {
        serde_json::to_vec_pretty(v)
    } else {
        serde_json::to_vec(v)
    }
    .unwrap_or_default();
    body.push(b'\n');
    Bytes::from(body)
}

/// Distinct reads whose last rendering is kept, at most; then it starts over (the key is made of
/// what clients ask for).
const RENDERED_MAX: usize = 4096;

/// The last rendering of each read (endpoint, name, filters) with its index: the blocking queries
/// one change wakes are mostly the same query, rendered once.
#[derive(Default)]
pub(super) struct Rendered(std::sync::Mutex<std::collections::HashMap<String, (u64, Bytes)>>);

impl Rendered {
    fn get_or_render(&self, key: String, index: u64, make: impl FnOnce() -> Bytes) -> Bytes {
        let lock = || self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((i, b)) = lock().get(&key) {
            if *i == index {
                return b.clone();
            }
        }
        let body = make();
        let mut g = lock();
        if g.len() >= RENDERED_MAX {
            g.clear();
        }
        g.insert(key, (index, body.clone()));
        body
    }
}

fn response(status: StatusCode, content_type: &str, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    let status = match e {
        ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
        ApiError::NotFound(_) => StatusCode::NOT_FOUND,
        ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
        ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
    };
    response(
        status,
        "text/plain; charset=utf-8",
        Bytes::from(e.to_string()),
    )
}

impl ConsulApi {
    /// Serves `listener` until `shutdown` turns true.
    pub(super) async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.changed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // out of descriptors and the like: do not spin
                        warn!(error = %e, "Consul API: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let api = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let api = api.clone();
                    async move { Ok::<_, Infallible>(api.handle(peer, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    debug!(peer = %peer, error = %e, "Consul API connection ended");
                }
            });
        }
    }

    /// Is the request allowed? The token from `X-Consul-Token`, `Authorization: Bearer` or
    /// `?token=`.
    fn authorize(&self, req: &Request<Incoming>, query: &Query) -> Result<(), ApiError> {
        let Some(want) = &self.token else {
            return Ok(());
        };
        let headers = req.headers();
        let given = headers
            .get("x-consul-token")
            .and_then(|v| v.to_str().ok())
            .or_else(|| {
                headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
            })
            .or_else(|| query.get("token"))
            .filter(|t| !t.is_empty());
        match given {
            None => Err(ApiError::Forbidden(
                "Permission denied: token required".into(),
            )),
            Some(t) if constant_time_eq(t.as_bytes(), want.as_bytes()) => Ok(()),
            Some(_) => Err(ApiError::Forbidden("ACL not found".into())),
        }
    }

    async fn handle(
        self: Arc<Self>,
        peer: SocketAddr,
        req: Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        let method_label = match *req.method() {
            Method::GET => "GET",
            Method::PUT => "PUT",
            _ => "other",
        };
        let query = Query::parse(req.uri().query());
        let path = req.uri().path().to_string();
        let open = path.starts_with("/v1/status/");
        let allowed = match open {
            true => Ok(()),
            false => self.authorize(&req, &query),
        };
        // only the method and the body are needed from here on: the head (headers, URI) is
        // not held by a blocking query
        let (head, body) = req.into_parts();
        let method = head.method;
        let result = match allowed {
            Err(e) => Err(e),
            Ok(()) => self.route(peer, &method, body, &path, &query).await,
        };
        let resp = match result {
            Err(e) => {
                debug!(path = %path, error = %e, "Consul API request refused");
                error_response(&e)
            }
            Ok(reply) => {
                let mut resp = match reply.body {
                    None => response(reply.status, "text/plain; charset=utf-8", Bytes::new()),
                    Some(body) => response(reply.status, reply.content_type, body),
                };
                let h = resp.headers_mut();
                if let Some(index) = reply.index {
                    h.insert("x-consul-index", HeaderValue::from(index.max(1)));
                    h.insert("x-consul-knownleader", HeaderValue::from_static("true"));
                    h.insert("x-consul-lastcontact", HeaderValue::from_static("0"));
                }
                resp
            }
        };
        METRICS
            .requests
            .with_label_values(&[method_label, resp.status().as_str()])
            .inc();
        resp
    }

    async fn read_body(body: Option<Incoming>) -> Result<Bytes, ApiError> {
        let Some(body) = body else {
            return Ok(Bytes::new());
        };
        match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => Ok(b.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::TooLarge(
                format!("Request body too large (more than {MAX_BODY} bytes)"),
            )),
            Err(e) => Err(ApiError::BadRequest(format!("Request body not read: {e}"))),
        }
    }

    /// An answer that is not cached.
    fn json(query: &Query, body: Value, index: Option<u64>) -> Reply {
        Reply::rendered(render(&body, query.get("pretty").is_some()), index)
    }

    /// A read at `index`, rendered once per index (see [`Rendered`]).
    fn read(
        &self,
        query: &Query,
        key: String,
        index: u64,
        make: impl FnOnce(&crate::routing::RoutingTable, &View<'_>) -> Value,
    ) -> Bytes {
        let pretty = query.get("pretty").is_some();
        let key = format!("{key} {pretty}");
        self.rendered.get_or_render(key, index, || {
            let table = self.table.load();
            render(&make(&table, &self.view()), pretty)
        })
    }

    fn view(&self) -> View<'_> {
        View {
            node: &self.node,
            datacenter: super::DATACENTER,
        }
    }

    /// Waits as a blocking query asks: until `index_of()` passes the client's index, or `wait`
    /// (plus up to 1/16 of it, as Consul, so clients do not come back all at once) is over.
    /// An index ahead of ours (from before a restart) is answered at once. Returns the index
    /// to answer with.
    async fn block(
        &self,
        query: &Query,
        index_of: impl Fn() -> (u64, u64),
    ) -> Result<u64, ApiError> {
        let Some((min, wait)) = query.blocking()? else {
            return Ok(index_of().1);
        };
        let jitter = wait.as_millis() as u64 / 16;
        let wait = wait + Duration::from_millis(rand::thread_rng().gen_range(0..=jitter));
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = self.dir.subscribe();
        let _held = Held::new();
        loop {
            let (wake, answer) = index_of();
            if wake > min || min > self.dir.index() {
                return Ok(answer);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Ok(index_of().1);
            }
        }
    }

    /// The whole view's index, to wake on and to answer with.
    fn global_index(&self) -> (u64, u64) {
        let i = self.dir.index();
        (i, i)
    }

    /// `(index that wakes a blocking query on the service, index to answer with)`.
    fn service_index(&self, name: &str) -> (u64, u64) {
        match self.dir.service_index(name) {
            Some(i) => (i, i),
            // a service never seen: only its appearance is a change for it
            None => (0, self.dir.index()),
        }
    }

    fn datacenter(query: &Query) -> Result<(), ApiError> {
        match query.get("dc") {
            None | Some("") => Ok(()),
            Some(dc) if dc == super::DATACENTER => Ok(()),
            Some(_) => Err(ApiError::Internal("No path to datacenter".into())),
        }
    }

    async fn route(
        &self,
        peer: SocketAddr,
        method: &Method,
        body: Incoming,
        path: &str,
        query: &Query,
    ) -> Result<Reply, ApiError> {
        let get = method == Method::GET || method == Method::HEAD;
        let put = method == Method::PUT;
        // only PUTs have a body to read; otherwise dropped now, not held while a query blocks
        let body = put.then_some(body);
        let allowed = |ok: bool| match ok {
            true => Ok(()),
            false => Err(ApiError::MethodNotAllowed(format!(
                "method {method} not allowed"
            ))),
        };
        let tail = |prefix: &str| path.strip_prefix(prefix).map(decode_segment);
        Self::datacenter(query)?;

        if let Some(name) = tail("/v1/health/service/") {
            allowed(get)?;
            let passing = query.flag("passing")?;
            let tags = query.all("tag");
            let index = self.block(query, || self.service_index(&name)).await?;
            let key = format!("health/service {name} {passing} {tags:?}");
            let body = self.read(query, key, index, |table, view| {
                view.health_service(table, &name, passing, &tags, index)
            });
            return Ok(Reply::rendered(body, Some(index)));
        }
        if let Some(name) = tail("/v1/health/checks/") {
            allowed(get)?;
            let index = self.block(query, || self.service_index(&name)).await?;
            let body = self.read(query, format!("health/checks {name}"), index, |t, v| {
                v.health_checks(t, &name, index)
            });
            return Ok(Reply::rendered(body, Some(index)));
        }
        if let Some(name) = tail("/v1/catalog/service/") {
            allowed(get)?;
            let tags = query.all("tag");
            let index = self.block(query, || self.service_index(&name)).await?;
            let key = format!("catalog/service {name} {tags:?}");
            let body = self.read(query, key, index, |t, v| {
                v.catalog_service(t, &name, &tags, index)
            });
            return Ok(Reply::rendered(body, Some(index)));
        }
        if path == "/v1/catalog/services" {
            allowed(get)?;
            let index = self.block(query, || self.global_index()).await?;
            let body = self.read(query, "catalog/services".into(), index, |t, v| {
                v.catalog_services(t)
            });
            return Ok(Reply::rendered(body, Some(index)));
        }
        if let Some(state) = tail("/v1/health/state/") {
            allowed(get)?;
            let state =
                match state.as_str() {
                    "any" => None,
                    s => Some(Status::parse(s).ok_or_else(|| {
                        ApiError::BadRequest(format!("Invalid check state: {s:?}"))
                    })?),
                };
            let index = self.block(query, || self.global_index()).await?;
            let key = format!("health/state {state:?}");
            let body = self.read(query, key, index, |t, v| v.health_state(t, state, index));
            return Ok(Reply::rendered(body, Some(index)));
        }
        if path == "/v1/catalog/datacenters" {
            allowed(get)?;
            return Ok(Self::json(
                query,
                serde_json::json!([super::DATACENTER]),
                None,
            ));
        }
        if path == "/v1/catalog/nodes" {
            allowed(get)?;
            let index = self.dir.index();
            let address = self.listen.ip().to_string();
            let body = self.view().catalog_nodes(&address, index);
            return Ok(Self::json(query, body, Some(index)));
        }
        if path == "/v1/agent/services" {
            allowed(get)?;
            let table = self.table.load();
            return Ok(Self::json(query, self.view().agent_services(&table), None));
        }
        for (prefix, by_id) in [
            ("/v1/agent/health/service/id/", true),
            ("/v1/agent/health/service/name/", false),
        ] {
            let Some(wanted) = tail(prefix) else {
                continue;
            };
            allowed(get)?;
            let table = self.table.load();
            let (worst, entries) =
                self.view()
                    .agent_health(&table, by_id, &wanted, self.dir.index());
            let Some(worst) = worst else {
                let what = if by_id { "ServiceId" } else { "ServiceName" };
                return Err(ApiError::NotFound(format!("{what} {wanted} not found")));
            };
            let pretty = query.get("pretty").is_some();
            let (content_type, body) = match (query.get("format"), by_id) {
                (Some("text"), _) => ("text/plain; charset=utf-8", Bytes::from(worst.as_str())),
                (_, true) => {
                    let one = entries.into_iter().next().unwrap_or_default();
                    ("application/json", render(&one, pretty))
                }
                (_, false) => ("application/json", render(&Value::Array(entries), pretty)),
            };
            return Ok(Reply {
                status: health_code(worst),
                content_type,
                body: Some(body),
                index: None,
            });
        }
        if path == "/v1/agent/checks" {
            allowed(get)?;
            let table = self.table.load();
            let index = self.dir.index();
            return Ok(Self::json(
                query,
                self.view().agent_checks(&table, index),
                None,
            ));
        }
        if path == "/v1/agent/service/register" {
            allowed(put)?;
            let replace = query.flag("replace-existing-checks")?;
            let body = Self::read_body(body).await?;
            self.agent.register(&body, replace, peer.ip()).await?;
            return Ok(Reply::empty());
        }
        if let Some(id) = tail("/v1/agent/service/deregister/") {
            allowed(put)?;
            self.agent.deregister(&id).await?;
            return Ok(Reply::empty());
        }
        if let Some(id) = tail("/v1/agent/service/maintenance/") {
            allowed(put)?;
            let enable = match query.get("enable") {
                None => return Err(ApiError::BadRequest("Missing value for enable".into())),
                Some(v) => match v {
                    "1" | "t" | "T" | "true" | "TRUE" | "True" => true,
                    "0" | "f" | "F" | "false" | "FALSE" | "False" => false,
                    other => {
                        return Err(ApiError::BadRequest(format!(
                            "Invalid value for enable: {other:?}"
                        )))
                    }
                },
            };
            let reason = query.get("reason").unwrap_or("");
            self.agent.maintenance(&id, enable, reason).await?;
            return Ok(Reply::empty());
        }
        if let Some(id) = tail("/v1/agent/service/") {
            allowed(get)?;
            let table = self.table.load();
            return match self.view().agent_service_by_id(&table, &id) {
                Some(v) => Ok(Self::json(query, v, None)),
                None => Err(ApiError::NotFound(format!("unknown service ID: {id}"))),
            };
        }
        for (verb, status) in [
            ("pass", Status::Passing),
            ("warn", Status::Warning),
            ("fail", Status::Critical),
        ] {
            if let Some(id) = tail(&format!("/v1/agent/check/{verb}/")) {
                allowed(put)?;
                let note = query.get("note").unwrap_or("");
                self.agent.update_ttl(&id, status, note).await?;
                return Ok(Reply::empty());
            }
        }
        if let Some(id) = tail("/v1/agent/check/update/") {
            allowed(put)?;
            let body = Self::read_body(body).await?;
            let (status, output) = check_update(&body)
                .map_err(|e| ApiError::BadRequest(format!("Request decode failed: {e}")))?;
            self.agent.update_ttl(&id, status, &output).await?;
            return Ok(Reply::empty());
        }
        if path == "/v1/agent/check/register" {
            allowed(put)?;
            let body = Self::read_body(body).await?;
            self.agent.register_check(&body).await?;
            return Ok(Reply::empty());
        }
        if let Some(id) = tail("/v1/agent/check/deregister/") {
            allowed(put)?;
            self.agent.deregister_check(&id).await?;
            return Ok(Reply::empty());
        }
        if path == "/v1/agent/self" {
            allowed(get)?;
            return Ok(Self::json(query, self.agent_self(), None));
        }
        if path == "/v1/status/leader" {
            return Ok(Self::json(query, Value::String(self.leader.clone()), None));
        }
        if path == "/v1/status/peers" {
            return Ok(Self::json(query, serde_json::json!([self.leader]), None));
        }
        let what = path
            .strip_prefix("/v1/")
            .and_then(|p| p.split('/').next())
            .unwrap_or("");
        let endpoint: String = match what {
            "agent" | "catalog" | "health" | "status" => path.to_string(),
            other => format!("/v1/{other}"),
        };
        Err(ApiError::NotImplemented(format!(
            "switchyard does not implement the Consul endpoint {endpoint} (supported: agent \
             service and check endpoints, health, catalog, status; see the README)"
        )))
    }

    fn agent_self(&self) -> Value {
        let meta: BTreeMap<String, String> = BTreeMap::new();
        serde_json::json!({
            "Config": {
                "Datacenter": super::DATACENTER,
                "NodeName": self.node,
                "NodeID": "",
                "Server": false,
                "Revision": "switchyard",
                "Version": env!("CARGO_PKG_VERSION"),
            },
            "Member": {
                "Name": self.node,
                "Addr": self.listen.ip().to_string(),
                "Port": self.listen.port(),
                "Tags": {"dc": super::DATACENTER, "role": "node"},
                "Status": 1,
            },
            "Meta": meta,
        })
    }
}

/// Compares without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_decode_and_repeat() {
        let q = Query::parse(Some("passing&tag=a%20b&tag=c&index=12&wait=5s&token=x%2By"));
        assert_eq!(q.flag("passing"), Ok(true));
        assert_eq!(q.all("tag"), ["a b", "c"]);
        assert_eq!(q.get("token"), Some("x+y"));
        assert_eq!(q.blocking(), Ok(Some((12, Duration::from_secs(5)))));
        assert_eq!(Query::parse(Some("index=0")).blocking(), Ok(None));
        assert_eq!(
            Query::parse(Some("index=3&wait=1h")).blocking(),
            Ok(Some((3, MAX_WAIT)))
        );
        assert!(Query::parse(Some("index=x")).blocking().is_err());
        assert!(Query::parse(Some("passing=maybe")).flag("passing").is_err());
        assert_eq!(decode_segment("service%3Aweb+1"), "service:web+1");
        assert_eq!(percent_decode("100%"), "100%");
    }

    #[test]
    fn a_read_is_rendered_once_per_index() {
        let r = Rendered::default();
        let mut made = 0;
        let mut get = |index: u64| {
            r.get_or_render("k".into(), index, || {
                made += 1;
                Bytes::from(format!("{index}"))
            })
        };
        assert_eq!(get(5), "5");
        assert_eq!(get(5), "5");
        assert_eq!(get(6), "6");
        assert_eq!(made, 2);
        for i in 0..RENDERED_MAX + 1 {
            r.get_or_render(format!("{i}"), 1, Bytes::new);
        }
        assert!(r.0.lock().unwrap().len() <= RENDERED_MAX, "bounded");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secre"));
    }
}

//! The HTTP side: the listener (hyper, HTTP/1.1), the ACL token, Consul's response headers,
//! the request metrics and the renderings shared by the queries one change wakes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::Request;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::decode::Status;
use super::query::Query;
use super::{ApiError, ConsulApi};

/// Largest request body accepted (a registration is a few hundred bytes).
const MAX_BODY: usize = 1 << 20;

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
pub(super) struct Held;

impl Held {
    pub(super) fn new() -> Held {
        METRICS.blocking.inc();
        Held
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        METRICS.blocking.dec();
    }
}

/// A successful answer: JSON (or nothing), and the index for `X-Consul-Index`.
pub(super) struct Reply {
    /// 200, but for the agent's health endpoints (429 warning, 503 critical).
    pub(super) status: StatusCode,
    /// JSON, but for the agent's health endpoints' `?format=text`.
    pub(super) content_type: &'static str,
    pub(super) body: Option<Bytes>,
    pub(super) index: Option<u64>,
}

impl Reply {
    pub(super) fn empty() -> Reply {
        Reply {
            status: StatusCode::OK,
            content_type: "application/json",
            body: None,
            index: None,
        }
    }
    pub(super) fn rendered(body: Bytes, index: Option<u64>) -> Reply {
        Reply {
            status: StatusCode::OK,
            content_type: "application/json",
            body: Some(body),
            index,
        }
    }
}

/// The status code of the agent's health endpoints: passing 200, warning 429, critical 503.
pub(super) fn health_code(status: Status) -> StatusCode {
    match status {
        Status::Passing => StatusCode::OK,
        Status::Warning => StatusCode::TOO_MANY_REQUESTS,
        Status::Critical => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// JSON text of `v`, compact or indented (`?pretty`), with a final newline.
pub(super) fn render(v: &Value, pretty: bool) -> Bytes {
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
    pub(super) fn get_or_render(
        &self,
        key: String,
        index: u64,
        make: impl FnOnce() -> Bytes,
    ) -> Bytes {
        let lock = || crate::sync::lock(&self.0);
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
}

/// The body of a PUT (`None`: not read, dropped).
pub(super) async fn read_body(body: Option<Incoming>) -> Result<Bytes, ApiError> {
    let Some(body) = body else {
        return Ok(Bytes::new());
    };
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::TooLarge(format!(
            "Request body too large (more than {MAX_BODY} bytes)"
        ))),
        Err(e) => Err(ApiError::BadRequest(format!("Request body not read: {e}"))),
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

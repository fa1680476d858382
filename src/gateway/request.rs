//! One request on the gateway: route, pick an instance per request, send over a pooled
//! connection, relay the response — with the native engine's rules:
//!
//! - routing by `:authority` (HTTP/2) or `Host`, then the path ([`crate::proxy::route_request`]);
//! - a connection failure is retried on another instance for every method (nothing was sent),
//!   and so is a request hyper hands back unsent (a pooled connection that had just closed);
//!   an idempotent request without a body also when the instance failed or was silent after it
//!   was sent (`retry_on` "reset", the default), or answered a status `retry_on` lists; up to
//!   `proxy.max_tries` attempts, each retry withdrawn from the retry budget; each failure counts
//!   towards passive ejection, each answer and failure after sending towards outlier detection;
//! - no response head within `proxy.read_timeout_ms`: 504 (the instance counts towards passive
//!   ejection). A gRPC request waits as long as its own `grpc-timeout` allows instead (a gRPC
//!   stream may answer its head late), or without limit when it has none;
//! - our own answers (404, 503, 502, 504) name the service and the reason, as gRPC statuses for
//!   gRPC requests;
//! - an HTTP/1.1 upgrade request (WebSocket) to an HTTP/1.1 instance that answers 101 becomes a
//!   byte tunnel between the two connections (the native engine's rule, also over TLS).

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use smallvec::SmallVec;
use tracing::debug;

use super::body::{full, Finish, Picked, Relay, RespBody};
use super::{grpc, ClientInfo, Gateway};
use crate::proxy::{finish_request, Finished, InFlight, Outcome};
use crate::routing::outlier::{self, Answer};
use crate::routing::Service;
use crate::upstream::body::{H2Body, Received};
use crate::upstream::pool::{ReqBody, Sender, TlsTarget};
use crate::upstream::{protocol_for, ClientTls, Protocol};

/// Headers that describe one hop (RFC 9110 §7.6.1) and never pass through; `te: trailers` is
/// kept (gRPC requires it over HTTP/2). Names made at compile time: no parsing per request.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TRAILER,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Facts about the request kept for the answer and the log.
struct Facts {
    grpc: bool,
    /// The gRPC deadline, when the client set one.
    deadline: Option<Duration>,
    start: Instant,
    log: Option<(String, String)>,
}

impl Gateway {
    /// Answers one request (never fails: errors become our own answers).
    pub(super) async fn handle(
        self: &Arc<Self>,
        req: Request<Received>,
        client: &ClientInfo,
    ) -> Response<RespBody> {
        let in_flight = InFlight::new();
        let grpc = grpc::is_grpc(req.headers());
        let facts = Facts {
            grpc,
            deadline: if grpc {
                grpc::timeout(req.headers())
            } else {
                None
            },
            start: Instant::now(),
            log: self
                .access_log
                .then(|| (req.method().to_string(), req.uri().path().to_string())),
        };
        if req.method() == http::Method::CONNECT {
            return self.own(
                &facts,
                None,
                None,
                405,
                "switchyard: CONNECT is not supported (not a forward proxy)".into(),
            );
        }
        let mut req = req;
        let upgrade = upgrade_of(&mut req);
        let host = authority(&req).map(str::to_owned);
        let outcome = {
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let table = self.table.load();
            crate::proxy::route_request(&self.router, &table, host.as_deref(), path)
        };
        match outcome {
            Outcome::Answer {
                status,
                body,
                label,
                service,
            } => self.own(&facts, service.as_ref(), label.as_deref(), status, body),
            Outcome::Proxy { service, rewrite } => {
                // the path as the instance gets it, and :authority for HTTP/2 instances, made
                // once (they share the request's bytes: no copy per attempt)
                let root = || PathAndQuery::from_static("/");
                let target = match rewrite {
                    Some(r) => PathAndQuery::try_from(r).unwrap_or_else(|_| root()),
                    None => req.uri().path_and_query().cloned().unwrap_or_else(root),
                };
                let authority = req
                    .uri()
                    .authority()
                    .cloned()
                    .or_else(|| host.as_deref().and_then(|h| h.parse().ok()));
                let key = service.hash_key(
                    |name| {
                        req.headers()
                            .get_all(name)
                            .iter()
                            .map(|v| v.as_bytes())
                            .collect()
                    },
                    &client.ip,
                );
                let req = upstream_request(req, host.as_deref(), &target, client);
                let to = Target {
                    host,
                    authority,
                    path: target,
                };
                // boxed: the exchange's state (a few KB) stays in one place on the heap, instead
                // of being copied with the stream's task each time hyper moves it
                Box::pin(self.proxy(req, to, service, facts, in_flight, upgrade, key)).await
            }
        }
    }

    /// One of our own answers, counted and logged at once.
    fn own(
        &self,
        facts: &Facts,
        service: Option<&Arc<Service>>,
        label: Option<&str>,
        status: u16,
        body: String,
    ) -> Response<RespBody> {
        finish_request(&Finished {
            service,
            label,
            instance: None,
            log: facts.log.as_ref(),
            status,
            elapsed: facts.start.elapsed(),
            tries: 0,
            error: "",
        });
        own_response(facts, status, body)
    }

    #[allow(clippy::too_many_arguments)]
    async fn proxy(
        self: &Arc<Self>,
        req: Request<ReqBody>,
        to: Target,
        service: Arc<Service>,
        facts: Facts,
        in_flight: InFlight,
        mut upgrade: Option<Upgrade>,
        key: Option<u64>,
    ) -> Response<RespBody> {
        let on = service.traffic.retry.on;
        let cfg = &self.cfg;
        let mut tried: SmallVec<[Arc<str>; 4]> = SmallVec::new();
        // a copy to send again is only worth making when there could be a second attempt
        let replay = (cfg.max_tries > 1 && service.instances.len() > 1)
            .then(|| Replay::of(&req))
            .flatten();
        let mut pending = Some(req);
        let head_limit = if facts.grpc {
            facts.deadline
        } else {
            Some(cfg.read_timeout)
        };
        let fail = |status: u16, reason: String, tries: usize, error: &'static str| {
            let finish = Finish {
                service: service.clone(),
                picked: None,
                status,
                start: facts.start,
                tries,
                log: facts.log.clone(),
                error: Some(error),
                slot: None,
                in_flight: None,
            };
            drop(finish);
            if status >= 502 {
                crate::events::RECENT.record(
                    "upstream",
                    format!("service {:?}: {status} {reason}", service.name),
                );
            }
            own_response(
                &facts,
                status,
                format!("switchyard: service {:?}: {reason}", service.name),
            )
        };
        loop {
            let Some(inst) = service.select(&tried, key) else {
                let status = if tried.is_empty() { 503 } else { 502 };
                let reason = format!("no usable instance left after {} tries", tried.len());
                return fail(status, reason, tried.len(), "upstream");
            };
            tried.push(inst.key.clone());
            let picked = Picked::new(inst.clone());
            // tries left, a candidate left, and the retry budget allows it (counting the retry)
            let can_retry = |tried: &[Arc<str>]| {
                tried.len() < cfg.max_tries
                    && service.has_candidate(tried)
                    && crate::routing::budget::try_retry(&service)
            };
            let protocol = protocol_for(&inst, &service.upstream, facts.grpc);
            let host_name;
            let system;
            let tls = if protocol.tls() {
                host_name = inst.registered_host();
                let config: &ClientTls = match &service.upstream.tls {
                    Some(t) => t,
                    None => {
                        system = ClientTls::system();
                        &system
                    }
                };
                Some(TlsTarget {
                    config,
                    server_name: &host_name,
                })
            } else {
                None
            };
            let sender = match self.pool.get(inst.addr, protocol, tls).await {
                Ok(s) => s,
                Err(e) => {
                    debug!(service = %service.name, instance = %inst.addr, error = %e, "connect failed");
                    crate::health::passive_failure(&service, &inst, &e);
                    if can_retry(&tried) {
                        continue;
                    }
                    let reason = format!("upstream error after {} tries: {e}", tried.len());
                    return fail(502, reason, tried.len(), "upstream");
                }
            };
            let Some(mut req) = pending.take() else {
                return fail(502, "request lost".into(), tried.len(), "upstream");
            };
            let upstream_start = Instant::now();
            let (sent, back, slot) = match sender {
                Sender::Http1(mut send, key) => {
                    to_http1(&mut req, &to);
                    if let Some(u) = &upgrade {
                        let h = req.headers_mut();
                        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                        h.insert(header::UPGRADE, u.protocol.clone());
                    }
                    let sent = match send.ready().await {
                        Ok(()) => Sent::from(timed(head_limit, send.try_send_request(req)).await),
                        Err(e) => Sent::Failed(e.to_string(), Some(Box::new(req))),
                    };
                    (sent, Some((send, key)), None)
                }
                Sender::Http2(send, slot) => {
                    to_http2(&mut req, protocol, &to, &inst.addr);
                    let exchange = crate::upstream::h2::send(send, req);
                    let sent = match timed(head_limit, exchange).await {
                        Some(Ok(resp)) => Sent::Head(resp.map(|b| Received::H2(H2Body::new(b)))),
                        Some(Err(n)) => Sent::Failed(n.error.to_string(), n.request),
                        None => Sent::TimedOut,
                    };
                    (sent, None, Some(slot))
                }
            };
            match sent {
                Sent::Head(mut resp) => {
                    let status = resp.status().as_u16();
                    outlier::observe(&service, &inst, Answer::Status(status));
                    // an answer retry_on lists: dropped (with its connection) and sent elsewhere
                    if on.status(status) {
                        if let Some(replay) = replay.as_ref().filter(|_| can_retry(&tried)) {
                            pending = Some(replay.request());
                            continue;
                        }
                    }
                    crate::health::passive_success(&service, &inst);
                    let first_byte = upstream_start.elapsed();
                    inst.state.observe_latency(first_byte);
                    service.metrics().upstream.observe(first_byte.as_secs_f64());
                    let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS
                        && back.is_some()
                        && upgrade.is_some();
                    let tunnel = switched
                        .then(|| upgrade.take())
                        .flatten()
                        .map(|u| (u, hyper::upgrade::on(&mut resp)));
                    if let (Some((send, key)), None) = (back, &tunnel) {
                        self.pool.put_back(send, key);
                    }
                    let (mut parts, body) = resp.into_parts();
                    let protocol = parts.headers.get(header::UPGRADE).cloned();
                    strip_hop_by_hop(&mut parts.headers);
                    if let Some((client, instance)) = tunnel {
                        let h = &mut parts.headers;
                        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                        h.insert(header::UPGRADE, protocol.unwrap_or(client.protocol));
                        tokio::spawn(relay_upgraded(client.on, instance));
                    }
                    let finish = Finish {
                        service: service.clone(),
                        status: parts.status.as_u16(),
                        picked: Some(picked),
                        start: facts.start,
                        tries: tried.len(),
                        log: facts.log.clone(),
                        error: None,
                        slot,
                        in_flight: Some(in_flight),
                    };
                    let body = Relay::new(body, facts.grpc, finish).boxed_unsync();
                    return Response::from_parts(parts, body);
                }
                Sent::Failed(error, unsent) => {
                    debug!(service = %service.name, instance = %inst.addr, error = %error, unsent = unsent.is_some(), "upstream request failed");
                    crate::health::passive_failure(&service, &inst, &error);
                    if unsent.is_none() {
                        outlier::observe(&service, &inst, Answer::Failed);
                    }
                    match (unsent, &replay) {
                        // nothing reached the instance: safe to retry for every method
                        (Some(r), _) if can_retry(&tried) => {
                            pending = Some(*r);
                            continue;
                        }
                        (None, Some(replay)) if on.reset && can_retry(&tried) => {
                            pending = Some(replay.request());
                            continue;
                        }
                        _ => {
                            let reason =
                                format!("upstream error after {} tries: {error}", tried.len());
                            return fail(502, reason, tried.len(), "upstream");
                        }
                    }
                }
                Sent::TimedOut => {
                    crate::health::passive_failure(&service, &inst, &"upstream read timed out");
                    outlier::observe(&service, &inst, Answer::Failed);
                    // as nginx's proxy_next_upstream timeout, for what can be sent again
                    if let Some(replay) = replay.as_ref().filter(|_| on.reset && can_retry(&tried))
                    {
                        pending = Some(replay.request());
                        continue;
                    }
                    let reason = if facts.grpc {
                        "upstream did not answer within the call's deadline".to_string()
                    } else {
                        "upstream timed out".to_string()
                    };
                    return fail(504, reason, tried.len(), "timeout");
                }
            }
        }
    }
}

/// What it takes to send a bodiless idempotent request again (GET, HEAD, PUT, DELETE, OPTIONS,
/// TRACE: RFC 9110 §9.2.2), after an instance failed or was silent once it was sent.
struct Replay {
    method: http::Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Replay {
    fn of(req: &Request<ReqBody>) -> Option<Replay> {
        use http::Method;
        use hyper::body::Body;
        let m = req.method();
        let idempotent = [
            Method::GET,
            Method::HEAD,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
            Method::TRACE,
        ]
        .contains(m);
        (idempotent && req.body().is_end_stream()).then(|| Replay {
            method: m.clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        })
    }

    fn request(&self) -> Request<ReqBody> {
        let mut req = Request::new(http_body_util::Either::Right(http_body_util::Empty::new()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// How sending a request to an instance went.
enum Sent {
    /// The response head arrived.
    Head(Response<Received>),
    /// The error, and the request when hyper never sent it (safe to send elsewhere).
    Failed(String, Option<Box<Request<ReqBody>>>),
    /// No response head within the limit.
    TimedOut,
}

type SendResult =
    Option<Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<ReqBody>>>>;

impl From<SendResult> for Sent {
    fn from(r: SendResult) -> Sent {
        match r {
            Some(Ok(resp)) => Sent::Head(resp.map(Received::H1)),
            Some(Err(mut e)) => {
                let req = e.take_message().map(Box::new);
                Sent::Failed(e.into_error().to_string(), req)
            }
            None => Sent::TimedOut,
        }
    }
}

/// An HTTP/1.1 client's upgrade request: the protocol asked for, and the client's connection
/// once hyper has sent our 101.
struct Upgrade {
    protocol: HeaderValue,
    on: hyper::upgrade::OnUpgrade,
}

/// `Connection: upgrade` with an `Upgrade` header on HTTP/1.1 (HTTP/2 has no such thing), other
/// than `h2c`.
fn upgrade_of(req: &mut Request<Received>) -> Option<Upgrade> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let asked = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let protocol = req.headers().get(header::UPGRADE)?.clone();
    // h2c is declined (the request is answered over HTTP/1.1): HTTP/2 clients use prior
    // knowledge or TLS, and every stream is balanced on its own
    if protocol.as_bytes().eq_ignore_ascii_case(b"h2c") {
        return None;
    }
    asked.then(|| Upgrade {
        protocol,
        on: hyper::upgrade::on(&mut *req),
    })
}

/// After a 101: bytes both ways between the client's and the instance's connections until either
/// side closes.
async fn relay_upgraded(client: hyper::upgrade::OnUpgrade, instance: hyper::upgrade::OnUpgrade) {
    match futures::future::join(client, instance).await {
        (Ok(c), Ok(i)) => {
            let (mut c, mut i) = (TokioIo::new(c), TokioIo::new(i));
            let _ = tokio::io::copy_bidirectional(&mut c, &mut i).await;
        }
        (c, i) => {
            debug!(client = ?c.err(), instance = ?i.err(), "upgrade not completed");
        }
    }
}

/// `fut` within `limit` (None: no limit); `None` when the time ran out. (Not an `async fn`: that
/// would hold `fut` twice, as its argument and as what it awaits.)
fn timed<F: std::future::Future>(
    limit: Option<Duration>,
    fut: F,
) -> impl std::future::Future<Output = Option<F::Output>> {
    use futures::future::{Either, FutureExt};
    match limit {
        Some(l) => Either::Left(tokio::time::timeout(l, fut).map(Result::ok)),
        None => Either::Right(fut.map(Some)),
    }
}

/// Our own answer: a short text body, or for a gRPC request a trailers-only gRPC status.
fn own_response(facts: &Facts, status: u16, body: String) -> Response<RespBody> {
    let mut headers = HeaderMap::new();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if facts.grpc {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        let passed = facts.deadline.is_some_and(|d| facts.start.elapsed() >= d);
        let code = grpc::code_for(status, passed);
        grpc::put_status(&mut headers, code, body.trim_end());
        let mut resp = Response::new(full(""));
        *resp.headers_mut() = headers;
        return resp;
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    let mut body = body;
    if !body.ends_with('\n') {
        body.push('\n');
    }
    let mut resp = Response::new(full(body));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    *resp.headers_mut() = headers;
    resp
}

/// `:authority` (HTTP/2, or an absolute-form target) or `Host`.
fn authority(req: &Request<Received>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

/// Drops hop-by-hop headers and those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // most requests have none (HTTP/2 forbids the connection-specific ones, RFC 9113 §8.2.2):
    // one pass over the names, no lookups
    if !headers
        .keys()
        .any(|n| n == header::TE || HOP_BY_HOP.contains(n))
    {
        return;
    }
    let named: SmallVec<[HeaderName; 4]> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Where a request goes on an instance.
struct Target {
    /// `Host` for HTTP/1.1 instances (as the client sent it, or its `:authority`).
    host: Option<String>,
    /// `:authority` for HTTP/2 instances.
    authority: Option<Authority>,
    path: PathAndQuery,
}

/// The client's request, made ready for any instance: hop-by-hop headers out, X-Forwarded-* in.
fn upstream_request(
    req: Request<Received>,
    host: Option<&str>,
    target: &PathAndQuery,
    client: &ClientInfo,
) -> Request<ReqBody> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let headers = &mut parts.headers;
    headers.remove(header::EXPECT);
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => {
            HeaderValue::from_str(&format!("{}, {}", prev.trim(), client.ip)).ok()
        }
        _ => client.ip_value.clone(),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    let proto = if client.tls { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    match host.and_then(|h| HeaderValue::from_str(h).ok()) {
        Some(v) => {
            headers.insert(X_FORWARDED_HOST, v);
        }
        None => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
    parts.uri = Uri::from(target.clone());
    Request::from_parts(parts, http_body_util::Either::Left(body))
}

/// HTTP/1.1 upstream: origin-form target, `Host` set.
fn to_http1(req: &mut Request<ReqBody>, to: &Target) {
    *req.version_mut() = Version::HTTP_11;
    *req.uri_mut() = Uri::from(to.path.clone());
    if !req.headers().contains_key(header::HOST) {
        if let Some(v) = to
            .host
            .as_deref()
            .and_then(|h| HeaderValue::from_str(h).ok())
        {
            req.headers_mut().insert(header::HOST, v);
        }
    }
}

/// HTTP/2 upstream: `:scheme`, `:authority` (the client's, else the instance's address) and
/// `:path`; no `Host` header.
fn to_http2(
    req: &mut Request<ReqBody>,
    protocol: Protocol,
    to: &Target,
    addr: &std::net::SocketAddr,
) {
    *req.version_mut() = Version::HTTP_2;
    let scheme = if protocol.tls() {
        http::uri::Scheme::HTTPS
    } else {
        http::uri::Scheme::HTTP
    };
    let authority = match &to.authority {
        Some(a) => Ok(a.clone()),
        None => Authority::try_from(addr.to_string()),
    };
    let path = if to.path.as_str().starts_with('/') {
        to.path.clone()
    } else {
        PathAndQuery::from_static("/")
    };
    if let Ok(authority) = authority {
        let uri = Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query(path)
            .build();
        if let Ok(uri) = uri {
            *req.uri_mut() = uri;
        }
    }
    req.headers_mut().remove(header::HOST);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_te_trailers_stays() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("gzip, trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        names.sort();
        assert_eq!(names, ["te", "x-kept"]);
        assert_eq!(h["te"], "trailers");
    }
}

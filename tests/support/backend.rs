//! A real HTTP/1.1 backend for tests (hyper), on an ephemeral port.
//!
//! Every response carries `x-backend: <name>`. Paths:
//! - `/health`: status from [`Backend::set_health`] (200 by default);
//! - every other path, after [`Backend::set_status`] with a status: that status, counted as a hit;
//! - `/slow?ms=N`: answers after N ms;
//! - `/bytes?n=N`: streams N bytes (`0123456789` repeated) in 64 KiB chunks;
//! - `/upload`: reads the whole body, answers `{"len":..,"sum":..}` (sum of bytes mod 2^64);
//! - anything else: JSON echo of method, uri, HTTP version, headers and body length.
//!
//! [`Backend::start`] speaks HTTP/1.1; [`Backend::start_mode`] also HTTP/2 with prior knowledge
//! (h2c) or TLS with ALPN (h2 and http/1.1).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::watch;

type Body = BoxBody<Bytes, Infallible>;

/// What a backend speaks.
#[derive(Clone)]
pub enum Mode {
    Http1,
    /// HTTP/1.1 and HTTP/2 with prior knowledge on the same port.
    H2cOrHttp1,
    /// TLS with this configuration, then HTTP/2 or HTTP/1.1 as ALPN chose.
    Tls(Arc<rustls::ServerConfig>),
}

pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    health: Arc<AtomicU16>,
    answer: Arc<AtomicU16>,
    hang: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
}

struct Shared {
    name: String,
    health: Arc<AtomicU16>,
    answer: Arc<AtomicU16>,
    hang: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

fn query_num(uri: &hyper::Uri, key: &str) -> u64 {
    uri.query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .unwrap_or(0)
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if shared.hang.load(Ordering::Relaxed) {
        // a hung instance answers on no connection, old or new (health checks keep theirs)
        std::future::pending::<()>().await;
    }
    let path = req.uri().path().to_string();
    if path != "/health" {
        shared.hits.fetch_add(1, Ordering::Relaxed);
    }
    let builder = Response::builder().header("x-backend", shared.name.as_str());
    let answer = shared.answer.load(Ordering::Relaxed);
    if answer != 0 && path != "/health" {
        let body = full(format!("{} {answer}\n", shared.name));
        return Ok(builder.status(answer).body(body).unwrap_or_default());
    }
    let resp = match path.as_str() {
        "/health" => {
            let status = shared.health.load(Ordering::Relaxed);
            builder
                .status(status)
                .body(full(format!("{} {status}\n", shared.name)))
        }
        "/slow" => {
            let ms = query_num(req.uri(), "ms");
            tokio::time::sleep(Duration::from_millis(ms)).await;
            builder.body(full(format!("{} slow {ms}\n", shared.name)))
        }
        "/bytes" => {
            let n = query_num(req.uri(), "n");
            let pattern: Bytes = Bytes::from(b"0123456789".repeat(6554)); // 65540 bytes
            let chunks = (0..n.div_ceil(65540)).map(move |i| {
                let remaining = n - i * 65540;
                Ok::<_, Infallible>(Frame::data(pattern.slice(0..remaining.min(65540) as usize)))
            });
            builder
                .header("content-length", n.to_string())
                .body(StreamBody::new(futures::stream::iter(chunks)).boxed())
        }
        "/upload" => {
            let mut body = req.into_body();
            let (mut len, mut sum) = (0u64, 0u64);
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            len += d.len() as u64;
                            sum = d.iter().fold(sum, |s, b| s.wrapping_add(*b as u64));
                        }
                    }
                    Err(e) => {
                        return Ok(Response::builder()
                            .status(400)
                            .body(full(format!("body error: {e}")))
                            .unwrap_or_default())
                    }
                }
            }
            builder.body(full(format!("{{\"len\":{len},\"sum\":{sum}}}")))
        }
        _ => {
            let headers: BTreeMap<String, Vec<String>> =
                req.headers().iter().fold(BTreeMap::new(), |mut m, (k, v)| {
                    m.entry(k.as_str().to_string())
                        .or_default()
                        .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
                    m
                });
            let method = req.method().to_string();
            let version = format!("{:?}", req.version());
            let uri = req.uri().to_string();
            let body = req.into_body().collect().await.map(|b| b.to_bytes());
            let body_len = body.as_ref().map(|b| b.len()).unwrap_or(0);
            let echo = serde_json::json!({
                "backend": shared.name,
                "method": method,
                "uri": uri,
                "version": version,
                "headers": headers,
                "body_len": body_len,
            });
            builder
                .header("content-type", "application/json")
                .body(full(echo.to_string()))
        }
    };
    Ok(resp.unwrap_or_default())
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Self::start_on(name, "127.0.0.1:0").await
    }

    /// Starts on a given address (e.g. the address of a backend that was stopped).
    pub async fn start_on(name: &str, addr: &str) -> Backend {
        Self::launch(name, addr, Mode::Http1).await
    }

    /// Starts speaking `mode` on an ephemeral port.
    pub async fn start_mode(name: &str, mode: Mode) -> Backend {
        Self::launch(name, "127.0.0.1:0", mode).await
    }

    async fn launch(name: &str, addr: &str, mode: Mode) -> Backend {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("backend {name}: binding {addr}: {e}"));
        let addr = listener.local_addr().expect("backend local addr");
        let health = Arc::new(AtomicU16::new(200));
        let answer = Arc::new(AtomicU16::new(0));
        let hang = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicU64::new(0));
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            name: name.to_string(),
            health: health.clone(),
            answer: answer.clone(),
            hang: hang.clone(),
            hits: hits.clone(),
        });
        let mut accept_stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = accept_stop.changed() => return,
                    r = listener.accept() => match r {
                        Ok(s) => s,
                        Err(_) => continue,
                    },
                };
                let shared = shared.clone();
                let mut conn_stop = stop_rx.clone();
                let mode = mode.clone();
                tokio::spawn(async move {
                    if shared.hang.load(Ordering::Relaxed) {
                        // accept, never answer, keep the socket open until stopped
                        let _keep = stream;
                        let _ = conn_stop.changed().await;
                        return;
                    }
                    let svc = hyper::service::service_fn(move |req| handle(shared.clone(), req));
                    let auto = || {
                        hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                    };
                    match mode {
                        Mode::Http1 => {
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let conn = hyper::server::conn::http1::Builder::new()
                                .keep_alive(true)
                                .serve_connection(io, svc);
                            tokio::select! {
                                _ = conn => {}
                                _ = conn_stop.changed() => {}
                            }
                        }
                        Mode::H2cOrHttp1 => {
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let builder = auto();
                            let conn = builder.serve_connection(io, svc);
                            tokio::select! {
                                _ = conn => {}
                                _ = conn_stop.changed() => {}
                            }
                        }
                        Mode::Tls(config) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(config);
                            let Ok(tls) = acceptor.accept(stream).await else {
                                return;
                            };
                            let io = hyper_util::rt::TokioIo::new(tls);
                            let builder = auto();
                            let conn = builder.serve_connection(io, svc);
                            tokio::select! {
                                _ = conn => {}
                                _ = conn_stop.changed() => {}
                            }
                        }
                    }
                });
            }
        });
        Backend {
            name: name.to_string(),
            addr,
            health,
            answer,
            hang,
            hits,
            stop,
        }
    }

    pub fn addr_string(&self) -> String {
        self.addr.to_string()
    }

    /// Status `/health` answers.
    pub fn set_health(&self, status: u16) {
        self.health.store(status, Ordering::Relaxed);
    }

    /// Every request but `/health` is answered with `status` (0: answered normally again).
    pub fn set_status(&self, status: u16) {
        self.answer.store(status, Ordering::Relaxed);
    }

    /// Connections are accepted and no request is answered (on new and open connections).
    pub fn set_hang(&self, hang: bool) {
        self.hang.store(hang, Ordering::Relaxed);
    }

    /// Requests served (excluding /health).
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Closes the listener and every connection: the port refuses connections afterwards.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

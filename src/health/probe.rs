//! Probes: one check of one instance, named for their mechanism.
//!
//! - HTTP: `GET <path>` over HTTP/1.1; healthy when the status is in the expected
//!   set (default 200-299). The verdict comes from the status line alone: a probe must not depend
//!   on how large or slow the body is. [`check`] keeps the connection for the
//!   next check (`health.reuse_connection`) when the response allows it: HTTP/1.1, no
//!   `Connection: close`, a body framed by `Content-Length` or chunked and at most
//!   [`MAX_DRAIN`] bytes, drained within the check's timeout. Any error, timeout or other response
//!   closes it. An idle connection the server closed in the meantime is replaced by a fresh one
//!   within the same check, without counting a failure.
//! - HTTPS (`super::https`): `GET <path>` over TLS, verified like the proxy's connections.
//! - [`TcpHealthCheck`]: healthy when a TCP connection opens.
//! - [`GrpcHealthCheck`]: `grpc.health.v1.Health/Check`; healthy on `SERVING`. The channel is kept
//!   between checks (tonic reconnects it), so a check is one HTTP/2 request, not a handshake.
//! - `none`: always healthy: admits without probing.
//!
//! The [`HealthCheck`] implementations do not bound their own time; [`check`], which the
//! scheduler runs, bounds everything by the target's timeout, so a target that accepts and never
//! answers fails with [`ProbeError::Timeout`].

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::{Protocol, StatusSet, Target};
use crate::http1::Chunked;

/// Why a check failed; the text becomes the `reason` of a logged health flip.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer within {}ms", .0.as_millis())]
    Timeout(Duration),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("unexpected status {0}")]
    Status(u16),
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("grpc health check failed: {0}")]
    Grpc(String),
    #[error("grpc health status is {0}")]
    NotServing(&'static str),
    /// The admission thread's task running a first check ended without a result.
    #[error("first check task ended: {0}")]
    TaskEnded(#[from] tokio::task::JoinError),
}

impl ProbeError {
    /// The check could not be made for a shortage on the proxy's side (no file for a socket,
    /// no local port): it says nothing about the instance.
    pub fn is_local(&self) -> bool {
        match self {
            ProbeError::Connect { source, .. } | ProbeError::Io(source) => {
                crate::limits::is_local_shortage(source)
            }
            _ => false,
        }
    }
}

/// One way of checking an instance. `check` is called repeatedly on the same value.
#[async_trait]
pub trait HealthCheck: Send + Sync {
    /// Checks once: `Ok` means healthy.
    async fn check(&self) -> Result<(), ProbeError>;
}

/// Healthy when a TCP connection to `addr` opens.
#[derive(Debug, Clone)]
pub struct TcpHealthCheck {
    pub addr: SocketAddr,
}

#[async_trait]
impl HealthCheck for TcpHealthCheck {
    async fn check(&self) -> Result<(), ProbeError> {
        TcpStream::connect(self.addr)
            .await
            .map(drop)
            .map_err(|source| ProbeError::Connect {
                addr: self.addr,
                source,
            })
    }
}

/// Longest response head (status line and headers) read; a longer one still gives a verdict from
/// its status line, but its connection is not kept.
const MAX_HEAD: usize = 2048;
/// Largest response body read to keep a connection; a larger one closes it (after the verdict).
pub const MAX_DRAIN: u64 = 64 * 1024;

/// The request of an HTTP check; `keep_alive` false asks the server to close.
pub(super) fn http_request(path: &str, host: &dyn std::fmt::Display, keep_alive: bool) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: switchyard-health/{}\r\nAccept: */*\r\n{}\r\n",
        env!("CARGO_PKG_VERSION"),
        if keep_alive { "" } else { "Connection: close\r\n" }
    )
}

/// Parses `HTTP/1.x NNN reason` into NNN ([`crate::http1::parse_status_line`]).
pub fn parse_status_line(line: &[u8]) -> Result<u16, ProbeError> {
    crate::http1::parse_status_line(line)
        .map(|(_, status)| status)
        .map_err(|e| {
            let shown: String = String::from_utf8_lossy(line).chars().take(64).collect();
            ProbeError::Malformed(format!("{e}: {shown:?}"))
        })
}

/// How the rest of a response can be read so that its connection serves the next check.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// This many body bytes are still to come.
    Length(u64),
    /// A chunked body; the bytes of it already read.
    Chunked(Vec<u8>),
}

/// A response head: the verdict, and how to finish the response if the connection can be kept.
struct Head {
    verdict: Result<(), ProbeError>,
    keep: Option<Framing>,
}

/// Why an exchange produced no verdict.
enum Failure {
    /// Nothing was received (the write failed, or the connection closed or reset before the first
    /// byte): on a reused connection, the server closed it while idle.
    Stale(ProbeError),
    Failed(ProbeError),
}

/// Sends `request` and reads the status line, and with `keep_alive` the rest of the head.
async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    expected: &StatusSet,
    keep_alive: bool,
) -> Result<Head, Failure> {
    stream
        .write_all(request)
        .await
        .map_err(|e| Failure::Stale(ProbeError::Io(e)))?;
    let mut buf = [0u8; MAX_HEAD];
    let mut len = 0;
    let mut line_end = None;
    // (head end, complete): incomplete when the head was cut short by the buffer or the peer
    let (head_end, complete) = loop {
        if line_end.is_none() {
            line_end = buf[..len].iter().position(|b| *b == b'\n');
        }
        if line_end.is_some() {
            if !keep_alive {
                break (len, false);
            }
            if let Some(end) = find_head_end(&buf[..len]) {
                break (end, true);
            }
        }
        if len == buf.len() {
            if line_end.is_some() {
                break (len, false);
            }
            return Err(Failure::Failed(ProbeError::Malformed(format!(
                "no status line in the first {MAX_HEAD} bytes"
            ))));
        }
        let n = match stream.read(&mut buf[len..]).await {
            Ok(n) => n,
            Err(e) if len == 0 => return Err(Failure::Stale(ProbeError::Io(e))),
            Err(_) if line_end.is_some() => break (len, false),
            Err(e) => return Err(Failure::Failed(ProbeError::Io(e))),
        };
        if n == 0 {
            if line_end.is_some() {
                break (len, false);
            }
            let e = ProbeError::Malformed("connection closed before the status line".into());
            return Err(if len == 0 {
                Failure::Stale(e)
            } else {
                Failure::Failed(e)
            });
        }
        len += n;
    };
    let line_end = line_end.unwrap_or(0);
    let status = match parse_status_line(&buf[..line_end]) {
        Ok(s) => s,
        Err(e) => {
            return Ok(Head {
                verdict: Err(e),
                keep: None,
            })
        }
    };
    let verdict = if expected.contains(status) {
        Ok(())
    } else {
        Err(ProbeError::Status(status))
    };
    let keep = if complete {
        framing(&buf[..head_end], status, &buf[head_end..len])
    } else {
        None
    };
    Ok(Head { verdict, keep })
}

/// End of the head (after its empty line) in `buf`, if it is all there.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// How to finish a response whose head is `head` so its connection can be kept; `None` when it
/// cannot be (HTTP/1.0 without keep-alive, `Connection: close`, a body delimited by the close,
/// an oversized body, a head the proxy would refuse ([`crate::http1::parse_response`]), an interim
/// status, bytes beyond the body).
fn framing(head: &[u8], status: u16, rest: &[u8]) -> Option<Framing> {
    let mut fields = [httparse::EMPTY_HEADER; crate::http1::MAX_HEADERS];
    let r = crate::http1::parse_response(head, &mut fields, false).ok()??;
    if !r.keep_alive || r.head_len != head.len() || r.status != status || status < 200 {
        return None;
    }
    match r.framing {
        crate::http1::Framing::Empty => rest.is_empty().then_some(Framing::Length(0)),
        crate::http1::Framing::Chunked => Some(Framing::Chunked(rest.to_vec())),
        crate::http1::Framing::Length(n) if n <= MAX_DRAIN => {
            let have = rest.len() as u64;
            (have <= n).then(|| Framing::Length(n - have))
        }
        _ => None,
    }
}

/// Reads the rest of a response; true when it ended exactly (the connection can be reused).
async fn drain(stream: &mut TcpStream, framing: Framing) -> bool {
    let mut scratch = [0u8; 2048];
    match framing {
        Framing::Length(mut remaining) => {
            while remaining > 0 {
                let want = remaining.min(scratch.len() as u64) as usize;
                match stream.read(&mut scratch[..want]).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => remaining -= n as u64,
                }
            }
            true
        }
        Framing::Chunked(already) => {
            let mut body = ChunkedBody::default();
            let Ok(mut done) = body.feed(&already) else {
                return false;
            };
            while !done {
                match stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => match body.feed(&scratch[..n]) {
                        Ok(d) => done = d,
                        Err(()) => return false,
                    },
                }
            }
            true
        }
    }
}

/// A chunked body that is read only to keep the connection: the framing is the engine's
/// ([`Chunked`]); a chunk larger than [`MAX_DRAIN`], more than that in total, or bytes beyond the
/// body end it.
#[derive(Debug, Default)]
struct ChunkedBody {
    framing: Chunked,
    seen: u64,
}

impl ChunkedBody {
    /// Consumes `bytes`; Ok(true) once the body ended exactly at the end of `bytes`.
    fn feed(&mut self, bytes: &[u8]) -> Result<bool, ()> {
        self.seen += bytes.len() as u64;
        if self.seen > MAX_DRAIN + 1024 {
            return Err(());
        }
        let used = self
            .framing
            .feed(
                bytes,
                crate::http1::chunked::Output::Nothing,
                &mut Vec::new(),
            )
            .map_err(|_| ())?;
        if used < bytes.len() || self.framing.chunk_left() > MAX_DRAIN {
            return Err(());
        }
        Ok(self.framing.is_done())
    }
}

/// What a target keeps between two checks (an `Option<Conn>` is 16 bytes).
pub enum Conn {
    /// An idle HTTP/1.1 connection, parked outside any reactor: a check registers it with the
    /// runtime it runs on and parks it again when it is done (two `epoll_ctl` calls). Kept
    /// registered, a socket costs tokio about 290 bytes (a cache-line aligned 256-byte block and
    /// the stream), 29 MB at 100,000 instances; parked, it costs the descriptor. A parked
    /// connection can also move between runtimes (from the admission thread's to the
    /// scheduler's).
    Http(std::net::TcpStream),
    /// A gRPC channel (it reconnects by itself). Its tasks live on the runtime that made it.
    Grpc(Box<GrpcHealthCheck>),
}

impl Conn {
    /// Takes a kept HTTP connection off the current runtime's reactor.
    fn park(stream: TcpStream) -> Option<Conn> {
        stream.into_std().ok().map(Conn::Http)
    }

    /// Whether the next check may run on another runtime than this one's: an HTTP connection
    /// can, a gRPC channel (tied to its runtime) cannot and is dropped instead.
    pub fn portable(&self) -> bool {
        matches!(self, Conn::Http(_))
    }
}

/// One check of `target`, bounded by its timeout. `conn` is what the previous check kept;
/// `keep_alive` says whether an HTTP check may keep its connection. Returns the result and what
/// to keep for the next check.
pub async fn check(
    target: &Target,
    conn: Option<Conn>,
    keep_alive: bool,
) -> (Result<(), ProbeError>, Option<Conn>) {
    let spec = &target.spec;
    let deadline = Instant::now() + spec.timeout;
    let timed_out = || ProbeError::Timeout(spec.timeout);
    match spec.protocol {
        Protocol::None => (Ok(()), None),
        Protocol::Tcp => {
            match timeout_at(deadline, TcpHealthCheck { addr: target.addr }.check()).await {
                Ok(r) => (r, None),
                Err(_) => (Err(timed_out()), None),
            }
        }
        Protocol::Https => (super::https::check(target, deadline).await, None),
        Protocol::Grpc => {
            let kept = match conn {
                Some(Conn::Grpc(g)) => Some(g),
                _ => None,
            };
            grpc(target, kept, deadline).await
        }
        Protocol::Http => {
            let reused = match conn {
                Some(Conn::Http(s)) => TcpStream::from_std(s).ok(),
                // detected as gRPC-only (below): it stays checked over gRPC
                Some(Conn::Grpc(g)) => return grpc(target, Some(g), deadline).await,
                None => None,
            };
            let (result, kept) = http(target, reused, keep_alive, deadline).await;
            if matches!(result, Err(ProbeError::Malformed(_) | ProbeError::Io(_))) {
                // no HTTP/1.1 answer at all, as from an HTTP/2-only (gRPC) server: ask the gRPC
                // health service; SERVING passes, and later checks use gRPC
                let detected = grpc(target, None, deadline).await;
                if detected.0.is_ok() {
                    return detected;
                }
            }
            (result, kept.and_then(Conn::park))
        }
    }
}

/// A gRPC health check on `kept` (the previous check's channel) or a new channel.
async fn grpc(
    target: &Target,
    kept: Option<Box<GrpcHealthCheck>>,
    deadline: Instant,
) -> (Result<(), ProbeError>, Option<Conn>) {
    let spec = &target.spec;
    let grpc = match kept {
        Some(g) => g,
        None => match GrpcHealthCheck::new(target.addr, spec.grpc_service.clone(), spec.timeout) {
            Ok(g) => Box::new(g),
            Err(e) => return (Err(e), None),
        },
    };
    let result = timeout_at(deadline, grpc.check())
        .await
        .unwrap_or_else(|_| Err(ProbeError::Timeout(spec.timeout)));
    (result, Some(Conn::Grpc(grpc)))
}

/// An HTTP check on `reused` or, if the server closed that one while it was idle, on a fresh
/// connection. (A parked connection's readiness is unknown until the exchange: a close shows up
/// as a failed write or an end of stream before the first byte.)
async fn http(
    target: &Target,
    reused: Option<TcpStream>,
    keep_alive: bool,
    deadline: Instant,
) -> (Result<(), ProbeError>, Option<TcpStream>) {
    let spec = &target.spec;
    let timed_out = || ProbeError::Timeout(spec.timeout);
    let request = match &target.host {
        Some(host) => http_request(&spec.path, host, keep_alive),
        None => http_request(&spec.path, &target.addr, keep_alive),
    };
    if let Some(mut stream) = reused {
        match timeout_at(
            deadline,
            exchange(&mut stream, request.as_bytes(), &spec.expected, true),
        )
        .await
        {
            Err(_) => return (Err(timed_out()), None),
            // closed by the server while idle (a keep-alive timeout): start over on a new one
            Ok(Err(Failure::Stale(_))) => {}
            Ok(Err(Failure::Failed(e))) => return (Err(e), None),
            Ok(Ok(head)) => return finish(stream, head, deadline).await,
        }
    }
    let mut stream = match timeout_at(deadline, TcpStream::connect(target.addr)).await {
        Err(_) => return (Err(timed_out()), None),
        Ok(Err(source)) => {
            return (
                Err(ProbeError::Connect {
                    addr: target.addr,
                    source,
                }),
                None,
            )
        }
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    match timeout_at(
        deadline,
        exchange(&mut stream, request.as_bytes(), &spec.expected, keep_alive),
    )
    .await
    {
        Err(_) => (Err(timed_out()), None),
        Ok(Err(Failure::Stale(e) | Failure::Failed(e))) => (Err(e), None),
        Ok(Ok(head)) if keep_alive => finish(stream, head, deadline).await,
        Ok(Ok(head)) => (head.verdict, None),
    }
}

/// Reads the rest of the response within the deadline and keeps the connection if it ended
/// cleanly; the verdict stands either way.
async fn finish(
    mut stream: TcpStream,
    head: Head,
    deadline: Instant,
) -> (Result<(), ProbeError>, Option<TcpStream>) {
    let kept = match head.keep {
        Some(framing) => timeout_at(deadline, drain(&mut stream, framing))
            .await
            .unwrap_or(false),
        None => false,
    };
    (head.verdict, kept.then_some(stream))
}

/// `grpc.health.v1.Health/Check` for `service` ("" = the whole server); healthy on SERVING.
#[derive(Debug, Clone)]
pub struct GrpcHealthCheck {
    channel: Channel,
    service: String,
}

impl GrpcHealthCheck {
    /// Builds a lazily connecting channel: must be called inside a tokio runtime.
    pub fn new(addr: SocketAddr, service: String, timeout: Duration) -> Result<Self, ProbeError> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| ProbeError::Grpc(format!("endpoint for {addr}: {e}")))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .tcp_nodelay(true);
        Ok(GrpcHealthCheck {
            channel: endpoint.connect_lazy(),
            service,
        })
    }
}

#[async_trait]
impl HealthCheck for GrpcHealthCheck {
    async fn check(&self) -> Result<(), ProbeError> {
        let mut client = HealthClient::new(self.channel.clone());
        let request = HealthCheckRequest {
            service: self.service.clone(),
        };
        match client.check(request).await {
            Ok(resp) => match resp.into_inner().status() {
                ServingStatus::Serving => Ok(()),
                other => Err(ProbeError::NotServing(other.as_str_name())),
            },
            Err(status) => Err(ProbeError::Grpc(format!(
                "{:?}: {}",
                status.code(),
                status.message()
            ))),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::net::TcpListener;

    /// A one-shot HTTP server answering every connection with `response`.
    async fn serve(response: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(response.as_bytes()).await;
                });
            }
        });
        addr
    }

    /// One HTTP check of `addr` on a fresh connection, healthy on `expected`.
    async fn http(addr: SocketAddr, expected: &str) -> Result<(), ProbeError> {
        let mut spec = crate::health::fixtures::spec();
        spec.protocol = Protocol::Http;
        spec.expected = StatusSet::parse(expected).unwrap();
        let target = Target {
            spec: Arc::new(spec),
            addr,
            host: None,
        };
        check(&target, None, false).await.0
    }

    #[test]
    fn only_the_proxys_own_shortage_is_no_verdict() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let connect = |errno| ProbeError::Connect {
            addr,
            source: std::io::Error::from_raw_os_error(errno),
        };
        assert!(connect(libc::EMFILE).is_local());
        assert!(ProbeError::Io(std::io::Error::from_raw_os_error(libc::ENFILE)).is_local());
        assert!(!connect(libc::ECONNREFUSED).is_local());
        assert!(!ProbeError::Timeout(Duration::from_secs(1)).is_local());
        assert!(!ProbeError::Status(500).is_local());
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content").unwrap(), 204);
        assert_eq!(parse_status_line(b"HTTP/1.0 503").unwrap(), 503);
        assert!(parse_status_line(b"SSH-2.0-OpenSSH").is_err());
        assert!(parse_status_line(b"HTTP/1.1 20x ok").is_err());
    }

    #[tokio::test]
    async fn http_check_uses_expected_statuses() {
        let ok = serve("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
        let sick = serve("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let garbage = serve("hello\n").await;
        assert!(http(ok, "200-299").await.is_ok());
        let e = http(sick, "200-299").await.unwrap_err();
        assert!(matches!(e, ProbeError::Status(503)), "{e}");
        assert!(http(sick, "200,503").await.is_ok());
        assert!(matches!(
            http(garbage, "200").await,
            Err(ProbeError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn refused_connections_fail_tcp_and_http() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        assert!(TcpHealthCheck { addr }.check().await.is_ok());
        drop(l);
        let e = TcpHealthCheck { addr }.check().await.unwrap_err();
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
        assert!(matches!(
            http(addr, "200").await,
            Err(ProbeError::Connect { .. })
        ));
    }

    #[test]
    fn responses_that_allow_reuse_are_recognised() {
        let f = |head: &str, rest: &str| {
            let status = parse_status_line(head.lines().next().unwrap().as_bytes()).unwrap();
            framing(head.as_bytes(), status, rest.as_bytes())
        };
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(f(ok, ""), Some(Framing::Length(5)));
        assert_eq!(f(ok, "hel"), Some(Framing::Length(2)));
        assert_eq!(f(ok, "hello!"), None, "bytes beyond the body");
        let chunked = "HTTP/1.1 503 Busy\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(f(chunked, "5"), Some(Framing::Chunked(b"5".to_vec())));
        assert_eq!(
            f("HTTP/1.1 204 No Content\r\n\r\n", ""),
            Some(Framing::Length(0))
        );
        for head in [
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 100 Continue\r\n\r\n",
        ] {
            assert_eq!(f(head, ""), None, "{head:?}");
        }
        assert_eq!(
            f(
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
                ""
            ),
            Some(Framing::Length(0))
        );
    }

    #[test]
    fn chunked_bodies_end_exactly() {
        let body = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n";
        // any split into reads gives the same answer
        for split in 0..body.len() {
            let mut c = ChunkedBody::default();
            let first = c.feed(&body[..split]).unwrap();
            assert!(!first || split == body.len(), "ended early at {split}");
            assert_eq!(c.feed(&body[split..]), Ok(true), "split at {split}");
        }
        let mut c = ChunkedBody::default();
        assert_eq!(c.feed(b"0\r\n\r\n"), Ok(true));
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXX",
            b"0\r\n\r\nextra",
            b"fffffff\r\n",
        ] {
            assert!(ChunkedBody::default().feed(bad).is_err(), "{bad:?}");
        }
    }

    /// A keep-alive HTTP/1.1 server: answers every request on a connection with `response`;
    /// closes after `per_connection` requests (0 = never). Returns (address, connections, requests).
    pub(crate) async fn keep_alive_server(
        response: &'static str,
        per_connection: usize,
    ) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (conns, reqs) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (c, r) = (conns.clone(), reqs.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut served = 0;
                    loop {
                        let mut chunk = [0u8; 1024];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        while let Some(end) = find_head_end(&buf) {
                            buf.drain(..end);
                            r.fetch_add(1, Ordering::SeqCst);
                            if s.write_all(response.as_bytes()).await.is_err() {
                                return;
                            }
                            served += 1;
                            if served == per_connection {
                                return; // closes
                            }
                        }
                    }
                });
            }
        });
        (addr, conns, reqs)
    }

    fn target(addr: SocketAddr) -> Target {
        Target {
            spec: Arc::new(crate::health::CheckSpec {
                tls: None,
                protocol: Protocol::Http,
                path: "/health".into(),
                port: None,
                expected: StatusSet::parse("200-299").unwrap(),
                grpc_service: String::new(),
                interval: Duration::from_millis(100),
                timeout: Duration::from_millis(2000),
                jitter: Duration::ZERO,
                healthy_threshold: 1,
                unhealthy_threshold: 1,
            }),
            addr,
            host: None,
        }
    }

    #[tokio::test]
    async fn http_checks_reuse_their_connection_and_reconnect_when_it_closes() {
        let chunked = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        for response in ["HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", chunked] {
            // the server closes every connection after 3 requests
            let (addr, conns, reqs) = keep_alive_server(response, 3).await;
            let t = target(addr);
            let mut conn = None;
            for i in 0..9 {
                let (result, kept) = check(&t, conn.take(), true).await;
                assert!(result.is_ok(), "check {i}: {result:?}");
                assert!(kept.is_some(), "check {i} kept no connection");
                conn = kept;
                // let the close after every third answer arrive before the next check
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(reqs.load(Ordering::SeqCst), 9);
            assert_eq!(conns.load(Ordering::SeqCst), 3, "{response:?}");
        }
    }

    #[tokio::test]
    async fn a_connection_closed_between_checks_is_replaced_without_a_failure() {
        // answers once per connection and closes; our next check may find it closed at any point
        let (addr, conns, _) =
            keep_alive_server("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", 1).await;
        let t = target(addr);
        let mut conn = None;
        for i in 0..20 {
            let (result, kept) = check(&t, conn.take(), true).await;
            assert!(result.is_ok(), "check {i}: {result:?}");
            conn = kept;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 20);
    }

    #[tokio::test]
    async fn responses_that_end_the_connection_are_not_kept() {
        for response in [
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\n\r\nbody until close",
        ] {
            let (addr, _, _) = keep_alive_server(response, 0).await;
            let (result, kept) = check(&target(addr), None, true).await;
            assert!(result.is_ok(), "{response:?}: {result:?}");
            assert!(kept.is_none(), "{response:?} was kept");
        }
        // without keep-alive nothing is kept and the request asks to close
        let (addr, _, _) =
            keep_alive_server("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", 0).await;
        let (result, kept) = check(&target(addr), None, false).await;
        assert!(result.is_ok() && kept.is_none());
        // a failing status keeps the connection too (it is the answer, not a broken connection)
        let (addr, conns, _) =
            keep_alive_server("HTTP/1.1 503 Busy\r\ncontent-length: 4\r\n\r\nbusy", 0).await;
        let (result, kept) = check(&target(addr), None, true).await;
        assert!(matches!(result, Err(ProbeError::Status(503))), "{result:?}");
        let (result, kept) = check(&target(addr), kept, true).await;
        assert!(matches!(result, Err(ProbeError::Status(503))) && kept.is_some());
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_connection_that_stops_answering_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        // answers the first request, then never again
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await;
            let _ = s.read(&mut buf).await;
            std::future::pending::<()>().await;
        });
        let t = target(addr);
        let (result, kept) = check(&t, None, true).await;
        assert!(result.is_ok() && kept.is_some());
        let (result, kept) = check(&t, kept, true).await;
        assert!(matches!(result, Err(ProbeError::Timeout(_))), "{result:?}");
        assert!(kept.is_none());
    }
}

//! The native HTTP/1.1 proxy engine (`proxy.engine = "native"`, the default).
//!
//! pingora still runs the process: listeners, threads, signals, graceful shutdown, the admin
//! service and the background tasks. What this module replaces is pingora-proxy's per-request
//! path, which measured at about 0.55× nginx's requests per second on one core: a pingora
//! [`ServerApp`] that owns each client connection and proxies its requests itself.
//!
//! Per request, on one connection task, with no allocation in the common case:
//!
//! ```text
//! read head ─▶ parse (httparse, borrowed) ─▶ route (one ArcSwap load) ─▶ upstream head into a reused buffer
//!     ─▶ idle upstream connection from this thread's pool, or connect (retry another instance on failure)
//!     ─▶ one write: head (+ body when it is already buffered)
//!     ─▶ read response head ─▶ one write to the client: head (+ body when it is already buffered)
//!     ─▶ stream the rest of the body, if any ─▶ connection back to the pool
//! ```
//!
//! Client connections come from the proxy listener (TCP, [`ProxyListener`]) and from the TLS
//! listener when ALPN chose HTTP/1.1 ([`crate::tls`]): the engine is generic over the client
//! stream ([`ClientIo`]).
//!
//! Files, one step each: [`client`] (the client stream), [`request`] (head, routing, our own answers), [`exchange`] (instances,
//! retries, sending the request and its body), [`relay`] (the response, upgrades), [`pool`],
//! [`timer`], [`threads`]. Messages are read and framed by [`crate::http1`], whose module docs
//! state the rules: the proxy frames every message it forwards itself, so no request or response
//! can be read one way by switchyard and another way by an instance or a client.
//!
//! Proxy semantics:
//! - Our own 404/503, and 502/504 with a body naming the service; 400/408/431/501 for requests
//!   that break the rules, then the connection closes.
//! - A request head must arrive within `proxy.request_header_timeout_ms` in all (408).
//! - Retries: a connect failure (nothing sent) is retried on another instance for every method; a
//!   request that may have reached an instance (a reused connection that closed, no response
//!   byte, a silent instance) is sent again only when its method is idempotent (RFC 9110 §9.2.2).
//! - A request body that did not come with the head is streamed while the response is read: an
//!   instance that answers early (413, 401) is relayed at once, and full-duplex exchanges work;
//!   the client connection closes after an early answer whose request body was not all read.
//! - `Expect: 100-continue` is answered by the proxy itself (as nginx does); `Upgrade` requests
//!   (WebSocket) become a byte tunnel after the instance answers 101 (a 101 to any other request
//!   is a 502), ended after `proxy.tunnel_idle_timeout_ms` without traffic.
//! - Passive ejection, X-Forwarded-*, metrics and the access log as [`crate::proxy`] describes.

mod client;
mod exchange;
pub mod pool;
mod relay;
mod request;
pub mod threads;
pub mod timer;

use std::io::{self, Write};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use crate::config::ProxyConfig;
use crate::http1::MAX_HEAD;
use crate::routing::{Router, SharedTable};
pub(crate) use client::ClientIo;
use request::Head;
use threads::{Serving, Workers};
use timer::timed;

/// Request bodies up to this size that arrived with the head are sent with it in one write (and
/// can be replayed on another instance).
pub(crate) const INLINE_BODY: usize = 16 * 1024;
const CLIENT_BUF: usize = 8 * 1024;
const UPSTREAM_BUF: usize = 16 * 1024;

/// The native engine, shared by all connections.
pub struct Engine {
    pub table: SharedTable,
    pub router: Router,
    pub cfg: ProxyConfig,
    pub access_log: bool,
    pub workers: Workers,
    /// HTTP/2 clients and services with non-HTTP/1.1 instances are served there.
    pub gateway: Arc<crate::gateway::Gateway>,
    /// This process's name in `Via` ([`via_name`]).
    pub via: Arc<str>,
    /// Open client connections at most ([`crate::limits::client_connection_limit`]).
    pub max_clients: usize,
}

/// The answer to a connection over `proxy.max_client_connections`.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 51\r\nconnection: close\r\nretry-after: 1\r\n\r\nswitchyard: too many client connections, try again\n";

/// A name for this process in `Via` fields: unique enough that a request which comes back to the
/// same process (a registration that leads to the proxy itself, directly or through other
/// proxies) is recognised as a loop.
pub fn via_name() -> Arc<str> {
    Arc::from(format!("switchyard-{:08x}", rand::random::<u32>()))
}

/// The proxy listener: its cleartext connections are the engine's (TLS ones come through
/// [`crate::tls::TlsListener`], which shares the engine).
pub struct ProxyListener(pub Arc<Engine>);

#[async_trait]
impl ServerApp for ProxyListener {
    async fn process_new(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let (socket, ip, there, serving) = self.0.admit(io)?;
        let shutdown = shutdown.clone();
        // The connection gets a task of its own, also on this thread: pingora's task for it (2 KiB,
        // sized for its accept and handshake steps) and this boxed future (1.4 KiB) end now
        // instead of living as long as the connection.
        let engine = self.0.clone();
        there.handle().spawn(async move {
            // registers the socket with this thread's runtime (it is already non-blocking: the
            // flag belongs to the socket, shared with pingora's closed descriptor)
            match TcpStream::from_std(socket) {
                Ok(io) => engine.serve(io, ip, shutdown, serving).await,
                Err(e) => debug!("client connection from {ip} dropped: {e}"),
            }
        });
        None
    }
}

impl Engine {
    /// Takes a new client connection out of pingora's stream and picks the thread to serve it
    /// ([`threads`]). `None`: dropped, or refused at `proxy.max_client_connections` (with a short
    /// 503 written to the socket).
    pub(crate) fn admit(
        &self,
        io: Stream,
    ) -> Option<(std::net::TcpStream, String, Arc<threads::Worker>, Serving)> {
        let ip = io
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
            .map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
        // the socket leaves pingora's stream and the accepting thread's epoll (threads.rs)
        let socket = match take_socket(&io) {
            Ok(s) => s,
            Err(e) => {
                debug!("client connection from {ip} dropped: {e}");
                return None;
            }
        };
        drop(io);
        let here = self.workers.local();
        let Some((there, serving)) = self.workers.place(here.clone(), self.max_clients) else {
            // at proxy.max_client_connections: say so and close (the socket is still blocking-
            // free: a short answer fits the send buffer, or is dropped)
            crate::metrics::METRICS.client_connections_refused.inc();
            let _ = (&socket).write(TOO_MANY_CONNECTIONS);
            debug!("client connection from {ip} refused: proxy.max_client_connections reached");
            return None;
        };
        Some((socket, ip, there, serving))
    }
}

/// A duplicate of the client socket behind pingora's stream, not yet registered with any runtime.
#[allow(unsafe_code)] // a descriptor borrowed from pingora's stream
fn take_socket(io: &Stream) -> io::Result<std::net::TcpStream> {
    use std::os::fd::BorrowedFd;
    // SAFETY: the proxy listener is TCP (`proxy.listen` is a socket address), so pingora's stream
    // id is its socket's descriptor, open for as long as `io` lives; the duplicate is our own.
    let fd = unsafe { BorrowedFd::borrow_raw(io.id()) };
    Ok(std::net::TcpStream::from(fd.try_clone_to_owned()?))
}

impl Engine {
    /// Serves one client connection on the calling thread, request after request.
    pub(crate) async fn serve<S: ClientIo>(
        &self,
        io: S,
        ip: String,
        shutdown: ShutdownWatch,
        _serving: Serving,
    ) {
        if !self.cfg.work_stealing {
            // this task stays on this thread: its time limits can use the thread's wheel
            timer::drive_this_thread(&shutdown);
        }
        let mut conn = Conn {
            client: Buffered::new(io),
            out: Vec::new(),
            rbuf: Vec::new(),
            ip,
            shutdown,
        };
        let mut first = true;
        loop {
            if conn.client.len() == 0 {
                // between requests: idle keep-alive, ended early by shutdown. An idle connection
                // holds no buffers (taken again from the allocator's thread-local free lists,
                // uninitialised, when the next request arrives) and no request state.
                conn.trim();
                let limit = self.cfg.downstream_read_timeout;
                let next = timer::idle(limit, conn.client.fill_idle(MAX_HEAD), &mut conn.shutdown);
                match next.await {
                    Some(Ok(Some(n))) if n > 0 => {}
                    _ => break,
                }
            }
            // HTTP/2 with prior knowledge starts with its preface (boxed: rare, and the first
            // request only)
            let h2 = std::mem::take(&mut first)
                && crate::gateway::preface(&conn.client.buf) != crate::gateway::Preface::No
                && Box::pin(self.prior_knowledge(&mut conn)).await;
            // a request's state (about 1.2 KB) is boxed while it is served: inline, it would be
            // part of the task of every connection, idle or not
            let step = if h2 {
                Step::Gateway { h2 }
            } else {
                Box::pin(self.one_request(&mut conn)).await
            };
            match step {
                Step::Next => {}
                Step::Close => break,
                Step::Linger => {
                    Box::pin(linger(&mut conn.client.io)).await;
                    return;
                }
                Step::Gateway { h2 } => {
                    // the gateway (src/gateway) serves the rest of the connection, from the
                    // buffered bytes on (boxed: its state is no part of an HTTP/1 connection's)
                    let buf = std::mem::take(&mut conn.client.buf);
                    let gw = self.gateway.clone();
                    let client = crate::gateway::ClientInfo::new(conn.ip, S::TLS);
                    let (io, shutdown) = (conn.client.io, conn.shutdown);
                    return Box::pin(gw.serve_buffered(io, buf, h2, client, shutdown)).await;
                }
            }
        }
        let _ = conn.client.io.shutdown().await;
    }

    /// Whether the connection starts with the HTTP/2 preface (reading the rest of it if only its
    /// beginning arrived). HTTP/2 connections are the gateway's (src/gateway).
    async fn prior_knowledge<S: ClientIo>(&self, conn: &mut Conn<S>) -> bool {
        use crate::gateway::{preface, Preface};
        loop {
            match preface(&conn.client.buf) {
                Preface::No => return false,
                Preface::Yes => return true,
                Preface::Partial => {
                    let read = conn.client.fill(MAX_HEAD);
                    match timed(self.cfg.downstream_read_timeout, read).await {
                        Ok(Some(n)) if n > 0 => {}
                        _ => return false,
                    }
                }
            }
        }
    }
}

/// How long a closing connection whose client may still be sending (an early answer to an
/// upload) is drained before it is closed.
const LINGER: Duration = Duration::from_secs(2);

/// Closes a connection whose client may still be sending: our side first (FIN after the answer),
/// then its bytes are read and dropped until it closes too or [`LINGER`] ends. Closing at once with
/// unread bytes would reset the connection, and the reset can destroy the answer before the
/// client reads it (nginx's lingering close, for the same reason).
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) {
    if io.shutdown().await.is_err() {
        return;
    }
    let mut scratch = vec![0u8; 16 * 1024];
    let drain = async {
        loop {
            match io.read(&mut scratch).await {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            }
        }
    };
    let _ = timed(LINGER, drain).await;
}

/// A stream with a read buffer: `buf` holds the unread bytes, its spare capacity is where the
/// next read lands (never zero-filled: an idle or small request touches only the memory it uses).
struct Buffered<S> {
    io: S,
    buf: Vec<u8>,
}

impl<S: ClientIo> Buffered<S> {
    /// Waits for the next request on an idle connection, then reads it. The buffer is taken only
    /// once bytes are there (where the stream can tell): an idle connection holds none (8 KiB each
    /// otherwise).
    async fn fill_idle(&mut self, max: usize) -> io::Result<Option<usize>> {
        if self.buf.capacity() == 0 {
            if let Some(readable) = self.io.readable() {
                readable.await?;
            }
        }
        self.fill(max).await
    }
}

impl<S: tokio::io::AsyncRead + Unpin> Buffered<S> {
    fn new(io: S) -> Self {
        Buffered {
            io,
            buf: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.buf.len()
    }

    /// Reads more bytes, growing the buffer up to `max`. `Ok(Some(0))`: end of stream; `Ok(None)`:
    /// the buffer holds `max` bytes already.
    async fn fill(&mut self, max: usize) -> io::Result<Option<usize>> {
        read_more(&mut self.io, &mut self.buf, CLIENT_BUF, max).await
    }

    /// Drops the first `n` buffered bytes.
    fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
    }
}

/// Reads into the spare capacity of `buf` (at least `min` bytes of capacity, doubling when full,
/// at most `max`). `Ok(Some(0))`: end of stream; `Ok(None)`: `buf` already holds `max` bytes
/// (nothing read).
async fn read_more<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    min: usize,
    max: usize,
) -> io::Result<Option<usize>> {
    if buf.len() == buf.capacity() {
        if buf.len() >= max {
            return Ok(None);
        }
        let want = (buf.capacity() * 2).clamp(min, max);
        buf.reserve_exact(want - buf.len());
    }
    io.read_buf(buf).await.map(Some)
}

struct Conn<S> {
    client: Buffered<S>,
    /// Outgoing head (+ inline body), reused by every request on the connection.
    out: Vec<u8>,
    /// Upstream read buffer.
    rbuf: Vec<u8>,
    ip: String,
    shutdown: ShutdownWatch,
}

impl<S: ClientIo> Conn<S> {
    /// Frees the buffers of an idle connection; they are allocated again on the next request.
    fn trim(&mut self) {
        if self.client.len() == 0 {
            self.client.buf = Vec::new();
        }
        self.rbuf = Vec::new();
        self.out = Vec::new();
    }
}

pub(crate) enum Step {
    Next,
    Close,
    /// Close, but the client may still be sending: see [`linger`].
    Linger,
    /// The gateway serves this request (HTTP/2: the connection's preface) and the rest of the
    /// connection.
    Gateway {
        h2: bool,
    },
}

/// Writes one of our own answers (`request`: the request it answers, if its head was read).
/// Returns whether it was written.
async fn write_own<S: ClientIo>(
    conn: &mut Conn<S>,
    status: u16,
    body: &str,
    keep: bool,
    request: Option<&Head>,
    limit: Duration,
) -> bool {
    let http10 = request.is_some_and(|h| h.http10);
    // a HEAD request gets the head only
    let shown = if request.is_some_and(|h| h.head_request) {
        ""
    } else {
        body
    };
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    conn.out.clear();
    conn.out.reserve(192 + shown.len());
    let connection = match (keep, http10) {
        (false, _) => "Connection: close\r\n",
        (true, true) => "Connection: keep-alive\r\n",
        (true, false) => "",
    };
    use std::io::Write;
    let _ = write!(
        conn.out,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\ncache-control: no-store\r\n{connection}\r\n{shown}",
        body.len()
    );
    timed(limit, send(&mut conn.client.io, &conn.out))
        .await
        .is_ok()
}

/// Writes to the client (unbuffered: each call is one `write` when the socket takes it all).
async fn send<W: AsyncWrite + Unpin>(io: &mut W, bytes: &[u8]) -> io::Result<()> {
    io.write_all(bytes).await
}

//! The native HTTP/1.1 proxy engine (`proxy.engine = "native"`, the default).
//!
//! pingora still runs the process: listeners, threads, signals, graceful shutdown, the admin
//! service and the background tasks. What this module replaces is pingora-proxy's per-request
//! path, which measured at about 0.55× nginx on one core (BENCHMARKS.md): a pingora
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
//! The proxy semantics are the same as the pingora engine's ([`crate::proxy`]): our own 404/503,
//! connect failures retried on another instance for every method, an idempotent request whose
//! connection closed before any response byte retried too, 502/504 with a body naming the
//! service, passive ejection, X-Forwarded-*, hop-by-hop stripping, metrics and the access log.
//! `Expect: 100-continue` is answered by the proxy itself (as nginx does); `Upgrade` requests
//! (WebSocket) become a byte tunnel after the instance answers 101.

pub mod codec;
pub mod pool;
pub mod threads;
pub mod timer;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use smallvec::SmallVec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use crate::config::ProxyConfig;
use crate::proxy::{access_line, record_request, AccessLine, InFlight, Outcome};
use crate::routing::{Instance, InstanceState, Router, Service, SharedTable};
use codec::{Chunked, ClientConnection, Framing, HeadError, MAX_HEAD, MAX_HEADERS};
use threads::{Serving, Workers};
use timer::timed;

/// Request bodies up to this size that arrived with the head are sent with it in one write (and
/// can be replayed on another instance).
const INLINE_BODY: usize = 16 * 1024;
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
}

#[async_trait]
impl ServerApp for Engine {
    async fn process_new(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
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
        let (there, serving) = self.workers.place(here.clone());
        let shutdown = shutdown.clone();
        // The connection gets a task of its own, also on this thread: pingora's task for it (2 KiB,
        // sized for its accept and handshake steps) and this boxed future (1.4 KiB) end now
        // instead of living as long as the connection (BENCHMARKS.md, sixth session).
        let engine = self.clone();
        there.handle().spawn(async move {
            engine.serve(socket, ip, shutdown, serving).await;
        });
        None
    }
}

/// A duplicate of the client socket behind pingora's stream, not yet registered with any runtime.
fn take_socket(io: &Stream) -> io::Result<std::net::TcpStream> {
    use std::os::fd::BorrowedFd;
    // SAFETY: the proxy listener is TCP (`proxy.listen` is a socket address), so pingora's stream
    // id is its socket's descriptor, open for as long as `io` lives; the duplicate is our own.
    let fd = unsafe { BorrowedFd::borrow_raw(io.id()) };
    Ok(std::net::TcpStream::from(fd.try_clone_to_owned()?))
}

impl Engine {
    /// Serves one client connection on the calling thread, request after request.
    async fn serve(
        &self,
        socket: std::net::TcpStream,
        ip: String,
        shutdown: ShutdownWatch,
        _serving: Serving,
    ) {
        // registers the socket with this thread's runtime (it is already non-blocking: the flag
        // belongs to the socket, shared with pingora's closed descriptor)
        let io = match TcpStream::from_std(socket) {
            Ok(io) => io,
            Err(e) => {
                debug!("client connection from {ip} dropped: {e}");
                return;
            }
        };
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
                    Some(Ok(n)) if n > 0 => {}
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
                Step::Gateway { h2 } => {
                    // the gateway (src/gateway) serves the rest of the connection, from the
                    // buffered bytes on (boxed: its state is no part of an HTTP/1 connection's)
                    let buf = std::mem::take(&mut conn.client.buf);
                    let gw = self.gateway.clone();
                    let (io, ip, shutdown) = (conn.client.io, conn.ip, conn.shutdown);
                    return Box::pin(gw.serve_cleartext(io, buf, h2, ip, shutdown)).await;
                }
            }
        }
        let _ = conn.client.io.shutdown().await;
    }

    /// Whether the connection starts with the HTTP/2 preface (reading the rest of it if only its
    /// beginning arrived). HTTP/2 connections are the gateway's (src/gateway).
    async fn prior_knowledge(&self, conn: &mut Conn) -> bool {
        use crate::gateway::{preface, Preface};
        loop {
            match preface(&conn.client.buf) {
                Preface::No => return false,
                Preface::Yes => return true,
                Preface::Partial => {
                    let read = conn.client.fill(MAX_HEAD);
                    match timed(self.cfg.downstream_read_timeout, read).await {
                        Ok(n) if n > 0 => {}
                        _ => return false,
                    }
                }
            }
        }
    }
}

/// A stream with a read buffer: `buf` holds the unread bytes, its spare capacity is where the
/// next read lands (never zero-filled: an idle or small request touches only the memory it uses).
struct Buffered<S> {
    io: S,
    buf: Vec<u8>,
}

impl Buffered<TcpStream> {
    /// Waits for the next request on an idle connection, then reads it. The buffer is taken only
    /// once bytes are there: an idle connection holds none (8 KiB each otherwise).
    async fn fill_idle(&mut self, max: usize) -> io::Result<usize> {
        if self.buf.capacity() == 0 {
            self.io.readable().await?;
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

    /// Reads more bytes, growing the buffer up to `max`. `Ok(0)`: end of stream.
    async fn fill(&mut self, max: usize) -> io::Result<usize> {
        read_more(&mut self.io, &mut self.buf, CLIENT_BUF, max).await
    }

    /// Drops the first `n` buffered bytes.
    fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
    }
}

/// Reads into the spare capacity of `buf` (at least `min` bytes of capacity, doubling when full,
/// at most `max`). `Ok(0)`: end of stream.
async fn read_more<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    min: usize,
    max: usize,
) -> io::Result<usize> {
    if buf.len() == buf.capacity() {
        if buf.len() >= max {
            return Err(io::Error::other("buffer full"));
        }
        let want = (buf.capacity() * 2).clamp(min, max);
        buf.reserve_exact(want - buf.len());
    }
    io.read_buf(buf).await
}

struct Conn {
    client: Buffered<TcpStream>,
    /// Outgoing head (+ inline body), reused by every request on the connection.
    out: Vec<u8>,
    /// Upstream read buffer.
    rbuf: Vec<u8>,
    ip: String,
    shutdown: ShutdownWatch,
}

impl Conn {
    /// Frees the buffers of an idle connection; they are allocated again on the next request.
    fn trim(&mut self) {
        if self.client.len() == 0 {
            self.client.buf = Vec::new();
        }
        self.rbuf = Vec::new();
        self.out = Vec::new();
    }
}

enum Step {
    Next,
    Close,
    /// The gateway serves this request (HTTP/2: the connection's preface) and the rest of the
    /// connection.
    Gateway {
        h2: bool,
    },
}

/// What the request head said, kept after the head's borrow of the read buffer ends.
struct Head {
    head_len: usize,
    framing: Framing,
    keep_alive: bool,
    idempotent: bool,
    head_request: bool,
    upgrade: bool,
    expect_continue: bool,
    http10: bool,
    /// Method and path, only when the access log is on.
    log: Option<(String, String)>,
}

enum Route {
    Service(Arc<Service>),
    /// Answered by the proxy: status, body, and the labels to count it under.
    Own(u16, String, Option<Arc<str>>, Option<Arc<Service>>),
}

/// Why proxying to an instance failed.
enum UpstreamError {
    Connect(io::Error),
    /// The connection closed or failed before any response byte arrived.
    NoResponse(io::Error),
    Timeout,
    BadResponse(HeadError),
    /// Failed after the response started (nothing more can be sent to the client).
    Broken(io::Error),
    /// The client went away or sent a broken body.
    Client(io::Error),
}

impl Engine {
    /// Reads, routes and proxies one request whose first bytes are buffered. `Step::Close` ends
    /// the connection.
    async fn one_request(&self, conn: &mut Conn) -> Step {
        // 1. the request head
        // (bytes are always buffered here: serve waited for the first ones, and every read below
        // that returns adds some)
        let (head, route) = loop {
            match self.parse_head(conn) {
                Ok(Some(parsed)) => break parsed,
                Ok(None) => {}
                Err(e) => {
                    self.reject_head(conn, e).await;
                    return Step::Close;
                }
            }
            // the rest of the head
            let read = timed(self.cfg.downstream_read_timeout, conn.client.fill(MAX_HEAD)).await;
            match read {
                Ok(0) => return Step::Close,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    self.own_answer(conn, 408, "request head not received in time".into())
                        .await;
                    return Step::Close;
                }
                Err(_) => {
                    if conn.client.len() >= MAX_HEAD {
                        self.reject_head(conn, HeadError::TooLarge).await;
                    }
                    return Step::Close;
                }
            }
        };
        let start = Instant::now();
        let _in_flight = InFlight::new();
        match route {
            Route::Own(status, body, label, service) => {
                // an unread request body stays on the connection: close it after answering
                let keep = head.keep_alive
                    && head.framing.is_empty()
                    && !timer::shutting_down(&conn.shutdown);
                conn.client.consume(head.head_len.min(conn.client.len()));
                let written = write_own(
                    conn,
                    status,
                    &body,
                    keep,
                    Some(&head),
                    self.cfg.write_timeout,
                )
                .await;
                self.finish(
                    head.log.as_ref(),
                    service.as_ref(),
                    label.as_deref(),
                    None,
                    status,
                    start,
                    0,
                    None,
                );
                if keep && written {
                    Step::Next
                } else {
                    Step::Close
                }
            }
            Route::Service(service) if service.gateway => Step::Gateway { h2: false },
            Route::Service(service) => self.proxy(conn, head, service, start).await,
        }
    }

    /// Parses the buffered head and routes it; the upstream head is written into `conn.out`.
    fn parse_head(&self, conn: &mut Conn) -> Result<Option<(Head, Route)>, HeadError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let Some(req) = codec::parse_request(&conn.client.buf[..], &mut headers)? else {
            return Ok(None);
        };
        let head = Head {
            head_len: req.head_len,
            framing: req.framing,
            keep_alive: req.keep_alive,
            idempotent: req.is_idempotent(),
            head_request: req.is_head(),
            upgrade: req.upgrade.is_some(),
            expect_continue: req.expect_continue,
            http10: req.version == 0,
            log: self.access_log.then(|| {
                (
                    req.method.to_string(),
                    req.target.split('?').next().unwrap_or("").to_string(),
                )
            }),
        };
        if req.method == "CONNECT" {
            // whatever follows on the connection is not HTTP: answer and close
            let head = Head {
                keep_alive: false,
                ..head
            };
            return Ok(Some((
                head,
                Route::Own(
                    405,
                    "switchyard: CONNECT is not supported (not a forward proxy)\n".into(),
                    None,
                    None,
                ),
            )));
        }
        let table = self.table.load();
        let outcome = crate::proxy::route_request(&self.router, &table, req.host, req.target);
        let route = match outcome {
            Outcome::Proxy { service, rewrite } => {
                let target = rewrite.as_deref().unwrap_or(req.target);
                req.write_upstream_head(&mut conn.out, target, &conn.ip);
                Route::Service(service)
            }
            Outcome::Answer {
                status,
                body,
                label,
                service,
            } => Route::Own(status, body, label, service),
        };
        Ok(Some((head, route)))
    }

    async fn reject_head(&self, conn: &mut Conn, e: HeadError) {
        debug!(error = %e, client = %conn.ip, "refused request head");
        let status = e.status();
        self.own_answer(conn, status, format!("{e}")).await;
    }

    /// Answers without a routed request (bad head, read timeout) and closes.
    async fn own_answer(&self, conn: &mut Conn, status: u16, why: String) {
        let start = Instant::now();
        let body = format!("switchyard: {why}\n");
        write_own(conn, status, &body, false, None, self.cfg.write_timeout).await;
        self.finish(None, None, None, None, status, start, 0, None);
    }

    async fn proxy(
        &self,
        conn: &mut Conn,
        head: Head,
        service: Arc<Service>,
        start: Instant,
    ) -> Step {
        let mut attempt = Attempt {
            tried: SmallVec::new(),
            instance: None,
            inflight: None,
        };
        // A body that came with the head goes out in the same write and can be replayed.
        let buffered_body = conn.client.len() - head.head_len;
        let inline = match head.framing {
            Framing::Empty => true,
            Framing::Length(n) => n as usize <= INLINE_BODY && (n as usize) <= buffered_body,
            _ => false,
        };
        if inline {
            if let Framing::Length(n) = head.framing {
                let n = n as usize;
                conn.out
                    .extend_from_slice(&conn.client.buf[head.head_len..head.head_len + n]);
                conn.client.consume(head.head_len + n);
            } else {
                conn.client.consume(head.head_len);
            }
        } else {
            conn.client.consume(head.head_len);
        }

        let result = self
            .exchange(conn, &head, &service, inline, &mut attempt)
            .await;
        let (status, keep, error) = match result {
            Ok((status, keep)) => (status, keep, None),
            Err((e, sent)) => {
                let (mut status, reason) = self.error_status(&e, &attempt);
                if status == 504 {
                    if let Some(inst) = &attempt.instance {
                        crate::health::passive_failure(&service, inst, &"upstream read timed out");
                    }
                }
                if status >= 500 {
                    crate::events::RECENT.record(
                        "upstream",
                        format!(
                            "service {:?}: {status} {reason} (last instance {})",
                            service.name,
                            attempt
                                .instance
                                .as_ref()
                                .map_or("none".to_string(), |i| i.addr.to_string())
                        ),
                    );
                }
                match sent {
                    // the response had started: the client sees it cut short; count what it got
                    Some(s) => status = s,
                    None if status > 0 => {
                        let body = format!("switchyard: service {:?}: {reason}\n", service.name);
                        let limit = self.cfg.write_timeout;
                        write_own(conn, status, &body, false, Some(&head), limit).await;
                    }
                    None => {}
                }
                let error = match &e {
                    UpstreamError::Client(_) => "downstream",
                    UpstreamError::Timeout => "timeout",
                    _ => "upstream",
                };
                (status, false, Some(error))
            }
        };
        let tries = attempt.tried.len();
        let instance = attempt.instance.as_deref();
        self.finish(
            head.log.as_ref(),
            Some(&service),
            None,
            instance,
            status,
            start,
            tries,
            error,
        );
        if keep {
            Step::Next
        } else {
            Step::Close
        }
    }

    fn error_status(&self, e: &UpstreamError, attempt: &Attempt) -> (u16, String) {
        let tries = attempt.tried.len();
        match e {
            UpstreamError::Timeout => (504, "upstream timed out".into()),
            UpstreamError::Connect(err) if err.kind() == io::ErrorKind::TimedOut => (
                502,
                format!("connecting to the upstream timed out after {tries} tries"),
            ),
            UpstreamError::Connect(err) if err.kind() == io::ErrorKind::NotFound => {
                (if tries == 0 { 503 } else { 502 }, err.to_string())
            }
            UpstreamError::Connect(err) => (
                502,
                format!("upstream error after {tries} tries: connect: {err}"),
            ),
            UpstreamError::NoResponse(err) => (
                502,
                format!(
                    "upstream error after {tries} tries: connection closed before response: {err}"
                ),
            ),
            UpstreamError::BadResponse(err) => {
                (502, format!("upstream sent an invalid response: {err}"))
            }
            UpstreamError::Broken(e) => (
                502,
                format!("upstream connection broke during the response: {e}"),
            ),
            UpstreamError::Client(_) => (0, "client went away".into()),
        }
    }

    /// Sends the request to an instance (retrying as allowed) and relays the response. Returns the
    /// status and whether the client connection can carry another request; on error, the status
    /// already sent to the client if the response had started.
    ///
    /// The rare steps (a new upstream connection, a request body that did not come with the head,
    /// an upgrade tunnel) are boxed futures, so the boxed state of every request stays small.
    async fn exchange(
        &self,
        conn: &mut Conn,
        head: &Head,
        service: &Arc<Service>,
        inline: bool,
        attempt: &mut Attempt,
    ) -> Result<(u16, bool), (UpstreamError, Option<u16>)> {
        let cfg = &self.cfg;
        let mut body_sent = false;
        if conn.rbuf.capacity() < UPSTREAM_BUF {
            conn.rbuf.reserve_exact(UPSTREAM_BUF);
        }
        let (mut up, rlen, upstream_start) = 'instances: loop {
            let Some(inst) = attempt.next(service) else {
                let e = io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "no usable instance left after {} tries",
                        attempt.tried.len()
                    ),
                );
                return Err((UpstreamError::Connect(e), None));
            };
            let addr = inst.addr;
            let mut pooled = pool::checkout(addr, cfg.idle_timeout);
            loop {
                let reused = pooled.is_some();
                let mut up = match pooled.take() {
                    Some(s) => s,
                    None => match Box::pin(connect(addr, cfg.connect_timeout)).await {
                        Ok(s) => s,
                        Err(e) => {
                            crate::health::passive_failure(service, &inst, &e);
                            if attempt.can_retry(service, cfg.max_tries) {
                                continue 'instances;
                            }
                            return Err((UpstreamError::Connect(e), None));
                        }
                    },
                };
                let started = Instant::now();
                let sent = if inline {
                    timed(cfg.write_timeout, up.write_all(&conn.out)).await
                } else {
                    body_sent = true;
                    match Box::pin(self.send_streamed(conn, &mut up, head)).await {
                        Ok(()) => Ok(()),
                        Err(UpstreamError::Client(e)) => {
                            return Err((UpstreamError::Client(e), None))
                        }
                        Err(UpstreamError::NoResponse(e)) => Err(e),
                        Err(other) => return Err((other, None)),
                    }
                };
                let got = match sent {
                    Ok(()) => read_head(&mut up, &mut conn.rbuf, cfg.read_timeout).await,
                    Err(e) => Err(UpstreamError::NoResponse(e)),
                };
                match got {
                    Ok(n) => break 'instances (up, n, started),
                    Err(UpstreamError::NoResponse(e)) => {
                        let replayable = inline || !body_sent;
                        // a pooled connection the instance had just closed: same instance, fresh connection
                        if reused && replayable {
                            continue;
                        }
                        if head.idempotent
                            && replayable
                            && attempt.can_retry(service, cfg.max_tries)
                        {
                            continue 'instances;
                        }
                        return Err((UpstreamError::NoResponse(e), None));
                    }
                    // no first byte within read_timeout: an idempotent request goes to another
                    // instance (as nginx's proxy_next_upstream timeout); the silent one counts
                    // towards passive ejection either way
                    Err(UpstreamError::Timeout)
                        if head.idempotent
                            && (inline || !body_sent)
                            && attempt.can_retry(service, cfg.max_tries) =>
                    {
                        crate::health::passive_failure(service, &inst, &"upstream read timed out");
                        continue 'instances;
                    }
                    Err(e) => return Err((e, None)),
                }
            }
        };
        let inst = attempt.instance.clone();
        // 2. the response head (interim 1xx answers other than 101 are not relayed)
        let mut rlen = rlen;
        let mut start_at = 0;
        let resp = loop {
            {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let parsed = codec::parse_response(
                    &conn.rbuf[start_at..rlen],
                    &mut headers,
                    head.head_request,
                );
                match parsed {
                    Ok(Some(r)) if (100..200).contains(&r.status) && r.status != 101 => {
                        start_at += r.head_len;
                        if start_at < rlen {
                            continue;
                        }
                    }
                    Ok(Some(r)) => {
                        let shutting_down = timer::shutting_down(&conn.shutdown);
                        let facts = client_head(&mut conn.out, shutting_down, head, &r);
                        break RespFacts {
                            body_start: start_at + r.head_len,
                            ..facts
                        };
                    }
                    Ok(None) => {}
                    Err(e) => return Err((UpstreamError::BadResponse(e), None)),
                }
            }
            // more bytes needed for the head
            conn.rbuf.drain(..start_at);
            start_at = 0;
            let more = read_more(&mut up, &mut conn.rbuf, UPSTREAM_BUF, MAX_HEAD);
            match timed(cfg.read_timeout, more).await {
                Ok(0) => {
                    let e = HeadError::Invalid("connection closed inside the response head");
                    return Err((UpstreamError::BadResponse(e), None));
                }
                Ok(_) => rlen = conn.rbuf.len(),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Err((UpstreamError::Timeout, None))
                }
                Err(e) if e.kind() == io::ErrorKind::Other && conn.rbuf.len() >= MAX_HEAD => {
                    return Err((UpstreamError::BadResponse(HeadError::TooLarge), None))
                }
                Err(e) => return Err((UpstreamError::NoResponse(e), None)),
            }
        };
        if let Some(inst) = &inst {
            crate::health::passive_success(service, inst);
        }
        service
            .metrics()
            .upstream
            .observe(upstream_start.elapsed().as_secs_f64());
        let status = resp.status;
        let sent = Some(status);

        // 3. the body: whatever is buffered goes out in the same write as the head
        let mut state = BodyState::new(resp.framing, resp.dechunk);
        conn.out.reserve(rlen - resp.body_start);
        let used = state
            .feed(&conn.rbuf[resp.body_start..rlen], &mut conn.out)
            .map_err(|e| (UpstreamError::BadResponse(e), None))?;
        let mut extra = resp.body_start + used < rlen;
        timed(cfg.write_timeout, send(&mut conn.client.io, &conn.out))
            .await
            .map_err(|e| (UpstreamError::Client(e), sent))?;
        if resp.mode == ClientConnection::Upgrade {
            Box::pin(self.tunnel(conn, up, resp.body_start, rlen)).await;
            return Ok((status, false));
        }
        while !state.done() && !extra {
            conn.rbuf.clear();
            let n = match timed(cfg.read_timeout, up.read_buf(&mut conn.rbuf)).await {
                Ok(0) if resp.framing == Framing::UntilClose => break,
                Ok(0) => {
                    let e = io::Error::new(io::ErrorKind::UnexpectedEof, "response body cut short");
                    return Err((UpstreamError::Broken(e), sent));
                }
                Ok(n) => n,
                Err(e) => return Err((UpstreamError::Broken(e), sent)),
            };
            conn.out.clear();
            let used = state
                .feed(&conn.rbuf[..n], &mut conn.out)
                .map_err(|e| (UpstreamError::BadResponse(e), sent))?;
            extra = used < n;
            timed(cfg.write_timeout, send(&mut conn.client.io, &conn.out))
                .await
                .map_err(|e| (UpstreamError::Client(e), sent))?;
        }
        let complete = state.done() || resp.framing == Framing::UntilClose;
        // bytes after the end of the response mean the instance broke framing: do not reuse
        if resp.upstream_keep && !extra && state.done() {
            if let Some(inst) = &inst {
                pool::checkin(inst.addr, up, cfg.keepalive_pool_size, cfg.idle_timeout);
            }
        }
        Ok((status, complete && !extra && mode_keeps(resp.mode)))
    }

    /// Sends the head and a body that did not arrive with it, reading it from the client as it
    /// comes. Errors: `Client` (the client failed), `NoResponse` (the upstream write failed).
    async fn send_streamed(
        &self,
        conn: &mut Conn,
        up: &mut TcpStream,
        head: &Head,
    ) -> Result<(), UpstreamError> {
        let cfg = &self.cfg;
        timed(cfg.write_timeout, up.write_all(&conn.out))
            .await
            .map_err(UpstreamError::NoResponse)?;
        let mut continue_sent = false;
        let mut chunked = Chunked::default();
        let mut left = match head.framing {
            Framing::Length(n) => n,
            _ => u64::MAX,
        };
        loop {
            // forward what is buffered
            let avail = &conn.client.buf[..];
            let used = match head.framing {
                Framing::Chunked => chunked.feed(avail, None).map_err(|e| {
                    UpstreamError::Client(io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
                })?,
                _ => (left.min(avail.len() as u64)) as usize,
            };
            if used > 0 {
                timed(cfg.write_timeout, up.write_all(&conn.client.buf[..used]))
                    .await
                    .map_err(UpstreamError::NoResponse)?;
                conn.client.consume(used);
                if head.framing != Framing::Chunked {
                    left -= used as u64;
                }
            }
            let done = match head.framing {
                Framing::Chunked => chunked.is_done(),
                _ => left == 0,
            };
            if done {
                return Ok(());
            }
            if head.expect_continue && !continue_sent {
                continue_sent = true;
                timed(
                    cfg.write_timeout,
                    send(&mut conn.client.io, b"HTTP/1.1 100 Continue\r\n\r\n"),
                )
                .await
                .map_err(UpstreamError::Client)?;
            }
            match timed(cfg.downstream_read_timeout, conn.client.fill(CLIENT_BUF)).await {
                Ok(0) => {
                    return Err(UpstreamError::Client(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "client closed inside the request body",
                    )))
                }
                Ok(_) => {}
                Err(e) => return Err(UpstreamError::Client(e)),
            }
        }
    }

    /// After 101 Switching Protocols: bytes both ways until either side closes.
    async fn tunnel(&self, conn: &mut Conn, mut up: TcpStream, from: usize, to: usize) {
        if to > from
            && send(&mut conn.client.io, &conn.rbuf[from..to])
                .await
                .is_err()
        {
            return;
        }
        if conn.client.len() > 0 {
            let pending = std::mem::take(&mut conn.client.buf);
            if up.write_all(&pending).await.is_err() {
                return;
            }
        }
        let _ = tokio::io::copy_bidirectional(&mut conn.client.io, &mut up).await;
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        log: Option<&(String, String)>,
        service: Option<&Arc<Service>>,
        label: Option<&str>,
        instance: Option<&Instance>,
        status: u16,
        start: Instant,
        tries: usize,
        error: Option<&str>,
    ) {
        let elapsed = start.elapsed();
        record_request(service, label, status, elapsed);
        if let Some((method, path)) = log {
            let name = service
                .map(|s| &*s.name)
                .or(label)
                .unwrap_or(crate::metrics::UNKNOWN_SERVICE);
            access_line(&AccessLine {
                service: name,
                instance,
                method,
                path,
                status,
                elapsed,
                tries,
                error: error.unwrap_or(""),
            });
        }
    }
}

/// Decides how the response goes to the client and writes its head into `out`.
fn client_head(
    out: &mut Vec<u8>,
    shutting_down: bool,
    head: &Head,
    r: &codec::Response<'_>,
) -> RespFacts {
    let dechunk = head.http10 && r.framing == Framing::Chunked;
    let mode = if r.status == 101 && head.upgrade {
        ClientConnection::Upgrade
    } else if !head.keep_alive
        || shutting_down
        || r.framing == Framing::UntilClose
        || dechunk
        || r.status == 101
    {
        ClientConnection::Close
    } else if head.http10 {
        ClientConnection::KeepAlive10
    } else {
        ClientConnection::KeepAlive11
    };
    r.write_client_head(out, mode, dechunk);
    RespFacts {
        status: r.status,
        framing: r.framing,
        upstream_keep: r.keep_alive,
        dechunk,
        mode,
        body_start: r.head_len,
    }
}

/// What the response head decided, kept after its borrow of the read buffer ends.
struct RespFacts {
    status: u16,
    framing: Framing,
    /// The instance allows another request on this connection.
    upstream_keep: bool,
    /// Chunked body sent de-chunked (HTTP/1.0 client).
    dechunk: bool,
    mode: ClientConnection,
    /// Offset of the body in the upstream read buffer.
    body_start: usize,
}

fn mode_keeps(mode: ClientConnection) -> bool {
    matches!(
        mode,
        ClientConnection::KeepAlive10 | ClientConnection::KeepAlive11
    )
}

/// The instance(s) one request has tried, and the in-flight count of the current one.
struct Attempt {
    tried: SmallVec<[Arc<str>; 4]>,
    instance: Option<Arc<Instance>>,
    inflight: Option<Arc<InstanceState>>,
}

impl Attempt {
    fn next(&mut self, service: &Service) -> Option<Arc<Instance>> {
        self.release();
        let inst = service.select(&self.tried)?;
        if !self.tried.is_empty() {
            service.metrics().retries.inc();
        }
        self.tried.push(inst.key.clone());
        inst.state.inflight.fetch_add(1, Ordering::Relaxed);
        inst.state.requests.fetch_add(1, Ordering::Relaxed);
        self.inflight = Some(inst.state.clone());
        self.instance = Some(inst.clone());
        Some(inst)
    }

    fn can_retry(&self, service: &Service, max_tries: usize) -> bool {
        self.tried.len() < max_tries && service.has_candidate(&self.tried)
    }

    fn release(&mut self) {
        if let Some(st) = self.inflight.take() {
            st.inflight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.release();
    }
}

async fn connect(addr: SocketAddr, limit: Duration) -> io::Result<TcpStream> {
    let s = timed(limit, TcpStream::connect(addr)).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Reads until at least one byte of the response arrived. Returns the bytes buffered.
async fn read_head(
    up: &mut TcpStream,
    rbuf: &mut Vec<u8>,
    limit: Duration,
) -> Result<usize, UpstreamError> {
    rbuf.clear();
    match timed(limit, up.read_buf(rbuf)).await {
        Ok(0) => Err(UpstreamError::NoResponse(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before responding",
        ))),
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(UpstreamError::Timeout),
        Err(e) => Err(UpstreamError::NoResponse(e)),
    }
}

/// Progress through a response body, appending what goes to the client to `out`.
enum BodyState {
    Empty,
    Length(u64),
    Chunked { framing: Chunked, decode: bool },
    UntilClose,
}

impl BodyState {
    fn new(framing: Framing, dechunk: bool) -> BodyState {
        match framing {
            Framing::Empty => BodyState::Empty,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::Chunked {
                framing: Chunked::default(),
                decode: dechunk,
            },
            Framing::UntilClose => BodyState::UntilClose,
        }
    }

    /// Takes body bytes from `input` into `out`; returns how many belonged to the body.
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, HeadError> {
        match self {
            BodyState::Empty => Ok(0),
            BodyState::Length(left) => {
                let n = (*left).min(input.len() as u64) as usize;
                out.extend_from_slice(&input[..n]);
                *left -= n as u64;
                Ok(n)
            }
            BodyState::Chunked { framing, decode } => {
                if *decode {
                    framing.feed(input, Some(out))
                } else {
                    let n = framing.feed(input, None)?;
                    out.extend_from_slice(&input[..n]);
                    Ok(n)
                }
            }
            BodyState::UntilClose => {
                out.extend_from_slice(input);
                Ok(input.len())
            }
        }
    }

    fn done(&self) -> bool {
        match self {
            BodyState::Empty => true,
            BodyState::Length(left) => *left == 0,
            BodyState::Chunked { framing, .. } => framing.is_done(),
            BodyState::UntilClose => false,
        }
    }
}

/// Writes one of our own answers (`request`: the request it answers, if its head was read).
/// Returns whether it was written.
async fn write_own(
    conn: &mut Conn,
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
async fn send(io: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    io.write_all(bytes).await
}

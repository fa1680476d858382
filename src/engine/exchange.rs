//! Sending a request to an instance: choosing it, connecting or reusing a pooled connection,
//! retrying what may be retried, and streaming a request body while the response is relayed.
//!
//! Retries (RFC 9110 §9.2.2): a connect failure sent nothing and is retried on another instance for
//! every method. Once the head was written, the instance may have acted on it, so a connection
//! that closes (or an instance that stays silent) before any response byte leads to a new attempt
//! only for an idempotent method, and only while the body can still be sent again (it came with
//! the head, or none of it was read yet), and only with `retry_on` "reset" (the default). An
//! answer whose status `retry_on` lists ("5xx", "gateway-error") is dropped and the request sent
//! to another instance under the same conditions. Every retry is withdrawn from the service's
//! retry budget ([`crate::routing::budget`]); every answer and failure after sending is counted
//! by outlier detection ([`crate::routing::outlier`]).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::atomic::{AtomicBool, AtomicU16};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::relay::{tunnel, Relay, Relayed};
use super::request::Head;
use super::{pool, read_more, timer, ClientIo, Conn, Engine, CLIENT_BUF, UPSTREAM_BUF};
use crate::config::ProxyConfig;
use crate::http1::{BodyError, BodyOut, Framing, HeadError, Reframe};
use crate::routing::outlier::{self, Answer};
use crate::routing::{Health, Instance, InstanceState, Service};
use timer::timed;

/// Why proxying to an instance failed.
pub(super) enum UpstreamError {
    /// No instance left to try (none usable, or all tried).
    NoInstance,
    /// The proxy itself ran short (open files, memory, local ports): no instance is to blame.
    Local(io::Error),
    /// The instance was ejected (by its checks) while the request waited for its first byte.
    Ejected,
    Connect(io::Error),
    /// The connection closed or failed before any response byte arrived.
    NoResponse(io::Error),
    Timeout,
    BadResponse(HeadError),
    /// The response body broke its framing (after its head, maybe already sent).
    BadResponseBody(BodyError),
    /// Failed after the response started.
    Broken(io::Error),
    /// The client went away, or stopped sending its body in time.
    Client(io::Error),
    /// The client's request body broke its framing.
    ClientBody(BodyError),
    /// The instance answered with a status `retry_on` lists, and the request may go elsewhere
    /// (its answer was dropped unread).
    Answered(u16),
    /// The client sent its body slower than `proxy.min_request_body_rate`.
    SlowClient,
}

/// Why streaming a request body stopped early.
enum PumpError {
    /// Reading from the client failed or it closed.
    Client(io::Error),
    /// The body broke its framing.
    Body(BodyError),
    /// Writing to the instance failed: it may have answered early and closed.
    Upstream,
    /// The client sent its body slower than `proxy.min_request_body_rate`.
    TooSlow,
}

/// The minimum rate of a streamed request body: once `grace` is over, `received` bytes must have
/// come by `start + grace + received / rate`.
struct BodyRate {
    start: Instant,
    grace: Duration,
    bytes_per_sec: u64,
}

impl BodyRate {
    fn new(cfg: &ProxyConfig) -> BodyRate {
        BodyRate {
            start: Instant::now(),
            grace: cfg.request_body_rate_grace,
            bytes_per_sec: cfg.min_request_body_rate,
        }
    }

    /// How long the next read may take (at most `per_read`).
    fn wait_limit(&self, received: u64, per_read: Duration) -> Duration {
        if self.bytes_per_sec == 0 {
            return per_read;
        }
        let earned =
            self.grace + Duration::from_secs_f64(received as f64 / self.bytes_per_sec as f64);
        let due = self.start + earned;
        due.saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
            .min(per_read)
    }
}

/// The instance(s) one request has tried, and the in-flight count of the current one.
#[derive(Default)]
pub(super) struct Attempt {
    pub tried: SmallVec<[Arc<str>; 4]>,
    pub instance: Option<Arc<Instance>>,
    inflight: Option<Arc<InstanceState>>,
    /// The request's hash key (policy `hash`).
    pub key: Option<u64>,
}

impl Attempt {
    fn next(&mut self, service: &Service) -> Option<Arc<Instance>> {
        self.release();
        let inst = service.select(&self.tried, self.key)?;
        self.tried.push(inst.key.clone());
        inst.state.inflight.fetch_add(1, Ordering::Relaxed);
        inst.state.requests.fetch_add(1, Ordering::Relaxed);
        self.inflight = Some(inst.state.clone());
        self.instance = Some(inst.clone());
        Some(inst)
    }

    /// Another instance may be tried: tries left, a candidate left, and the retry budget allows
    /// it (which then counts the retry).
    pub(super) fn can_retry(&self, service: &Service, max_tries: usize) -> bool {
        self.tried.len() < max_tries
            && service.has_candidate(&self.tried)
            && crate::routing::budget::try_retry(service)
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

impl Engine {
    /// Sends the request to an instance (retrying as allowed) and relays the response. Returns the
    /// status, whether the client connection can carry another request, and whether the whole
    /// request body was read; on error, the status already sent to the client if the response had
    /// started.
    ///
    /// The rare steps (a new upstream connection, a request body that did not come with the head,
    /// an upgrade tunnel) are boxed futures, so the boxed state of every request stays small.
    pub(super) async fn exchange<S: ClientIo>(
        &self,
        conn: &mut Conn<S>,
        head: &Head,
        service: &Arc<Service>,
        inline: bool,
        attempt: &mut Attempt,
    ) -> Result<(u16, bool, bool), (UpstreamError, Option<u16>)> {
        let cfg = &self.cfg;
        if conn.rbuf.capacity() < UPSTREAM_BUF {
            conn.rbuf.reserve_exact(UPSTREAM_BUF);
        }
        let on = service.traffic.retry.on;
        // an answer retry_on lists may be dropped only when the request can be sent again whole
        let status_retry = (on.status_5xx || on.gateway_error) && inline && head.idempotent;
        'answers: loop {
            let (mut up, first, started, inst) = 'instances: loop {
                let Some(inst) = attempt.next(service) else {
                    return Err((UpstreamError::NoInstance, None));
                };
                let addr = inst.addr;
                let mut pooled = pool::checkout(addr, cfg.idle_timeout);
                loop {
                    let reused = pooled.is_some();
                    let mut up = match pooled.take() {
                        Some(s) => s,
                        None => match Box::pin(connect(addr, cfg.connect_timeout)).await {
                            Ok(s) => s,
                            Err(e) if is_local(&e) => {
                                crate::metrics::METRICS.local_errors.inc();
                                return Err((UpstreamError::Local(e), None));
                            }
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
                    // the head (with the body when it came with it); a streamed body follows while the
                    // response is read
                    let failed = match timed(cfg.write_timeout, up.write_all(&conn.out)).await {
                        Ok(()) if !inline => break 'instances (up, None, started, inst),
                        Ok(()) => {
                            // an idempotent request may go elsewhere: its own limit, and it watches
                            let (limit, watch) = if head.idempotent {
                                (cfg.per_try_timeout, Some(&*inst))
                            } else {
                                (cfg.read_timeout, None)
                            };
                            match read_first(&mut up, &mut conn.rbuf, limit, watch).await {
                                Ok(n) => break 'instances (up, Some(n), started, inst),
                                Err(e) => e,
                            }
                        }
                        Err(e) => UpstreamError::NoResponse(e),
                    };
                    if !reused
                        && matches!(
                            failed,
                            UpstreamError::NoResponse(_) | UpstreamError::Timeout
                        )
                    {
                        outlier::observe(service, &inst, Answer::Failed);
                    }
                    match failed {
                        // the request may have reached the instance: again only when idempotent
                        UpstreamError::NoResponse(e) if head.idempotent => {
                            // a pooled connection the instance had just closed: a fresh one to the
                            // same instance
                            if reused {
                                continue;
                            }
                            if on.reset && attempt.can_retry(service, cfg.max_tries) {
                                continue 'instances;
                            }
                            return Err((UpstreamError::NoResponse(e), None));
                        }
                        // no first byte within read_timeout: an idempotent request goes to another
                        // instance (as nginx's proxy_next_upstream timeout); the silent one counts
                        // towards passive ejection either way
                        UpstreamError::Timeout
                            if head.idempotent
                                && on.reset
                                && attempt.can_retry(service, cfg.max_tries) =>
                        {
                            crate::health::passive_failure(
                                service,
                                &inst,
                                &"upstream read timed out",
                            );
                            continue 'instances;
                        }
                        // ejected while this request waited on it: another instance, at once
                        UpstreamError::Ejected if attempt.can_retry(service, cfg.max_tries) => {
                            continue 'instances;
                        }
                        e => return Err((e, None)),
                    }
                }
            };
            let sent = AtomicU16::new(0);
            let body_sent = AtomicBool::new(first.is_some());
            let relay = Relay {
                cfg,
                head,
                service,
                inst: &inst,
                started,
                shutting_down: timer::shutting_down(&conn.shutdown),
                sent: &sent,
                body_sent: &body_sent,
                retry: (status_retry && first.is_some()).then_some(&*attempt),
            };
            let relayed = match first {
                Some(n) => {
                    let Conn {
                        client, rbuf, out, ..
                    } = &mut *conn;
                    relay.run(&mut up, &mut client.io, rbuf, out, Some(n)).await
                }
                None => Box::pin(streamed(conn, &relay, &mut up)).await,
            };
            let relayed = match relayed {
                // dropped with its connection (its body unread); the request goes to another instance
                Err(UpstreamError::Answered(_)) => continue 'answers,
                Err(
                    e @ (UpstreamError::Timeout
                    | UpstreamError::NoResponse(_)
                    | UpstreamError::BadResponse(_)),
                ) if sent.load(Ordering::Relaxed) == 0 => {
                    outlier::observe(service, &inst, Answer::Failed);
                    Err(e)
                }
                r => r,
            };
            let Relayed {
                status,
                client_keep,
                upstream_reusable,
                upgrade,
            } = relayed.map_err(|e| {
                let s = sent.load(Ordering::Relaxed);
                (e, (s > 0).then_some(s))
            })?;
            let body_done = body_sent.load(Ordering::Relaxed);
            if let Some((from, to)) = upgrade {
                if body_done {
                    Box::pin(tunnel(conn, up, from, to, cfg.tunnel_idle_timeout)).await;
                }
                return Ok((status, false, body_done));
            }
            // an instance that answered before the whole request reached it may read the rest as a
            // new request: its connection is not reused, and the client's unread body ends the client
            // connection too
            if upstream_reusable && body_done {
                pool::checkin(inst.addr, up, cfg.keepalive_pool_size, cfg.idle_timeout);
            }
            return Ok((status, client_keep && body_done, body_done));
        }
    }
}

/// Sends the body that did not come with the head while the response is read and relayed, so
/// that an instance may answer before it has read the whole body (an early 413 or 401) or while
/// it still reads it (full duplex).
async fn streamed<S: ClientIo>(
    conn: &mut Conn<S>,
    relay: &Relay<'_>,
    up: &mut TcpStream,
) -> Result<Relayed, UpstreamError> {
    let cfg = relay.cfg;
    let head = relay.head;
    let Conn {
        client, out, rbuf, ..
    } = conn;
    // RFC 9110 §10.1.1: a client that asked waits for the go-ahead (never sent to HTTP/1.0)
    if head.expect_continue && !head.http10 && client.buf.is_empty() {
        timed(
            cfg.write_timeout,
            client.io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n"),
        )
        .await
        .map_err(UpstreamError::Client)?;
    }
    let (mut cr, mut cw) = ClientIo::split(&mut client.io);
    let cbuf = &mut client.buf;
    let (mut ur, mut uw) = up.split();
    let mut encoded = Vec::new();
    let pump = pump_body(cfg, head.framing, &mut cr, cbuf, &mut uw, &mut encoded);
    tokio::pin!(pump);
    let mut pumping = true;
    // until the body is sent, or the instance starts answering (no time limit on the answer while
    // the body goes out: the pump has its own limits)
    rbuf.clear();
    let early = tokio::select! {
        r = &mut pump => {
            pumping = false;
            match r {
                Ok(()) => {
                    relay.body_sent.store(true, Ordering::Relaxed);
                    None
                }
                Err(PumpError::Upstream) => None,
                Err(PumpError::Client(e)) => return Err(UpstreamError::Client(e)),
                Err(PumpError::Body(e)) => return Err(UpstreamError::ClientBody(e)),
                Err(PumpError::TooSlow) => return Err(UpstreamError::SlowClient),
            }
        }
        r = ur.read_buf(rbuf) => match r {
            Ok(0) => {
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, "closed before responding");
                return Err(UpstreamError::NoResponse(e));
            }
            Ok(n) => Some(n),
            Err(e) => return Err(UpstreamError::NoResponse(e)),
        },
    };
    let run = relay.run(&mut ur, &mut cw, rbuf, out, early);
    tokio::pin!(run);
    loop {
        tokio::select! {
            r = &mut pump, if pumping => {
                pumping = false;
                match r {
                    Ok(()) => relay.body_sent.store(true, Ordering::Relaxed),
                    // the instance stopped reading: what it answers decides
                    Err(PumpError::Upstream) => {}
                    Err(PumpError::Client(e)) => return Err(UpstreamError::Client(e)),
                    Err(PumpError::Body(e)) => return Err(UpstreamError::ClientBody(e)),
                    Err(PumpError::TooSlow) => return Err(UpstreamError::SlowClient),
                }
            }
            r = &mut run => return r,
        }
    }
}

/// Reads a request body from the client (what is buffered first) and sends it with the proxy's
/// framing: a length as it is, chunked re-encoded ([`crate::http1::chunked`]).
async fn pump_body<R, W>(
    cfg: &ProxyConfig,
    framing: Framing,
    client: &mut R,
    cbuf: &mut Vec<u8>,
    up: &mut W,
    encoded: &mut Vec<u8>,
) -> Result<(), PumpError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut body = Reframe::new(framing, BodyOut::Chunked);
    let rate = BodyRate::new(cfg);
    let mut received = cbuf.len() as u64;
    loop {
        if !cbuf.is_empty() {
            encoded.clear();
            let used = body.feed(cbuf, encoded).map_err(PumpError::Body)?;
            cbuf.drain(..used);
            if !encoded.is_empty() {
                timed(cfg.write_timeout, up.write_all(encoded))
                    .await
                    .map_err(|_| PumpError::Upstream)?;
            }
        }
        if body.done() {
            return Ok(());
        }
        let before = cbuf.len();
        let read = read_more(client, cbuf, CLIENT_BUF, CLIENT_BUF);
        let limit = rate.wait_limit(received, cfg.downstream_read_timeout);
        match timed(limit, read).await {
            Ok(Some(0)) => {
                return Err(PumpError::Client(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed inside the request body",
                )))
            }
            Ok(Some(_)) => received += (cbuf.len() - before) as u64,
            // the reader left a whole buffer unused (see BodyError::Held)
            Ok(None) => return Err(PumpError::Body(BodyError::Held(cbuf.len()))),
            Err(e)
                if e.kind() == io::ErrorKind::TimedOut && limit < cfg.downstream_read_timeout =>
            {
                return Err(PumpError::TooSlow)
            }
            Err(e) => return Err(PumpError::Client(e)),
        }
    }
}

/// A failure of the proxy's own resources, not of the instance it was connecting to.
fn is_local(e: &io::Error) -> bool {
    crate::limits::is_local_shortage(e)
}

async fn connect(addr: SocketAddr, limit: Duration) -> io::Result<TcpStream> {
    let s = timed(limit, TcpStream::connect(addr)).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// How often a request waiting for its first byte looks whether its instance was ejected.
const EJECTION_POLL: Duration = Duration::from_millis(250);

/// Reads until at least one byte of the response arrived, within `limit`; returns the bytes
/// buffered. With `watch` (a request that may go to another instance), it ends with
/// [`UpstreamError::Ejected`] as soon as that instance is found ejected while it stays silent (a
/// hung instance takes no waiting request down with it).
pub(super) async fn read_first<R: AsyncRead + Unpin>(
    up: &mut R,
    rbuf: &mut Vec<u8>,
    limit: Duration,
    watch: Option<&Instance>,
) -> Result<usize, UpstreamError> {
    rbuf.clear();
    // on the coarse clock: no clock read on the common path beyond the wheel's own
    let deadline = timer::now_ms() + limit.as_millis() as u64;
    loop {
        let left = Duration::from_millis(deadline.saturating_sub(timer::now_ms()));
        if left.is_zero() {
            return Err(UpstreamError::Timeout);
        }
        let slice = if watch.is_some() {
            left.min(EJECTION_POLL)
        } else {
            left
        };
        // read_buf is cancel-safe: a slice that ends without bytes loses none
        match timed(slice, up.read_buf(rbuf)).await {
            Ok(0) => {
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, "closed before responding");
                return Err(UpstreamError::NoResponse(e));
            }
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                if watch.is_some_and(|i| i.state.health() == Health::Unhealthy) {
                    return Err(UpstreamError::Ejected);
                }
            }
            Err(e) => return Err(UpstreamError::NoResponse(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_proxys_own_shortages_are_local() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOMEM,
            libc::ENOBUFS,
            libc::EADDRNOTAVAIL,
        ] {
            assert!(is_local(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        for errno in [
            libc::ECONNREFUSED,
            libc::ETIMEDOUT,
            libc::EHOSTUNREACH,
            libc::ECONNRESET,
        ] {
            assert!(!is_local(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        assert!(!is_local(&io::Error::from(io::ErrorKind::TimedOut)));
    }
}

//! Pooled hyper connections to instances, for the gateway ([`crate::gateway`]).
//!
//! - HTTP/2 (`h2c`, `grpc`, `h2`): connections are shared; a request takes a stream on the first
//!   open connection with fewer than `http2.upstream_max_streams_per_connection` streams in
//!   flight, else a new connection is opened. A stream
//!   slot is held until the response body ends or is dropped (a cancelled call).
//! - HTTP/1.1 (`http`, `https`, and `h2` when the instance's ALPN says http/1.1): a connection
//!   carries one request at a time; it goes back to the pool as soon as the response head has
//!   arrived and is handed out again once hyper has read the whole body (`is_ready`).
//!
//! Connections are keyed by address, TLS server name and protocol, and by the proxy thread that
//! opened them: a connection's task runs on that thread's runtime, so requests served there use
//! it without waking another thread (as the native engine's per-thread pool). Closed connections
//! are dropped when met; HTTP/1.1 connections idle longer than `proxy.idle_timeout_ms` too.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::body::Received;
use super::connect::{connect, ConnectError};
use super::{ClientTls, Protocol};
use crate::clock::clock_ms;
use crate::sync::lock;

thread_local! {
    /// This thread's id, read without the `Arc` that `thread::current()` clones.
    static THREAD: std::thread::ThreadId = std::thread::current().id();
}

/// Every this many requests, the pool drops closed and idle connections ([`Pool::sweep`]).
const SWEEP_EVERY: u32 = 1024;

/// Request bodies sent upstream: the client's body as it was received (HTTP/1.1 or HTTP/2), or
/// none (a bodiless idempotent request sent again to another instance).
pub type ReqBody = Either<Received, Empty<Bytes>>;

/// Settings of the pool and of its HTTP/2 connections.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// HTTP/1.1 connections kept per instance.
    pub max_idle_per_instance: usize,
    /// Streams in flight on one HTTP/2 connection, at most.
    pub max_streams_per_connection: usize,
    /// HTTP/2 PING interval on idle-looking connections (None: off) and the wait for its ack.
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    /// The thread whose runtime runs the connection's task.
    thread: std::thread::ThreadId,
    addr: SocketAddr,
    /// TLS server name (None: plain TCP).
    tls: Option<Arc<str>>,
    /// ALPN offered h2 (an `h2` instance's HTTP/1.1 connections are not an `https` one's).
    offer_h2: bool,
    /// Which TLS settings verified the instance (the address of its [`ClientTls`], which lives
    /// as long as the config): a service with its own CA never gets another one's connection.
    tls_config: usize,
}

struct H1 {
    send: http1::SendRequest<ReqBody>,
    since: Instant,
}

struct H2 {
    send: h2::client::SendRequest<Bytes>,
    streams: Arc<Streams>,
}

impl H2 {
    fn is_closed(&self) -> bool {
        self.streams.closed.load(Ordering::Relaxed)
    }
}

/// Streams in flight on one HTTP/2 connection, when the last one ended, and whether the
/// connection did.
#[derive(Default)]
pub(crate) struct Streams {
    pub(crate) now: AtomicUsize,
    /// [`crate::clock::clock_ms`] when a stream last ended.
    released_at: AtomicU64,
    /// The connection ended (set by its task, [`super::h2::handshake`]).
    pub(crate) closed: AtomicBool,
}

/// A stream taken on a shared HTTP/2 connection; given back on drop.
pub struct StreamSlot(Arc<Streams>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::Relaxed);
        self.0.released_at.store(clock_ms(), Ordering::Relaxed);
    }
}

/// The gate of opening an HTTP/2 connection to one instance: the last failure, if any.
type Opening = tokio::sync::Mutex<Option<(Instant, String)>>;

/// Where one request goes.
pub enum Sender {
    Http1(http1::SendRequest<ReqBody>, PoolKey),
    Http2(h2::client::SendRequest<Bytes>, StreamSlot),
}

/// Where an HTTP/1.1 connection goes back to.
pub struct PoolKey(Key);

/// TLS towards one instance: its configurations and the server name (SNI).
pub struct TlsTarget<'a> {
    pub config: &'a ClientTls,
    pub server_name: &'a str,
}

pub struct Pool {
    cfg: PoolConfig,
    h1: Mutex<HashMap<Key, Vec<H1>>>,
    h2: Mutex<HashMap<Key, Vec<H2>>>,
    /// One HTTP/2 connection being opened per instance at a time: a burst of streams waits for
    /// it (and shares it) instead of opening a connection each.
    /// The last failure to open one is kept for connect_timeout: those who waited for it fail at
    /// once (and go to another instance) instead of each trying in turn.
    opening: Mutex<HashMap<Key, Arc<Opening>>>,
    /// Requests since the last sweep.
    gets: AtomicU32,
}

impl Pool {
    pub fn new(cfg: PoolConfig) -> Pool {
        Pool {
            cfg,
            h1: Mutex::new(HashMap::new()),
            h2: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
            gets: AtomicU32::new(0),
        }
    }

    /// A sender for one request to `addr` speaking `protocol`: a pooled connection, or a new one.
    pub async fn get(
        &self,
        addr: SocketAddr,
        protocol: Protocol,
        tls: Option<TlsTarget<'_>>,
    ) -> Result<Sender, ConnectError> {
        if self.gets.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep();
        }
        let key = Key {
            thread: THREAD.with(|id| *id),
            addr,
            tls: tls.as_ref().map(|t| Arc::from(t.server_name)),
            offer_h2: protocol == Protocol::H2,
            tls_config: tls
                .as_ref()
                .map_or(0, |t| t.config as *const ClientTls as usize),
        };
        if protocol.http2() {
            if let Some(s) = self.take_h2(&key) {
                return Ok(s);
            }
            if protocol == Protocol::H2c || protocol == Protocol::Grpc {
                return Box::pin(self.open_shared(key, protocol, tls)).await;
            }
        }
        // an h2 instance may have answered ALPN with http/1.1: its connections are HTTP/1.1 ones
        if !protocol.http2() || protocol.tls() {
            if let Some(s) = self.take_h1(&key) {
                return Ok(s);
            }
        }
        // (boxed, as open_shared: opening a connection is the rare path, and its futures —
        // TCP, TLS and HTTP handshakes — are large; inline, every request's future would carry
        // them and be copied with them)
        Box::pin(self.open(key, protocol, tls)).await
    }

    /// A new HTTP/2 connection to a cleartext instance, opened by one stream while the others
    /// that need one wait for it and share it.
    async fn open_shared(
        &self,
        key: Key,
        protocol: Protocol,
        tls: Option<TlsTarget<'_>>,
    ) -> Result<Sender, ConnectError> {
        let addr = key.addr;
        let gate = lock(&self.opening).entry(key.clone()).or_default().clone();
        let mut last_failure = gate.lock().await;
        // opened by the stream we waited for
        if let Some(s) = self.take_h2(&key) {
            return Ok(s);
        }
        if let Some((at, error)) = &*last_failure {
            if at.elapsed() < self.cfg.connect_timeout {
                return Err(ConnectError::Recent {
                    addr,
                    error: error.clone(),
                });
            }
        }
        let opened = self.open(key, protocol, tls).await;
        *last_failure = opened
            .as_ref()
            .err()
            .map(|e| (Instant::now(), e.to_string()));
        opened
    }

    /// Drops closed connections, and idle ones (no stream for `idle_timeout`; an HTTP/1.1 one
    /// ready and unused as long) of every instance, including those no request goes to any more
    /// (deregistered instances): dropping its last sender ends a connection.
    pub fn sweep(&self) {
        let idle_ms = self.cfg.idle_timeout.as_millis() as u64;
        let now = clock_ms();
        lock(&self.h2).retain(|_, list| {
            list.retain(|c| {
                !c.is_closed()
                    && (c.streams.now.load(Ordering::Relaxed) > 0
                        || now.saturating_sub(c.streams.released_at.load(Ordering::Relaxed))
                            < idle_ms)
            });
            !list.is_empty()
        });
        let idle = self.cfg.idle_timeout;
        lock(&self.h1).retain(|_, list| {
            list.retain(|c| {
                !c.send.is_closed() && (c.since.elapsed() < idle || !c.send.is_ready())
            });
            !list.is_empty()
        });
        // gates nobody waits at and that remember no recent failure go
        let recent = |f: &Option<(Instant, String)>| {
            f.as_ref()
                .is_some_and(|(at, _)| at.elapsed() < self.cfg.connect_timeout)
        };
        lock(&self.opening)
            .retain(|_, g| Arc::strong_count(g) > 1 || g.try_lock().map_or(true, |f| recent(&f)));
    }

    /// Connections held (HTTP/1.1, HTTP/2), for tests.
    #[cfg(test)]
    pub fn held(&self) -> (usize, usize) {
        let count = |n: usize, l: usize| n + l;
        (
            lock(&self.h1).values().map(Vec::len).fold(0, count),
            lock(&self.h2).values().map(Vec::len).fold(0, count),
        )
    }

    fn take_h2(&self, key: &Key) -> Option<Sender> {
        let mut map = lock(&self.h2);
        let list = map.get_mut(key)?;
        list.retain(|c| !c.is_closed());
        // (an instance allowing fewer streams makes hyper queue the rest on the connection)
        let allowed = self.cfg.max_streams_per_connection;
        for c in list.iter() {
            // one increment per taker: the count never passes the limit
            let taken = c
                .streams
                .now
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < allowed).then_some(n + 1)
                })
                .is_ok();
            if taken {
                return Some(Sender::Http2(c.send.clone(), StreamSlot(c.streams.clone())));
            }
        }
        None
    }

    fn take_h1(&self, key: &Key) -> Option<Sender> {
        let mut map = lock(&self.h1);
        let list = map.get_mut(key)?;
        let idle = self.cfg.idle_timeout;
        list.retain(|c| !c.send.is_closed() && (c.since.elapsed() < idle || !c.send.is_ready()));
        let i = list.iter().rposition(|c| c.send.is_ready())?;
        let c = list.swap_remove(i);
        Some(Sender::Http1(c.send, PoolKey(key.clone())))
    }

    /// Gives an HTTP/1.1 connection back once its response head arrived; it is reused after
    /// hyper has read the body to its end (until then `is_ready` is false).
    pub fn put_back(&self, send: http1::SendRequest<ReqBody>, key: PoolKey) {
        if send.is_closed() {
            return;
        }
        let mut map = lock(&self.h1);
        let list = map.entry(key.0).or_default();
        if list.len() < self.cfg.max_idle_per_instance {
            list.push(H1 {
                send,
                since: Instant::now(),
            });
        }
    }

    async fn open(
        &self,
        key: Key,
        protocol: Protocol,
        tls: Option<TlsTarget<'_>>,
    ) -> Result<Sender, ConnectError> {
        let addr = key.addr;
        let io = match &tls {
            Some(t) if protocol.tls() => {
                let config = if protocol.http2() {
                    &t.config.h2
                } else {
                    &t.config.http1
                };
                connect(
                    addr,
                    self.cfg.connect_timeout,
                    Some((config, t.server_name)),
                )
                .await?
            }
            _ => connect(addr, self.cfg.connect_timeout, None).await?,
        };
        let h2 = if protocol.tls() {
            io.alpn_h2()
        } else {
            protocol.http2()
        };
        let handshake = |source| ConnectError::Handshake { addr, source };
        if h2 {
            let streams = Arc::new(Streams {
                now: AtomicUsize::new(1),
                released_at: AtomicU64::new(clock_ms()),
                closed: AtomicBool::new(false),
            });
            let keepalive = self
                .cfg
                .keepalive_interval
                .map(|i| (i, self.cfg.keepalive_timeout));
            let send = super::h2::handshake(io, addr, keepalive, streams.clone())
                .await
                .map_err(|e| ConnectError::Http2Handshake { addr, source: e })?;
            lock(&self.h2).entry(key).or_default().push(H2 {
                send: send.clone(),
                streams: streams.clone(),
            });
            Ok(Sender::Http2(send, StreamSlot(streams)))
        } else {
            let (send, conn) = http1::Builder::new()
                .handshake(TokioIo::new(io))
                .await
                .map_err(handshake)?;
            tokio::spawn(async move {
                // (with_upgrades: a 101 hands the connection to the gateway's tunnel)
                if let Err(e) = conn.with_upgrades().await {
                    debug!(instance = %addr, error = %e, "HTTP/1.1 connection to instance ended");
                }
            });
            Ok(Sender::Http1(send, PoolKey(key)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn pool(max_streams: usize) -> Arc<Pool> {
        Arc::new(Pool::new(PoolConfig {
            connect_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(60),
            max_idle_per_instance: 8,
            max_streams_per_connection: max_streams,
            keepalive_interval: None,
            keepalive_timeout: Duration::from_secs(1),
        }))
    }

    /// An h2c server that counts the connections it accepted.
    async fn h2c_server() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Empty::<Bytes>::new(),
                        ))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn a_burst_of_streams_shares_new_http2_connections_up_to_the_stream_limit() {
        let (addr, accepted) = h2c_server().await;
        let pool = pool(10);
        let gets: Vec<_> = (0..50)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.get(addr, Protocol::H2c, None).await })
            })
            .collect();
        let mut held = Vec::new();
        for g in gets {
            match g.await.unwrap() {
                Ok(s @ Sender::Http2(..)) => held.push(s),
                Ok(_) => panic!("an h2c instance gave an HTTP/1.1 sender"),
                Err(e) => panic!("{e}"),
            }
        }
        // 50 streams held at once, 10 per connection
        assert_eq!(accepted.load(Ordering::Relaxed), 5);
        drop(held);
        // released slots are taken again: no new connection
        let again = pool.get(addr, Protocol::H2c, None).await.unwrap();
        assert!(matches!(again, Sender::Http2(..)));
        assert_eq!(accepted.load(Ordering::Relaxed), 5);
    }

    #[tokio::test]
    async fn idle_http2_connections_are_swept() {
        let (addr, accepted) = h2c_server().await;
        let pool = Arc::new(Pool::new(PoolConfig {
            idle_timeout: Duration::from_millis(50),
            ..pool(10).cfg.clone()
        }));
        let busy = pool.get(addr, Protocol::H2c, None).await.unwrap();
        let idle = pool.get(addr, Protocol::H2c, None).await.unwrap();
        drop(idle);
        assert_eq!(pool.held(), (0, 1));
        tokio::time::sleep(Duration::from_millis(80)).await;
        // a stream in flight keeps its connection
        pool.sweep();
        assert_eq!(pool.held(), (0, 1));
        drop(busy);
        tokio::time::sleep(Duration::from_millis(80)).await;
        pool.sweep();
        assert_eq!(pool.held(), (0, 0));
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn every_stream_waiting_for_a_refused_instance_fails_promptly() {
        // a port nobody listens on
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let pool = pool(10);
        let start = Instant::now();
        let gets: Vec<_> = (0..20)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.get(addr, Protocol::Grpc, None).await })
            })
            .collect();
        for g in gets {
            assert!(g.await.unwrap().is_err());
        }
        assert!(start.elapsed() < Duration::from_millis(400));
    }
}

//! The hyper-based request path: HTTP/2 from clients (h2c, or TLS with ALPN h2), and requests to
//! instances that do not speak plain HTTP/1.1.
//!
//! ```text
//! proxy listener ─▶ native engine (engine/mod.rs) ─┬─ HTTP/1.1 to http instances: its own path
//!                   │ the HTTP/2 preface (h2c with prior knowledge) ─────────────┐
//!                   │ a request for a service with h2c/grpc/https/h2 instances ──┤ (connection handed over)
//! TLS listener (tls.rs) ─ ALPN http/1.1: the native engine, as above; ALPN h2 ─────┤
//!                                                                                  ▼
//!                            Gateway::serve: hyper server (HTTP/2 or HTTP/1.1), one task per stream
//!                                 │ request.rs: route (same `route_request`), select per request,
//!                                 │ retry, passive ejection, metrics, access log, own answers
//!                                 │ (as gRPC statuses for gRPC requests: grpc.rs)
//!                                 ▼
//!                            upstream::pool: HTTP/1.1 (hyper) or HTTP/2 (h2, multiplexed), TCP or TLS
//! ```
//!
//! HTTP/2 abuse limits are hyper's and h2's, set from `[http2]`: concurrent streams, header list
//! size, streams reset by the client before we answered (rapid reset, CVE-2023-44487) and
//! streams we had to reset, each ending the connection with GOAWAY when exceeded; h2 also bounds
//! CONTINUATION frames by the header list size, and keeps at most one SETTINGS/PING
//! acknowledgement pending (it reads no further frame until that is written). On shutdown every
//! connection gets GOAWAY and its open streams finish.

pub mod body;
pub mod grpc;
pub mod request;

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

use crate::config::ProxyConfig;
use crate::routing::{Router, SharedTable};
use crate::upstream::body::Received;
use crate::upstream::pool::{Pool, PoolConfig};

/// The HTTP/2 connection preface a client with prior knowledge starts with (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a connection say about the HTTP/2 preface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preface {
    /// Not the preface: HTTP/1.
    No,
    /// A beginning of the preface (possibly of an HTTP/1 method too, like `P`): read more.
    Partial,
    /// The whole preface.
    Yes,
}

/// Classifies the first bytes read from a client connection.
pub fn preface(buf: &[u8]) -> Preface {
    let n = buf.len().min(PREFACE.len());
    if n == 0 || buf[..n] != PREFACE[..n] {
        Preface::No
    } else if n < PREFACE.len() {
        Preface::Partial
    } else {
        Preface::Yes
    }
}

/// `[http2]`: limits and keep-alive of HTTP/2 connections, on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http2Config {
    pub max_concurrent_streams: u32,
    pub max_header_list_size: u32,
    pub max_pending_accept_reset_streams: usize,
    pub max_local_error_reset_streams: usize,
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
    pub upstream_max_streams_per_connection: usize,
}

impl Default for Http2Config {
    fn default() -> Self {
        Http2Config {
            max_concurrent_streams: 256,
            max_header_list_size: 64 * 1024,
            max_pending_accept_reset_streams: 100,
            max_local_error_reset_streams: 1024,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(10),
            upstream_max_streams_per_connection: 100,
        }
    }
}

/// Who is on the other side of a client connection.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub ip: String,
    /// The address as an X-Forwarded-For value, made once per connection.
    pub ip_value: Option<http::HeaderValue>,
    /// Came over TLS (X-Forwarded-Proto: https).
    pub tls: bool,
}

impl ClientInfo {
    pub fn new(ip: String, tls: bool) -> ClientInfo {
        let ip_value = http::HeaderValue::from_str(&ip).ok();
        ClientInfo { ip, ip_value, tls }
    }
}

/// Everything the hyper-based path needs, shared by all its connections.
pub struct Gateway {
    pub table: SharedTable,
    pub router: Router,
    pub cfg: ProxyConfig,
    pub http2: Http2Config,
    pub access_log: bool,
    pub pool: Pool,
}

impl Gateway {
    pub fn new(
        table: SharedTable,
        router: Router,
        cfg: ProxyConfig,
        http2: Http2Config,
        access_log: bool,
    ) -> Gateway {
        let pool = Pool::new(PoolConfig {
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.idle_timeout,
            max_idle_per_instance: cfg.keepalive_pool_size.max(1),
            max_streams_per_connection: http2.upstream_max_streams_per_connection,
            keepalive_interval: http2.keepalive_interval,
            keepalive_timeout: http2.keepalive_timeout,
        });
        Gateway {
            table,
            router,
            cfg,
            http2,
            access_log,
            pool,
        }
    }

    /// Serves a client connection the engine hands over: one that started with the HTTP/2 preface
    /// (`h2`), or an HTTP/1.1 one (cleartext or TLS) from the request whose head is buffered on.
    /// `buffered`: the bytes the engine already read, served first.
    pub async fn serve_buffered<I>(
        self: Arc<Self>,
        io: I,
        buffered: Vec<u8>,
        h2: bool,
        client: ClientInfo,
        shutdown: ShutdownWatch,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.serve(Rewind::new(buffered, io), h2, client, shutdown)
            .await;
    }

    /// Serves one client connection with hyper until it ends, or until shutdown (then GOAWAY or
    /// `Connection: close`, and open requests finish).
    pub async fn serve<I>(
        self: Arc<Self>,
        io: I,
        h2: bool,
        client: ClientInfo,
        mut shutdown: ShutdownWatch,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let protocol = match (client.tls, h2) {
            (false, true) => "h2c",
            (true, true) => "h2",
            (true, false) => "https",
            (false, false) => "http",
        };
        let open = crate::metrics::METRICS
            .gateway_connections
            .with_label_values(&[protocol]);
        open.inc();
        let _open = scopeguard(move || open.dec());
        let client = Arc::new(client);
        let gw = self.clone();
        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let gw = gw.clone();
            let client = client.clone();
            let req = req.map(Received::H1);
            async move { Ok::<_, Infallible>(gw.handle(req, &client).await) }
        });
        let io = TokioIo::new(io);
        macro_rules! drive {
            ($conn:expr) => {{
                let conn = $conn;
                tokio::pin!(conn);
                let result = if *shutdown.borrow() {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                } else {
                    tokio::select! {
                        r = conn.as_mut() => r,
                        _ = shutdown.changed() => {
                            conn.as_mut().graceful_shutdown();
                            conn.await
                        }
                    }
                };
                if let Err(e) = result {
                    debug!(error = ?e, h2, "client connection ended");
                }
            }};
        }
        if h2 {
            let l = &self.http2;
            let mut builder = http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .max_concurrent_streams(l.max_concurrent_streams)
                .max_header_list_size(l.max_header_list_size)
                .max_pending_accept_reset_streams(l.max_pending_accept_reset_streams)
                .max_local_error_reset_streams(l.max_local_error_reset_streams)
                .keep_alive_interval(l.keepalive_interval)
                .keep_alive_timeout(l.keepalive_timeout)
                .adaptive_window(true);
            drive!(builder.serve_connection(io, svc));
        } else {
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(self.cfg.downstream_read_timeout)
                .keep_alive(true);
            drive!(builder.serve_connection(io, svc).with_upgrades());
        }
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// A stream whose first bytes were already read: they are read again first.
pub struct Rewind<S> {
    pre: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(pre: Vec<u8>, inner: S) -> Rewind<S> {
        Rewind { pre, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.at < me.pre.len() {
            let n = (me.pre.len() - me.at).min(buf.remaining());
            buf.put_slice(&me.pre[me.at..me.at + n]);
            me.at += n;
            if me.at == me.pre.len() {
                me.pre = Vec::new();
                me.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preface_is_told_from_http1_methods() {
        assert_eq!(preface(PREFACE), Preface::Yes);
        assert_eq!(
            preface(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"),
            Preface::Yes
        );
        assert_eq!(preface(b"PRI * HTTP/2"), Preface::Partial);
        assert_eq!(
            preface(b"P"),
            Preface::Partial,
            "could still be POST: read more"
        );
        assert_eq!(preface(b"POST / HTTP/1.1\r\n"), Preface::No);
        assert_eq!(preface(b"PRIVATE / HTTP/1.1\r\n"), Preface::No);
        assert_eq!(preface(b""), Preface::No);
    }

    #[tokio::test]
    async fn rewind_replays_the_buffered_bytes_first() {
        use tokio::io::AsyncReadExt;
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"world")
            .await
            .unwrap();
        drop(a);
        let mut r = Rewind::new(b"hello ".to_vec(), b);
        let mut out = String::new();
        r.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }
}

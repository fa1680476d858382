//! HTTP/2 towards instances, on the `h2` crate directly (framing, HPACK and flow control are
//! h2's).
//!
//! hyper's HTTP/2 client puts two steps between a request and h2 that a proxy does not need: a
//! channel to the connection's task, and a task spawned per request that waits for the response
//! and hands it back through a oneshot channel. Here the request's own task opens the stream and
//! awaits the response on it; a task is spawned only to send a request body that did not end with
//! the head (gRPC calls, uploads), because the body goes on while the response streams back.
//!
//! - Flow control: the instance's DATA is released (WINDOW_UPDATE) as the client's side takes it,
//!   so a slow client slows the instance down instead of being buffered for.
//! - Cancellation: when the client goes away (its stream reset, its connection closed) the
//!   response body is dropped and h2 resets the stream towards the instance (RST_STREAM CANCEL);
//!   an error reading the client's body resets it too.
//! - Keep-alive: while streams are open, a PING every `http2.keepalive_interval`; no
//!   acknowledgement within `keepalive_timeout` closes the connection (hyper's behaviour).

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::SendStream;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::pool::{ReqBody, Streams};

/// Window sizes and send buffer: hyper's client defaults.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;

/// Opens HTTP/2 on `io` and spawns the connection's task on this thread's runtime. `streams` is
/// marked closed when the connection ends.
pub(crate) async fn handshake<T>(
    io: T,
    addr: SocketAddr,
    keepalive: Option<(Duration, Duration)>,
    streams: Arc<Streams>,
) -> Result<SendRequest<Bytes>, h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, mut conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_push(false)
        .handshake::<T, Bytes>(io)
        .await?;
    let ping = conn.ping_pong();
    tokio::spawn(async move {
        let alive = keep_alive(ping, keepalive, || streams.now.load(Ordering::Relaxed) > 0);
        tokio::select! {
            r = &mut conn => if let Err(e) = r {
                debug!(instance = %addr, error = %e, "HTTP/2 connection to instance ended");
            },
            () = alive => debug!(instance = %addr, "HTTP/2 connection to instance dropped: PING not acknowledged"),
        }
        streams.closed.store(true, Ordering::Relaxed);
    });
    Ok(send)
}

/// Returns when a PING sent while `open()` said the connection is in use was not acknowledged
/// within the timeout (never when keep-alive is off).
async fn keep_alive(
    ping: Option<h2::PingPong>,
    keepalive: Option<(Duration, Duration)>,
    open: impl Fn() -> bool,
) {
    let (Some(mut ping), Some((interval, timeout))) = (ping, keepalive) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        if !open() {
            continue;
        }
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return std::future::pending().await, // the connection is ending anyway
            Err(_) => return,
        }
    }
}

/// Why a request could not be sent on an HTTP/2 connection.
pub(crate) struct NotSent {
    pub error: h2::Error,
    /// The request, when nothing of it reached the instance (safe to send elsewhere).
    pub request: Option<Box<Request<ReqBody>>>,
}

/// Opens a stream for `req` (an HTTP/2 request: scheme and authority set) once the connection
/// takes one, starts sending its body, and resolves to the response head.
pub(crate) fn send(send: SendRequest<Bytes>, req: Request<ReqBody>) -> Exchange {
    Exchange {
        send,
        req: Some(req),
        response: None,
    }
}

/// One request on an HTTP/2 connection, from waiting for a stream to the response head. A plain
/// state machine rather than an `async fn`: the request is held once, in place, instead of as an
/// argument and again as a local of each nested future (it is on every request's path).
pub(crate) struct Exchange {
    send: SendRequest<Bytes>,
    /// Until the stream is opened.
    req: Option<Request<ReqBody>>,
    /// Once it is.
    response: Option<ResponseFuture>,
}

impl Future for Exchange {
    type Output = Result<http::Response<h2::RecvStream>, NotSent>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let me = self.get_mut();
        if me.req.is_some() {
            // waits while the instance's SETTINGS_MAX_CONCURRENT_STREAMS are all open; fails when
            // the connection is gone, before anything of this request was sent
            let ready = ready!(me.send.poll_ready(cx));
            let Some(req) = me.req.take() else {
                unreachable!("checked above")
            };
            if let Err(error) = ready {
                return Poll::Ready(Err(NotSent {
                    error,
                    request: Some(Box::new(req)),
                }));
            }
            // (connection-specific fields are gone, TE is at most "trailers": RFC 9113 §8.2.2,
            // done by the gateway for every instance)
            let (parts, body) = req.into_parts();
            let end = body.is_end_stream();
            // (nothing ran since poll_ready: the connection's task runs on this thread's
            // runtime, so it did not close in between, and an error here is about this
            // request's head; with `proxy.work_stealing` a GOAWAY could land in between, and the
            // request fails with 502)
            match me.send.send_request(Request::from_parts(parts, ()), end) {
                Ok((response, stream)) => {
                    if !end {
                        tokio::spawn(pipe(body, stream));
                    }
                    me.response = Some(response);
                }
                Err(error) => {
                    return Poll::Ready(Err(NotSent {
                        error,
                        request: None,
                    }))
                }
            }
        }
        let Some(response) = me.response.as_mut() else {
            unreachable!("a stream is opened before its response is awaited")
        };
        Pin::new(response).poll(cx).map_err(|error| NotSent {
            error,
            request: None,
        })
    }
}

/// Sends a client's request body on the instance's stream as its flow control allows; trailers end
/// it. An error reading the body resets the
/// stream (CANCEL); the peer's reset ends the pipe.
async fn pipe<B>(mut body: B, mut tx: SendStream<Bytes>)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = poll_fn(|cx| tx.poll_reset(cx)) => return,
        };
        let frame = match frame {
            None => {
                let _ = tx.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(e)) => {
                debug!(error = %e, "body failed: HTTP/2 stream reset");
                tx.send_reset(h2::Reason::CANCEL);
                return;
            }
            Some(Ok(frame)) => frame,
        };
        let mut data = match frame.into_data() {
            Ok(d) => d,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = tx.send_trailers(trailers);
                }
                return;
            }
        };
        let end = body.is_end_stream();
        if data.is_empty() {
            if end {
                let _ = tx.send_data(Bytes::new(), true);
                return;
            }
            continue;
        }
        while !data.is_empty() {
            tx.reserve_capacity(data.len());
            match poll_fn(|cx| tx.poll_capacity(cx)).await {
                Some(Ok(0)) => {}
                Some(Ok(n)) => {
                    let chunk = data.split_to(n.min(data.len()));
                    if tx.send_data(chunk, end && data.is_empty()).is_err() {
                        return;
                    }
                }
                // the stream was reset or the connection ended
                None | Some(Err(_)) => return,
            }
        }
        if end {
            return;
        }
    }
}

//! The least an HTTP/2 relay built on the `h2` crate does per request, for `scripts/bench/http2.sh`
//! (`BENCH_FLOOR=1`): h2c from clients, h2c to two fixed instances in turn, nothing else — no
//! routing, no policies, no metrics, no logs, no limits beyond h2's defaults. Its CPU per request
//! is a lower bound for any proxy whose HTTP/2 framing and HPACK are the `h2` crate's on both
//! sides, switchyard included.
//!
//! `h2_floor LISTEN THREADS BACKEND...`: THREADS single-threaded runtimes accept on one socket; each
//! keeps one HTTP/2 connection to every backend and sends requests to them in turn. A stream is a
//! task (`SPAWN=0`: polled inside its connection's task instead; `HYPER=1`: clients are served by
//! hyper's HTTP/2 server, as switchyard's gateway does, instead of by h2 directly).

use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use h2::client::SendRequest;
use h2::server::SendResponse;
use h2::RecvStream;
use http::Request;
use tokio::net::{TcpListener, TcpStream};

/// The allocator switchyard uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Per thread: each backend's address and its connection (opened again when it ended).
type Upstreams = Rc<Vec<(SocketAddr, std::cell::RefCell<SendRequest<Bytes>>)>>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listen: SocketAddr = args[1].parse().expect("LISTEN");
    let threads: usize = args[2].parse().expect("THREADS");
    let backends: Vec<SocketAddr> = args[3..]
        .iter()
        .map(|a| a.parse().expect("BACKEND"))
        .collect();
    let spawn = std::env::var("SPAWN").map_or(true, |v| v != "0");
    let hyper = std::env::var("HYPER").is_ok_and(|v| v == "1");
    let listener = std::net::TcpListener::bind(listen).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let listener = listener.try_clone().expect("clone");
            let backends = backends.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, serve(listener, backends, spawn, hyper));
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
}

async fn serve(
    listener: std::net::TcpListener,
    backends: Vec<SocketAddr>,
    spawn: bool,
    hyper: bool,
) {
    let listener = TcpListener::from_std(listener).expect("listener");
    let mut ups = Vec::new();
    for b in backends {
        let send = open(b).await.expect("connect to a backend");
        ups.push((b, std::cell::RefCell::new(send)));
    }
    let ups: Upstreams = Rc::new(ups);
    loop {
        let Ok((io, _)) = listener.accept().await else {
            continue;
        };
        let _ = io.set_nodelay(true);
        if hyper {
            tokio::task::spawn_local(hyper_connection(io, ups.clone()));
        } else {
            tokio::task::spawn_local(connection(io, ups.clone(), spawn));
        }
    }
}

/// An HTTP/2 connection to a backend, its task spawned on this thread.
async fn open(backend: SocketAddr) -> Result<SendRequest<Bytes>, Box<dyn std::error::Error>> {
    let io = TcpStream::connect(backend).await?;
    io.set_nodelay(true)?;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(2 * 1024 * 1024)
        .initial_connection_window_size(5 * 1024 * 1024)
        .handshake::<_, Bytes>(io)
        .await?;
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// A stream on backend `i`'s connection, which is opened again once if it ended.
async fn ready(ups: &Upstreams, i: usize) -> Option<SendRequest<Bytes>> {
    let (addr, send) = &ups[i % ups.len()];
    let current = send.borrow().clone();
    let error = match current.ready().await {
        Ok(s) => return Some(s),
        Err(e) => e,
    };
    eprintln!("connection to {addr} ended ({error}): opening another");
    let fresh = open(*addr).await.ok()?;
    *send.borrow_mut() = fresh.clone();
    fresh.ready().await.ok()
}

async fn connection(io: TcpStream, ups: Upstreams, spawn: bool) {
    let Ok(mut conn) = h2::server::handshake(io).await else {
        return;
    };
    let mut next = 0usize;
    let mut streams = FuturesUnordered::new();
    loop {
        tokio::select! {
            accepted = conn.accept() => {
                let Some(Ok((req, respond))) = accepted else { break };
                next = next.wrapping_add(1);
                if spawn {
                    tokio::task::spawn_local(stream(req, respond, ups.clone(), next));
                } else {
                    streams.push(stream(req, respond, ups.clone(), next));
                }
            }
            Some(()) = streams.next(), if !streams.is_empty() => {}
        }
    }
    while streams.next().await.is_some() {}
}

async fn stream(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    ups: Upstreams,
    i: usize,
) {
    let (mut parts, mut body) = req.into_parts();
    let mut uri = http::uri::Parts::from(parts.uri);
    uri.scheme = Some(http::uri::Scheme::HTTP);
    parts.uri = http::Uri::from_parts(uri).expect("uri");
    let end = body.is_end_stream();
    let Some(mut up) = ready(&ups, i).await else {
        respond.send_reset(h2::Reason::REFUSED_STREAM);
        return;
    };
    let Ok((response, mut tx)) = up.send_request(Request::from_parts(parts, ()), end) else {
        respond.send_reset(h2::Reason::REFUSED_STREAM);
        return;
    };
    if !end {
        while let Some(Ok(data)) = body.data().await {
            let _ = body.flow_control().release_capacity(data.len());
            if tx.send_data(data, body.is_end_stream()).is_err() {
                return;
            }
        }
    }
    let Ok(response) = response.await else {
        respond.send_reset(h2::Reason::INTERNAL_ERROR);
        return;
    };
    let (parts, mut rbody) = response.into_parts();
    let rend = rbody.is_end_stream();
    let Ok(mut out) = respond.send_response(http::Response::from_parts(parts, ()), rend) else {
        return;
    };
    if rend {
        return;
    }
    while let Some(Ok(data)) = rbody.data().await {
        let _ = rbody.flow_control().release_capacity(data.len());
        let end = rbody.is_end_stream();
        if out.send_data(data, end).is_err() || end {
            return;
        }
    }
    if let Ok(Some(trailers)) = rbody.trailers().await {
        let _ = out.send_trailers(trailers);
    } else {
        let _ = out.send_data(Bytes::new(), true);
    }
}

#[derive(Clone, Copy)]
struct Local;

impl<F: std::future::Future + 'static> hyper::rt::Executor<F> for Local {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// The client's connection served by hyper; each request relayed on h2 to an instance, its
/// response body handed back to hyper as an `http_body::Body`.
async fn hyper_connection(io: TcpStream, ups: Upstreams) {
    use http_body_util::BodyExt;
    let next = std::cell::Cell::new(0usize);
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        next.set(next.get().wrapping_add(1));
        let (ups, i) = (ups.clone(), next.get());
        async move {
            let (mut parts, _body) = req.into_parts();
            let mut uri = http::uri::Parts::from(parts.uri);
            uri.scheme = Some(http::uri::Scheme::HTTP);
            parts.uri = http::Uri::from_parts(uri).expect("uri");
            let Some(mut up) = ready(&ups, i).await else {
                return Err(h2::Error::from(h2::Reason::REFUSED_STREAM));
            };
            let (response, _tx) = up.send_request(Request::from_parts(parts, ()), true)?;
            let response = response.await?;
            let (parts, body) = response.into_parts();
            let body = H2Body(body).boxed_unsync();
            Ok::<_, h2::Error>(http::Response::from_parts(parts, body))
        }
    });
    let _ = hyper::server::conn::http2::Builder::new(Local)
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
        .await;
}

/// An instance's response body as hyper takes it.
struct H2Body(RecvStream);

impl hyper::body::Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, h2::Error>>> {
        use std::task::Poll;
        let me = &mut self.0;
        if !me.is_end_stream() {
            match me.poll_data(cx) {
                Poll::Ready(Some(Ok(d))) => {
                    let _ = me.flow_control().release_capacity(d.len());
                    return Poll::Ready(Some(Ok(hyper::body::Frame::data(d))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {}
            }
        }
        match me.poll_trailers(cx) {
            Poll::Ready(Ok(Some(t))) => Poll::Ready(Some(Ok(hyper::body::Frame::trailers(t)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}

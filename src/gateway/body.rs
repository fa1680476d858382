//! The response body relayed to the client, and what is recorded when it ends.
//!
//! A response is counted (metrics, access log, in-flight counts, the HTTP/2 stream slot) when its
//! body ends or is dropped — a cancelled gRPC call included — not when its head arrives, so that
//! durations and `least_request` see streams as long as they really are.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use super::grpc;
use crate::proxy::{finish_request, Finished, InFlight};
use crate::routing::{Instance, Service};
use crate::upstream::body::Received;
use crate::upstream::pool::StreamSlot;

pub use crate::upstream::body::BoxError;

/// Body of every response the gateway gives.
pub type RespBody = UnsyncBoxBody<Bytes, BoxError>;

/// An empty body (our own answers carry theirs in full).
pub fn full(text: impl Into<Bytes>) -> RespBody {
    http_body_util::Full::new(text.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An instance chosen for a request: counted in its in-flight requests while this lives.
pub struct Picked(pub Arc<Instance>);

impl Picked {
    pub fn new(inst: Arc<Instance>) -> Picked {
        inst.state.inflight.fetch_add(1, Ordering::Relaxed);
        inst.state.requests.fetch_add(1, Ordering::Relaxed);
        Picked(inst)
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.0.state.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Everything recorded when a proxied response ends.
pub struct Finish {
    pub service: Arc<Service>,
    pub picked: Option<Picked>,
    pub status: u16,
    pub start: Instant,
    pub tries: usize,
    /// Method and path, when the access log is on.
    pub log: Option<(String, String)>,
    pub error: Option<&'static str>,
    /// Held, not read: dropped with the `Finish`, they give back the HTTP/2 stream slot and the
    /// instance's in-flight count when the response ends.
    #[allow(dead_code)]
    pub slot: Option<StreamSlot>,
    #[allow(dead_code)]
    pub in_flight: Option<InFlight>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        finish_request(&Finished {
            service: Some(&self.service),
            label: None,
            instance: self.picked.as_ref().map(|p| &*p.0),
            log: self.log.as_ref(),
            status: self.status,
            elapsed: self.start.elapsed(),
            tries: self.tries,
            error: self.error.unwrap_or(""),
        });
    }
}

/// The instance's response body on its way to the client. For a gRPC call, an instance that
/// fails mid-stream (killed, connection reset) ends the call with UNAVAILABLE trailers instead of
/// a reset stream, which clients would report as INTERNAL or UNKNOWN.
pub struct Relay {
    inner: Received,
    grpc: bool,
    finish: Option<Finish>,
    ended: bool,
}

impl Relay {
    pub(crate) fn new(inner: Received, grpc: bool, finish: Finish) -> Relay {
        Relay {
            inner,
            grpc,
            finish: Some(finish),
            ended: false,
        }
    }
}

impl Body for Relay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let me = self.get_mut();
        if me.ended {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut me.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if frame.is_trailers() {
                    me.ended = true;
                    me.finish.take();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            None => {
                me.ended = true;
                me.finish.take();
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                me.ended = true;
                let mut finish = me.finish.take();
                if let Some(f) = finish.as_mut() {
                    f.error = Some("upstream");
                }
                if me.grpc {
                    let name = finish
                        .as_ref()
                        .map(|f| f.service.name.to_string())
                        .unwrap_or_default();
                    let mut trailers = HeaderMap::new();
                    grpc::put_status(
                        &mut trailers,
                        grpc::Code::Unavailable,
                        &format!(
                            "switchyard: service {name:?}: instance connection broke during the call: {e}"
                        ),
                    );
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

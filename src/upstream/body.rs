//! Bodies received from a peer, whichever way they came: hyper's (a client's request body, an
//! HTTP/1.1 instance's response), h2's (an HTTP/2 instance's response, [`super::h2`]).

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::RecvStream;
use hyper::body::{Body, Frame, Incoming, SizeHint};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body received over HTTP/1.1 (hyper) or HTTP/2 (h2): a client's request body, an instance's
/// response body.
pub enum Received {
    H1(Incoming),
    H2(H2Body),
}

impl Body for Received {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = match self.get_mut() {
            Received::H1(b) => {
                ready!(Pin::new(b).poll_frame(cx)).map(|r| r.map_err(BoxError::from))
            }
            Received::H2(b) => {
                ready!(Pin::new(b).poll_frame(cx)).map(|r| r.map_err(BoxError::from))
            }
        };
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Received::H1(b) => b.is_end_stream(),
            Received::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Received::H1(b) => b.size_hint(),
            Received::H2(b) => b.size_hint(),
        }
    }
}

/// A body received on an HTTP/2 stream; what the receiving side takes is released to the
/// sender's flow-control window, so a slow reader slows the sender instead of being buffered for.
pub struct H2Body {
    recv: RecvStream,
    data_done: bool,
}

impl H2Body {
    pub fn new(recv: RecvStream) -> H2Body {
        H2Body {
            recv,
            data_done: false,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let me = self.get_mut();
        if !me.data_done {
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = me.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => me.data_done = true,
            }
        }
        match ready!(me.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

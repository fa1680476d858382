//! The client side of a connection the engine serves: a TCP socket, or TLS over one
//! ([`crate::tls`]). The engine is generic over it, so HTTP/1.1 over TLS takes the same path as
//! cleartext HTTP/1.1, with its own X-Forwarded-Proto.

use std::future::Future;
use std::io;

use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// A client connection's byte stream.
pub(crate) trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Came over TLS: `X-Forwarded-Proto: https`, and the gateway is told so.
    const TLS: bool;

    /// The reading half of [`ClientIo::split`].
    type Reader<'a>: AsyncRead + Unpin + Send
    where
        Self: 'a;
    /// The writing half of [`ClientIo::split`].
    type Writer<'a>: AsyncWrite + Unpin + Send
    where
        Self: 'a;

    /// Both directions at once: a request body streamed while the response is relayed, and
    /// upgrade tunnels.
    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>);

    /// Waits until the client sent something, without a read buffer (`None`: the stream cannot
    /// tell without reading, so the caller reads with a buffer instead). An idle keep-alive
    /// connection holds no buffer while it waits.
    fn readable(&self) -> Option<impl Future<Output = io::Result<()>> + Send + '_>;
}

impl ClientIo for TcpStream {
    const TLS: bool = false;
    type Reader<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Writer<'a> = tokio::net::tcp::WriteHalf<'a>;

    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        TcpStream::split(self)
    }

    fn readable(&self) -> Option<impl Future<Output = io::Result<()>> + Send + '_> {
        Some(TcpStream::readable(self))
    }
}

impl ClientIo for TlsStream<TcpStream> {
    const TLS: bool = true;
    type Reader<'a> = ReadHalf<&'a mut TlsStream<TcpStream>>;
    type Writer<'a> = WriteHalf<&'a mut TlsStream<TcpStream>>;

    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        tokio::io::split(self)
    }

    /// TLS records may hold decrypted bytes that the socket's readiness does not show: read.
    fn readable(&self) -> Option<impl Future<Output = io::Result<()>> + Send + '_> {
        None::<std::future::Ready<io::Result<()>>>
    }
}

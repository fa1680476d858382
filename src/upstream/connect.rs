//! Opening a connection to an instance: TCP, then TLS for `https`/`h2` instances.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Why a connection to an instance could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr}: {source}")]
    Tcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connect to {addr}: timed out after {ms} ms")]
    Timeout { addr: SocketAddr, ms: u128 },
    #[error("TLS to {addr} ({name}): {source}")]
    Tls {
        addr: SocketAddr,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("{error} (a moment ago, for {addr})")]
    Recent { addr: SocketAddr, error: String },
    #[error("{name:?} is not a valid TLS server name")]
    ServerName { name: String },
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("HTTP/2 handshake with {addr}: {source}")]
    Http2Handshake {
        addr: SocketAddr,
        #[source]
        source: h2::Error,
    },
}

/// A connection to an instance, plain or TLS.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Io {
    /// The protocol the server agreed to by ALPN (TLS only).
    pub fn alpn_h2(&self) -> bool {
        match self {
            Io::Plain(_) => false,
            Io::Tls(t) => t.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

/// TCP to `addr` within `limit`, then TLS when `tls` is given (`name`: SNI and the name the
/// certificate must be valid for).
pub async fn connect(
    addr: SocketAddr,
    limit: Duration,
    tls: Option<(&Arc<ClientConfig>, &str)>,
) -> Result<Io, ConnectError> {
    let timeout = || ConnectError::Timeout {
        addr,
        ms: limit.as_millis(),
    };
    let deadline = tokio::time::Instant::now() + limit;
    let tcp = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(ConnectError::Tcp { addr, source }),
        Err(_) => return Err(timeout()),
    };
    let _ = tcp.set_nodelay(true);
    let Some((config, name)) = tls else {
        return Ok(Io::Plain(tcp));
    };
    let server_name =
        ServerName::try_from(name.to_string()).map_err(|_| ConnectError::ServerName {
            name: name.to_string(),
        })?;
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    match tokio::time::timeout_at(deadline, connector.connect(server_name, tcp)).await {
        Ok(Ok(s)) => Ok(Io::Tls(Box::new(s))),
        Ok(Err(source)) => Err(ConnectError::Tls {
            addr,
            name: name.to_string(),
            source,
        }),
        Err(_) => Err(timeout()),
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

//! Probes: one check of one instance, named for their mechanism.
//!
//! - [`HttpHealthCheck`]: `GET <path>` over a fresh HTTP/1.1 connection (`Connection: close`);
//!   healthy when the status is in the expected set (default 200-299). Only the status line is
//!   read: a probe must not depend on how large or slow the body is.
//! - [`TcpHealthCheck`]: healthy when a TCP connection opens.
//! - [`GrpcHealthCheck`]: `grpc.health.v1.Health/Check`; healthy on `SERVING`. The channel is kept
//!   between checks (tonic reconnects it), so a check is one HTTP/2 request, not a handshake.
//! - [`NoHealthCheck`]: always healthy (protocol `none`): admits without probing.
//!
//! A check does not bound its own time: the scheduler runs every check under the configured
//! timeout, so a target that accepts and never answers fails with [`ProbeError::Timeout`].

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::StatusSet;

/// Why a check failed; the text becomes the `reason` of a logged health flip.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer within {}ms", .0.as_millis())]
    Timeout(Duration),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("unexpected status {0}")]
    Status(u16),
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("grpc health check failed: {0}")]
    Grpc(String),
    #[error("grpc health status is {0}")]
    NotServing(&'static str),
}

/// One way of checking an instance. `check` is called repeatedly on the same value.
#[async_trait]
pub trait HealthCheck: Send + Sync {
    /// Checks once: `Ok` means healthy.
    async fn check(&self) -> Result<(), ProbeError>;
}

/// Healthy when a TCP connection to `addr` opens.
#[derive(Debug, Clone)]
pub struct TcpHealthCheck {
    pub addr: SocketAddr,
}

#[async_trait]
impl HealthCheck for TcpHealthCheck {
    async fn check(&self) -> Result<(), ProbeError> {
        TcpStream::connect(self.addr)
            .await
            .map(drop)
            .map_err(|source| ProbeError::Connect {
                addr: self.addr,
                source,
            })
    }
}

/// `GET path` with `Host: host`; healthy when the status is in `expected`.
#[derive(Debug, Clone)]
pub struct HttpHealthCheck {
    pub addr: SocketAddr,
    /// Host header: the instance's registered `host:port`.
    pub host: String,
    pub path: String,
    pub expected: StatusSet,
}

/// Longest status line we read before giving up.
const MAX_STATUS_LINE: usize = 1024;

impl HttpHealthCheck {
    fn request(&self) -> String {
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: switchyard-health/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            self.path,
            self.host,
            env!("CARGO_PKG_VERSION")
        )
    }
}

/// Parses `HTTP/1.x NNN reason` into NNN.
pub fn parse_status_line(line: &[u8]) -> Result<u16, ProbeError> {
    let text = std::str::from_utf8(line)
        .map_err(|_| ProbeError::Malformed("status line is not utf-8".into()))?;
    let mut parts = text.split_ascii_whitespace();
    let version = parts.next().unwrap_or("");
    let code = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/") || code.len() != 3 {
        let shown: String = text.chars().take(64).collect();
        return Err(ProbeError::Malformed(format!("status line {shown:?}")));
    }
    code.parse::<u16>()
        .ok()
        .filter(|c| (100..=999).contains(c))
        .ok_or_else(|| ProbeError::Malformed(format!("status code {code:?}")))
}

#[async_trait]
impl HealthCheck for HttpHealthCheck {
    async fn check(&self) -> Result<(), ProbeError> {
        let mut stream =
            TcpStream::connect(self.addr)
                .await
                .map_err(|source| ProbeError::Connect {
                    addr: self.addr,
                    source,
                })?;
        let _ = stream.set_nodelay(true);
        stream.write_all(self.request().as_bytes()).await?;
        let mut buf = [0u8; MAX_STATUS_LINE];
        let mut len = 0;
        let line_end = loop {
            if let Some(pos) = buf[..len].iter().position(|b| *b == b'\n') {
                break pos;
            }
            if len == buf.len() {
                return Err(ProbeError::Malformed(format!(
                    "no status line in the first {MAX_STATUS_LINE} bytes"
                )));
            }
            let n = stream.read(&mut buf[len..]).await?;
            if n == 0 {
                return Err(ProbeError::Malformed(
                    "connection closed before the status line".into(),
                ));
            }
            len += n;
        };
        let line = buf[..line_end]
            .strip_suffix(b"\r")
            .unwrap_or(&buf[..line_end]);
        let status = parse_status_line(line)?;
        if self.expected.contains(status) {
            Ok(())
        } else {
            Err(ProbeError::Status(status))
        }
    }
}

/// `grpc.health.v1.Health/Check` for `service` ("" = the whole server); healthy on SERVING.
#[derive(Debug, Clone)]
pub struct GrpcHealthCheck {
    channel: Channel,
    service: String,
}

impl GrpcHealthCheck {
    /// Builds a lazily connecting channel: must be called inside a tokio runtime.
    pub fn new(addr: SocketAddr, service: String, timeout: Duration) -> Result<Self, ProbeError> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| ProbeError::Grpc(format!("endpoint for {addr}: {e}")))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .tcp_nodelay(true);
        Ok(GrpcHealthCheck {
            channel: endpoint.connect_lazy(),
            service,
        })
    }
}

#[async_trait]
impl HealthCheck for GrpcHealthCheck {
    async fn check(&self) -> Result<(), ProbeError> {
        let mut client = HealthClient::new(self.channel.clone());
        let request = HealthCheckRequest {
            service: self.service.clone(),
        };
        match client.check(request).await {
            Ok(resp) => match resp.into_inner().status() {
                ServingStatus::Serving => Ok(()),
                other => Err(ProbeError::NotServing(other.as_str_name())),
            },
            Err(status) => Err(ProbeError::Grpc(format!(
                "{:?}: {}",
                status.code(),
                status.message()
            ))),
        }
    }
}

/// Protocol `none`: no probe, always healthy.
#[derive(Debug, Clone, Copy)]
pub struct NoHealthCheck;

#[async_trait]
impl HealthCheck for NoHealthCheck {
    async fn check(&self) -> Result<(), ProbeError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A one-shot HTTP server answering every connection with `response`.
    async fn serve(response: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(response.as_bytes()).await;
                });
            }
        });
        addr
    }

    fn http(addr: SocketAddr, expected: &str) -> HttpHealthCheck {
        HttpHealthCheck {
            addr,
            host: addr.to_string(),
            path: "/health".into(),
            expected: StatusSet::parse(expected).unwrap(),
        }
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content").unwrap(), 204);
        assert_eq!(parse_status_line(b"HTTP/1.0 503").unwrap(), 503);
        assert!(parse_status_line(b"SSH-2.0-OpenSSH").is_err());
        assert!(parse_status_line(b"HTTP/1.1 20x ok").is_err());
    }

    #[tokio::test]
    async fn http_check_uses_expected_statuses() {
        let ok = serve("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
        let sick = serve("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let garbage = serve("hello\n").await;
        assert!(http(ok, "200-299").check().await.is_ok());
        let e = http(sick, "200-299").check().await.unwrap_err();
        assert!(matches!(e, ProbeError::Status(503)), "{e}");
        assert!(http(sick, "200,503").check().await.is_ok());
        assert!(matches!(
            http(garbage, "200").check().await,
            Err(ProbeError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn refused_connections_fail_tcp_and_http() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        assert!(TcpHealthCheck { addr }.check().await.is_ok());
        drop(l);
        let e = TcpHealthCheck { addr }.check().await.unwrap_err();
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
        assert!(matches!(
            http(addr, "200").check().await,
            Err(ProbeError::Connect { .. })
        ));
    }
}

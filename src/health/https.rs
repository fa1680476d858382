//! The HTTPS check (`protocol = "https"`): `GET path` over TLS, verified as the proxy verifies the
//! instance (the service's upstream TLS, else the system roots; the certificate must be valid for
//! the registered host), healthy on an expected status. A new connection per check: TLS
//! instances are few next to plain ones, and a kept TLS session could not be parked outside the
//! event loop like a plain connection.

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use super::probe::{http_request, parse_status_line};
use super::{ProbeError, Target};
use crate::upstream::ClientTls;

/// Most bytes read looking for the status line.
const MAX_LINE: usize = 8 * 1024;

/// One HTTPS check of `target`, within `deadline`.
pub async fn check(target: &Target, deadline: Instant) -> Result<(), ProbeError> {
    let spec = &target.spec;
    let timed_out = || ProbeError::Timeout(spec.timeout);
    let tcp = match timeout_at(deadline, TcpStream::connect(target.addr)).await {
        Err(_) => return Err(timed_out()),
        Ok(Err(source)) => {
            return Err(ProbeError::Connect {
                addr: target.addr,
                source,
            })
        }
        Ok(Ok(s)) => s,
    };
    let _ = tcp.set_nodelay(true);
    let host = target.host();
    let name = server_name(&host);
    let server_name = ServerName::try_from(name.to_string())
        .map_err(|_| ProbeError::Malformed(format!("{name:?} is not a TLS server name")))?;
    let system;
    let tls: &ClientTls = match &spec.tls {
        Some(t) => &t.0,
        None => {
            system = ClientTls::system();
            &system
        }
    };
    let connector = tokio_rustls::TlsConnector::from(tls.http1.clone());
    let mut stream = match timeout_at(deadline, connector.connect(server_name, tcp)).await {
        Err(_) => return Err(timed_out()),
        Ok(Err(e)) => return Err(ProbeError::Tls(e.to_string())),
        Ok(Ok(s)) => s,
    };
    let exchange = async {
        let request = http_request(&spec.path, &host, false);
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(512);
        loop {
            if let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
                return parse_status_line(line);
            }
            if buf.len() >= MAX_LINE {
                return Err(ProbeError::Malformed(format!(
                    "no status line in the first {MAX_LINE} bytes"
                )));
            }
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(ProbeError::Malformed(
                    "connection closed before the status line".into(),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let status = timeout_at(deadline, exchange)
        .await
        .unwrap_or_else(|_| Err(timed_out()))?;
    if spec.expected.contains(status) {
        Ok(())
    } else {
        Err(ProbeError::Status(status))
    }
}

/// The host of a `host:port` (IPv6 in brackets) as a TLS server name.
fn server_name(host_port: &str) -> &str {
    let host = host_port.rsplit_once(':').map_or(host_port, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host_port
        }
    });
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_drop_the_port_and_brackets() {
        assert_eq!(server_name("api.test:8443"), "api.test");
        assert_eq!(server_name("127.0.0.1:443"), "127.0.0.1");
        assert_eq!(server_name("[::1]:443"), "::1");
        assert_eq!(server_name("api.test"), "api.test");
    }
}

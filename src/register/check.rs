//! Gates of `switchyard register`: whether the key should exist right now.
//!
//! - [`HttpCheck`]: `--check URL`, a plain HTTP/1.1 GET (http:// only) answered 2xx = passing,
//!   probed every `--check-interval-ms`; the gate follows every result and each flip is logged
//!   once. A hand-written client is enough: one request line, one status line.
//! - [`run_reachable_gate`]: for a wrapped command without `--check`, the gate opens once the
//!   registered address accepts a TCP connection, and stays open.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{info, warn};

use super::RegisterError;
use crate::registry::codec::{self, HostPort};

/// Longest wait for one check answer (shorter when the interval is shorter).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a wrapped command's address is tried until it accepts connections.
pub const REACHABLE_POLL: Duration = Duration::from_millis(100);
/// Most bytes read while looking for the status line.
const MAX_STATUS_LINE: usize = 8 * 1024;

/// An HTTP GET health check against one `http://host[:port]/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCheck {
    pub url: String,
    pub addr: HostPort,
    /// Path and query, always starting with '/'.
    pub path: String,
    /// `Host` header value (the URL's authority).
    pub authority: String,
}

/// One check result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckResult {
    Passing(u16),
    /// Non-2xx status.
    Status(u16),
    /// No answer: connect refused, timeout, not HTTP.
    Error(String),
}

impl CheckResult {
    pub fn passing(&self) -> bool {
        matches!(self, CheckResult::Passing(_))
    }
}

impl std::fmt::Display for CheckResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckResult::Passing(s) | CheckResult::Status(s) => write!(f, "status {s}"),
            CheckResult::Error(e) => f.write_str(e),
        }
    }
}

impl HttpCheck {
    /// Parses `http://host[:port][/path][?query]`; the port defaults to 80.
    pub fn parse(url: &str) -> Result<HttpCheck, RegisterError> {
        let bad = |reason: &str| RegisterError::BadCheck {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                return Err(bad(&format!(
                    "scheme {scheme:?} is not supported (only http://)"
                )))
            }
            None => return Err(bad("expected http://host:port/path")),
        };
        if rest.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(bad("contains spaces or control characters"));
        }
        let rest = rest.split('#').next().unwrap_or("");
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.contains('@') {
            return Err(bad("credentials in the url are not supported"));
        }
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        let has_port = match authority.strip_prefix('[') {
            Some(v6) => v6.contains("]:"),
            None => authority.contains(':'),
        };
        let with_port = if has_port {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let addr = codec::parse_host_port(&with_port).map_err(|e| bad(&e.to_string()))?;
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        Ok(HttpCheck {
            url: url.to_string(),
            addr,
            path,
            authority: authority.to_string(),
        })
    }

    /// One GET; 2xx is passing. Never takes longer than `limit`.
    pub async fn probe(&self, limit: Duration) -> CheckResult {
        match tokio::time::timeout(limit, self.request()).await {
            Err(_) => CheckResult::Error(format!("no answer within {limit:?}")),
            Ok(Err(e)) => CheckResult::Error(e),
            Ok(Ok(status)) if (200..300).contains(&status) => CheckResult::Passing(status),
            Ok(Ok(status)) => CheckResult::Status(status),
        }
    }

    async fn request(&self) -> Result<u16, String> {
        let mut stream = TcpStream::connect((self.addr.host.as_str(), self.addr.port))
            .await
            .map_err(|e| format!("connect to {}: {e}", self.addr))?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: switchyard-register\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            self.path, self.authority
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 512];
        loop {
            if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
                return parse_status_line(&buf[..end]);
            }
            if buf.len() > MAX_STATUS_LINE {
                return Err("status line too long".into());
            }
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed before a status line".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// `HTTP/1.1 200 OK` → 200 ([`crate::http1::parse_status_line`]).
fn parse_status_line(line: &[u8]) -> Result<u16, String> {
    crate::http1::parse_status_line(line)
        .map(|(_, status)| status)
        .map_err(|e| {
            let text = String::from_utf8_lossy(line);
            format!("not an http answer ({e}): {:?}", truncate(&text, 80))
        })
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Probes `check` every `interval` and publishes passing/failing on `gate`. Logs the first
/// result and every flip, once each.
pub async fn run_check_gate(check: HttpCheck, interval: Duration, gate: watch::Sender<bool>) {
    let limit = interval.min(CHECK_TIMEOUT);
    let mut last: Option<bool> = None;
    loop {
        let result = check.probe(limit).await;
        let passing = result.passing();
        if last != Some(passing) {
            match (last, passing) {
                (_, true) => {
                    info!(url = %check.url, result = %result, "check passing; registering")
                }
                (None, false) => {
                    warn!(url = %check.url, result = %result, "check failing; not registering yet")
                }
                (Some(_), false) => {
                    warn!(url = %check.url, result = %result, "check failing; deregistering")
                }
            }
            last = Some(passing);
            if gate.send(passing).is_err() {
                return;
            }
        }
        tokio::select! {
            _ = gate.closed() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Opens `gate` once `addr` accepts a TCP connection.
pub async fn run_reachable_gate(addr: HostPort, gate: watch::Sender<bool>) {
    let mut logged = false;
    loop {
        let attempt = tokio::time::timeout(
            CHECK_TIMEOUT,
            TcpStream::connect((addr.host.as_str(), addr.port)),
        )
        .await;
        match attempt {
            Ok(Ok(_)) => {
                info!(addr = %addr, "service reachable; registering");
                let _ = gate.send(true);
                return;
            }
            Ok(Err(e)) if !logged => {
                info!(addr = %addr, error = %e, "waiting for the service to accept connections");
                logged = true;
            }
            _ => {}
        }
        tokio::select! {
            _ = gate.closed() => return,
            _ = tokio::time::sleep(REACHABLE_POLL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_urls_parse() {
        let c = HttpCheck::parse("http://127.0.0.1:8080/health?x=1").unwrap();
        assert_eq!(c.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.path, "/health?x=1");
        assert_eq!(c.authority, "127.0.0.1:8080");
        let c = HttpCheck::parse("HTTP://svc.local").unwrap();
        assert_eq!(c.addr.port, 80);
        assert_eq!(c.path, "/");
        let c = HttpCheck::parse("http://[::1]:81/h#frag").unwrap();
        assert_eq!(c.addr.host, "::1");
        assert_eq!(c.path, "/h");
        let c = HttpCheck::parse("http://[::1]?q").unwrap();
        assert_eq!(c.addr.port, 80);
        assert_eq!(c.path, "/?q");
    }

    #[test]
    fn bad_check_urls_name_the_reason() {
        for (url, reason) in [
            ("https://x:1/", "only http://"),
            ("x:1/health", "expected http://"),
            ("http:///health", "no host"),
            ("http://u:p@x:1/", "credentials"),
            ("http://x:0/", "outside"),
            ("http://x:1/a b", "spaces"),
            ("http://x:1/a\r\nX: y", "control"),
        ] {
            let e = HttpCheck::parse(url).expect_err(url).to_string();
            assert!(e.contains(reason), "{url}: {e} should mention {reason}");
            assert!(e.contains(&format!("{url:?}")), "{e} should name the url");
        }
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content"), Ok(204));
        assert_eq!(parse_status_line(b"HTTP/1.0 503"), Ok(503));
        assert!(parse_status_line(b"SSH-2.0-OpenSSH").is_err());
        assert!(parse_status_line(b"HTTP/1.1 2000 x").is_err());
    }

    #[tokio::test]
    async fn probe_reads_the_status() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let c = HttpCheck::parse(&format!("http://127.0.0.1:{port}/health")).unwrap();
        assert_eq!(c.probe(CHECK_TIMEOUT).await, CheckResult::Passing(200));
        assert_eq!(c.probe(CHECK_TIMEOUT).await, CheckResult::Status(503));
        // nobody listens any more
        assert!(matches!(
            c.probe(CHECK_TIMEOUT).await,
            CheckResult::Error(_)
        ));
    }
}

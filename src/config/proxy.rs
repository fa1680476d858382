//! `[proxy]`: the cleartext listener, the request path's timeouts, retries and threads.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{in_range, invalid, millis, parse_addr, ConfigError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    pub listen: String,
    pub engine: ProxyEngine,
    pub threads: usize,
    pub work_stealing: bool,
    pub connect_timeout_ms: u64,
    pub read_timeout_ms: u64,
    pub write_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub downstream_read_timeout_ms: u64,
    pub request_header_timeout_ms: u64,
    pub tunnel_idle_timeout_ms: u64,
    pub max_client_connections: usize,
    pub per_try_timeout_ms: u64,
    pub min_request_body_rate: u64,
    pub request_body_rate_grace_ms: u64,
    pub keepalive_pool_size: usize,
    pub max_tries: usize,
    pub grace_period_seconds: u64,
    pub shutdown_timeout_seconds: u64,
    /// The proxy's zone: instances with the same `zone` metadata are preferred ("": none).
    pub zone: String,
}

impl Default for ProxySection {
    fn default() -> Self {
        ProxySection {
            listen: "0.0.0.0:8080".into(),
            engine: ProxyEngine::Native,
            threads: 2,
            work_stealing: false,
            connect_timeout_ms: 1_000,
            read_timeout_ms: 30_000,
            write_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            downstream_read_timeout_ms: 60_000,
            request_header_timeout_ms: 10_000,
            tunnel_idle_timeout_ms: 300_000,
            max_client_connections: 0,
            per_try_timeout_ms: 0,
            min_request_body_rate: 256,
            request_body_rate_grace_ms: 10_000,
            keepalive_pool_size: 256,
            max_tries: 3,
            grace_period_seconds: 0,
            shutdown_timeout_seconds: 10,
            zone: String::new(),
        }
    }
}

/// Which request path proxies client traffic (`proxy.engine`): only switchyard's own
/// ([`crate::engine`]). `"pingora"` (pingora-proxy's path) was removed: it did not frame what it
/// forwarded by the rules of [`crate::http1`], and it doubled the request-path code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyEngine {
    #[default]
    Native,
    /// Refused with an explanation by validation.
    Pingora,
}

/// Validated `[proxy]`.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub threads: usize,
    pub work_stealing: bool,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    pub downstream_read_timeout: Duration,
    /// Longest time from a request's first byte to the end of its head (a total, not per read).
    pub request_header_timeout: Duration,
    /// An upgraded connection (WebSocket) with no bytes either way for this long is closed.
    pub tunnel_idle_timeout: Duration,
    /// Open client connections at most (0: what the open-file limit carries, see
    /// [`crate::limits`]); more are answered 503 and closed.
    pub max_client_connections: usize,
    /// First-byte limit of one try of an idempotent request (then another instance is tried);
    /// `read_timeout` when not set.
    pub per_try_timeout: Duration,
    /// Bytes per second a streamed request body must average once its grace time is over
    /// (0: no minimum).
    pub min_request_body_rate: u64,
    pub request_body_rate_grace: Duration,
    pub keepalive_pool_size: usize,
    pub max_tries: usize,
    pub grace_period: Duration,
    pub shutdown_timeout: Duration,
    /// `proxy.zone`, when set.
    pub zone: Option<std::sync::Arc<str>>,
}

impl ProxySection {
    pub(super) fn validate(&self) -> Result<ProxyConfig, ConfigError> {
        let p = self;
        in_range("proxy.threads", p.threads as u64, 1, 1024)?;
        if p.engine == ProxyEngine::Pingora {
            return Err(invalid(
                "proxy.engine",
                "\"pingora\" was removed; \"native\" is the only request path (remove the key)",
            ));
        }
        in_range("proxy.max_tries", p.max_tries as u64, 1, 16)?;
        Ok(ProxyConfig {
            listen: parse_addr("proxy.listen", &p.listen)?,
            threads: p.threads,
            work_stealing: p.work_stealing,
            connect_timeout: millis("proxy.connect_timeout_ms", p.connect_timeout_ms)?,
            read_timeout: millis("proxy.read_timeout_ms", p.read_timeout_ms)?,
            write_timeout: millis("proxy.write_timeout_ms", p.write_timeout_ms)?,
            idle_timeout: millis("proxy.idle_timeout_ms", p.idle_timeout_ms)?,
            downstream_read_timeout: millis(
                "proxy.downstream_read_timeout_ms",
                p.downstream_read_timeout_ms,
            )?,
            request_header_timeout: millis(
                "proxy.request_header_timeout_ms",
                p.request_header_timeout_ms,
            )?,
            tunnel_idle_timeout: millis("proxy.tunnel_idle_timeout_ms", p.tunnel_idle_timeout_ms)?,
            max_client_connections: p.max_client_connections,
            per_try_timeout: if p.per_try_timeout_ms == 0 {
                Duration::from_millis(p.read_timeout_ms)
            } else {
                millis("proxy.per_try_timeout_ms", p.per_try_timeout_ms)?
            },
            min_request_body_rate: p.min_request_body_rate,
            request_body_rate_grace: millis(
                "proxy.request_body_rate_grace_ms",
                p.request_body_rate_grace_ms,
            )?,
            keepalive_pool_size: p.keepalive_pool_size,
            max_tries: p.max_tries,
            grace_period: Duration::from_secs(p.grace_period_seconds),
            shutdown_timeout: Duration::from_secs(p.shutdown_timeout_seconds),
            zone: match p.zone.trim() {
                "" => None,
                z => Some(z.into()),
            },
        })
    }
}

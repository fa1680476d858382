//! The check configuration: how an instance is checked (`[health]`, `[services.<name>.health]`
//! validated by [`crate::config`]) and which statuses pass.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::routing::Health;

/// How an instance is checked (config key `protocol`, metadata `health_protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// `GET path`, healthy on an expected status (default).
    #[default]
    Http,
    /// Healthy when a TCP connection opens.
    Tcp,
    /// `grpc.health.v1.Health/Check`, healthy on SERVING.
    Grpc,
    /// `GET path` over TLS (as the proxy reaches `https`/`h2` instances), healthy on an expected
    /// status.
    Https,
    /// No active check: admitted at once; passive ejections end at the next (trivial) check.
    None,
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "http" => Ok(Protocol::Http),
            "tcp" => Ok(Protocol::Tcp),
            "grpc" => Ok(Protocol::Grpc),
            "https" => Ok(Protocol::Https),
            "none" => Ok(Protocol::None),
            other => Err(format!(
                "{other:?} is not one of http, https, tcp, grpc, none"
            )),
        }
    }
}

/// Set of HTTP statuses, written like `"200-299"` or `"200,204,300-399"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSet(Vec<(u16, u16)>);

impl StatusSet {
    pub fn parse(text: &str) -> Result<StatusSet, String> {
        let mut ranges = Vec::new();
        for part in text.split(',').map(str::trim) {
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            let code = |s: &str| {
                s.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|c| (100..=599).contains(c))
            };
            match (code(lo), code(hi)) {
                (Some(lo), Some(hi)) if lo <= hi => ranges.push((lo, hi)),
                _ => {
                    return Err(format!(
                        "{text:?}: {part:?} is not a status (100-599) or a range like 200-299"
                    ))
                }
            }
        }
        Ok(StatusSet(ranges))
    }

    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status))
    }
}

/// A validated check definition: `[health]`, possibly overridden by `[services.<name>.health]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    pub protocol: Protocol,
    /// HTTP path (default `/health`).
    pub path: String,
    /// Port to probe; `None` = the instance's own port.
    pub port: Option<u16>,
    /// HTTP statuses counted as healthy (default 200-299).
    pub expected: StatusSet,
    /// gRPC service name to ask about ("" = the whole server).
    pub grpc_service: String,
    /// Time between the starts of two checks (default 1 s).
    pub interval: Duration,
    /// Time one check may take (default 1 s).
    pub timeout: Duration,
    /// Each wait is shortened by a random 0..=jitter, so checks spread out (default 100 ms); the
    /// wait after the first check by up to interval/2 (unless jitter is 0).
    pub jitter: Duration,
    /// Consecutive passes that admit a pending or unhealthy instance (default 1).
    pub healthy_threshold: u32,
    /// Consecutive failures that eject a healthy instance (default 2).
    pub unhealthy_threshold: u32,
    /// TLS of `https` checks: the service's upstream TLS (`None`: the system roots).
    pub tls: Option<TlsSettings>,
}

/// The upstream TLS settings an HTTPS check verifies with (equal when they are the same ones).
#[derive(Debug, Clone)]
pub struct TlsSettings(pub Arc<crate::upstream::ClientTls>);

impl PartialEq for TlsSettings {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for TlsSettings {}

/// Validated `[health]` configuration.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// false: no active checks, no passive ejection, new instances are healthy at once.
    pub enabled: bool,
    /// New instances take traffic before their first check passes.
    pub admit_immediately: bool,
    /// Checks running at the same time, at most (default 256); steady checks leave
    /// `max_concurrent / 8` (at most 64) of them to first checks of new instances.
    pub max_concurrent: usize,
    /// HTTP checks keep their connection for the next check when the response allows it
    /// (default true).
    pub reuse_connection: bool,
    /// Kept-alive check connections at most; above it checks use one-shot connections.
    /// `None` (default): half the open-file limit (`RLIMIT_NOFILE`).
    pub max_idle_connections: Option<usize>,
    /// The check of services without their own.
    pub default: CheckSpec,
    /// Services whose check differs from `default`.
    pub services: BTreeMap<String, CheckSpec>,
}

impl HealthConfig {
    pub fn spec_for(&self, service: &str) -> &CheckSpec {
        self.services.get(service).unwrap_or(&self.default)
    }

    /// Health of a newly registered instance.
    pub fn initial_health(&self) -> Health {
        if !self.enabled || self.admit_immediately {
            Health::Healthy
        } else {
            Health::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_sets_parse_lists_and_ranges() {
        let s = StatusSet::parse("200-204, 301,404").unwrap();
        assert!(s.contains(200) && s.contains(204) && s.contains(301) && s.contains(404));
        assert!(!s.contains(205) && !s.contains(500));
        for bad in ["", "2xx", "300-200", "99", "200-700"] {
            assert!(StatusSet::parse(bad).is_err(), "{bad:?}");
        }
    }
}

//! `[etcd]`: where the registry reads instances from, and how patiently.

use std::time::Duration;

use serde::Deserialize;

use super::{invalid, millis, ConfigError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdSection {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub dial_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub resync_interval_ms: u64,
    pub dns_refresh_ms: u64,
    pub dns_timeout_ms: u64,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl Default for EtcdSection {
    fn default() -> Self {
        EtcdSection {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/services/".into(),
            dial_timeout_ms: 2_000,
            request_timeout_ms: 5_000,
            backoff_initial_ms: 100,
            backoff_max_ms: 5_000,
            resync_interval_ms: 60_000,
            dns_refresh_ms: 30_000,
            dns_timeout_ms: 5_000,
            username: None,
            password: None,
        }
    }
}

/// Validated `[etcd]`.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Always ends with `/`.
    pub prefix: String,
    pub dial_timeout: Duration,
    pub request_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub resync_interval: Duration,
    /// Registered DNS names are looked up again this often.
    pub dns_refresh: Duration,
    /// One lookup of a registered name may take this long.
    pub dns_timeout: Duration,
    pub credentials: Option<(String, String)>,
}

impl EtcdSection {
    pub(super) fn validate(&self) -> Result<EtcdConfig, ConfigError> {
        let e = self;
        if e.endpoints.is_empty() {
            return Err(invalid(
                "etcd.endpoints",
                "at least one endpoint is required",
            ));
        }
        let endpoints = e
            .endpoints
            .iter()
            .map(|ep| normalize_endpoint(ep))
            .collect::<Result<Vec<_>, _>>()?;
        let mut prefix = e.prefix.trim().to_string();
        if prefix.is_empty() || !prefix.starts_with('/') {
            return Err(invalid(
                "etcd.prefix",
                format!("{:?} must start with '/'", e.prefix),
            ));
        }
        if !prefix.ends_with('/') {
            // watch `prefix/`, never `prefix`: "/services/user" would also match "user-admin"
            prefix.push('/');
        }
        if e.backoff_max_ms < e.backoff_initial_ms {
            return Err(invalid(
                "etcd.backoff_max_ms",
                format!(
                    "{} is smaller than etcd.backoff_initial_ms ({})",
                    e.backoff_max_ms, e.backoff_initial_ms
                ),
            ));
        }
        let credentials = match (&e.username, &e.password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "etcd.username",
                    "username and password must be set together",
                ))
            }
        };
        Ok(EtcdConfig {
            endpoints,
            prefix,
            dial_timeout: millis("etcd.dial_timeout_ms", e.dial_timeout_ms)?,
            request_timeout: millis("etcd.request_timeout_ms", e.request_timeout_ms)?,
            backoff_initial: millis("etcd.backoff_initial_ms", e.backoff_initial_ms)?,
            backoff_max: millis("etcd.backoff_max_ms", e.backoff_max_ms)?,
            resync_interval: millis("etcd.resync_interval_ms", e.resync_interval_ms)?,
            dns_refresh: millis("etcd.dns_refresh_ms", e.dns_refresh_ms)?,
            dns_timeout: millis("etcd.dns_timeout_ms", e.dns_timeout_ms)?,
            credentials,
        })
    }
}

/// `host:port` or a URL of one, as `http://host:port` (the scheme kept when given).
fn normalize_endpoint(ep: &str) -> Result<String, ConfigError> {
    let ep = ep.trim();
    let rest = ep
        .strip_prefix("http://")
        .or_else(|| ep.strip_prefix("https://"))
        .unwrap_or(ep);
    let ok = rest
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if !ok {
        return Err(invalid(
            "etcd.endpoints",
            format!("{ep:?} is not an endpoint like http://127.0.0.1:2379"),
        ));
    }
    Ok(if rest.len() == ep.len() {
        format!("http://{ep}")
    } else {
        ep.to_string()
    })
}

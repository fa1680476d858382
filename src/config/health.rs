//! `[health]` and `[services.<name>.health]`: active checks, passive detection and admission.
//! A service's section overrides single keys of `[health]`; unset keys inherit.

use std::time::Duration;

use serde::Deserialize;

use super::{in_range, invalid, ConfigError};
use crate::health::{CheckSpec, Protocol, StatusSet, TlsSettings};
use crate::routing::AllUnhealthy;

/// `[health]`: active checks, passive detection and admission, for every service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSection {
    pub enabled: bool,
    pub admit_immediately: bool,
    pub max_concurrent: usize,
    pub reuse_connection: bool,
    pub max_idle_connections: Option<usize>,
    pub protocol: Protocol,
    pub path: String,
    pub port: Option<u16>,
    pub expected_statuses: String,
    pub grpc_service: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub jitter_ms: u64,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub passive_failures: u64,
    pub passive_cooldown_ms: u64,
    pub all_unhealthy: AllUnhealthy,
}

impl Default for HealthSection {
    fn default() -> Self {
        HealthSection {
            enabled: true,
            admit_immediately: false,
            max_concurrent: 256,
            reuse_connection: true,
            max_idle_connections: None,
            protocol: Protocol::Http,
            path: "/health".into(),
            port: None,
            expected_statuses: "200-299".into(),
            grpc_service: String::new(),
            interval_ms: 1_000,
            timeout_ms: 1_000,
            jitter_ms: 100,
            healthy_threshold: 1,
            unhealthy_threshold: 2,
            passive_failures: 2,
            passive_cooldown_ms: 10_000,
            all_unhealthy: AllUnhealthy::Fail,
        }
    }
}

/// `[services.<name>.health]`: per-service overrides of `[health]`; unset keys inherit.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceHealthSection {
    pub protocol: Option<Protocol>,
    pub path: Option<String>,
    pub port: Option<u16>,
    pub expected_statuses: Option<String>,
    pub grpc_service: Option<String>,
    pub interval_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub jitter_ms: Option<u64>,
    pub healthy_threshold: Option<u32>,
    pub unhealthy_threshold: Option<u32>,
    pub passive_failures: Option<u64>,
    pub passive_cooldown_ms: Option<u64>,
    pub all_unhealthy: Option<AllUnhealthy>,
}

impl HealthSection {
    /// The checker's own limits.
    pub(super) fn validate_limits(&self) -> Result<(), ConfigError> {
        in_range(
            "health.max_concurrent",
            self.max_concurrent as u64,
            1,
            65_536,
        )?;
        if let Some(n) = self.max_idle_connections {
            in_range("health.max_idle_connections", n as u64, 0, 1_000_000)?;
        }
        Ok(())
    }

    /// How long a passive ejection lasts: with active checks, until a check brings the instance
    /// back (`None`); without, the cool-down (`<section>.passive_cooldown_ms`).
    pub(super) fn passive_cooldown(
        &self,
        section: &str,
        v: u64,
    ) -> Result<Option<Duration>, ConfigError> {
        in_range(format!("{section}.passive_cooldown_ms"), v, 1, 3_600_000)?;
        Ok((!self.enabled).then(|| Duration::from_millis(v)))
    }

    /// The check of `[health]` with the overrides `o` of `section` applied; its TLS is `tls`.
    pub(super) fn check_spec(
        &self,
        section: &str,
        o: &ServiceHealthSection,
        tls: Option<TlsSettings>,
    ) -> Result<CheckSpec, ConfigError> {
        let h = self;
        let key = |k: &str| format!("{section}.{k}");
        let ms = |k: &str, v: u64| -> Result<Duration, ConfigError> {
            in_range(key(k), v, 1, 3_600_000).map(Duration::from_millis)
        };
        let interval = ms("interval_ms", o.interval_ms.unwrap_or(h.interval_ms))?;
        let timeout = ms("timeout_ms", o.timeout_ms.unwrap_or(h.timeout_ms))?;
        let jitter = Duration::from_millis(o.jitter_ms.unwrap_or(h.jitter_ms));
        if jitter >= interval {
            return Err(invalid(
                key("jitter_ms"),
                format!(
                    "{} must be smaller than interval_ms ({})",
                    jitter.as_millis(),
                    interval.as_millis()
                ),
            ));
        }
        let threshold = |k: &str, v: u32| -> Result<u32, ConfigError> {
            in_range(key(k), v.into(), 1, 100).map(|_| v)
        };
        let path = o.path.clone().unwrap_or_else(|| h.path.clone());
        if !path.starts_with('/') || path.contains([' ', '\r', '\n']) {
            return Err(invalid(
                key("path"),
                format!("{path:?} must start with '/' and contain no spaces"),
            ));
        }
        let port = o.port.or(h.port);
        if port == Some(0) {
            return Err(invalid(key("port"), "0 is not a port"));
        }
        let statuses = o
            .expected_statuses
            .as_deref()
            .unwrap_or(&h.expected_statuses);
        let expected =
            StatusSet::parse(statuses).map_err(|m| invalid(key("expected_statuses"), m))?;
        Ok(CheckSpec {
            protocol: o.protocol.unwrap_or(h.protocol),
            path,
            port,
            expected,
            grpc_service: o
                .grpc_service
                .clone()
                .unwrap_or_else(|| h.grpc_service.clone()),
            interval,
            timeout,
            jitter,
            healthy_threshold: threshold(
                "healthy_threshold",
                o.healthy_threshold.unwrap_or(h.healthy_threshold),
            )?,
            unhealthy_threshold: threshold(
                "unhealthy_threshold",
                o.unhealthy_threshold.unwrap_or(h.unhealthy_threshold),
            )?,
            tls,
        })
    }
}

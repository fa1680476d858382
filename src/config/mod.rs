//! Configuration pipeline:
//!
//! ```text
//! TOML file (or the embedded config/switchyard.toml)
//!   -> FileConfig            serde, deny_unknown_fields, named defaults (one *Section per table)
//!   -> FileConfig::apply     CLI overrides: --listen, --admin-listen, --etcd, --prefix, --tls-*
//!   -> FileConfig::validate  each section validates itself into its part of the validated Config;
//!                            errors name the key and carry the offending value
//! ```
//!
//! One file per section: `proxy.rs`, `admin.rs` (with `[consul]`), `etcd.rs`, `routing.rs`,
//! `health.rs`, `traffic.rs`, `services.rs` (with `[upstream_tls]`), `tls.rs`, `http2.rs`, `log.rs`. Every key is
//! documented in `config/switchyard.toml`, which is also the embedded default.

mod admin;
mod etcd;
mod health;
mod http2;
mod log;
mod proxy;
mod routing;
mod services;
#[cfg(test)]
mod tests;
mod tls;
mod traffic;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use admin::{AdminSection, ConsulSection};
pub use etcd::{EtcdConfig, EtcdSection};
pub use health::{HealthSection, ServiceHealthSection};
pub use http2::Http2Section;
pub use log::{LogFormat, LogSection};
pub use proxy::{ProxyConfig, ProxyEngine, ProxySection};
pub use routing::{RouteSection, RoutingSection};
pub use services::ServiceSection;
pub use tls::{CertificateSection, Listen, TlsConfig, TlsSection};
pub use traffic::{TrafficKeys, TrafficSection};

use crate::gateway::Http2Config;
use crate::health::HealthConfig;
use crate::routing::{Router, ServiceSettings};
use crate::tls::TlsError;
use crate::upstream::TlsFiles;

/// The default configuration, shipped as `config/switchyard.toml` and embedded in the binary.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/switchyard.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid config: {key}: {value} is outside {min}-{max}")]
    OutOfRange {
        key: String,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("invalid config: {key}: must be greater than 0")]
    Zero { key: String },
    #[error("invalid config: {key}: {value:?} is not an address like 127.0.0.1:8080")]
    Address { key: String, value: String },
    #[error("invalid config: {key}: {message}")]
    Invalid { key: String, message: String },
    #[error("invalid config: {key}: {source}")]
    Tls {
        key: String,
        #[source]
        source: TlsError,
    },
}

/// A value of `key` that no typed variant describes; `message` names the value.
fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// `value` if it is within `min..=max`.
fn in_range(key: impl Into<String>, value: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
    if (min..=max).contains(&value) {
        return Ok(value);
    }
    Err(ConfigError::OutOfRange {
        key: key.into(),
        value,
        min,
        max,
    })
}

/// A `*_ms` key that must not be 0.
fn millis(key: &str, v: u64) -> Result<Duration, ConfigError> {
    if v == 0 {
        return Err(ConfigError::Zero { key: key.into() });
    }
    Ok(Duration::from_millis(v))
}

fn parse_addr(key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse().map_err(|_| ConfigError::Address {
        key: key.into(),
        value: v.into(),
    })
}

/// The configuration file as written: one section per table, every key defaulted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub proxy: ProxySection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub consul: ConsulSection,
    #[serde(default)]
    pub etcd: EtcdSection,
    #[serde(default)]
    pub routing: RoutingSection,
    #[serde(default)]
    pub health: HealthSection,
    #[serde(default)]
    pub traffic: TrafficSection,
    #[serde(default)]
    pub services: BTreeMap<String, ServiceSection>,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub tls: TlsSection,
    #[serde(default)]
    pub upstream_tls: TlsFiles,
    #[serde(default)]
    pub http2: Http2Section,
}

/// Command-line values that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub etcd: Vec<String>,
    pub prefix: Option<String>,
    pub tls_listen: Option<String>,
    /// `--tls-cert` and `--tls-key`: one certificate, instead of `[[tls.certificates]]`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub admin_listen: SocketAddr,
    /// The Consul-compatible API; `None` when `consul.enabled = false`.
    pub consul: Option<crate::consul::ConsulConfig>,
    pub etcd: EtcdConfig,
    pub router: Router,
    pub services: BTreeMap<String, ServiceSettings>,
    /// Settings of services without a `[services.<name>]` section.
    pub default_service: ServiceSettings,
    pub health: HealthConfig,
    /// How often outlier detection sweeps (`traffic.outlier_interval_ms`).
    pub outlier_interval: Duration,
    pub log: LogSection,
    /// The TLS listener, when `[tls]` has one.
    pub tls: Option<TlsConfig>,
    pub http2: Http2Config,
}

impl Config {
    /// switchyard's own listeners. An instance registered at one of them is refused (it would
    /// make the proxy a door to itself); a new listener adds itself here.
    pub fn own_listeners(&self) -> Vec<crate::registry::OwnAddress> {
        use crate::registry::OwnAddress;
        let mut own = vec![
            OwnAddress::listener("proxy listener", self.proxy.listen),
            OwnAddress::listener("admin listener", self.admin_listen),
        ];
        if let Some(c) = &self.consul {
            own.push(OwnAddress::listener("Consul API listener", c.listen));
        }
        if let Some(t) = &self.tls {
            own.extend(
                t.listen
                    .iter()
                    .map(|a| OwnAddress::listener("TLS listener", *a)),
            );
        }
        own
    }

    /// Settings for `service`, falling back to defaults.
    pub fn service_settings(&self, service: &str) -> ServiceSettings {
        self.services
            .get(service)
            .cloned()
            .unwrap_or_else(|| self.default_service.clone())
    }
}

impl FileConfig {
    pub fn parse(text: &str, origin: &str) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })
    }

    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        FileConfig::parse(&text, &path.display().to_string())
    }

    pub fn embedded() -> Result<FileConfig, ConfigError> {
        FileConfig::parse(DEFAULT_CONFIG, "(embedded default)")
    }

    pub fn apply(&mut self, o: &Overrides) {
        if let Some(l) = &o.listen {
            self.proxy.listen = l.clone();
        }
        if let Some(l) = &o.admin_listen {
            self.admin.listen = l.clone();
        }
        if !o.etcd.is_empty() {
            self.etcd.endpoints = o.etcd.clone();
        }
        if let Some(p) = &o.prefix {
            self.etcd.prefix = p.clone();
        }
        if let Some(l) = &o.tls_listen {
            self.tls.listen = Some(Listen::One(l.clone()));
        }
        if let (Some(cert), Some(key)) = (&o.tls_cert, &o.tls_key) {
            self.tls.certificates = vec![CertificateSection {
                cert_file: cert.clone(),
                key_file: key.clone(),
            }];
        }
    }

    /// Every section validated (in this order; the first error is returned).
    pub fn validate(self) -> Result<Config, ConfigError> {
        let proxy = self.proxy.validate()?;
        let admin_listen = self.admin.validate(proxy.listen)?;
        let consul = self.consul.validate(proxy.listen, admin_listen)?;
        let etcd = self.etcd.validate()?;
        let router = self.routing.validate()?;
        let zone = proxy.zone.clone();
        let services = services::validate(
            &self.health,
            &self.traffic,
            zone.as_ref(),
            &self.upstream_tls,
            &self.services,
        )?;
        let outlier_interval = self.traffic.interval()?;
        self.log.validate()?;
        let tls = self.tls.validate(&proxy.listen, &admin_listen)?;
        let http2 = self.http2.validate()?;
        Ok(Config {
            proxy,
            admin_listen,
            consul,
            etcd,
            router,
            services: services.settings,
            default_service: services.default,
            health: services.health,
            outlier_interval,
            log: self.log,
            tls,
            http2,
        })
    }
}

/// Loads the file (or the embedded default), applies CLI overrides and validates.
pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
    let mut file = match path {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::embedded()?,
    };
    file.apply(overrides);
    file.validate()
}

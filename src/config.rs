//! Configuration pipeline:
//!
//! ```text
//! TOML file (or the embedded config/switchyard.toml)
//!   -> FileConfig        serde, deny_unknown_fields, named defaults
//!   -> CLI overrides     --listen, --admin-listen, --etcd, --prefix
//!   -> Config::validate  every value checked; errors name the key and the offending value
//! ```
//!
//! Every key is documented in `config/switchyard.toml`, which is also the embedded default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::gateway::Http2Config;
use crate::health::{CheckSpec, HealthConfig, Protocol, StatusSet};
use crate::registry::codec::valid_service_name;
use crate::routing::route::ExplicitRoute;
use crate::routing::{AllUnhealthy, Policy, Router, ServiceSettings};
use crate::tls::{CertFiles, SniResolver, TlsError};
use crate::upstream::{ClientTls, TlsFiles, UpstreamSettings};

/// The default configuration, shipped as `config/switchyard.toml` and embedded in the binary.
pub const DEFAULT_CONFIG: &str = include_str!("../config/switchyard.toml");

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
    #[error("invalid config: {key}: {message}")]
    Invalid { key: String, message: String },
    #[error("invalid config: {key}: {source}")]
    Tls {
        key: String,
        #[source]
        source: TlsError,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

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

/// `[tls]`: the TLS listener and its certificates.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    pub listen: Option<Listen>,
    pub certificates: Vec<CertificateSection>,
    pub handshake_timeout_ms: Option<u64>,
}

/// `tls.listen`: one address, or several (`["0.0.0.0:8443", "[::]:8443"]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Listen {
    One(String),
    Many(Vec<String>),
}

/// One `[[tls.certificates]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateSection {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// `[http2]`: HTTP/2 limits, both sides.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http2Section {
    pub max_concurrent_streams: u32,
    pub max_header_list_size: u32,
    pub max_pending_accept_reset_streams: usize,
    pub max_local_error_reset_streams: usize,
    pub keepalive_interval_ms: u64,
    pub keepalive_timeout_ms: u64,
    pub upstream_max_streams_per_connection: usize,
}

impl Default for Http2Section {
    fn default() -> Self {
        let d = Http2Config::default();
        Http2Section {
            max_concurrent_streams: d.max_concurrent_streams,
            max_header_list_size: d.max_header_list_size,
            max_pending_accept_reset_streams: d.max_pending_accept_reset_streams,
            max_local_error_reset_streams: d.max_local_error_reset_streams,
            keepalive_interval_ms: d.keepalive_interval.map_or(0, |i| i.as_millis() as u64),
            keepalive_timeout_ms: d.keepalive_timeout.as_millis() as u64,
            upstream_max_streams_per_connection: d.upstream_max_streams_per_connection,
        }
    }
}

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    pub listen: String,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: "127.0.0.1:9090".into(),
        }
    }
}

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingSection {
    pub host_routing: bool,
    pub path_routing: bool,
    pub host_suffixes: Vec<String>,
    pub routes: Vec<RouteSection>,
}

impl Default for RoutingSection {
    fn default() -> Self {
        RoutingSection {
            host_routing: true,
            path_routing: true,
            host_suffixes: vec![],
            routes: vec![],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub service: String,
    #[serde(default)]
    pub strip_prefix: bool,
}

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

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceSection {
    pub policy: Policy,
    pub health: ServiceHealthSection,
    /// Protocol of instances registered without `protocol` metadata.
    pub protocol: Option<crate::upstream::Protocol>,
    /// TLS towards this service's `https`/`h2` instances, over `[upstream_tls]`.
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    pub level: String,
    pub format: LogFormat,
    pub access_log: bool,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: "info".into(),
            format: LogFormat::Text,
            access_log: false,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[consul]`: the Consul-compatible agent API ([`crate::consul`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsulSection {
    pub enabled: bool,
    pub listen: String,
    pub token: Option<String>,
}

impl Default for ConsulSection {
    fn default() -> Self {
        ConsulSection {
            enabled: true,
            listen: "127.0.0.1:8500".into(),
            token: None,
        }
    }
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
    pub log: LogSection,
    /// The TLS listener, when `[tls]` has one.
    pub tls: Option<TlsConfig>,
    pub http2: Http2Config,
}

/// Validated `[tls]`: the listener address and its certificates, loaded.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// One TLS listener per address, all with the same certificates.
    pub listen: Vec<SocketAddr>,
    pub resolver: std::sync::Arc<SniResolver>,
    pub handshake_timeout: Duration,
}

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
}

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

    pub fn validate(self) -> Result<Config, ConfigError> {
        let p = &self.proxy;
        let ms = |key: &str, v: u64| -> Result<Duration, ConfigError> {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
            Ok(Duration::from_millis(v))
        };
        if p.threads == 0 || p.threads > 1024 {
            return Err(invalid(
                "proxy.threads",
                format!("{} is outside 1-1024", p.threads),
            ));
        }
        if p.engine == ProxyEngine::Pingora {
            return Err(invalid(
                "proxy.engine",
                "\"pingora\" was removed; \"native\" is the only request path (remove the key)",
            ));
        }
        if p.max_tries == 0 || p.max_tries > 16 {
            return Err(invalid(
                "proxy.max_tries",
                format!("{} is outside 1-16", p.max_tries),
            ));
        }
        let proxy = ProxyConfig {
            listen: parse_addr("proxy.listen", &p.listen)?,
            threads: p.threads,
            work_stealing: p.work_stealing,
            connect_timeout: ms("proxy.connect_timeout_ms", p.connect_timeout_ms)?,
            read_timeout: ms("proxy.read_timeout_ms", p.read_timeout_ms)?,
            write_timeout: ms("proxy.write_timeout_ms", p.write_timeout_ms)?,
            idle_timeout: ms("proxy.idle_timeout_ms", p.idle_timeout_ms)?,
            downstream_read_timeout: ms(
                "proxy.downstream_read_timeout_ms",
                p.downstream_read_timeout_ms,
            )?,
            request_header_timeout: ms(
                "proxy.request_header_timeout_ms",
                p.request_header_timeout_ms,
            )?,
            tunnel_idle_timeout: ms("proxy.tunnel_idle_timeout_ms", p.tunnel_idle_timeout_ms)?,
            max_client_connections: p.max_client_connections,
            per_try_timeout: if p.per_try_timeout_ms == 0 {
                Duration::from_millis(p.read_timeout_ms)
            } else {
                ms("proxy.per_try_timeout_ms", p.per_try_timeout_ms)?
            },
            min_request_body_rate: p.min_request_body_rate,
            request_body_rate_grace: ms(
                "proxy.request_body_rate_grace_ms",
                p.request_body_rate_grace_ms,
            )?,
            keepalive_pool_size: p.keepalive_pool_size,
            max_tries: p.max_tries,
            grace_period: Duration::from_secs(p.grace_period_seconds),
            shutdown_timeout: Duration::from_secs(p.shutdown_timeout_seconds),
        };
        let admin_listen = parse_addr("admin.listen", &self.admin.listen)?;
        if admin_listen == proxy.listen {
            return Err(invalid(
                "admin.listen",
                format!("{admin_listen} is the same address as proxy.listen"),
            ));
        }
        let consul = match self.consul.enabled {
            false => None,
            true => {
                let listen = parse_addr("consul.listen", &self.consul.listen)?;
                if listen == proxy.listen || listen == admin_listen {
                    return Err(invalid(
                        "consul.listen",
                        format!("{listen} is the same address as proxy.listen or admin.listen"),
                    ));
                }
                if self
                    .consul
                    .token
                    .as_deref()
                    .is_some_and(|t| t.trim().is_empty())
                {
                    return Err(invalid("consul.token", "must not be empty when set"));
                }
                Some(crate::consul::ConsulConfig {
                    listen,
                    token: self.consul.token.clone(),
                })
            }
        };

        let e = &self.etcd;
        if e.endpoints.is_empty() {
            return Err(invalid(
                "etcd.endpoints",
                "at least one endpoint is required",
            ));
        }
        let mut endpoints = Vec::new();
        for ep in &e.endpoints {
            endpoints.push(normalize_endpoint(ep)?);
        }
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
        let etcd = EtcdConfig {
            endpoints,
            prefix,
            dial_timeout: ms("etcd.dial_timeout_ms", e.dial_timeout_ms)?,
            request_timeout: ms("etcd.request_timeout_ms", e.request_timeout_ms)?,
            backoff_initial: ms("etcd.backoff_initial_ms", e.backoff_initial_ms)?,
            backoff_max: ms("etcd.backoff_max_ms", e.backoff_max_ms)?,
            resync_interval: ms("etcd.resync_interval_ms", e.resync_interval_ms)?,
            dns_refresh: ms("etcd.dns_refresh_ms", e.dns_refresh_ms)?,
            dns_timeout: ms("etcd.dns_timeout_ms", e.dns_timeout_ms)?,
            credentials,
        };

        let mut routes = Vec::new();
        for (i, r) in self.routing.routes.iter().enumerate() {
            let key = format!("routing.routes[{i}]");
            if !valid_service_name(&r.service) {
                return Err(invalid(
                    format!("{key}.service"),
                    format!(
                        "{:?} is not a valid service name (A-Z a-z 0-9 . _ -)",
                        r.service
                    ),
                ));
            }
            if r.host.is_none() && r.path_prefix.is_none() {
                return Err(invalid(key, "a route needs a host, a path_prefix or both"));
            }
            if let Some(pp) = &r.path_prefix {
                if !pp.starts_with('/') {
                    return Err(invalid(
                        format!("{key}.path_prefix"),
                        format!("{pp:?} must start with '/'"),
                    ));
                }
            }
            if let Some(h) = &r.host {
                if h.is_empty() || h.contains(['/', ' ']) {
                    return Err(invalid(
                        format!("{key}.host"),
                        format!("{h:?} is not a host name"),
                    ));
                }
            }
            routes.push(ExplicitRoute {
                host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                path_prefix: r.path_prefix.clone(),
                service: r.service.as_str().into(),
                strip_prefix: r.strip_prefix,
            });
        }
        for s in &self.routing.host_suffixes {
            if s.trim_start_matches('.').is_empty() || s.contains(['/', ' ', ':']) {
                return Err(invalid(
                    "routing.host_suffixes",
                    format!("{s:?} is not a domain suffix"),
                ));
            }
        }
        let router = Router::new(
            routes,
            self.routing.host_suffixes.clone(),
            self.routing.host_routing,
            self.routing.path_routing,
        );
        let h = &self.health;
        if h.max_concurrent == 0 || h.max_concurrent > 65_536 {
            return Err(invalid(
                "health.max_concurrent",
                format!("{} is outside 1-65536", h.max_concurrent),
            ));
        }
        if h.max_idle_connections.is_some_and(|n| n > 1_000_000) {
            return Err(invalid(
                "health.max_idle_connections",
                format!("{:?} is outside 0-1000000", h.max_idle_connections),
            ));
        }
        let mut global_check = check_spec("health", h, &ServiceHealthSection::default())?;
        // with active checks, a check brings an ejected instance back; without, the cool-down does
        let cooldown = |section: &str, v: u64| -> Result<Option<Duration>, ConfigError> {
            if v == 0 || v > 3_600_000 {
                return Err(invalid(
                    format!("{section}.passive_cooldown_ms"),
                    format!("{v} is outside 1-3600000"),
                ));
            }
            Ok((!h.enabled).then(|| Duration::from_millis(v)))
        };
        let global_tls = if self.upstream_tls.is_empty() {
            None
        } else {
            let t = ClientTls::load(&self.upstream_tls).map_err(|source| ConfigError::Tls {
                key: "upstream_tls".into(),
                source,
            })?;
            Some(std::sync::Arc::new(t))
        };
        global_check.tls = global_tls.clone().map(crate::health::TlsSettings);
        let default_service = ServiceSettings {
            policy: Policy::default(),
            all_unhealthy: h.all_unhealthy,
            passive_failures: h.passive_failures,
            passive_cooldown: cooldown("health", h.passive_cooldown_ms)?,
            upstream: UpstreamSettings {
                protocol: None,
                tls: global_tls.clone(),
            },
        };
        let mut services = BTreeMap::new();
        let mut service_checks = BTreeMap::new();
        for (name, s) in &self.services {
            if !valid_service_name(name) {
                return Err(invalid(
                    format!("services.{name}"),
                    "is not a valid service name (A-Z a-z 0-9 . _ -)",
                ));
            }
            let sh = &s.health;
            services.insert(
                name.clone(),
                ServiceSettings {
                    policy: s.policy,
                    all_unhealthy: sh.all_unhealthy.unwrap_or(h.all_unhealthy),
                    passive_failures: sh.passive_failures.unwrap_or(h.passive_failures),
                    passive_cooldown: cooldown(
                        &format!("services.{name}.health"),
                        sh.passive_cooldown_ms.unwrap_or(h.passive_cooldown_ms),
                    )?,
                    upstream: UpstreamSettings {
                        protocol: s.protocol,
                        tls: match &s.tls {
                            Some(files) => {
                                let t = ClientTls::load(&files.over(&self.upstream_tls)).map_err(
                                    |source| ConfigError::Tls {
                                        key: format!("services.{name}.tls"),
                                        source,
                                    },
                                )?;
                                Some(std::sync::Arc::new(t))
                            }
                            None => global_tls.clone(),
                        },
                    },
                },
            );
            let mut spec = check_spec(&format!("services.{name}.health"), h, sh)?;
            // a service of gRPC instances is checked with gRPC health unless told otherwise,
            // one of https/h2 instances over TLS
            if sh.protocol.is_none() && spec.protocol == Protocol::Http {
                use crate::upstream::Protocol as Up;
                match s.protocol {
                    Some(Up::Grpc) => spec.protocol = Protocol::Grpc,
                    Some(Up::Https | Up::H2) => spec.protocol = Protocol::Https,
                    _ => {}
                }
            }
            spec.tls = services
                .get(name)
                .and_then(|st: &ServiceSettings| st.upstream.tls.clone())
                .map(crate::health::TlsSettings);
            if spec != global_check {
                service_checks.insert(name.clone(), spec);
            }
        }
        let health = HealthConfig {
            enabled: h.enabled,
            admit_immediately: h.admit_immediately,
            max_concurrent: h.max_concurrent,
            reuse_connection: h.reuse_connection,
            max_idle_connections: h.max_idle_connections,
            default: global_check,
            services: service_checks,
        };
        if self.log.level.trim().is_empty() {
            return Err(invalid("log.level", "must not be empty"));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(invalid("log.level", format!("{:?}: {e}", self.log.level)));
        }
        let tls = tls_config(&self.tls, &proxy.listen, &admin_listen)?;
        let http2 = http2_config(&self.http2)?;
        Ok(Config {
            proxy,
            admin_listen,
            consul,
            etcd,
            router,
            services,
            default_service,
            health,
            log: self.log,
            tls,
            http2,
        })
    }
}

/// `[tls]`: no listener without certificates and the other way round; every file loaded.
fn tls_config(
    t: &TlsSection,
    proxy: &SocketAddr,
    admin: &SocketAddr,
) -> Result<Option<TlsConfig>, ConfigError> {
    let listen = match (&t.listen, t.certificates.is_empty()) {
        (None, true) => return Ok(None),
        (None, false) => {
            return Err(invalid(
                "tls.listen",
                "certificates are configured but no address to listen on (e.g. \"0.0.0.0:8443\")",
            ))
        }
        (Some(_), true) => {
            return Err(invalid(
                "tls.certificates",
                "tls.listen is set but no certificate is configured ([[tls.certificates]] cert_file, key_file, or --tls-cert and --tls-key)",
            ))
        }
        (Some(Listen::One(l)), false) => vec![parse_addr("tls.listen", l)?],
        (Some(Listen::Many(list)), false) => list
            .iter()
            .map(|l| parse_addr("tls.listen", l))
            .collect::<Result<Vec<_>, _>>()?,
    };
    if listen.is_empty() {
        return Err(invalid("tls.listen", "is an empty list"));
    }
    for (i, addr) in listen.iter().enumerate() {
        if addr == proxy || addr == admin || listen[..i].contains(addr) {
            return Err(invalid(
                "tls.listen",
                format!("{addr} is already proxy.listen, admin.listen or another tls.listen"),
            ));
        }
    }
    let files: Vec<CertFiles> = t
        .certificates
        .iter()
        .map(|c| CertFiles {
            cert_file: c.cert_file.clone(),
            key_file: c.key_file.clone(),
        })
        .collect();
    let resolver = SniResolver::load(files).map_err(|source| ConfigError::Tls {
        key: "tls.certificates".into(),
        source,
    })?;
    let handshake = t.handshake_timeout_ms.unwrap_or(10_000);
    if handshake == 0 || handshake > 3_600_000 {
        return Err(invalid(
            "tls.handshake_timeout_ms",
            format!("{handshake} is outside 1-3600000"),
        ));
    }
    Ok(Some(TlsConfig {
        listen,
        resolver: std::sync::Arc::new(resolver),
        handshake_timeout: Duration::from_millis(handshake),
    }))
}

/// `[http2]`, each value within the range HTTP/2 (and sense) allows.
fn http2_config(h: &Http2Section) -> Result<Http2Config, ConfigError> {
    let range = |key: &str, v: u64, lo: u64, hi: u64| -> Result<(), ConfigError> {
        if v < lo || v > hi {
            return Err(invalid(
                format!("http2.{key}"),
                format!("{v} is outside {lo}-{hi}"),
            ));
        }
        Ok(())
    };
    range(
        "max_concurrent_streams",
        h.max_concurrent_streams.into(),
        1,
        65_536,
    )?;
    range(
        "max_header_list_size",
        h.max_header_list_size.into(),
        1024,
        16 << 20,
    )?;
    range(
        "max_pending_accept_reset_streams",
        h.max_pending_accept_reset_streams as u64,
        1,
        100_000,
    )?;
    range(
        "max_local_error_reset_streams",
        h.max_local_error_reset_streams as u64,
        1,
        100_000,
    )?;
    range(
        "keepalive_interval_ms",
        h.keepalive_interval_ms,
        0,
        3_600_000,
    )?;
    range("keepalive_timeout_ms", h.keepalive_timeout_ms, 1, 3_600_000)?;
    range(
        "upstream_max_streams_per_connection",
        h.upstream_max_streams_per_connection as u64,
        1,
        65_536,
    )?;
    Ok(Http2Config {
        max_concurrent_streams: h.max_concurrent_streams,
        max_header_list_size: h.max_header_list_size,
        max_pending_accept_reset_streams: h.max_pending_accept_reset_streams,
        max_local_error_reset_streams: h.max_local_error_reset_streams,
        keepalive_interval: (h.keepalive_interval_ms > 0)
            .then(|| Duration::from_millis(h.keepalive_interval_ms)),
        keepalive_timeout: Duration::from_millis(h.keepalive_timeout_ms),
        upstream_max_streams_per_connection: h.upstream_max_streams_per_connection,
    })
}

/// The check of `[health]` with the overrides of one `[services.<name>.health]` applied.
fn check_spec(
    section: &str,
    h: &HealthSection,
    o: &ServiceHealthSection,
) -> Result<CheckSpec, ConfigError> {
    let key = |k: &str| format!("{section}.{k}");
    let ms = |k: &str, v: u64| -> Result<Duration, ConfigError> {
        if v == 0 || v > 3_600_000 {
            return Err(invalid(key(k), format!("{v} is outside 1-3600000")));
        }
        Ok(Duration::from_millis(v))
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
        if v == 0 || v > 100 {
            return Err(invalid(key(k), format!("{v} is outside 1-100")));
        }
        Ok(v)
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
    let expected = StatusSet::parse(statuses).map_err(|m| invalid(key("expected_statuses"), m))?;
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
        tls: None,
    })
}

fn parse_addr(key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse()
        .map_err(|_| invalid(key, format!("{v:?} is not an address like 127.0.0.1:8080")))
}

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

/// Loads the file (or the embedded default), applies CLI overrides and validates.
pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
    let mut file = match path {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::embedded()?,
    };
    file.apply(overrides);
    file.validate()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Config, ConfigError> {
        FileConfig::parse(text, "test")?.validate()
    }

    #[test]
    fn embedded_default_is_valid_and_documents_defaults() {
        let c = FileConfig::embedded().unwrap().validate().unwrap();
        assert_eq!(c.proxy.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.etcd.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(c.etcd.prefix, "/services/");
        // the embedded file and the code defaults agree
        let d = check("").unwrap();
        assert_eq!(format!("{:?}", c.proxy), format!("{:?}", d.proxy));
        assert_eq!(format!("{:?}", c.etcd), format!("{:?}", d.etcd));
        assert_eq!(format!("{:?}", c.health), format!("{:?}", d.health));
        assert_eq!(
            format!("{:?}", c.default_service),
            format!("{:?}", d.default_service)
        );
        assert_eq!(c.http2, d.http2);
        assert!(c.tls.is_none(), "no TLS listener by default");
    }

    #[test]
    fn errors_name_the_key_and_value() {
        let cases = [
            ("[proxy]\nlisten = \"nope\"", "proxy.listen"),
            ("[proxy]\nmax_tries = 0", "proxy.max_tries"),
            ("[proxy]\nengine = \"pingora\"", "proxy.engine"),
            (
                "[proxy]\nrequest_header_timeout_ms = 0",
                "proxy.request_header_timeout_ms",
            ),
            (
                "[proxy]\nconnect_timeout_ms = 0",
                "proxy.connect_timeout_ms",
            ),
            ("[proxy]\nlisten_typo = 1", "listen_typo"),
            ("[etcd]\nendpoints = []", "etcd.endpoints"),
            ("[etcd]\nendpoints = [\"http://x\"]", "etcd.endpoints"),
            ("[etcd]\nprefix = \"services\"", "etcd.prefix"),
            ("[etcd]\ndns_refresh_ms = 0", "etcd.dns_refresh_ms"),
            ("[etcd]\ndns_timeout_ms = 0", "etcd.dns_timeout_ms"),
            (
                "[[routing.routes]]\nservice = \"bad name\"\npath_prefix=\"/a\"",
                "routing.routes[0].service",
            ),
            ("[[routing.routes]]\nservice = \"a\"", "routing.routes[0]"),
            ("[services.a]\npolicy = \"fastest\"", "fastest"),
            ("[health]\nprotocol = \"udp\"", "udp"),
            ("[health]\ninterval_ms = 0", "health.interval_ms"),
            ("[health]\njitter_ms = 1000", "health.jitter_ms"),
            (
                "[health]\nunhealthy_threshold = 0",
                "health.unhealthy_threshold",
            ),
            (
                "[health]\nexpected_statuses = \"2xx\"",
                "health.expected_statuses",
            ),
            ("[health]\nall_unhealthy = \"maybe\"", "maybe"),
            (
                "[services.a.health]\npath = \"health\"",
                "services.a.health.path",
            ),
            ("[services.a.health]\ntypo = 1", "typo"),
            ("[log]\nformat = \"xml\"", "xml"),
            ("[tls]\nlisten = \"127.0.0.1:8443\"", "tls.certificates"),
            (
                "[tls]\nlisten = [\"127.0.0.1:8443\", \"nope\"]\n[[tls.certificates]]\ncert_file = \"/c\"\nkey_file = \"/k\"",
                "nope",
            ),
            (
                "[[tls.certificates]]\ncert_file = \"/nonexistent.crt\"\nkey_file = \"/k\"",
                "tls.listen",
            ),
            (
                "[tls]\nlisten = \"127.0.0.1:8443\"\n[[tls.certificates]]\ncert_file = \"/nonexistent.crt\"\nkey_file = \"/k\"",
                "/nonexistent.crt",
            ),
            ("[upstream_tls]\nca_file = \"/nonexistent-ca.pem\"", "/nonexistent-ca.pem"),
            (
                "[services.a.tls]\ncert_file = \"/c.pem\"",
                "services.a.tls",
            ),
            ("[services.a]\nprotocol = \"spdy\"", "spdy"),
            ("[http2]\nmax_concurrent_streams = 0", "http2.max_concurrent_streams"),
            ("not toml at all [", "invalid config"),
        ];
        for (text, want) in cases {
            let err = check(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err} should mention {want}");
        }
    }

    #[test]
    fn service_health_overrides_inherit_the_rest() {
        let c = check(
            "[health]\ninterval_ms = 2000\npassive_failures = 3\n\
             [services.a.health]\nprotocol = \"grpc\"\nall_unhealthy = \"fail_open\"\n\
             [services.b]\npolicy = \"random\"\n",
        )
        .unwrap();
        let a = c.health.spec_for("a");
        assert_eq!(a.protocol, Protocol::Grpc);
        assert_eq!(a.interval, Duration::from_millis(2000));
        assert_eq!(c.health.spec_for("b"), &c.health.default);
        assert_eq!(c.health.spec_for("other").protocol, Protocol::Http);
        // a gRPC service is checked over gRPC unless its health section says otherwise
        let g =
            check("[services.g]\nprotocol = \"grpc\"\n[services.t]\nprotocol = \"h2\"\n").unwrap();
        assert_eq!(g.health.spec_for("g").protocol, Protocol::Grpc);
        assert_eq!(g.health.spec_for("t").protocol, Protocol::Https);
        assert_eq!(
            g.service_settings("g").upstream.protocol,
            Some(crate::upstream::Protocol::Grpc)
        );
        let sa = c.service_settings("a");
        assert_eq!(sa.all_unhealthy, AllUnhealthy::FailOpen);
        assert_eq!(sa.passive_failures, 3);
        assert_eq!(c.service_settings("other").passive_failures, 3);
        assert_eq!(c.health.initial_health(), crate::routing::Health::Pending);
        let off = check("[health]\nenabled = false").unwrap();
        assert_eq!(off.health.initial_health(), crate::routing::Health::Healthy);
        // without checks, passive ejection lasts the cool-down (nginx's max_fails / fail_timeout)
        assert_eq!(off.service_settings("x").passive_failures, 2);
        assert_eq!(
            off.service_settings("x").passive_cooldown,
            Some(Duration::from_secs(10))
        );
        assert_eq!(sa.passive_cooldown, None);
        let short =
            check("[health]\nenabled = false\n[services.s.health]\npassive_cooldown_ms = 500")
                .unwrap();
        assert_eq!(
            short.service_settings("s").passive_cooldown,
            Some(Duration::from_millis(500))
        );
    }

    #[test]
    fn the_consul_api_is_on_at_8500_by_default_and_validated() {
        let c = FileConfig::embedded().unwrap().validate().unwrap();
        let consul = c.consul.as_ref().expect("the Consul API is on by default");
        assert_eq!(consul.listen.to_string(), "127.0.0.1:8500");
        assert_eq!(consul.token, None);
        assert_eq!(
            check("").unwrap().consul,
            c.consul,
            "the file and the code agree"
        );
        assert!(check("[consul]\nenabled = false").unwrap().consul.is_none());
        let with_token = check("[consul]\ntoken = \"s\"").unwrap().consul.unwrap();
        assert_eq!(with_token.token.as_deref(), Some("s"));
        for (text, want) in [
            ("[consul]\nlisten = \"8500\"", "consul.listen"),
            ("[consul]\ntoken = \" \"", "consul.token"),
            ("[consul]\nport = 1", "port"),
            ("[consul]\nlisten = \"127.0.0.1:9090\"", "consul.listen"),
        ] {
            let err = check(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err} should mention {want}");
        }
    }

    #[test]
    fn overrides_win_and_prefix_gets_trailing_slash() {
        let mut f = FileConfig::parse("", "t").unwrap();
        f.apply(&Overrides {
            listen: Some("127.0.0.1:1".into()),
            admin_listen: Some("127.0.0.1:2".into()),
            etcd: vec!["127.0.0.1:3".into(), "http://127.0.0.1:4".into()],
            prefix: Some("/svc".into()),
            ..Default::default()
        });
        let c = f.validate().unwrap();
        assert_eq!(c.proxy.listen.port(), 1);
        assert_eq!(c.admin_listen.port(), 2);
        assert_eq!(
            c.etcd.endpoints,
            ["http://127.0.0.1:3", "http://127.0.0.1:4"]
        );
        assert_eq!(c.etcd.prefix, "/svc/");
    }
}

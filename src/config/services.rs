//! `[services.<name>]` and `[upstream_tls]`: per-service traffic policies (over `[traffic]`),
//! instance protocol, upstream TLS and health overrides, each falling back to the global value.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use super::health::{HealthSection, ServiceHealthSection};
use super::traffic::{section_with_traffic_keys, with_traffic_keys, TrafficKeys, TrafficSection};
use super::{invalid, ConfigError};
use crate::health::{HealthConfig, Protocol, TlsSettings};
use crate::registry::codec::valid_service_name;
use crate::routing::{Policy, ServiceSettings};
use crate::upstream::{ClientTls, TlsFiles, UpstreamSettings};

with_traffic_keys!(section_with_traffic_keys! {
    /// `[services.<name>]`: this service's own fields, then the `[traffic]` keys for it (see
    /// [`TrafficKeys`] for each one's meaning).
    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct ServiceSection {
        pub health: ServiceHealthSection,
        /// Protocol of instances registered without `protocol` metadata.
        pub protocol: Option<crate::upstream::Protocol>,
        /// TLS towards this service's `https`/`h2` instances, over `[upstream_tls]`.
        pub tls: Option<TlsFiles>,
    }
});

/// What `[health]`, `[upstream_tls]` and `[services.*]` validate into together.
pub(super) struct Services {
    pub settings: BTreeMap<String, ServiceSettings>,
    /// Settings of services without a `[services.<name>]` section.
    pub default: ServiceSettings,
    pub health: HealthConfig,
}

/// Validates the per-service sections against the global `[health]` and `[upstream_tls]`.
pub(super) fn validate(
    h: &HealthSection,
    traffic: &TrafficSection,
    zone: Option<&Arc<str>>,
    upstream_tls: &TlsFiles,
    sections: &BTreeMap<String, ServiceSection>,
) -> Result<Services, ConfigError> {
    let global_traffic = traffic.traffic_keys();
    let (policy, default_traffic) = global_traffic.validate("traffic", zone)?;
    h.validate_limits()?;
    let mut global_check = h.check_spec("health", &ServiceHealthSection::default(), None)?;
    let global_tls = if upstream_tls.is_empty() {
        None
    } else {
        Some(load_tls("upstream_tls", upstream_tls)?)
    };
    global_check.tls = global_tls.clone().map(TlsSettings);
    let default = ServiceSettings {
        policy,
        traffic: Arc::new(default_traffic),
        all_unhealthy: h.all_unhealthy,
        passive_failures: h.passive_failures,
        passive_cooldown: h.passive_cooldown("health", h.passive_cooldown_ms)?,
        upstream: UpstreamSettings {
            protocol: None,
            tls: global_tls.clone(),
        },
    };
    let mut settings = BTreeMap::new();
    let mut checks = BTreeMap::new();
    for (name, s) in sections {
        if !valid_service_name(name) {
            return Err(invalid(
                format!("services.{name}"),
                "is not a valid service name (A-Z a-z 0-9 . _ -)",
            ));
        }
        let sh = &s.health;
        let health_key = format!("services.{name}.health");
        let passive_cooldown = h.passive_cooldown(
            &health_key,
            sh.passive_cooldown_ms.unwrap_or(h.passive_cooldown_ms),
        )?;
        let tls = match &s.tls {
            Some(files) => Some(load_tls(
                &format!("services.{name}.tls"),
                &files.over(upstream_tls),
            )?),
            None => global_tls.clone(),
        };
        let (policy, traffic) = s
            .traffic_keys()
            .over(&global_traffic)
            .validate(&format!("services.{name}"), zone)?;
        let service = ServiceSettings {
            policy,
            traffic: Arc::new(traffic),
            all_unhealthy: sh.all_unhealthy.unwrap_or(h.all_unhealthy),
            passive_failures: sh.passive_failures.unwrap_or(h.passive_failures),
            passive_cooldown,
            upstream: UpstreamSettings {
                protocol: s.protocol,
                tls: tls.clone(),
            },
        };
        let mut spec = h.check_spec(&health_key, sh, tls.map(TlsSettings))?;
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
        settings.insert(name.clone(), service);
        if spec != global_check {
            checks.insert(name.clone(), spec);
        }
    }
    Ok(Services {
        settings,
        default,
        health: HealthConfig {
            enabled: h.enabled,
            admit_immediately: h.admit_immediately,
            max_concurrent: h.max_concurrent,
            reuse_connection: h.reuse_connection,
            max_idle_connections: h.max_idle_connections,
            default: global_check,
            services: checks,
        },
    })
}

fn load_tls(key: &str, files: &TlsFiles) -> Result<Arc<ClientTls>, ConfigError> {
    ClientTls::load(files)
        .map(Arc::new)
        .map_err(|source| ConfigError::Tls {
            key: key.into(),
            source,
        })
}

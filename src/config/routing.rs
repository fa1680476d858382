//! `[routing]` and `[[routing.routes]]`: how a request names its service.

use serde::Deserialize;

use super::{invalid, ConfigError};
use crate::registry::codec::valid_service_name;
use crate::routing::route::ExplicitRoute;
use crate::routing::Router;

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

/// One `[[routing.routes]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub service: String,
    #[serde(default)]
    pub strip_prefix: bool,
}

impl RoutingSection {
    pub(super) fn validate(&self) -> Result<Router, ConfigError> {
        let routes = self
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| r.validate(&format!("routing.routes[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        for s in &self.host_suffixes {
            if s.trim_start_matches('.').is_empty() || s.contains(['/', ' ', ':']) {
                return Err(invalid(
                    "routing.host_suffixes",
                    format!("{s:?} is not a domain suffix"),
                ));
            }
        }
        Ok(Router::new(
            routes,
            self.host_suffixes.clone(),
            self.host_routing,
            self.path_routing,
        ))
    }
}

impl RouteSection {
    fn validate(&self, key: &str) -> Result<ExplicitRoute, ConfigError> {
        if !valid_service_name(&self.service) {
            return Err(invalid(
                format!("{key}.service"),
                format!(
                    "{:?} is not a valid service name (A-Z a-z 0-9 . _ -)",
                    self.service
                ),
            ));
        }
        if self.host.is_none() && self.path_prefix.is_none() {
            return Err(invalid(key, "a route needs a host, a path_prefix or both"));
        }
        if let Some(pp) = &self.path_prefix {
            if !pp.starts_with('/') {
                return Err(invalid(
                    format!("{key}.path_prefix"),
                    format!("{pp:?} must start with '/'"),
                ));
            }
        }
        if let Some(h) = &self.host {
            if h.is_empty() || h.contains(['/', ' ']) {
                return Err(invalid(
                    format!("{key}.host"),
                    format!("{h:?} is not a host name"),
                ));
            }
        }
        Ok(ExplicitRoute {
            host: self.host.as_ref().map(|h| h.to_ascii_lowercase()),
            path_prefix: self.path_prefix.clone(),
            service: self.service.as_str().into(),
            strip_prefix: self.strip_prefix,
        })
    }
}

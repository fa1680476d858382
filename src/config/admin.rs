//! `[admin]` (metrics, status page, API) and `[consul]` (the Consul-compatible agent API): the
//! two listeners besides the proxy's, each on an address of its own.

use std::net::SocketAddr;

use serde::Deserialize;

use super::{invalid, parse_addr, ConfigError};

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

impl AdminSection {
    /// The admin listener, never the proxy's address.
    pub(super) fn validate(&self, proxy: SocketAddr) -> Result<SocketAddr, ConfigError> {
        let admin = parse_addr("admin.listen", &self.listen)?;
        if admin == proxy {
            return Err(invalid(
                "admin.listen",
                format!("{admin} is the same address as proxy.listen"),
            ));
        }
        Ok(admin)
    }
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

impl ConsulSection {
    /// `None` when disabled; its listener apart from the proxy's and the admin's.
    pub(super) fn validate(
        &self,
        proxy: SocketAddr,
        admin: SocketAddr,
    ) -> Result<Option<crate::consul::ConsulConfig>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        let listen = parse_addr("consul.listen", &self.listen)?;
        if listen == proxy || listen == admin {
            return Err(invalid(
                "consul.listen",
                format!("{listen} is the same address as proxy.listen or admin.listen"),
            ));
        }
        if self.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(invalid("consul.token", "must not be empty when set"));
        }
        Ok(Some(crate::consul::ConsulConfig {
            listen,
            token: self.token.clone(),
        }))
    }
}

//! How switchyard talks to an instance: the protocol it speaks, TLS towards it, and the pooled
//! hyper connections the gateway ([`crate::gateway`]) sends requests over.
//!
//! An instance's protocol comes from its registration metadata `protocol`, else from
//! `[services.<name>] protocol`, else it is `http` — except that a gRPC request
//! (`content-type: application/grpc...`) to an instance with no protocol given goes over h2c:
//! gRPC servers only speak HTTP/2, and the examples register them as a plain `host:port`.
//!
//! | protocol | wire | TLS |
//! | --- | --- | --- |
//! | `http` (default) | HTTP/1.1 | no |
//! | `h2c`, `grpc` | HTTP/2 with prior knowledge | no |
//! | `https` | HTTP/1.1 | yes (ALPN http/1.1) |
//! | `h2` | HTTP/2 | yes (ALPN h2; HTTP/1.1 when the instance does not agree to h2) |

pub mod body;
pub mod connect;
pub(crate) mod h2;
pub mod pool;
pub mod tls;

use std::sync::Arc;

use serde::Deserialize;

use crate::routing::Instance;
pub use tls::{ClientTls, TlsFiles};

/// The protocol switchyard speaks to an instance (metadata `protocol`, `[services.<name>] protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 over TCP (the default).
    Http,
    /// HTTP/2 over TCP with prior knowledge.
    H2c,
    /// gRPC: h2c on the wire, and the gRPC health check by default.
    Grpc,
    /// HTTP/1.1 over TLS.
    Https,
    /// HTTP/2 over TLS (ALPN h2).
    H2,
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "http" => Ok(Protocol::Http),
            "h2c" => Ok(Protocol::H2c),
            "grpc" => Ok(Protocol::Grpc),
            "https" => Ok(Protocol::Https),
            "h2" => Ok(Protocol::H2),
            other => Err(format!(
                "{other:?} is not one of http, h2c, grpc, https, h2"
            )),
        }
    }
}

impl Protocol {
    /// HTTP/2 on the wire (h2 over TLS may still end up HTTP/1.1 when ALPN says so).
    pub fn http2(self) -> bool {
        matches!(self, Protocol::H2c | Protocol::Grpc | Protocol::H2)
    }

    pub fn tls(self) -> bool {
        matches!(self, Protocol::Https | Protocol::H2)
    }

    /// Anything but plain HTTP/1.1 (the native engine hands such requests to the gateway).
    pub fn needs_gateway(self) -> bool {
        self != Protocol::Http
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::H2c => "h2c",
            Protocol::Grpc => "grpc",
            Protocol::Https => "https",
            Protocol::H2 => "h2",
        }
    }
}

/// Per-service upstream settings (from `[services.<name>]` and `[upstream_tls]`).
#[derive(Debug, Clone, Default)]
pub struct UpstreamSettings {
    /// `[services.<name>] protocol`; `None`: instances without metadata speak HTTP/1.1 (h2c for
    /// gRPC requests).
    pub protocol: Option<Protocol>,
    /// TLS towards `https`/`h2` instances: `[services.<name>.tls]` over `[upstream_tls]`.
    pub tls: Option<Arc<ClientTls>>,
}

/// The protocol an instance was registered with (metadata `protocol`), if it names a valid one.
pub fn registered_protocol(inst: &Instance) -> Option<Protocol> {
    inst.metadata.get("protocol").and_then(|v| v.parse().ok())
}

/// The protocol to use for one request to `inst`: its metadata, else the service's setting,
/// else HTTP/1.1 — h2c for a gRPC request, since gRPC servers only speak HTTP/2.
pub fn protocol_for(inst: &Instance, settings: &UpstreamSettings, grpc: bool) -> Protocol {
    match registered_protocol(inst).or(settings.protocol) {
        Some(p) => p,
        None if grpc => Protocol::H2c,
        None => Protocol::Http,
    }
}

/// Whether requests to this set of instances may need something else than HTTP/1.1 over TCP.
pub fn any_needs_gateway(instances: &[Arc<Instance>], settings: &UpstreamSettings) -> bool {
    settings.protocol.is_some_and(Protocol::needs_gateway)
        || instances
            .iter()
            .any(|i| registered_protocol(i).is_some_and(Protocol::needs_gateway))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{Health, InstanceState};

    fn inst(meta: &[(&str, &str)]) -> Instance {
        Instance::new(
            "/s/a/1".into(),
            "1",
            &crate::routing::HostPort {
                host: "127.0.0.1".into(),
                port: 1,
            },
            "127.0.0.1:1".parse().unwrap(),
            1,
            meta.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            Arc::new(InstanceState::new(Health::Healthy)),
        )
    }

    #[test]
    fn metadata_then_service_setting_then_grpc_default() {
        let none = UpstreamSettings::default();
        let h2 = UpstreamSettings {
            protocol: Some(Protocol::H2),
            tls: None,
        };
        assert_eq!(protocol_for(&inst(&[]), &none, false), Protocol::Http);
        assert_eq!(protocol_for(&inst(&[]), &none, true), Protocol::H2c);
        assert_eq!(protocol_for(&inst(&[]), &h2, true), Protocol::H2);
        let https = inst(&[("protocol", "HTTPS")]);
        assert_eq!(protocol_for(&https, &h2, false), Protocol::Https);
        // a value that names no protocol is ignored
        assert_eq!(
            protocol_for(&inst(&[("protocol", "spdy")]), &none, false),
            Protocol::Http
        );
        assert!(Protocol::Grpc.http2() && !Protocol::Grpc.tls());
        assert!(any_needs_gateway(&[Arc::new(https)], &none));
        assert!(!any_needs_gateway(
            &[Arc::new(inst(&[("protocol", "http")]))],
            &none
        ));
    }
}

//! `[tls]` and `[[tls.certificates]]`: the TLS listeners and the certificates they serve (SNI).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{in_range, invalid, parse_addr, ConfigError};
use crate::tls::{CertFiles, SniResolver};

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

/// Validated `[tls]`: the listener address and its certificates, loaded.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// One TLS listener per address, all with the same certificates.
    pub listen: Vec<SocketAddr>,
    pub resolver: Arc<SniResolver>,
    pub handshake_timeout: Duration,
}

impl TlsSection {
    /// No listener without certificates and the other way round; every file loaded; each
    /// address apart from the proxy's, the admin's and the other TLS ones.
    pub(super) fn validate(
        &self,
        proxy: &SocketAddr,
        admin: &SocketAddr,
    ) -> Result<Option<TlsConfig>, ConfigError> {
        let listen = match (&self.listen, self.certificates.is_empty()) {
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
        let files: Vec<CertFiles> = self
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
        let handshake = self.handshake_timeout_ms.unwrap_or(10_000);
        in_range("tls.handshake_timeout_ms", handshake, 1, 3_600_000)?;
        Ok(Some(TlsConfig {
            listen,
            resolver: Arc::new(resolver),
            handshake_timeout: Duration::from_millis(handshake),
        }))
    }
}

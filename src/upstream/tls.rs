//! TLS towards `https` and `h2` instances: server certificates verified against the system roots
//! or `ca_file`, an optional client certificate (mTLS), SNI = the instance's registered host.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rustls::{ClientConfig, RootCertStore};
use tracing::warn;

use crate::tls::{load_certified_key, load_certs, TlsError};

/// `[upstream_tls]` or `[services.<name>.tls]`: files; unset = the system roots, no client cert.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFiles {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl TlsFiles {
    /// `self`'s keys, each falling back to `base`'s.
    pub fn over(&self, base: &TlsFiles) -> TlsFiles {
        TlsFiles {
            ca_file: self.ca_file.clone().or_else(|| base.ca_file.clone()),
            cert_file: self.cert_file.clone().or_else(|| base.cert_file.clone()),
            key_file: self.key_file.clone().or_else(|| base.key_file.clone()),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == TlsFiles::default()
    }
}

/// Client TLS configurations for one set of files, one per ALPN offer.
pub struct ClientTls {
    /// Offers h2 then http/1.1 (`h2` instances).
    pub h2: Arc<ClientConfig>,
    /// Offers http/1.1 only (`https` instances).
    pub http1: Arc<ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl ClientTls {
    /// Builds the configurations; errors name the file that is wrong.
    pub fn load(files: &TlsFiles) -> Result<ClientTls, TlsError> {
        let roots = match &files.ca_file {
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in load_certs(path)? {
                    roots.add(cert).map_err(|source| TlsError::Certificate {
                        path: path.clone(),
                        source,
                    })?;
                }
                roots
            }
            None => system_roots(),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsError::Setup)?
            .with_root_certificates(roots);
        let mut config = match (&files.cert_file, &files.key_file) {
            (Some(cert), Some(key)) => {
                let ck = load_certified_key(cert, key)?;
                builder
                    .with_client_auth_cert(ck.cert.clone(), crate::tls::load_key(key)?)
                    .map_err(|source| TlsError::Certificate {
                        path: cert.clone(),
                        source,
                    })?
            }
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), None) => {
                return Err(TlsError::Empty {
                    path: cert.clone(),
                    what: "matching key_file (cert_file and key_file go together)",
                })
            }
            (None, Some(key)) => {
                return Err(TlsError::Empty {
                    path: key.clone(),
                    what: "matching cert_file (cert_file and key_file go together)",
                })
            }
        };
        let mut http1 = config.clone();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        http1.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ClientTls {
            h2: Arc::new(config),
            http1: Arc::new(http1),
        })
    }

    /// System roots, no client certificate: for instances with no TLS settings at all. Built
    /// once, on first use.
    pub fn system() -> Arc<ClientTls> {
        static SYSTEM: OnceLock<Arc<ClientTls>> = OnceLock::new();
        SYSTEM
            .get_or_init(|| match ClientTls::load(&TlsFiles::default()) {
                Ok(t) => Arc::new(t),
                // cannot happen without files; an empty root store would still fail closed
                Err(e) => {
                    warn!(error = %e, "upstream TLS with the system roots");
                    let provider = Arc::new(rustls::crypto::ring::default_provider());
                    let config = ClientConfig::builder_with_provider(provider)
                        .with_safe_default_protocol_versions()
                        .map(|b| {
                            b.with_root_certificates(RootCertStore::empty())
                                .with_no_client_auth()
                        });
                    let config = Arc::new(config.unwrap_or_else(|_| {
                        ClientConfig::builder()
                            .with_root_certificates(RootCertStore::empty())
                            .with_no_client_auth()
                    }));
                    Arc::new(ClientTls {
                        h2: config.clone(),
                        http1: config,
                    })
                }
            })
            .clone()
    }
}

/// The operating system's trusted roots (certificates that fail to parse are skipped).
fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        warn!(error = %e, "loading the system's trusted certificates");
    }
    let (_added, _skipped) = roots.add_parsable_certificates(found.certs);
    roots
}

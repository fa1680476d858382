//! TLS termination: certificates chosen by SNI, reloaded on SIGHUP, and the TLS listener.
//!
//! ```text
//! [[tls.certificates]] cert_file + key_file ──load (key must match the certificate)──▶ CertStore
//!                                                      ▲ SIGHUP: load all again, swap whole
//! client ──TLS (1.2 / 1.3)──▶ TlsListener ──SniResolver: first certificate valid for the SNI
//!            ALPN h2 | http/1.1               name, else the first one
//!                 ├──▶ http/1.1: the native engine (the cleartext path, X-Forwarded-Proto: https)
//!                 └──▶ h2: the gateway (the same request path as h2c)
//! ```
//!
//! A reload that fails (a file missing, unreadable, or a key that does not match) keeps the
//! certificates in use and logs which file is wrong. Open connections are not touched by a
//! reload: they keep the certificate they were made with; new handshakes get the new ones.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tracing::{debug, info, warn};

use crate::engine::Engine;
use crate::gateway::ClientInfo;

/// Why a certificate, key or CA file could not be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not valid PEM: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("{path} contains no {what}")]
    Empty { path: PathBuf, what: &'static str },
    #[error("{path}: unusable private key: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{key} does not match the certificate in {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("{path}: {source}")]
    Certificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS setup: {0}")]
    Setup(#[source] rustls::Error),
}

fn pem_error(path: &Path, e: rustls_pki_types::pem::Error) -> TlsError {
    match e {
        rustls_pki_types::pem::Error::Io(source) => TlsError::Read {
            path: path.to_path_buf(),
            source,
        },
        other => TlsError::Pem {
            path: path.to_path_buf(),
            message: format!("{other:?}"),
        },
    }
}

/// All certificates of a PEM file (a chain: the end-entity certificate first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| pem_error(path, e))?;
    let certs = iter
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_path_buf(),
            what: "certificate (-----BEGIN CERTIFICATE-----)",
        });
    }
    Ok(certs)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            path: path.to_path_buf(),
            what: "private key (-----BEGIN PRIVATE KEY-----)",
        },
        other => pem_error(path, other),
    })
}

/// A certificate chain and its key, checked to belong together.
pub fn load_certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = load_certs(cert_file)?;
    let key = load_key(key_file)?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::Key {
            path: key_file.to_path_buf(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::Mismatch {
                cert: cert_file.to_path_buf(),
                key: key_file.to_path_buf(),
            })
        }
        // a key type whose public half rustls cannot derive: nothing to compare
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(source) => {
            return Err(TlsError::Certificate {
                path: cert_file.to_path_buf(),
                source,
            })
        }
    }
    Ok(certified)
}

/// One `[[tls.certificates]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// The certificates in use, in config order.
struct CertStore {
    keys: Vec<Arc<CertifiedKey>>,
}

impl CertStore {
    fn load(files: &[CertFiles]) -> Result<CertStore, TlsError> {
        let mut keys = Vec::with_capacity(files.len());
        for f in files {
            keys.push(Arc::new(load_certified_key(&f.cert_file, &f.key_file)?));
        }
        Ok(CertStore { keys })
    }

    /// The first certificate valid for `name`, else the first one (clients without SNI, or
    /// asking for a name no certificate has, get the default and decide for themselves).
    fn pick(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = name.and_then(|n| ServerName::try_from(n).ok()) {
            for key in &self.keys {
                let valid = key
                    .end_entity_cert()
                    .ok()
                    .and_then(|c| ParsedCertificate::try_from(c).ok())
                    .is_some_and(|c| rustls::client::verify_server_name(&c, &name).is_ok());
                if valid {
                    return Some(key.clone());
                }
            }
        }
        self.keys.first().cloned()
    }
}

/// Chooses a certificate by SNI from the certificates in use; reloadable.
pub struct SniResolver {
    files: Vec<CertFiles>,
    store: ArcSwap<CertStore>,
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SniResolver")
            .field("files", &self.files)
            .finish()
    }
}

impl SniResolver {
    /// Loads every certificate; the error names the first file that is wrong.
    pub fn load(files: Vec<CertFiles>) -> Result<SniResolver, TlsError> {
        let store = CertStore::load(&files)?;
        Ok(SniResolver {
            files,
            store: ArcSwap::from_pointee(store),
        })
    }

    /// Reads every file again and swaps the set in whole, or keeps the current one on error.
    pub fn reload(&self) -> Result<usize, TlsError> {
        let store = CertStore::load(&self.files)?;
        let n = store.keys.len();
        self.store.store(Arc::new(store));
        Ok(n)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.load().pick(hello.server_name())
    }
}

/// The server side TLS configuration: TLS 1.2 and 1.3, ALPN h2 then http/1.1.
pub fn server_config(resolver: Arc<SniResolver>) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Setup)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reloads the certificates on every SIGHUP until shutdown.
pub async fn reload_on_sighup(resolver: Arc<SniResolver>, mut shutdown: ShutdownWatch) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot install the SIGHUP handler: certificates will not be reloaded");
            return;
        }
    };
    loop {
        tokio::select! {
            got = hup.recv() => {
                if got.is_none() {
                    return;
                }
                match resolver.reload() {
                    Ok(n) => info!(certificates = n, "SIGHUP: TLS certificates reloaded"),
                    Err(e) => warn!(error = %e, "SIGHUP: TLS certificates not reloaded, keeping the current ones"),
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// The TLS listener: a pingora app that terminates TLS on the thread the engine picks for the
/// connection ([`Engine::admit`]), then hands HTTP/1.1 to the engine and HTTP/2 (ALPN h2) to the
/// gateway.
pub struct TlsListener {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub engine: Arc<Engine>,
    /// Longest time a handshake may take (the client's read timeout).
    pub handshake_timeout: Duration,
}

#[async_trait]
impl ServerApp for TlsListener {
    async fn process_new(self: &Arc<Self>, io: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let (socket, ip, there, serving) = self.engine.admit(io)?;
        let (me, shutdown) = (self.clone(), shutdown.clone());
        there.handle().spawn(async move {
            let Some(tls) = me.handshake(socket, &ip).await else {
                return;
            };
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                let client = ClientInfo::new(ip, true);
                let gateway = me.engine.gateway.clone();
                gateway.serve(tls, true, client, shutdown).await;
                drop(serving);
            } else {
                me.engine.serve(tls, ip, shutdown, serving).await;
            }
        });
        None
    }
}

impl TlsListener {
    /// The TLS handshake, within `handshake_timeout`; failures are counted and logged at debug.
    async fn handshake(
        &self,
        socket: std::net::TcpStream,
        ip: &str,
    ) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
        let io = match tokio::net::TcpStream::from_std(socket) {
            Ok(io) => io,
            Err(e) => {
                debug!(client = %ip, error = %e, "client connection dropped");
                return None;
            }
        };
        let accept = self.acceptor.accept(io);
        match tokio::time::timeout(self.handshake_timeout, accept).await {
            Ok(Ok(tls)) => Some(tls),
            Ok(Err(e)) => {
                crate::metrics::METRICS.tls_handshake_failures.inc();
                debug!(client = %ip, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                crate::metrics::METRICS.tls_handshake_failures.inc();
                debug!(client = %ip, "TLS handshake timed out");
                None
            }
        }
    }
}

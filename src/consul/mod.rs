//! The Consul-compatible agent API (`[consul]`, default `127.0.0.1:8500`): code written for a
//! Consul agent registers into switchyard and discovers through it unchanged, and what it
//! registers is kept in etcd, so every switchyard of a fleet routes to it.
//!
//! ```text
//!  Consul client ──PUT /v1/agent/service/register──▶ agent: decode ─▶ Record ─▶ etcd put
//!               │                                         (TTL check: under a lease of that TTL)
//!               ├─PUT /v1/agent/check/pass|warn|fail|update──▶ lease keep-alive, status → etcd
//!               ├─PUT /v1/agent/service/deregister/<id>──▶ etcd delete
//!               ├─PUT /v1/agent/check/register, .../maintenance/<id>──▶ the Record rewritten
//!               │        (each write answers once this switchyard's view has it)
//!               └─GET /v1/health|catalog/...──▶ view: routing snapshot + health, blocking on
//!                                                directory's index
//!  registry snapshots + health flips ──▶ directory (follow task): index per service,
//!                                        service id / check id → etcd key
//!  reaper (every second): critical longer than DeregisterCriticalServiceAfter → etcd delete
//! ```
//!
//! # Layout
//! - [`decode`]: request bodies the way Consul reads them (keys in any case, Go durations).
//! - [`record`]: a Consul registration as an etcd value (`health_*` metadata for its check).
//! - [`store`]: the etcd writes.
//! - [`agent`]: register, deregister, TTL updates, checks added or removed, maintenance, the
//!   reaper.
//! - [`directory`]: the index for `X-Consul-Index` and blocking queries; lookups by id.
//! - [`view`]: the read answers (health, catalog, agent).
//! - [`http`]: the listener, the ACL token, headers, metrics, shared renderings.
//! - [`query`]: query parameters (flags, repeated keys, `index` and `wait`) and path segments.
//! - [`routes`]: the endpoints, their blocking queries and answers.

pub mod agent;
pub mod decode;
pub mod directory;
pub mod http;
pub mod query;
pub mod record;
pub mod routes;
pub mod store;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::EtcdConfig;
use crate::routing::SharedTable;
use agent::Agent;
use directory::Directory;
use store::Store;

/// The datacenter switchyard answers as (there is only one).
pub const DATACENTER: &str = "dc1";

/// Validated `[consul]` (present only when `enabled`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsulConfig {
    /// Default `127.0.0.1:8500`, Consul's own.
    pub listen: SocketAddr,
    /// When set, every request but `/v1/status/*` must carry it (`X-Consul-Token`,
    /// `Authorization: Bearer` or `?token=`).
    pub token: Option<String>,
}

/// An answer other than 200, with Consul's status and text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400
    #[error("{0}")]
    BadRequest(String),
    /// 403
    #[error("{0}")]
    Forbidden(String),
    /// 404
    #[error("{0}")]
    NotFound(String),
    /// 405
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 413
    #[error("{0}")]
    TooLarge(String),
    /// 500 (Consul's answer for a failed operation, e.g. `pass` on a check without a TTL)
    #[error("{0}")]
    Internal(String),
    /// 501: an endpoint switchyard does not implement (KV, sessions, ACL, ...)
    #[error("{0}")]
    NotImplemented(String),
}

/// The listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("consul.listen {addr}: cannot listen ({source}); set [consul] listen to a free address or enabled = false")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds the API's listener. Unlike pingora's listeners it does not share its port
/// (`SO_REUSEPORT`): a port in use (a Consul agent, another switchyard) is an error at start.
pub fn bind(cfg: &ConsulConfig) -> Result<std::net::TcpListener, BindError> {
    let err = |source| BindError {
        addr: cfg.listen,
        source,
    };
    let listener = std::net::TcpListener::bind(cfg.listen).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(listener)
}

/// This host's name: the node name answers carry (a Consul agent's default too).
#[allow(unsafe_code)] // gethostname(2)
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if ok && !name.is_empty() => name.to_string(),
        _ => "switchyard".to_string(),
    }
}

/// The API: everything its handlers share.
pub struct ConsulApi {
    agent: Arc<Agent>,
    dir: Arc<Directory>,
    table: SharedTable,
    token: Option<String>,
    node: String,
    listen: SocketAddr,
    /// What `/v1/status/leader` answers: this node, at Consul's server port.
    leader: String,
    /// The last rendering of each read.
    rendered: http::Rendered,
}

impl ConsulApi {
    pub fn new(cfg: &ConsulConfig, etcd: EtcdConfig, table: SharedTable) -> Arc<ConsulApi> {
        http::init_metrics();
        let dir = Arc::new(Directory::default());
        let prefix = etcd.prefix.clone();
        Arc::new(ConsulApi {
            agent: Arc::new(Agent {
                store: Store::new(etcd),
                dir: dir.clone(),
                table: table.clone(),
                prefix,
            }),
            dir,
            table,
            token: cfg.token.clone(),
            node: host_name(),
            listen: cfg.listen,
            leader: format!("{}:8300", cfg.listen.ip()),
            rendered: http::Rendered::default(),
        })
    }

    /// Serves on `listener` (from [`bind`]) until `shutdown` turns true; follows the registry
    /// through `generations` (its [`crate::registry::Registry::subscribe`]).
    pub async fn run(
        self: Arc<Self>,
        listener: std::net::TcpListener,
        generations: watch::Receiver<u64>,
        shutdown: watch::Receiver<bool>,
    ) {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "Consul API: cannot use its listener; the API is off");
                return;
            }
        };
        info!(listen = %self.listen, node = %self.node, "Consul API listening");
        tokio::spawn(
            self.dir
                .clone()
                .follow(self.table.clone(), generations, shutdown.clone()),
        );
        tokio::spawn(self.agent.clone().reap(shutdown.clone()));
        self.serve(listener, shutdown).await;
    }
}

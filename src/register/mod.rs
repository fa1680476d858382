//! The registrar side: `switchyard register` and `switchyard services`.
//!
//! ```text
//!  register ── args → Registration (key, JSON value, ttl)
//!     │
//!     ├─ gate (watch<bool>): always open │ --check URL passes (check.rs) │ wrapped CMD reachable
//!     │
//!     └─ registrar loop (registrar.rs): gate open → grant lease, put key, keep alive
//!                                       gate closed → delete key, revoke lease
//!                                       lease lost (TTL 0) / etcd error → grant and put again
//!                                       stop (signal, child exit) → delete key, revoke lease
//!
//!  services ── list prefix/ at R → table or JSON; --watch: watch from R+1, one line per change,
//!              re-list and diff after every broken stream (services.rs)
//! ```
//!
//! # Layout
//! - [`registrar`]: the lease/put/keep-alive/deregister loop, driven by a gate and a stop signal.
//! - [`check`]: the `--check` HTTP/1.1 probe (http:// only) and the TCP reachability probe.
//! - [`child`]: the wrapped command (`register ... -- CMD ARGS...`): spawn, signals, exit code.
//! - [`services`]: `switchyard services` (table, `--json`, `--watch`).

pub(crate) mod check;
pub(crate) mod child;
pub(crate) mod registrar;
pub(crate) mod services;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::cli::{EtcdArgs, RegisterArgs};
use crate::registry::codec::{self, valid_service_name, MAX_WEIGHT};
use crate::registry::endpoints::{Dial, Endpoints};

pub use services::{render_table, run_services, ListedInstance};

/// Smallest accepted `--check-interval-ms`.
pub const MIN_CHECK_INTERVAL_MS: u64 = 100;

/// Errors of the registrar commands; each is printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("invalid service name {0:?} (allowed: A-Z a-z 0-9 . _ -)")]
    BadService(String),
    #[error("invalid --addr: {0}")]
    BadAddr(#[from] codec::DecodeError),
    #[error("invalid --meta {0:?}: expected KEY=VALUE")]
    BadMeta(String),
    #[error("invalid --ttl {0}: must be 1-3600 seconds")]
    BadTtl(i64),
    #[error("invalid --weight {0}: must be 0-{MAX_WEIGHT}")]
    BadWeight(u32),
    #[error("invalid --id {0:?}: must be non-empty")]
    BadId(String),
    #[error("invalid --check {url:?}: {reason}")]
    BadCheck { url: String, reason: String },
    #[error("invalid --check-interval-ms {0}: must be at least {MIN_CHECK_INTERVAL_MS}")]
    BadCheckInterval(u64),
    #[error("invalid --etcd {endpoints:?}: {message}")]
    BadEtcd { endpoints: String, message: String },
    #[error("etcd at {endpoints}: {message}")]
    Etcd { endpoints: String, message: String },
    #[error("cannot start command {command:?}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// What `register` writes: key and JSON value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub key: String,
    pub value: String,
    /// Lease TTL asked for, in seconds.
    pub ttl: i64,
    /// The address registered; the wrapped command is "reachable" once this accepts connections.
    pub addr: codec::HostPort,
}

/// The prefix with exactly one trailing '/', so `/services/user` never matches `user-admin`.
pub fn normalized_prefix(prefix: &str) -> String {
    let mut p = prefix.to_string();
    if !p.ends_with('/') {
        p.push('/');
    }
    p
}

/// Validates the arguments and builds the key and value.
pub fn build_registration(args: &RegisterArgs) -> Result<Registration, RegisterError> {
    if !valid_service_name(&args.service) {
        return Err(RegisterError::BadService(args.service.clone()));
    }
    let addr = codec::parse_host_port(&args.addr)?;
    if !(1..=3600).contains(&args.ttl) {
        return Err(RegisterError::BadTtl(args.ttl));
    }
    if args.weight > MAX_WEIGHT {
        return Err(RegisterError::BadWeight(args.weight));
    }
    let id = args.id.clone().unwrap_or_else(|| addr.to_string());
    if id.trim().is_empty() {
        return Err(RegisterError::BadId(id));
    }
    let mut metadata = BTreeMap::new();
    for m in &args.meta {
        let (k, v) = m
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| RegisterError::BadMeta(m.clone()))?;
        metadata.insert(k.to_string(), v.to_string());
    }
    let prefix = normalized_prefix(&args.etcd.prefix);
    let value = json!({
        "addr": addr.to_string(),
        "weight": args.weight,
        "metadata": metadata,
    })
    .to_string();
    Ok(Registration {
        key: format!("{prefix}{}/{id}", args.service),
        value,
        ttl: args.ttl,
        addr,
    })
}

pub(crate) fn etcd_error(args: &EtcdArgs, message: impl Into<String>) -> RegisterError {
    RegisterError::Etcd {
        endpoints: args.etcd.join(","),
        message: message.into(),
    }
}

/// Builds the etcd client. etcd-client connects lazily, so this only fails on endpoints that
/// cannot be used at all (`BadEtcd`); anything else is reported as `Etcd` and may be retried.
pub(crate) async fn connect(args: &EtcdArgs) -> Result<Client, RegisterError> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(3), Duration::from_secs(2));
    Client::connect(&args.etcd, Some(opts))
        .await
        .map_err(|e| match e {
            etcd_client::Error::InvalidUri(_)
            | etcd_client::Error::InvalidArgs(_)
            | etcd_client::Error::EndpointError(_) => RegisterError::BadEtcd {
                endpoints: args.etcd.join(","),
                message: e.to_string(),
            },
            other => etcd_error(args, other.to_string()),
        })
}

/// The registrar's endpoints, one at a time, with a shorter keep-alive than the proxy's (a PING
/// after 3 s, 2 s to answer): a hung member must be left well within the lease TTL. The first
/// client is made here, so a malformed endpoint in use fails at start (`BadEtcd`).
async fn registrar_endpoints(args: &EtcdArgs) -> Result<Endpoints, RegisterError> {
    let dial = Dial {
        connect_timeout: Duration::from_secs(2),
        keep_alive_interval: Duration::from_secs(3),
        keep_alive_timeout: Duration::from_secs(2),
        credentials: None,
    };
    let mut etcd = Endpoints::new(args.etcd.clone(), dial);
    match etcd.client().await {
        Ok(_) => Ok(etcd),
        Err(e) if e.is_bad_endpoint() => Err(RegisterError::BadEtcd {
            endpoints: args.etcd.join(","),
            message: e.to_string(),
        }),
        Err(e) => Err(etcd_error(args, e.to_string())),
    }
}

/// Runs `fut` with a deadline; the error names the operation.
pub(crate) async fn timed<T, E: std::fmt::Display>(
    what: &str,
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, fut).await {
        Err(_) => Err(format!("{what} timed out after {limit:?}")),
        Ok(Err(e)) => Err(format!("{what} failed: {e}")),
        Ok(Ok(v)) => Ok(v),
    }
}

/// Resolves once `rx` holds `want`; never resolves if the sender is gone first.
pub(crate) async fn wait_for_value(rx: &mut watch::Receiver<bool>, want: bool) {
    if rx.wait_for(|v| *v == want).await.is_err() {
        std::future::pending::<()>().await;
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, std::io::Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
}

/// Everything `register` checks before it touches etcd or starts a command.
struct Validated {
    reg: Registration,
    check: Option<check::HttpCheck>,
    interval: Duration,
}

fn validate(args: &RegisterArgs) -> Result<Validated, RegisterError> {
    let reg = build_registration(args)?;
    let check = args
        .check
        .as_deref()
        .map(check::HttpCheck::parse)
        .transpose()?;
    if args.check_interval_ms < MIN_CHECK_INTERVAL_MS {
        return Err(RegisterError::BadCheckInterval(args.check_interval_ms));
    }
    Ok(Validated {
        reg,
        check,
        interval: Duration::from_millis(args.check_interval_ms),
    })
}

/// `switchyard register`: returns the process exit code (the child's with a wrapped command).
async fn register(args: RegisterArgs) -> Result<u8, RegisterError> {
    let Validated {
        reg,
        check,
        interval,
    } = validate(&args)?;
    let etcd = registrar_endpoints(&args.etcd).await?;
    let mut term = signal(SignalKind::terminate()).map_err(RegisterError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RegisterError::Signals)?;

    // The gate says whether the key should exist right now.
    let wrapped = !args.command.is_empty();
    let (gate_tx, gate_rx) = watch::channel(check.is_none() && !wrapped);
    let (stop_tx, stop_rx) = watch::channel(false);

    let mut child = if wrapped {
        Some(child::Wrapped::spawn(&args.command)?)
    } else {
        None
    };
    match check {
        Some(check) => {
            tokio::spawn(check::run_check_gate(check, interval, gate_tx));
        }
        None if wrapped => {
            tokio::spawn(check::run_reachable_gate(reg.addr.clone(), gate_tx));
        }
        None => drop(gate_tx),
    }

    let registrar = tokio::spawn(registrar::run(reg, etcd, gate_rx, stop_rx));

    let code = match child.as_mut() {
        None => {
            tokio::select! {
                _ = term.recv() => info!(signal = "SIGTERM", "stopping"),
                _ = int.recv() => info!(signal = "SIGINT", "stopping"),
            }
            0
        }
        Some(child) => loop {
            tokio::select! {
                _ = term.recv() => {
                    // deregister at once: the proxy stops routing while the child drains
                    let _ = stop_tx.send(true);
                    child.forward("TERM");
                }
                _ = int.recv() => {
                    let _ = stop_tx.send(true);
                    child.forward("INT");
                }
                code = child.wait() => break code,
            }
        },
    };
    let _ = stop_tx.send(true);
    if let Err(e) = registrar.await {
        warn!(error = %e, "registrar task failed");
    }
    Ok(code)
}

/// Entry point of `switchyard register`.
pub fn run_register(args: RegisterArgs) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchyard: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(register(args)) {
        Ok(code) => ExitCode::from(code),
        Err(e @ RegisterError::Spawn { .. }) => {
            eprintln!("switchyard: {e}");
            // what a shell answers for a command it cannot run
            ExitCode::from(127)
        }
        Err(e) => {
            eprintln!("switchyard: {e}");
            ExitCode::FAILURE
        }
    }
}

//! The registrar side: `switchyard register` and `switchyard services`.
//!
//! `register` grants a lease, writes the instance key (JSON value) under it and keeps the lease
//! alive. A lost lease (etcd restarted with its data wiped, a partition longer than the TTL) is
//! noticed by the keep-alive answer (TTL 0) or by an error, and the lease is granted and the key
//! written again. SIGTERM/SIGINT deletes the key and revokes the lease before exiting 0.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions};
use serde_json::json;
use tracing::{info, warn};

use crate::cli::{EtcdArgs, RegisterArgs, ServicesArgs};
use crate::registry::codec::{self, valid_service_name};
use crate::registry::Backoff;

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
    #[error("invalid --id {0:?}: must be non-empty")]
    BadId(String),
    #[error("etcd at {endpoints}: {message}")]
    Etcd { endpoints: String, message: String },
}

/// What `register` writes: key and JSON value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub key: String,
    pub value: String,
    pub ttl: i64,
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
    let mut prefix = args.etcd.prefix.clone();
    if !prefix.ends_with('/') {
        prefix.push('/');
    }
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
    })
}

fn etcd_error(args: &EtcdArgs, message: impl Into<String>) -> RegisterError {
    RegisterError::Etcd {
        endpoints: args.etcd.join(","),
        message: message.into(),
    }
}

async fn connect(args: &EtcdArgs) -> Result<Client, RegisterError> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(3), Duration::from_secs(2));
    Client::connect(&args.etcd, Some(opts))
        .await
        .map_err(|e| etcd_error(args, e.to_string()))
}

async fn timed<T, E: std::fmt::Display>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Err(_) => Err(format!("{what} timed out")),
        Ok(Err(e)) => Err(format!("{what} failed: {e}")),
        Ok(Ok(v)) => Ok(v),
    }
}

/// Grants a lease and writes the key under it; returns the lease id.
async fn grant_and_put(client: &mut Client, reg: &Registration) -> Result<i64, String> {
    let lease = timed("lease grant", client.lease_grant(reg.ttl, None)).await?;
    let id = lease.id();
    timed(
        "put",
        client.put(
            reg.key.as_bytes(),
            reg.value.as_bytes(),
            Some(PutOptions::new().with_lease(id)),
        ),
    )
    .await?;
    Ok(id)
}

/// Keeps lease `id` alive until it is lost (Ok) or an error occurs (Err), or shutdown.
async fn keep_alive(
    client: &mut Client,
    id: i64,
    ttl: i64,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let (mut keeper, mut stream) = timed("keep-alive", client.lease_keep_alive(id)).await?;
    let period = Duration::from_millis((ttl as u64 * 1000 / 3).max(200));
    loop {
        timed("keep-alive send", keeper.keep_alive()).await?;
        let resp = timed("keep-alive answer", stream.message()).await?;
        match resp {
            None => return Err("keep-alive stream ended".into()),
            Some(r) if r.ttl() <= 0 => return Ok(()),
            Some(_) => {}
        }
        tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            _ = tokio::time::sleep(period) => {}
        }
    }
}

fn shutdown_on_signals() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        let _ = tx.send(true);
    });
    rx
}

async fn register(args: RegisterArgs) -> Result<(), RegisterError> {
    let reg = build_registration(&args)?;
    let mut shutdown = shutdown_on_signals();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut client = connect(&args.etcd).await?;
    let mut lease: Option<i64> = None;
    let mut warned = false;
    while !*shutdown.borrow() {
        let id = match grant_and_put(&mut client, &reg).await {
            Ok(id) => {
                info!(key = %reg.key, value = %reg.value, lease = id, ttl = reg.ttl, "registered");
                backoff.reset();
                warned = false;
                id
            }
            Err(e) => {
                if !warned {
                    warn!(error = %e, "etcd unavailable; retrying registration with backoff");
                    warned = true;
                }
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(backoff.next_delay()) => continue,
                }
            }
        };
        lease = Some(id);
        match keep_alive(&mut client, id, reg.ttl, &mut shutdown).await {
            Ok(()) if *shutdown.borrow() => break,
            Ok(()) => warn!(lease = id, "lease lost; registering again"),
            Err(e) => {
                warn!(lease = id, error = %e, "keep-alive failed; registering again");
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
    // deregister: delete first so the proxy stops routing at once, then free the lease
    if let Err(e) = timed("delete", client.delete(reg.key.as_bytes(), None)).await {
        warn!(key = %reg.key, error = %e, "could not delete the key; it expires with its lease");
    }
    if let Some(id) = lease {
        let _ = timed("lease revoke", client.lease_revoke(id)).await;
    }
    info!(key = %reg.key, "deregistered");
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime, std::io::Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
}

pub fn run_register(args: RegisterArgs) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchyard: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(register(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One row of `services` output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ListedInstance {
    pub service: String,
    pub id: String,
    pub key: String,
    pub addr: Option<String>,
    pub weight: Option<u32>,
    pub metadata: BTreeMap<String, String>,
    pub lease: i64,
    pub error: Option<String>,
}

async fn list(args: &ServicesArgs) -> Result<Vec<ListedInstance>, RegisterError> {
    let mut client = connect(&args.etcd).await?;
    let mut prefix = args.etcd.prefix.clone();
    if !prefix.ends_with('/') {
        prefix.push('/');
    }
    let resp = timed(
        "list",
        client.get(prefix.as_bytes(), Some(GetOptions::new().with_prefix())),
    )
    .await
    .map_err(|e| etcd_error(&args.etcd, e))?;
    let mut out = Vec::new();
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let (service, id) = match codec::decode_key(&prefix, kv.key()) {
            Ok(p) => (p.service.to_string(), p.instance.to_string()),
            Err(_) => (
                codec::service_of_key(&prefix, kv.key())
                    .unwrap_or("")
                    .to_string(),
                String::new(),
            ),
        };
        let (addr, weight, metadata, error) = match codec::decode_value(kv.value()) {
            Ok(r) => (Some(r.addr.to_string()), Some(r.weight), r.metadata, None),
            Err(e) => (None, None, BTreeMap::new(), Some(e.to_string())),
        };
        out.push(ListedInstance {
            service,
            id,
            key,
            addr,
            weight,
            metadata,
            lease: kv.lease(),
            error,
        });
    }
    Ok(out)
}

/// Renders instances as a table grouped by service.
pub fn render_table(rows: &[ListedInstance]) -> String {
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str("no services registered\n");
        return out;
    }
    let w_svc = rows
        .iter()
        .map(|r| r.service.len())
        .max()
        .unwrap_or(7)
        .max(7);
    let w_id = rows.iter().map(|r| r.id.len()).max().unwrap_or(8).max(8);
    out.push_str(&format!(
        "{:<w_svc$}  {:<w_id$}  {:<21}  {:>6}  METADATA\n",
        "SERVICE", "INSTANCE", "ADDRESS", "WEIGHT"
    ));
    for r in rows {
        let meta: Vec<String> = r.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let addr = r
            .addr
            .clone()
            .unwrap_or_else(|| format!("INVALID: {}", r.error.clone().unwrap_or_default()));
        let weight = r
            .weight
            .map(|w| w.to_string())
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<w_svc$}  {:<w_id$}  {:<21}  {:>6}  {}\n",
            r.service,
            r.id,
            addr,
            weight,
            meta.join(",")
        ));
    }
    out
}

pub fn run_services(args: ServicesArgs) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchyard: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listed = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), list(&args))
            .await
            .unwrap_or_else(|_| Err(etcd_error(&args.etcd, "timed out")))
    });
    match listed {
        Ok(rows) => {
            if args.json {
                match serde_json::to_string_pretty(&rows) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("switchyard: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", render_table(&rows));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("switchyard: {e}");
            ExitCode::FAILURE
        }
    }
}

//! The etcd side of the Consul API: registrations written, TTL leases kept alive, keys deleted.
//! Every call has the configured request deadline. The store talks to one endpoint at a time and
//! to the next, with a fresh client, after a call failed ([`crate::registry::endpoints`] says
//! why): a hung member fails the calls already sent to it, not a share of every later one.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::Mutex;

use crate::config::EtcdConfig;
use crate::registry::endpoints::{Dial, Endpoints};

/// An etcd failure, shown to the client as a 500 (what Consul answers when its servers fail).
#[derive(Debug, thiserror::Error)]
#[error("etcd at {endpoints}: {what}: {message}")]
pub struct StoreError {
    endpoints: String,
    what: &'static str,
    message: String,
}

/// A key as etcd has it now.
#[derive(Debug)]
pub struct Current {
    pub value: Vec<u8>,
    pub lease: i64,
    pub mod_revision: i64,
}

pub struct Store {
    cfg: EtcdConfig,
    etcd: Mutex<Endpoints>,
}

/// A client of the endpoint in use, and which one it was.
struct Conn {
    client: Client,
    generation: u64,
}

impl Store {
    pub fn new(cfg: EtcdConfig) -> Store {
        let dial = Dial {
            connect_timeout: cfg.dial_timeout,
            keep_alive_interval: Duration::from_secs(5),
            keep_alive_timeout: Duration::from_secs(3),
            credentials: cfg.credentials.clone(),
        };
        Store {
            etcd: Mutex::new(Endpoints::new(cfg.endpoints.clone(), dial)),
            cfg,
        }
    }

    fn error(&self, what: &'static str, message: impl ToString) -> StoreError {
        StoreError {
            endpoints: self.cfg.endpoints.join(","),
            what,
            message: message.to_string(),
        }
    }

    async fn client(&self) -> Result<Conn, StoreError> {
        let mut etcd = self.etcd.lock().await;
        let generation = etcd.generation();
        match etcd.client().await {
            Ok(client) => Ok(Conn { client, generation }),
            Err(e) => {
                etcd.failed();
                Err(self.error("connect", e))
            }
        }
    }

    /// Runs `fut`, a call on `conn`, with the request deadline; when it fails, the next call goes
    /// to the next endpoint (unless a concurrent failure of the same client moved on already).
    async fn timed<T, E: ToString>(
        &self,
        conn: &Conn,
        what: &'static str,
        fut: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, StoreError> {
        let result = match tokio::time::timeout(self.cfg.request_timeout, fut).await {
            Err(_) => Err(self.error(what, "timed out")),
            Ok(r) => r.map_err(|e| self.error(what, e)),
        };
        if result.is_err() {
            let mut etcd = self.etcd.lock().await;
            if etcd.generation() == conn.generation {
                etcd.failed();
            }
        }
        result
    }

    /// Writes `key` (under a new lease of `ttl` seconds, or none) and deletes `remove` in one
    /// transaction; returns the revision it made.
    pub async fn put(
        &self,
        key: &str,
        value: &str,
        ttl: Option<i64>,
        remove: &[Arc<str>],
    ) -> Result<i64, StoreError> {
        let conn = self.client().await?;
        let mut c = conn.client.clone();
        let mut opts = None;
        if let Some(ttl) = ttl {
            let lease = self
                .timed(&conn, "lease grant", c.lease_grant(ttl, None))
                .await?;
            opts = Some(PutOptions::new().with_lease(lease.id()));
        }
        let mut ops: Vec<TxnOp> = remove
            .iter()
            .filter(|k| ***k != *key)
            .map(|k| TxnOp::delete(k.as_bytes(), None))
            .collect();
        ops.push(TxnOp::put(key, value, opts));
        let resp = self
            .timed(&conn, "put", c.txn(Txn::new().and_then(ops)))
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// Deletes `keys` in one transaction; returns the revision it made.
    pub async fn delete(&self, keys: &[Arc<str>]) -> Result<i64, StoreError> {
        let conn = self.client().await?;
        let mut c = conn.client.clone();
        let ops: Vec<TxnOp> = keys
            .iter()
            .map(|k| TxnOp::delete(k.as_bytes(), None))
            .collect();
        let resp = self
            .timed(&conn, "delete", c.txn(Txn::new().and_then(ops)))
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// This host's address towards the first etcd endpoint: where the other switchyards (which
    /// reach etcd too) can most likely reach a service on this host. No packet is sent.
    pub async fn local_address(&self) -> Option<std::net::IpAddr> {
        let endpoint = self.cfg.endpoints.first()?;
        let authority = endpoint
            .split_once("://")
            .map_or(endpoint.as_str(), |(_, rest)| rest)
            .split('/')
            .next()?;
        let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await.ok()?;
        let connect = socket.connect(authority);
        tokio::time::timeout(self.cfg.dial_timeout, connect)
            .await
            .ok()?
            .ok()?;
        socket.local_addr().ok().map(|a| a.ip())
    }

    /// `key` as etcd has it, if it exists.
    pub async fn get(&self, key: &str) -> Result<Option<Current>, StoreError> {
        let conn = self.client().await?;
        let mut c = conn.client.clone();
        let mut resp = self.timed(&conn, "get", c.get(key, None)).await?;
        Ok(resp.take_kvs().into_iter().next().map(|kv| Current {
            lease: kv.lease(),
            mod_revision: kv.mod_revision(),
            value: kv.into_key_value().1,
        }))
    }

    /// Renews `lease` once; false when the lease is gone (expired).
    pub async fn keep_alive(&self, lease: i64) -> Result<bool, StoreError> {
        let conn = self.client().await?;
        let mut c = conn.client.clone();
        // lease_keep_alive sends the first keep-alive itself and fails when it is not granted
        match self
            .timed(&conn, "keep-alive", c.lease_keep_alive(lease))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) => {
                // an expired lease is one of its errors: ask etcd whether the lease is still there
                let left = self
                    .timed(
                        &conn,
                        "lease time-to-live",
                        c.lease_time_to_live(lease, None),
                    )
                    .await?;
                if left.ttl() <= 0 {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Writes `value` to `key` under `lease` (0: none) if the key was not modified since
    /// `mod_revision`; the new revision, or `None` when it had been.
    pub async fn put_if_unchanged(
        &self,
        key: &str,
        value: &str,
        lease: i64,
        mod_revision: i64,
    ) -> Result<Option<i64>, StoreError> {
        let conn = self.client().await?;
        let mut c = conn.client.clone();
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::put(key, value, opts)]);
        let resp = self.timed(&conn, "put", c.txn(txn)).await?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map(|h| h.revision()).unwrap_or(0)))
    }

    /// Deletes `key` if it was not modified since `mod_revision`; true if it was deleted.
    pub async fn delete_if_unchanged(
        &self,
        key: &str,
        mod_revision: i64,
    ) -> Result<bool, StoreError> {
        let conn = self.client().await?;
        let mut c = conn.client.clone();
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::delete(key, None)]);
        let resp = self.timed(&conn, "delete", c.txn(txn)).await?;
        Ok(resp.succeeded()
            && resp
                .op_responses()
                .iter()
                .any(|r| matches!(r, TxnOpResponse::Delete(d) if d.deleted() > 0)))
    }
}

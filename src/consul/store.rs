//! The etcd side of the Consul API: registrations written, TTL leases kept alive, keys deleted.
//! Every call has the configured request deadline; the client is made on first use and kept
//! (etcd-client reconnects by itself).

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use tokio::sync::Mutex;

use crate::config::EtcdConfig;

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
    client: Mutex<Option<Client>>,
}

impl Store {
    pub fn new(cfg: EtcdConfig) -> Store {
        Store {
            cfg,
            client: Mutex::new(None),
        }
    }

    fn error(&self, what: &'static str, message: impl ToString) -> StoreError {
        StoreError {
            endpoints: self.cfg.endpoints.join(","),
            what,
            message: message.to_string(),
        }
    }

    async fn client(&self) -> Result<Client, StoreError> {
        let mut g = self.client.lock().await;
        if let Some(c) = g.as_ref() {
            return Ok(c.clone());
        }
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(self.cfg.dial_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        if let Some((u, p)) = &self.cfg.credentials {
            opts = opts.with_user(u.clone(), p.clone());
        }
        let connect = Client::connect(&self.cfg.endpoints, Some(opts));
        let client = tokio::time::timeout(self.cfg.dial_timeout, connect)
            .await
            .map_err(|_| self.error("connect", "timed out"))?
            .map_err(|e| self.error("connect", e))?;
        *g = Some(client.clone());
        Ok(client)
    }

    async fn timed<T, E: ToString>(
        &self,
        what: &'static str,
        fut: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.cfg.request_timeout, fut)
            .await
            .map_err(|_| self.error(what, "timed out"))?
            .map_err(|e| self.error(what, e))
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
        let mut c = self.client().await?;
        let mut opts = None;
        if let Some(ttl) = ttl {
            let lease = self.timed("lease grant", c.lease_grant(ttl, None)).await?;
            opts = Some(PutOptions::new().with_lease(lease.id()));
        }
        let mut ops: Vec<TxnOp> = remove
            .iter()
            .filter(|k| ***k != *key)
            .map(|k| TxnOp::delete(k.as_bytes(), None))
            .collect();
        ops.push(TxnOp::put(key, value, opts));
        let resp = self.timed("put", c.txn(Txn::new().and_then(ops))).await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// Deletes `keys` in one transaction; returns the revision it made.
    pub async fn delete(&self, keys: &[Arc<str>]) -> Result<i64, StoreError> {
        let mut c = self.client().await?;
        let ops: Vec<TxnOp> = keys
            .iter()
            .map(|k| TxnOp::delete(k.as_bytes(), None))
            .collect();
        let resp = self
            .timed("delete", c.txn(Txn::new().and_then(ops)))
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
        let mut c = self.client().await?;
        let mut resp = self.timed("get", c.get(key, None)).await?;
        Ok(resp.take_kvs().into_iter().next().map(|kv| Current {
            lease: kv.lease(),
            mod_revision: kv.mod_revision(),
            value: kv.into_key_value().1,
        }))
    }

    /// Renews `lease` once; false when the lease is gone (expired).
    pub async fn keep_alive(&self, lease: i64) -> Result<bool, StoreError> {
        let mut c = self.client().await?;
        // lease_keep_alive sends the first keep-alive itself and fails when it is not granted
        match self.timed("keep-alive", c.lease_keep_alive(lease)).await {
            Ok(_) => Ok(true),
            Err(e) => {
                // an expired lease is one of its errors: ask etcd whether the lease is still there
                let left = self
                    .timed("lease time-to-live", c.lease_time_to_live(lease, None))
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
        let mut c = self.client().await?;
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::put(key, value, opts)]);
        let resp = self.timed("put", c.txn(txn)).await?;
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
        let mut c = self.client().await?;
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::delete(key, None)]);
        let resp = self.timed("delete", c.txn(txn)).await?;
        Ok(resp.succeeded()
            && resp
                .op_responses()
                .iter()
                .any(|r| matches!(r, TxnOpResponse::Delete(d) if d.deleted() > 0)))
    }
}

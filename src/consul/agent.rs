//! The agent's writes: service registration and deregistration, TTL check updates, and the
//! reaper of `DeregisterCriticalServiceAfter`. Each write goes to etcd, then waits (up to
//! [`SEEN_PATIENCE`]) until this switchyard's own view has it, so a client reads its own write.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use super::decode::{self, Status};
use super::directory::Directory;
use super::record::{Record, StoredCheck, DEFAULT_MAINTENANCE_REASON};
use super::store::Store;
use super::view::instance_checks;
use super::ApiError;
use crate::registry::codec::{decode_value, parse_host_port, valid_service_name};
use crate::routing::{Instance, SharedTable};

/// Longest wait for this switchyard's view to show a write before answering anyway.
pub const SEEN_PATIENCE: Duration = Duration::from_secs(2);

/// Consul keeps at most this much of a check's output.
const MAX_OUTPUT: usize = 4096;

pub struct Agent {
    pub store: Store,
    pub dir: Arc<Directory>,
    pub table: SharedTable,
    /// etcd prefix, ending in `/`.
    pub prefix: String,
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

fn unknown_service(id: &str) -> ApiError {
    ApiError::NotFound(format!(
        "Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."
    ))
}

fn unknown_check(id: &str) -> ApiError {
    ApiError::NotFound(format!(
        "Unknown check ID {id:?}. Ensure that the check ID is passed, not the check name."
    ))
}

impl Agent {
    /// The instance at `key` in the current snapshot.
    pub fn instance(&self, service: &str, key: &str) -> Option<Arc<Instance>> {
        let table = self.table.load();
        let svc = table.service(service)?;
        svc.instances.iter().find(|i| &*i.key == key).cloned()
    }

    /// Waits until the view has applied etcd revision `revision` (bounded).
    async fn seen(&self, revision: i64) {
        let mut rx = self.dir.subscribe();
        let deadline = tokio::time::Instant::now() + SEEN_PATIENCE;
        while self.dir.revision() < revision {
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                warn!(
                    revision,
                    seen = self.dir.revision(),
                    "a Consul API write is not in this switchyard's view yet; answering anyway"
                );
                return;
            }
        }
    }

    /// `PUT /v1/agent/service/register`.
    pub async fn register(&self, body: &[u8], replace: bool, peer: IpAddr) -> Result<(), ApiError> {
        let def = decode::service_definition(body).map_err(|e| {
            if e.field == "Name" {
                ApiError::BadRequest(e.message)
            } else {
                ApiError::BadRequest(format!("Request decode failed: {e}"))
            }
        })?;
        if !valid_service_name(&def.name) {
            return Err(ApiError::BadRequest(format!(
                "Invalid service name {:?}: switchyard service names are made of A-Z a-z 0-9 . _ -",
                def.name
            )));
        }
        if def.port == 0 {
            return Err(ApiError::BadRequest(
                "Request decode failed: Port: switchyard routes to a port: Port must be 1-65535"
                    .into(),
            ));
        }
        let host = match def.address.trim() {
            // Consul uses the agent's (node's) address: the registering client is where the
            // service is, but loopback means nothing to the other switchyards
            "" if peer.is_loopback() => match self.store.local_address().await {
                Some(ip) => ip.to_string(),
                None => peer.to_string(),
            },
            "" => peer.to_string(),
            a => a.trim_start_matches('[').trim_end_matches(']').to_string(),
        };
        if host
            .parse::<IpAddr>()
            .is_ok_and(|ip: IpAddr| ip.is_unspecified())
        {
            return Err(ApiError::BadRequest("Invalid service address".into()));
        }
        let joined = if host.contains(':') {
            format!("[{host}]:{}", def.port)
        } else {
            format!("{host}:{}", def.port)
        };
        let addr = parse_host_port(&joined)
            .map_err(|e| ApiError::BadRequest(format!("Request decode failed: Address: {e}")))?;
        let key = format!("{}{}/{}", self.prefix, def.name, def.id);
        // never overwrite what another registrar keeps (its lease, its deregistration)
        let taken = self
            .instance(&def.name, &key)
            .is_some_and(|i| Record::of_metadata(&i.metadata).is_none());
        if taken {
            return Err(ApiError::BadRequest(format!(
                "Service ID {:?} of {:?} is registered in etcd ({key}) by something other than \
                 the Consul API; choose another ID",
                def.id, def.name
            )));
        }
        let existing = self.dir.keys_of_id(&def.id);
        let previous = existing
            .iter()
            .find_map(|(k, svc)| self.instance(svc, k))
            .and_then(|i| Record::of_metadata(&i.metadata));
        let record = Record::new(&def, previous.as_ref(), replace);
        let value = record.to_value(&addr);
        let remove: Vec<Arc<str>> = existing.into_iter().map(|(k, _)| k).collect();
        let revision = self
            .store
            .put(&key, &value, record.lease_ttl(), &remove)
            .await
            .map_err(internal)?;
        info!(service = %def.name, id = %def.id, addr = %addr, key = %key,
            ttl = ?record.lease_ttl(), "Consul API: service registered");
        self.seen(revision).await;
        Ok(())
    }

    /// `PUT /v1/agent/service/deregister/<id>`.
    pub async fn deregister(&self, id: &str) -> Result<(), ApiError> {
        let keys: Vec<Arc<str>> = self
            .dir
            .keys_of_id(id)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        if keys.is_empty() {
            return Err(unknown_service(id));
        }
        let revision = self.store.delete(&keys).await.map_err(internal)?;
        info!(id = %id, keys = keys.len(), "Consul API: service deregistered");
        self.seen(revision).await;
        Ok(())
    }

    /// Rewrites the registration at `key` with `change` applied to its record (a new lease when
    /// it has a TTL check, none when not).
    async fn rewrite(&self, key: &str, change: impl FnOnce(&mut Record)) -> Result<i64, ApiError> {
        let Some(current) = self.store.get(key).await.map_err(internal)? else {
            return Err(ApiError::NotFound(format!(
                "{key} is not registered any more"
            )));
        };
        let reg = decode_value(&current.value).map_err(internal)?;
        let mut record = Record::of_metadata(&reg.metadata)
            .ok_or_else(|| internal(format!("{key} is not a Consul registration")))?;
        change(&mut record);
        let value = record.to_value(&reg.addr);
        self.store
            .put(key, &value, record.lease_ttl(), &[])
            .await
            .map_err(internal)
    }

    /// `PUT /v1/agent/check/register`: a check added to (or replacing one of) a service.
    pub async fn register_check(&self, body: &[u8]) -> Result<(), ApiError> {
        let (def, service_id) = decode::check_registration(body).map_err(|e| {
            if e.field == "Name" || e.field == "ServiceID" {
                ApiError::BadRequest(e.message)
            } else {
                ApiError::BadRequest(format!("Request decode failed: {e}"))
            }
        })?;
        let keys = self.dir.keys_of_id(&service_id);
        if keys.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "ServiceID {service_id:?} does not exist"
            )));
        }
        let id = def.id.clone().unwrap_or_default();
        let mut revision = 0;
        for (key, service) in keys {
            let name = format!("Service '{service}' check");
            revision = self
                .rewrite(&key, |record| {
                    let mut check = StoredCheck::new(id.clone(), name, &def);
                    if let Some(old) = record.checks.iter().find(|c| c.id == id) {
                        if old.is_ttl() && check.is_ttl() {
                            check.status = old.status;
                            check.output = old.output.clone();
                        }
                    }
                    record.checks.retain(|c| c.id != id);
                    record.checks.push(check);
                })
                .await?;
        }
        info!(check = %id, service = %service_id, "Consul API: check registered");
        self.seen(revision).await;
        Ok(())
    }

    /// `PUT /v1/agent/check/deregister/<id>`: the check removed from its service.
    pub async fn deregister_check(&self, check_id: &str) -> Result<(), ApiError> {
        let (key, _) = self
            .dir
            .key_of_check(check_id)
            .ok_or_else(|| unknown_check(check_id))?;
        let revision = self
            .rewrite(&key, |record| record.checks.retain(|c| c.id != check_id))
            .await?;
        info!(check = %check_id, key = %key, "Consul API: check deregistered");
        self.seen(revision).await;
        Ok(())
    }

    /// `PUT /v1/agent/service/maintenance/<id>?enable=&reason=`: in maintenance an instance stays
    /// registered, is not routed and has a critical `_service_maintenance:<id>` check.
    pub async fn maintenance(&self, id: &str, enable: bool, reason: &str) -> Result<(), ApiError> {
        let keys = self.dir.keys_of_id(id);
        if keys.is_empty() {
            return Err(unknown_service(id));
        }
        let reason = match reason {
            "" => DEFAULT_MAINTENANCE_REASON.to_string(),
            r => r.to_string(),
        };
        let mut revision = 0;
        for (key, _) in keys {
            let reason = enable.then(|| reason.clone());
            revision = self.rewrite(&key, |r| r.maintenance = reason).await?;
        }
        info!(id = %id, enable, "Consul API: service maintenance mode");
        self.seen(revision).await;
        Ok(())
    }

    /// `PUT /v1/agent/check/{pass,warn,fail}/<id>` and `/v1/agent/check/update/<id>`: renews the
    /// TTL lease and, when the status or output changed, writes them.
    pub async fn update_ttl(
        &self,
        check_id: &str,
        status: Status,
        output: &str,
    ) -> Result<(), ApiError> {
        let (key, service) = self
            .dir
            .key_of_check(check_id)
            .ok_or_else(|| unknown_check(check_id))?;
        let known = self
            .instance(&service, &key)
            .and_then(|i| Record::of_metadata(&i.metadata))
            .ok_or_else(|| unknown_check(check_id))?;
        match known.checks.iter().find(|c| c.id == check_id) {
            None => return Err(unknown_check(check_id)),
            Some(c) if !c.is_ttl() => {
                return Err(ApiError::Internal(format!(
                    "CheckID {check_id:?} does not have associated TTL"
                )))
            }
            Some(_) => {}
        }
        let mut output = output.to_string();
        if output.len() > MAX_OUTPUT {
            let mut cut = MAX_OUTPUT;
            while !output.is_char_boundary(cut) {
                cut -= 1;
            }
            output.truncate(cut);
        }
        // a few tries: a concurrent update of the same key makes the compare fail
        for _ in 0..5 {
            let Some(current) = self.store.get(&key).await.map_err(internal)? else {
                return Err(unknown_check(check_id));
            };
            let alive = match current.lease {
                0 => true,
                lease => self.store.keep_alive(lease).await.map_err(internal)?,
            };
            if !alive {
                // expired just now: the key goes with it
                return Err(unknown_check(check_id));
            }
            let reg = decode_value(&current.value).map_err(internal)?;
            let Some(mut record) = Record::of_metadata(&reg.metadata) else {
                return Err(unknown_check(check_id));
            };
            let Some(check) = record.checks.iter_mut().find(|c| c.id == check_id) else {
                return Err(unknown_check(check_id));
            };
            if check.status == status && check.output == output {
                return Ok(());
            }
            let from = check.status;
            check.status = status;
            check.output = output.clone();
            let value = record.to_value(&reg.addr);
            let written = self
                .store
                .put_if_unchanged(&key, &value, current.lease, current.mod_revision)
                .await
                .map_err(internal)?;
            if let Some(revision) = written {
                if from != status {
                    info!(check = %check_id, key = %key, from = from.as_str(),
                        to = status.as_str(), "Consul API: TTL check status changed");
                }
                self.seen(revision).await;
                return Ok(());
            }
        }
        Err(ApiError::Internal(format!(
            "check {check_id:?} kept changing while it was updated; try again"
        )))
    }

    /// Deletes instances whose checks stayed critical for their `DeregisterCriticalServiceAfter`,
    /// every second until `shutdown`. How long an instance has been critical is this
    /// switchyard's own observation (from when it first saw it critical).
    pub async fn reap(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut since: HashMap<Arc<str>, Instant> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            let mut seen = HashMap::with_capacity(since.len());
            for (key, service, after) in self.dir.reapable() {
                let Some(inst) = self.instance(&service, &key) else {
                    continue;
                };
                let Some(record) = Record::of_metadata(&inst.metadata) else {
                    continue;
                };
                // only the checks that have the setting count (as in Consul: not, for one,
                // the maintenance check)
                let reaping = |id: &str| {
                    record
                        .checks
                        .iter()
                        .any(|c| c.id == id && c.deregister_after_ms.is_some())
                };
                let critical = instance_checks(&inst, Some(&record))
                    .iter()
                    .any(|c| c.status == Status::Critical && reaping(&c.id));
                if !critical {
                    continue;
                }
                let first = since.get(&key).copied().unwrap_or_else(Instant::now);
                seen.insert(key.clone(), first);
                if first.elapsed() < after {
                    continue;
                }
                match self.store.get(&key).await {
                    Ok(Some(current)) => {
                        match self
                            .store
                            .delete_if_unchanged(&key, current.mod_revision)
                            .await
                        {
                            Ok(true) => info!(key = %key, id = %record.id,
                                after_ms = after.as_millis() as u64,
                                "Consul API: critical too long, deregistered (DeregisterCriticalServiceAfter)"),
                            Ok(false) => {}
                            Err(e) => {
                                warn!(key = %key, error = %e, "cannot deregister a critical instance")
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(key = %key, error = %e, "cannot deregister a critical instance")
                    }
                }
            }
            since = seen;
        }
    }
}

//! What the Consul API needs to know beyond the routing snapshot, kept up to date by one task
//! that follows the registry's snapshots and the health checker's flips:
//!
//! - the **index** (`X-Consul-Index`): the etcd revision of the snapshot, moved one further by
//!   every health flip this switchyard sees (so a blocking query also ends when an instance turns
//!   critical, which etcd never hears of), never backwards; and per service the index of its last
//!   change, so a blocking query on one service is not woken by every other service's changes;
//! - the Consul-registered instances by service id and by check id (for deregistration, TTL
//!   updates and `DeregisterCriticalServiceAfter`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tracing::debug;

use super::record::Record;
use crate::routing::{Instance, RoutingTable, SharedTable};

/// One Consul-registered instance.
#[derive(Debug, Clone)]
struct Entry {
    service: Arc<str>,
    id: String,
    checks: Vec<String>,
    /// The shortest `DeregisterCriticalServiceAfter` of its checks.
    reap_after: Option<Duration>,
}

#[derive(Debug, Default)]
struct Inner {
    index: u64,
    /// etcd revision of the last snapshot applied.
    revision: i64,
    services: HashMap<Arc<str>, u64>,
    /// Consul service id → keys (normally one).
    by_id: HashMap<String, Vec<Arc<str>>>,
    /// Check id → key.
    checks: HashMap<String, Arc<str>>,
    entries: HashMap<Arc<str>, Entry>,
}

impl Inner {
    fn forget(&mut self, key: &Arc<str>) {
        let Some(e) = self.entries.remove(key) else {
            return;
        };
        if let Some(keys) = self.by_id.get_mut(&e.id) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.by_id.remove(&e.id);
            }
        }
        for c in &e.checks {
            if self.checks.get(c) == Some(key) {
                self.checks.remove(c);
            }
        }
    }

    fn learn(&mut self, service: &Arc<str>, inst: &Instance) {
        let Some(rec) = Record::of_metadata(&inst.metadata) else {
            return;
        };
        let entry = Entry {
            service: service.clone(),
            id: rec.id.clone(),
            checks: rec.checks.iter().map(|c| c.id.clone()).collect(),
            reap_after: rec
                .checks
                .iter()
                .filter_map(|c| c.deregister_after_ms)
                .min()
                .map(Duration::from_millis),
        };
        let keys = self.by_id.entry(rec.id).or_default();
        if !keys.contains(&inst.key) {
            keys.push(inst.key.clone());
        }
        for c in &entry.checks {
            self.checks.insert(c.clone(), inst.key.clone());
        }
        self.entries.insert(inst.key.clone(), entry);
    }
}

/// Shared by the API's handlers and the task that keeps it ([`Directory::follow`]).
#[derive(Debug)]
pub struct Directory {
    inner: Mutex<Inner>,
    /// The index, sent after every change: blocking queries wait on it.
    changed: watch::Sender<u64>,
}

impl Default for Directory {
    fn default() -> Self {
        Directory {
            inner: Mutex::new(Inner::default()),
            changed: watch::channel(0).0,
        }
    }
}

impl Directory {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // a panic while holding it leaves consistent maps: every write is one insert or remove
        crate::sync::lock(&self.inner)
    }

    /// Applies the difference between two snapshots.
    pub fn apply(&self, before: &RoutingTable, now: &RoutingTable) {
        let mut g = self.lock();
        let mut changed = Vec::new();
        for (name, old, new) in now.services.changes(&before.services) {
            for i in old.map(|o| &o.instances[..]).unwrap_or_default() {
                g.forget(&i.key);
            }
            for i in new.map(|n| &n.instances[..]).unwrap_or_default() {
                g.learn(name, i);
            }
            changed.push(name.clone());
        }
        g.revision = g.revision.max(now.revision);
        if changed.is_empty() && g.index >= now.revision.max(1) as u64 {
            return;
        }
        let index = (g.index + 1).max(now.revision.max(1) as u64);
        g.index = index;
        for name in changed {
            g.services.insert(name, index);
        }
        drop(g);
        self.changed.send_replace(index);
    }

    /// A health flip of one of `service`'s instances.
    pub fn health_changed(&self, service: &Arc<str>) {
        let mut g = self.lock();
        g.index += 1;
        let index = g.index;
        g.services.insert(service.clone(), index);
        drop(g);
        self.changed.send_replace(index);
    }

    /// Flips were missed (a lagging receiver): every service may have changed.
    pub fn all_changed(&self) {
        let mut g = self.lock();
        g.index += 1;
        let index = g.index;
        for v in g.services.values_mut() {
            *v = index;
        }
        drop(g);
        self.changed.send_replace(index);
    }

    /// The index of the whole view (at least 1, as Consul's).
    pub fn index(&self) -> u64 {
        self.lock().index.max(1)
    }

    /// The index of `service`'s last change, if it was ever seen.
    pub fn service_index(&self, service: &str) -> Option<u64> {
        self.lock().services.get(service).copied()
    }

    /// etcd revision of the last snapshot applied.
    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// Keys of the instances registered with Consul service id `id`, with their service.
    pub fn keys_of_id(&self, id: &str) -> Vec<(Arc<str>, Arc<str>)> {
        let g = self.lock();
        g.by_id
            .get(id)
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| Some((k.clone(), g.entries.get(k)?.service.clone())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The key and service of the instance that has check `check_id`.
    pub fn key_of_check(&self, check_id: &str) -> Option<(Arc<str>, Arc<str>)> {
        let g = self.lock();
        let key = g.checks.get(check_id)?;
        Some((key.clone(), g.entries.get(key)?.service.clone()))
    }

    /// Instances with a `DeregisterCriticalServiceAfter`: key, service and the time.
    pub fn reapable(&self) -> Vec<(Arc<str>, Arc<str>, Duration)> {
        self.lock()
            .entries
            .iter()
            .filter_map(|(k, e)| Some((k.clone(), e.service.clone(), e.reap_after?)))
            .collect()
    }

    /// Changes with every new index.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Keeps the directory up to date until `shutdown` turns true: follows the registry's
    /// snapshots (`generations`) and the health checker's flips.
    pub async fn follow(
        self: Arc<Self>,
        table: SharedTable,
        mut generations: watch::Receiver<u64>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut flips = crate::health::subscribe_transitions();
        let mut last: Arc<RoutingTable> = Arc::new(RoutingTable::default());
        loop {
            let now = table.load_full();
            if !Arc::ptr_eq(&now, &last) {
                self.apply(&last, &now);
                last = now;
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                r = generations.changed() => if r.is_err() {
                    debug!("registry gone: the Consul directory stops following it");
                    return;
                },
                flip = flips.recv() => match flip {
                    Ok(service) => self.health_changed(&service),
                    Err(broadcast::error::RecvError::Lagged(_)) => self.all_changed(),
                    Err(broadcast::error::RecvError::Closed) => {
                        flips = crate::health::subscribe_transitions();
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{Health, Service, ServiceMap, ServiceSettings};

    fn table(revision: i64, services: &[(&str, Vec<Arc<Instance>>)]) -> RoutingTable {
        let map: ServiceMap = services
            .iter()
            .map(|(n, insts)| {
                let name: Arc<str> = (*n).into();
                let svc = Service::new(name.clone(), insts.clone(), 0, &ServiceSettings::default());
                (name, Arc::new(svc))
            })
            .collect();
        RoutingTable {
            services: map,
            revision,
        }
    }

    #[test]
    fn index_is_the_revision_and_health_flips_move_it_on() {
        let d = Directory::default();
        let a = vec![Instance::for_test("/s/a/1", 1, Health::Healthy)];
        let t1 = table(10, &[("a", a.clone()), ("b", vec![])]);
        d.apply(&RoutingTable::default(), &t1);
        assert_eq!((d.index(), d.service_index("a")), (10, Some(10)));
        d.health_changed(&"a".into());
        assert_eq!((d.index(), d.service_index("a")), (11, Some(11)));
        assert_eq!(d.service_index("b"), Some(10), "b did not change");
        // the next registration change: its revision, or one further if flips ran ahead
        let t2 = table(11, &[("a", a), ("b", vec![])]);
        d.apply(&t1, &t2);
        assert_eq!(
            d.index(),
            12,
            "never backwards, always forwards on a change"
        );
        assert_eq!(d.service_index("b"), Some(12), "b was rebuilt in t2");
        assert_eq!(d.service_index("c"), None);
    }
}

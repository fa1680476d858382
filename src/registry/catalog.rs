//! The catalog: every registration the registry knows, by etcd key, and the snapshot builder.
//!
//! Owned by the registry task alone. Applying an [`Update`] changes the catalog and publishes one
//! new [`RoutingTable`]: only the services the update touched are rebuilt; every other service's
//! `Arc<Service>` is carried over as is.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use tracing::{debug, info, warn};

use super::codec::{self, Registration};
use super::dns::{self, Address, Names, Resolved};
use super::own::OwnAddresses;
use crate::routing::{Health, Instance, InstanceState, RoutingTable, Service, ServiceSettings};

/// One change from etcd, in the registry's vocabulary.
#[derive(Debug, Clone)]
pub enum Change {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

/// What the registry applies to the catalog: one update = one snapshot swap.
#[derive(Debug, Clone)]
pub enum Update {
    /// A complete list at `revision`: everything not in it is removed.
    Reset {
        revision: i64,
        kvs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// The events of one watch response.
    Batch { revision: i64, changes: Vec<Change> },
    /// Answers of the resolver for names in use (the revision stays).
    Resolved { names: Vec<Resolved> },
}

/// Why an entry is invalid (kept so status pages and 503 bodies can say so).
#[derive(Debug, Clone)]
pub struct InvalidEntry {
    pub service: Option<Arc<str>>,
    pub reason: String,
    /// Fingerprint of the value that was refused: the same value again (every re-list) is not
    /// counted or logged again.
    value: u64,
}

fn fingerprint(value: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

#[derive(Debug, Default)]
struct ServiceEntries {
    /// Valid instances sorted by key, the snapshot's order: found by binary search, and a
    /// service of one instance costs one 8-byte allocation (a hash map cost 116 bytes, a B-tree
    /// about 280). A key names its service, so no key → service map is needed either.
    instances: Vec<Arc<Instance>>,
    invalid: BTreeSet<Arc<str>>,
}

impl ServiceEntries {
    /// Where `key` is in `instances`, or where it would go.
    fn find(&self, key: &str) -> Result<usize, usize> {
        self.instances.binary_search_by(|i| (*i.key).cmp(key))
    }
}

/// Counts of what one update did, for logs and metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyStats {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub invalid: usize,
    pub services_rebuilt: usize,
}

pub struct Catalog {
    prefix: String,
    services: HashMap<Arc<str>, ServiceEntries>,
    /// Valid instances over all services.
    valid: usize,
    invalid: HashMap<Arc<str>, InvalidEntry>,
    /// Services named in config routes: kept in the table even with no instance (503, not 404).
    pinned: HashSet<Arc<str>>,
    settings: Arc<dyn Fn(&str) -> ServiceSettings + Send + Sync>,
    initial_health: Health,
    /// DNS names in use, their last answers (resolved off this task).
    names: Names,
    /// switchyard's own listeners and etcd: an instance there is refused.
    own: OwnAddresses,
}

impl Catalog {
    pub fn new(
        prefix: String,
        pinned: impl IntoIterator<Item = Arc<str>>,
        settings: Arc<dyn Fn(&str) -> ServiceSettings + Send + Sync>,
        initial_health: Health,
        dns: dns::Requests,
    ) -> Self {
        Catalog {
            prefix,
            services: HashMap::new(),
            valid: 0,
            invalid: HashMap::new(),
            pinned: pinned.into_iter().collect(),
            settings,
            initial_health,
            names: Names::new(dns),
            own: OwnAddresses::default(),
        }
    }

    /// Asks the resolver again for every name in use.
    pub fn refresh_names(&mut self) {
        self.names.refresh();
    }

    /// Names that do not resolve now.
    pub fn failing_names(&self) -> Vec<dns::FailingName> {
        self.names.failing()
    }

    /// DNS names used by registrations.
    pub fn name_count(&self) -> usize {
        self.names.len()
    }

    /// The addresses refused as instance addresses (applies to later updates).
    pub fn own_addresses_mut(&mut self) -> &mut OwnAddresses {
        &mut self.own
    }

    pub fn instance_count(&self) -> usize {
        self.valid
    }

    pub fn invalid_entries(&self) -> impl Iterator<Item = (&Arc<str>, &InvalidEntry)> {
        self.invalid.iter()
    }

    /// Applies `update` and returns the new snapshot built from `current`, plus what changed.
    pub fn apply(&mut self, current: &RoutingTable, update: Update) -> (RoutingTable, ApplyStats) {
        let mut stats = ApplyStats::default();
        let mut touched: HashSet<Arc<str>> = HashSet::new();
        let revision = match update {
            Update::Reset { revision, kvs } => {
                self.own.forget_local_addresses();
                let listed: HashSet<&[u8]> = kvs.iter().map(|(k, _)| k.as_slice()).collect();
                let valid = self.services.values().flat_map(|e| &e.instances);
                let gone: Vec<Arc<str>> = valid
                    .map(|i| &i.key)
                    .chain(self.invalid.keys())
                    // waiting for their name's first answer
                    .chain(self.names.keys())
                    .filter(|k| !listed.contains(k.as_bytes()))
                    .cloned()
                    .collect();
                for key in gone {
                    self.delete(key.as_bytes(), &mut touched, &mut stats);
                }
                for (key, value) in &kvs {
                    self.put(key, value, &mut touched, &mut stats);
                }
                revision
            }
            Update::Batch { revision, changes } => {
                for change in &changes {
                    match change {
                        Change::Put { key, value } => {
                            self.put(key, value, &mut touched, &mut stats)
                        }
                        Change::Delete { key } => self.delete(key, &mut touched, &mut stats),
                    }
                }
                revision
            }
            Update::Resolved { names } => {
                for (host, answer) in names {
                    for (key, value) in self.names.resolved(&host, answer) {
                        self.put(key.as_bytes(), &value, &mut touched, &mut stats);
                    }
                }
                current.revision
            }
        };
        let mut services = current.services.clone();
        for name in &self.pinned {
            if !services.contains_key(name) {
                touched.insert(name.clone());
            }
        }
        for name in touched {
            let entries = self.services.get(&name);
            let empty = entries.is_none_or(|e| e.instances.is_empty() && e.invalid.is_empty());
            if empty {
                self.services.remove(&name);
                if !self.pinned.contains(&name) {
                    services.remove(&name);
                    continue;
                }
            }
            let (instances, invalid) = match self.services.get(&name) {
                Some(e) => (e.instances.clone(), e.invalid.len()),
                None => (Vec::new(), 0),
            };
            let settings = (self.settings)(&name);
            stats.services_rebuilt += 1;
            services.insert(
                name.clone(),
                Arc::new(Service::new(name, instances, invalid, &settings)),
            );
        }
        (RoutingTable { services, revision }, stats)
    }

    fn put(
        &mut self,
        key: &[u8],
        value: &[u8],
        touched: &mut HashSet<Arc<str>>,
        stats: &mut ApplyStats,
    ) {
        let decoded = codec::decode_key(&self.prefix, key).and_then(|parts| {
            let reg = codec::decode_value(value)?;
            Ok((parts.service.to_string(), parts.instance.to_string(), reg))
        });
        let key_str: Arc<str> = String::from_utf8_lossy(key).into_owned().into();
        let (service, id, reg) = match decoded {
            Ok(v) => v,
            Err(e) => {
                self.names.forget(&key_str);
                return self.mark_invalid(key, value, e.to_string(), touched, stats);
            }
        };
        let ip = match self.names.address(&key_str, value, &reg.addr.host) {
            Address::Ready(ip) => ip,
            Address::Pending => {
                // not routed until its name answers; not invalid either
                debug!(key = %key_str, name = %reg.addr.host, "waiting for the name to resolve");
                self.remove_valid(&key_str, touched, stats);
                self.clear_invalid(&key_str, touched);
                return;
            }
            Address::Failed(reason) => {
                return self.mark_invalid(key, value, reason, touched, stats);
            }
        };
        let addr = SocketAddr::new(ip, reg.addr.port);
        if let Some(own) = self.own.refuses(addr) {
            let reason = format!("address {addr} is switchyard's own {own}");
            return self.mark_invalid(key, value, reason, touched, stats);
        }
        // a key that was invalid and is now valid
        self.clear_invalid(&key_str, touched);
        let service: Arc<str> = self
            .services
            .get_key_value(service.as_str())
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| service.into());
        let entries = self.services.entry(service.clone()).or_default();
        let Registration {
            addr: registered,
            weight,
            metadata,
        } = reg;
        let at = entries.find(&key_str);
        let previous = at.ok().map(|n| &entries.instances[n]);
        let state = match previous {
            // Same key, same endpoint: keep its identity (health, counters).
            Some(p) if p.addr == addr => {
                if p.weight == weight && p.metadata == metadata && p.registered() == registered {
                    debug!(key = %key_str, "registration unchanged");
                    return;
                }
                stats.updated += 1;
                p.state.clone()
            }
            Some(_) => {
                stats.updated += 1;
                Arc::new(InstanceState::new(self.initial_health))
            }
            None => {
                stats.added += 1;
                Arc::new(InstanceState::new(self.initial_health))
            }
        };
        if previous.is_none() {
            info!(service = %service, key = %key_str, addr = %addr, weight, "instance registered");
        } else {
            info!(service = %service, key = %key_str, addr = %addr, weight, "instance updated");
        }
        let instance = Arc::new(Instance::new(
            key_str,
            &id,
            &registered,
            addr,
            weight,
            metadata,
            state,
        ));
        match at {
            Ok(n) => entries.instances[n] = instance,
            Err(n) => {
                entries.instances.insert(n, instance);
                self.valid += 1;
            }
        }
        touched.insert(service);
    }

    fn mark_invalid(
        &mut self,
        key: &[u8],
        value: &[u8],
        reason: String,
        touched: &mut HashSet<Arc<str>>,
        stats: &mut ApplyStats,
    ) {
        let key_str: Arc<str> = String::from_utf8_lossy(key).into_owned().into();
        let value = fingerprint(value);
        if self
            .invalid
            .get(&key_str)
            .is_some_and(|e| e.value == value && e.reason == reason)
        {
            // refused before for the same value (a re-list): counted and logged then
            return;
        }
        warn!(key = %key_str, error = %reason, "skipping invalid registration");
        crate::events::RECENT.record(
            "registry",
            format!("skipping invalid registration {key_str}: {reason}"),
        );
        stats.invalid += 1;
        // an instance that was valid and became invalid is no longer routable
        self.remove_valid(&key_str, touched, stats);
        let service: Option<Arc<str>> = codec::service_of_key(&self.prefix, key).map(Arc::from);
        if let Some(svc) = &service {
            self.services
                .entry(svc.clone())
                .or_default()
                .invalid
                .insert(key_str.clone());
            touched.insert(svc.clone());
        }
        self.invalid.insert(
            key_str,
            InvalidEntry {
                service,
                reason,
                value,
            },
        );
    }

    fn remove_valid(
        &mut self,
        key: &Arc<str>,
        touched: &mut HashSet<Arc<str>>,
        stats: &mut ApplyStats,
    ) {
        // a valid key's service is its first part after the prefix
        let Some(name) = codec::service_of_key(&self.prefix, key.as_bytes()) else {
            return;
        };
        let Some(service) = self.services.get_key_value(name).map(|(k, _)| k.clone()) else {
            return;
        };
        let Some(e) = self.services.get_mut(&service) else {
            return;
        };
        if let Ok(n) = e.find(key) {
            e.instances.remove(n);
            self.valid -= 1;
            info!(service = %service, key = %key, "instance deregistered");
            stats.removed += 1;
            touched.insert(service);
        }
    }

    fn delete(&mut self, key: &[u8], touched: &mut HashSet<Arc<str>>, stats: &mut ApplyStats) {
        let key_str: Arc<str> = String::from_utf8_lossy(key).into_owned().into();
        self.remove_valid(&key_str, touched, stats);
        self.clear_invalid(&key_str, touched);
        self.names.forget(&key_str);
    }

    fn clear_invalid(&mut self, key: &Arc<str>, touched: &mut HashSet<Arc<str>>) {
        if let Some(old) = self.invalid.remove(key) {
            if let Some(svc) = old.service {
                if let Some(e) = self.services.get_mut(&svc) {
                    e.invalid.remove(key);
                }
                touched.insert(svc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        Catalog::new(
            "/s/".into(),
            [Arc::from("pinned")],
            Arc::new(|_: &str| ServiceSettings::default()),
            Health::Healthy,
            dns::Requests::detached(),
        )
    }

    /// What the resolver would answer for the test's names.
    fn fake_dns(host: &str) -> Result<Vec<std::net::IpAddr>, dns::DnsError> {
        match host {
            "backend.test" => Ok(vec!["::9".parse().unwrap(), "127.0.0.9".parse().unwrap()]),
            h => Err(dns::DnsError::Failed {
                host: h.to_string(),
                reason: "no such name".into(),
            }),
        }
    }

    fn answer(host: &str, r: Result<Vec<std::net::IpAddr>, dns::DnsError>) -> Update {
        Update::Resolved {
            names: vec![(host.to_string(), r)],
        }
    }

    fn put(k: &str, v: &str) -> Change {
        Change::Put {
            key: k.as_bytes().to_vec(),
            value: v.as_bytes().to_vec(),
        }
    }

    /// `/s/a/1` and `/s/a/2` at revision 2.
    fn two_instances(c: &mut Catalog) -> RoutingTable {
        let puts = vec![put("/s/a/1", "127.0.0.1:1"), put("/s/a/2", "127.0.0.1:2")];
        c.apply(&RoutingTable::default(), batch(2, puts)).0
    }

    fn batch(rev: i64, changes: Vec<Change>) -> Update {
        Update::Batch {
            revision: rev,
            changes,
        }
    }

    #[test]
    fn puts_deletes_and_invalid_values() {
        let mut c = catalog();
        let t0 = RoutingTable::default();
        let (t1, s) = c.apply(
            &t0,
            batch(
                2,
                vec![
                    put("/s/a/1", "127.0.0.1:1"),
                    put("/s/a/2", r#"{"addr":"backend.test:2","weight":3}"#),
                    put("/s/a/3", "garbage"),
                    put("/s/b", "127.0.0.1:1"),
                    put("/s/b/1", "nowhere.test:1"),
                ],
            ),
        );
        // the names wait for the resolver; everything else is applied at once
        assert_eq!((s.added, s.invalid), (1, 2));
        assert_eq!(t1.service("a").unwrap().instances.len(), 1);
        let (t1, s) = c.apply(
            &t1,
            Update::Resolved {
                names: ["backend.test", "nowhere.test"]
                    .map(|h| (h.to_string(), fake_dns(h)))
                    .to_vec(),
            },
        );
        assert_eq!((s.added, s.invalid), (1, 1));
        assert_eq!(t1.revision, 2);
        let a = t1.service("a").unwrap();
        assert_eq!(a.instances.len(), 2);
        assert_eq!(a.invalid, 1);
        assert_eq!(a.instances[1].addr.to_string(), "127.0.0.9:2");
        // b has only an unresolvable instance: known (503), not routable
        assert_eq!(t1.service("b").unwrap().instances.len(), 0);
        assert!(t1.service("pinned").is_some());

        // a garbage value for an existing key removes it, others keep serving
        let (t2, _) = c.apply(&t1, batch(3, vec![put("/s/a/1", "")]));
        assert_eq!(t2.service("a").unwrap().instances.len(), 1);
        // b untouched: same Arc carried over
        assert!(Arc::ptr_eq(
            t1.service("b").unwrap(),
            t2.service("b").unwrap()
        ));

        let (t3, s) = c.apply(
            &t2,
            batch(
                4,
                vec![
                    Change::Delete {
                        key: b"/s/a/2".to_vec(),
                    },
                    Change::Delete {
                        key: b"/s/a/1".to_vec(),
                    },
                    Change::Delete {
                        key: b"/s/a/3".to_vec(),
                    },
                ],
            ),
        );
        assert_eq!(s.removed, 1);
        assert!(t3.service("a").is_none(), "service without keys disappears");
    }

    #[test]
    fn an_instance_at_an_own_address_is_refused_and_stops_being_routed() {
        use super::super::own::OwnAddress;
        let mut c = catalog();
        c.own_addresses_mut().add(OwnAddress::listener(
            "admin listener",
            "127.0.0.1:9090".parse().unwrap(),
        ));
        let t1 = two_instances(&mut c);
        let (t2, s) = c.apply(
            &t1,
            batch(
                3,
                vec![
                    put("/s/a/2", "127.0.0.1:9090"),
                    put(
                        "/s/adm/1",
                        r#"{"addr":"127.0.0.1:9090","metadata":{"health_path":"/healthz"}}"#,
                    ),
                ],
            ),
        );
        assert_eq!((s.removed, s.invalid), (1, 2));
        assert_eq!(t2.service("a").unwrap().instances.len(), 1);
        assert_eq!(
            t2.service("adm").unwrap().instances.len(),
            0,
            "known, not routable"
        );
        let reasons: Vec<String> = c.invalid_entries().map(|(_, e)| e.reason.clone()).collect();
        assert!(
            reasons
                .iter()
                .all(|r| r.contains("switchyard's own admin listener (127.0.0.1:9090)")),
            "{reasons:?}"
        );
    }

    fn addrs(t: &RoutingTable, service: &str) -> Vec<String> {
        t.service(service)
            .map(|s| s.instances.iter().map(|i| i.addr.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_name_that_resolved_once_keeps_routing_while_dns_fails() {
        let (requests, mut asked) = dns::Requests::channel();
        let mut c = Catalog::new(
            "/s/".into(),
            Vec::<Arc<str>>::new(),
            Arc::new(|_: &str| ServiceSettings::default()),
            Health::Healthy,
            requests,
        );
        let listed = || Update::Reset {
            revision: 7,
            kvs: vec![
                (b"/s/n/1".to_vec(), b"backend.test:80".to_vec()),
                (b"/s/n/2".to_vec(), b"backend.test:81".to_vec()),
                (b"/s/n/ip".to_vec(), b"127.0.0.1:82".to_vec()),
            ],
        };
        // the IP registration is routed at once; the name waits, asked for once
        let (t1, s) = c.apply(&RoutingTable::default(), listed());
        assert_eq!((s.added, s.invalid), (1, 0));
        assert_eq!(asked.try_recv().ok().as_deref(), Some("backend.test"));
        assert!(asked.try_recv().is_err(), "one lookup per name in flight");
        let (t2, s) = c.apply(&t1, answer("backend.test", fake_dns("backend.test")));
        assert_eq!(s.added, 2);
        assert_eq!(
            addrs(&t2, "n"),
            ["127.0.0.9:80", "127.0.0.9:81", "127.0.0.1:82"]
        );
        let state = t2.service("n").unwrap().instances[0].state.clone();
        // DNS fails: nothing changes but the failing list
        let servfail = dns::DnsError::Timeout {
            host: "backend.test".into(),
            after: std::time::Duration::from_secs(5),
        };
        let (t3, s) = c.apply(&t2, answer("backend.test", Err(servfail)));
        assert_eq!(s, ApplyStats::default());
        let failing = c.failing_names();
        assert_eq!(failing.len(), 1);
        assert_eq!(failing[0].last_good, Some("127.0.0.9".parse().unwrap()));
        assert!(failing[0].error.contains("timed out"), "{failing:?}");
        // a re-list meanwhile resolves nothing and removes nothing
        c.refresh_names();
        assert_eq!(asked.try_recv().ok().as_deref(), Some("backend.test"));
        let (t4, s) = c.apply(&t3, listed());
        assert_eq!((s.removed, s.invalid), (0, 0));
        assert_eq!(addrs(&t4, "n").len(), 3);
        assert!(Arc::ptr_eq(
            &t4.service("n").unwrap().instances[0].state,
            &state
        ));
        // it resolves again, elsewhere: the instances move
        let moved = Ok(vec!["127.0.0.10".parse().unwrap()]);
        let (t5, s) = c.apply(&t4, answer("backend.test", moved));
        assert_eq!(s.updated, 2);
        assert_eq!(
            addrs(&t5, "n"),
            ["127.0.0.10:80", "127.0.0.10:81", "127.0.0.1:82"]
        );
        assert!(c.failing_names().is_empty());
        // deleting every user forgets the name
        let deletes = ["/s/n/1", "/s/n/2"].map(|k| Change::Delete {
            key: k.as_bytes().to_vec(),
        });
        c.apply(&t5, batch(8, deletes.to_vec()));
        assert_eq!(c.name_count(), 0);
    }

    #[test]
    fn a_name_that_never_resolved_is_invalid_until_it_does() {
        let mut c = catalog();
        let (t1, _) = c.apply(
            &RoutingTable::default(),
            batch(2, vec![put("/s/n/1", "nowhere.test:80")]),
        );
        let (t2, s) = c.apply(&t1, answer("nowhere.test", fake_dns("nowhere.test")));
        assert_eq!(s.invalid, 1);
        assert_eq!(t2.service("n").unwrap().invalid, 1);
        // failing again: not counted again
        let (t3, s) = c.apply(&t2, answer("nowhere.test", fake_dns("nowhere.test")));
        assert_eq!(s, ApplyStats::default());
        let (t4, s) = c.apply(&t3, answer("nowhere.test", fake_dns("backend.test")));
        assert_eq!((s.added, c.invalid_entries().count()), (1, 0));
        assert_eq!(addrs(&t4, "n"), ["127.0.0.9:80"]);
    }

    #[test]
    fn an_invalid_key_is_counted_once_until_its_value_changes() {
        let mut c = catalog();
        let list = |v: &str| Update::Reset {
            revision: 5,
            kvs: vec![
                (b"/s/a/bad".to_vec(), v.as_bytes().to_vec()),
                (b"/s/a/1".to_vec(), b"127.0.0.1:1".to_vec()),
            ],
        };
        let (t1, s) = c.apply(&RoutingTable::default(), list("garbage"));
        assert_eq!((s.added, s.invalid), (1, 1));
        // every later re-list sees the same garbage: not counted again
        let (t2, s) = c.apply(&t1, list("garbage"));
        assert_eq!(
            s,
            ApplyStats::default(),
            "an unchanged list changes nothing"
        );
        // a different bad value is news
        let (t3, s) = c.apply(&t2, list("still garbage"));
        assert_eq!(s.invalid, 1);
        // fixed, then broken again with the first value: counted again
        let (t4, s) = c.apply(&t3, list("127.0.0.1:2"));
        assert_eq!((s.added, s.invalid), (1, 0));
        let (_, s) = c.apply(&t4, list("garbage"));
        assert_eq!((s.removed, s.invalid), (1, 1));
        assert_eq!(c.invalid_entries().count(), 1);
    }

    #[test]
    fn state_survives_weight_and_metadata_changes_not_address_changes() {
        let mut c = catalog();
        let (t1, _) = c.apply(
            &RoutingTable::default(),
            batch(2, vec![put("/s/a/1", "127.0.0.1:1")]),
        );
        let st = t1.service("a").unwrap().instances[0].state.clone();
        st.set_health(Health::Unhealthy);
        let (t2, s) = c.apply(
            &t1,
            batch(
                3,
                vec![put(
                    "/s/a/1",
                    r#"{"addr":"127.0.0.1:1","weight":5,"metadata":{"z":"a"}}"#,
                )],
            ),
        );
        assert_eq!(s.updated, 1);
        let i = &t2.service("a").unwrap().instances[0];
        assert!(Arc::ptr_eq(&i.state, &st));
        assert_eq!(i.weight, 5);
        assert_eq!(i.state.health(), Health::Unhealthy);
        let (t3, _) = c.apply(&t2, batch(4, vec![put("/s/a/1", "127.0.0.1:2")]));
        assert!(!Arc::ptr_eq(
            &t3.service("a").unwrap().instances[0].state,
            &st
        ));
    }

    #[test]
    fn reset_removes_what_is_not_listed() {
        let mut c = catalog();
        let t1 = two_instances(&mut c);
        let (t2, s) = c.apply(
            &t1,
            Update::Reset {
                revision: 9,
                kvs: vec![(b"/s/a/2".to_vec(), b"127.0.0.1:2".to_vec())],
            },
        );
        assert_eq!(s.removed, 1);
        assert_eq!(s.added, 0);
        assert_eq!(t2.revision, 9);
        assert_eq!(&*t2.service("a").unwrap().instances[0].key, "/s/a/2");
        assert_eq!(c.instance_count(), 1);
    }

    #[test]
    fn instances_stay_sorted_and_counted_through_puts_and_deletes() {
        let mut c = catalog();
        let keys = ["/s/a/3", "/s/a/1", "/s/b/9", "/s/a/2"];
        let puts = keys.iter().map(|k| put(k, "127.0.0.1:1")).collect();
        let (t1, s) = c.apply(&RoutingTable::default(), batch(2, puts));
        assert_eq!((s.added, c.instance_count()), (4, 4));
        let order: Vec<&str> = t1
            .service("a")
            .unwrap()
            .instances
            .iter()
            .map(|i| i.id())
            .collect();
        assert_eq!(order, ["1", "2", "3"]);
        // a new address for a known key replaces it in place; a delete of an unknown key or of
        // a key of an unknown service changes nothing
        let (t2, s) = c.apply(
            &t1,
            batch(
                3,
                vec![
                    put("/s/a/2", "127.0.0.1:2"),
                    Change::Delete {
                        key: b"/s/a/7".to_vec(),
                    },
                    Change::Delete {
                        key: b"/s/zz/1".to_vec(),
                    },
                    Change::Delete {
                        key: b"/s/a/1".to_vec(),
                    },
                ],
            ),
        );
        assert_eq!((s.updated, s.removed, c.instance_count()), (1, 1, 3));
        let a = t2.service("a").unwrap();
        let ids: Vec<&str> = a.instances.iter().map(|i| i.id()).collect();
        assert_eq!(ids, ["2", "3"]);
        assert_eq!(a.instances[0].addr.port(), 2);
    }
}

//! The services of a snapshot: name → [`Service`], in shards that snapshots share.
//!
//! ```text
//! ServiceMap { shards: [Arc<Shard>; 256] }     name ──hash──▶ shard (bits 32..40) ──▶ entry
//!   snapshot N    ─┬─ shard 0 ──┐
//!                  ├─ shard 1 ──┼── the same Arcs in both snapshots
//!   snapshot N+1  ─┴─ shard 1' ─┘   (only the shard a change touched is copied)
//! ```
//!
//! A registry change touches one service or a few, but a snapshot is immutable: copying a single
//! 100,000-entry map for every change took 4.6 ms (and dropping the old one about as long again
//! wherever its last reference went). Here a new snapshot clones the shard array (256 `Arc`s)
//! and copies only the shards it writes to ([`Arc::make_mut`]), so a change costs the size of a
//! shard (1/256 of the services), dropping an old snapshot costs 256 reference counts, and
//! [`ServiceMap::changes`] finds what changed between two snapshots by comparing shard pointers.
//! A lookup hashes the name once: the hash picks the shard and probes its table.

use std::hash::BuildHasher;
use std::sync::{Arc, LazyLock};

use hashbrown::HashTable;

use super::Service;

/// Shards per map (a power of two).
const SHARDS: usize = 256;

/// One hash function for every map of the process, so a name's shard is the same in all
/// snapshots (hashbrown's default: foldhash, seeded once per process).
static HASHER: LazyLock<hashbrown::DefaultHashBuilder> = LazyLock::new(Default::default);

/// The shard every empty map starts from: an empty map allocates nothing per shard.
static EMPTY: LazyLock<Arc<Shard>> = LazyLock::new(|| Arc::new(Shard::default()));

type Entry = (Arc<str>, Arc<Service>);

#[derive(Clone, Default)]
struct Shard {
    table: HashTable<Entry>,
}

fn hash(name: &str) -> u64 {
    HASHER.hash_one(name)
}

/// The shard of a hash: bits 32..40, which hashbrown uses for neither its bucket index (the low
/// bits) nor its control byte (the top 7 bits), so entries still spread within a shard.
fn shard_of(hash: u64) -> usize {
    (hash >> 32) as usize & (SHARDS - 1)
}

/// Services by name; cloning is 256 reference counts, writes copy one shard when it is shared.
#[derive(Clone)]
pub struct ServiceMap {
    shards: Box<[Arc<Shard>]>,
    len: usize,
}

impl Default for ServiceMap {
    fn default() -> Self {
        ServiceMap {
            shards: (0..SHARDS).map(|_| EMPTY.clone()).collect(),
            len: 0,
        }
    }
}

impl std::fmt::Debug for ServiceMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl ServiceMap {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn get_key_value(&self, name: &str) -> Option<(&Arc<str>, &Arc<Service>)> {
        let h = hash(name);
        self.shards[shard_of(h)]
            .table
            .find(h, |(k, _)| **k == *name)
            .map(|(k, v)| (k, v))
    }

    #[inline]
    pub fn get(&self, name: &str) -> Option<&Arc<Service>> {
        self.get_key_value(name).map(|(_, v)| v)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.get_key_value(name).is_some()
    }

    /// Inserts or replaces `name`'s service; copies its shard first if another map shares it.
    pub fn insert(&mut self, name: Arc<str>, service: Arc<Service>) -> Option<Arc<Service>> {
        let h = hash(&name);
        let shard = Arc::make_mut(&mut self.shards[shard_of(h)]);
        match shard.table.entry(h, |(k, _)| *k == name, |(k, _)| hash(k)) {
            hashbrown::hash_table::Entry::Occupied(mut e) => {
                Some(std::mem::replace(&mut e.get_mut().1, service))
            }
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert((name, service));
                self.len += 1;
                None
            }
        }
    }

    /// Removes `name`; copies its shard first if another map shares it (and only if it holds
    /// `name`).
    pub fn remove(&mut self, name: &str) -> Option<Arc<Service>> {
        let h = hash(name);
        let i = shard_of(h);
        self.shards[i].table.find(h, |(k, _)| **k == *name)?;
        let shard = Arc::make_mut(&mut self.shards[i]);
        let (entry, _) = shard
            .table
            .find_entry(h, |(k, _)| **k == *name)
            .ok()?
            .remove();
        self.len -= 1;
        Some(entry.1)
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<Service>)> {
        self.shards
            .iter()
            .flat_map(|s| s.table.iter().map(|(k, v)| (k, v)))
    }

    pub fn keys(&self) -> impl Iterator<Item = &Arc<str>> {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.iter().map(|(_, v)| v)
    }

    /// The services that differ between `before` and `self`: `(name, before, now)` for each name
    /// whose service was added (`before` is None), removed (`now` is None) or replaced by another
    /// `Arc`. Shards that both maps share are skipped without looking inside, so the cost is
    /// that of the shards written since `before`, not of the whole map.
    pub fn changes<'a>(
        &'a self,
        before: &'a ServiceMap,
    ) -> impl Iterator<
        Item = (
            &'a Arc<str>,
            Option<&'a Arc<Service>>,
            Option<&'a Arc<Service>>,
        ),
    > {
        self.shards
            .iter()
            .zip(before.shards.iter())
            .filter(|(now, old)| !Arc::ptr_eq(now, old))
            .flat_map(|(now, old)| {
                let changed = now.table.iter().filter_map(move |(k, v)| {
                    let prev = old.table.find(hash(k), |(o, _)| o == k).map(|(_, p)| p);
                    match prev {
                        Some(p) if Arc::ptr_eq(p, v) => None,
                        _ => Some((k, prev, Some(v))),
                    }
                });
                let gone = old.table.iter().filter_map(move |(k, v)| {
                    now.table
                        .find(hash(k), |(n, _)| n == k)
                        .is_none()
                        .then_some((k, Some(v), None))
                });
                changed.chain(gone)
            })
    }
}

impl FromIterator<(Arc<str>, Arc<Service>)> for ServiceMap {
    fn from_iter<I: IntoIterator<Item = (Arc<str>, Arc<Service>)>>(iter: I) -> Self {
        let mut map = ServiceMap::default();
        for (k, v) in iter {
            map.insert(k, v);
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::ServiceSettings;

    fn svc(name: &str) -> Arc<Service> {
        Arc::new(Service::new(
            name.into(),
            Vec::new(),
            0,
            &ServiceSettings::default(),
        ))
    }

    fn map(n: usize) -> ServiceMap {
        (0..n)
            .map(|i| {
                let name = format!("svc-{i}");
                (Arc::from(name.as_str()), svc(&name))
            })
            .collect()
    }

    #[test]
    fn insert_get_remove_keep_len() {
        let mut m = map(1000);
        assert_eq!(m.len(), 1000);
        assert_eq!(m.iter().count(), 1000);
        assert_eq!(m.get("svc-7").map(|s| &*s.name), Some("svc-7"));
        assert!(m.get("svc-1000").is_none());
        let (k, _) = m.get_key_value("svc-9").expect("svc-9 is in the map");
        assert_eq!(&**k, "svc-9");
        assert!(m.insert("svc-7".into(), svc("svc-7")).is_some(), "replaced");
        assert_eq!(m.len(), 1000);
        assert!(m.remove("svc-7").is_some());
        assert!(m.remove("svc-7").is_none());
        assert!(!m.contains_key("svc-7"));
        assert_eq!(m.len(), 999);
        assert_eq!(m.values().count(), 999);
    }

    #[test]
    fn a_write_copies_one_shard_and_leaves_the_original_alone() {
        let before = map(5000);
        let mut after = before.clone();
        let shared = |a: &ServiceMap, b: &ServiceMap| {
            a.shards
                .iter()
                .zip(b.shards.iter())
                .filter(|(x, y)| Arc::ptr_eq(x, y))
                .count()
        };
        assert_eq!(shared(&before, &after), SHARDS);
        after.insert("new".into(), svc("new"));
        after.remove("svc-1");
        assert!(
            shared(&before, &after) >= SHARDS - 2,
            "at most two shards copied"
        );
        assert!(before.contains_key("svc-1") && !before.contains_key("new"));
        assert!(!after.contains_key("svc-1") && after.contains_key("new"));
        assert_eq!((before.len(), after.len()), (5000, 5000));
        // removing an absent name copies nothing
        let mut again = before.clone();
        assert!(again.remove("absent").is_none());
        assert_eq!(shared(&before, &again), SHARDS);
    }

    #[test]
    fn changes_lists_added_replaced_and_removed_services_only() {
        let before = map(3000);
        let mut after = before.clone();
        after.insert("added".into(), svc("added"));
        after.insert("svc-10".into(), svc("svc-10"));
        after.remove("svc-20");
        let mut seen: Vec<(String, bool, bool)> = after
            .changes(&before)
            .map(|(k, old, new)| (k.to_string(), old.is_some(), new.is_some()))
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            vec![
                ("added".to_string(), false, true),
                ("svc-10".to_string(), true, true),
                ("svc-20".to_string(), true, false),
            ]
        );
        assert_eq!(before.changes(&before).count(), 0);
        // two maps built separately share no shard, but equal entries are still no change
        let other: ServiceMap = before.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        assert_eq!(other.changes(&before).count(), 0);
    }
}

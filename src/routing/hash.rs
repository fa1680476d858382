//! Consistent hashing for the `hash` policy: requests with the same key (a header, a cookie or
//! the client's IP) go to the same instance, and adding or removing one of N instances moves
//! about 1/N of the keys.
//!
//! A ring hash (ketama): every non-draining instance puts `POINTS × weight` points on a ring of
//! 64-bit hashes of its etcd key (its identity, so the ring does not depend on addresses or on
//! the order of registration); a key goes to the owner of the first point at or after its hash.
//! An unusable instance (unhealthy, ejected, already tried) is skipped by walking on to the next
//! point: only its own keys move, and they come back when it does. The hashes are our own
//! (FNV-1a, then a 64-bit finalizer), stable across processes and releases, so several proxies
//! agree on where a key goes.

use std::sync::Arc;

use super::Instance;

/// Points per unit of weight (weights above 100 count as 100), while the ring stays within
/// [`MAX_POINTS`].
const POINTS: u64 = 160;

/// Points on one ring at most (4 MiB, sorted in a few ms on every change of the service): a
/// service with more than 1,638 units of weight gets fewer points per unit (at least one), so a
/// very large service costs bounded memory and rebuild time at the price of less even shares.
const MAX_POINTS: u64 = 1 << 18;

/// The values of one header field in a request (rarely more than two).
pub type Values<'a> = smallvec::SmallVec<[&'a [u8]; 2]>;

/// What a `hash` policy hashes (`hash_on`): `"header:<name>"`, `"cookie:<name>"` or
/// `"client_ip"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    Header(Box<str>),
    Cookie(Box<str>),
    ClientIp,
}

impl HashOn {
    /// From the config value; the error says what is expected.
    pub fn parse(text: &str) -> Result<HashOn, String> {
        let bad =
            || format!("{text:?} is not \"header:<name>\", \"cookie:<name>\" or \"client_ip\"");
        if text == "client_ip" {
            return Ok(HashOn::ClientIp);
        }
        let (kind, name) = text.split_once(':').ok_or_else(bad)?;
        let name = name.trim();
        let token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        match kind {
            "header" if token => Ok(HashOn::Header(name.to_ascii_lowercase().into())),
            "cookie" if token => Ok(HashOn::Cookie(name.into())),
            _ => Err(bad()),
        }
    }

    /// The key of one request: `header(name)` gives the values of a header field (any case of
    /// the name), `client_ip` the client's address. None: the request has no such key (it is
    /// balanced as by `random`).
    pub fn key<'a>(&self, header: impl Fn(&str) -> Values<'a>, client_ip: &str) -> Option<u64> {
        match self {
            HashOn::ClientIp => Some(hash(client_ip.as_bytes())),
            HashOn::Header(name) => header(name).first().map(|v| hash(v)),
            HashOn::Cookie(name) => header("cookie")
                .into_iter()
                .flat_map(|v| v.split(|b| *b == b';'))
                .find_map(|pair| {
                    let pair = pair.trim_ascii();
                    let eq = pair.iter().position(|b| *b == b'=')?;
                    (pair[..eq].trim_ascii() == name.as_bytes())
                        .then(|| hash(pair[eq + 1..].trim_ascii()))
                }),
        }
    }
}

/// FNV-1a over `bytes`, then a finalizer (splitmix64) that spreads close keys over the ring.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The ring of one service's snapshot: (point, index into the service's instances), sorted.
#[derive(Debug, Default)]
pub struct Ring {
    points: Box<[(u64, u32)]>,
}

impl Ring {
    pub fn new(instances: &[Arc<Instance>]) -> Ring {
        let weight = |i: &Instance| i.weight.min(100) as u64;
        let units: u64 = instances.iter().map(|i| weight(i)).sum();
        let per_unit = (MAX_POINTS / units.max(1)).clamp(1, POINTS);
        let mut points = Vec::with_capacity((units * per_unit) as usize);
        for (idx, inst) in instances.iter().enumerate() {
            if inst.draining() {
                continue;
            }
            let base = hash(inst.key.as_bytes());
            let n = per_unit * weight(inst);
            points.extend((0..n).map(|i| (mix(base ^ mix(i + 1)), idx as u32)));
        }
        points.sort_unstable();
        Ring {
            points: points.into_boxed_slice(),
        }
    }

    /// The instance index for `key`: the owner of the first point at or after it that `accept`
    /// takes (each instance is asked once). None when it takes none.
    pub fn find(&self, key: u64, mut accept: impl FnMut(usize) -> bool) -> Option<usize> {
        let n = self.points.len();
        if n == 0 {
            return None;
        }
        let start = self.points.partition_point(|(p, _)| *p < key);
        let mut refused: smallvec::SmallVec<[u32; 8]> = smallvec::SmallVec::new();
        for step in 0..n {
            let (_, idx) = self.points[(start + step) % n];
            if refused.contains(&idx) {
                continue;
            }
            if accept(idx as usize) {
                return Some(idx as usize);
            }
            refused.push(idx);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Health;

    fn insts(names: &[&str]) -> Vec<Arc<Instance>> {
        names
            .iter()
            .map(|n| Instance::for_test(n, 1, Health::Healthy))
            .collect()
    }

    fn owners(ring: &Ring, instances: &[Arc<Instance>], keys: u64) -> Vec<String> {
        (0..keys)
            .map(|k| {
                let i = ring.find(hash(&k.to_le_bytes()), |_| true).unwrap();
                instances[i].key.to_string()
            })
            .collect()
    }

    #[test]
    fn removing_one_of_five_moves_only_its_keys_and_about_a_fifth() {
        let five = insts(&["/s/a", "/s/b", "/s/c", "/s/d", "/s/e"]);
        let four: Vec<_> = five.iter().filter(|i| &*i.key != "/s/c").cloned().collect();
        let before = owners(&Ring::new(&five), &five, 10_000);
        let after = owners(&Ring::new(&four), &four, 10_000);
        let moved: Vec<usize> = (0..before.len())
            .filter(|i| before[*i] != after[*i])
            .collect();
        assert!(
            moved.iter().all(|i| before[*i] == "/s/c"),
            "only the removed instance's keys move"
        );
        let share = moved.len() as f64 / before.len() as f64;
        assert!((0.15..=0.25).contains(&share), "moved {share}");
    }

    #[test]
    fn an_unusable_instance_is_skipped_without_moving_other_keys() {
        let five = insts(&["/s/a", "/s/b", "/s/c", "/s/d", "/s/e"]);
        let ring = Ring::new(&five);
        let before = owners(&ring, &five, 5000);
        let skipping: Vec<String> = (0..5000u64)
            .map(|k| {
                let i = ring
                    .find(hash(&k.to_le_bytes()), |i| &*five[i].key != "/s/b")
                    .unwrap();
                five[i].key.to_string()
            })
            .collect();
        for (b, s) in before.iter().zip(&skipping) {
            if b != "/s/b" {
                assert_eq!(b, s);
            } else {
                assert_ne!(s, "/s/b");
            }
        }
        assert!(ring.find(1, |_| false).is_none());
    }

    #[test]
    fn a_large_service_gets_a_bounded_ring() {
        let many: Vec<_> = (0..5000)
            .map(|i| Instance::for_test(&format!("/s/{i}"), 1, Health::Healthy))
            .collect();
        let ring = Ring::new(&many);
        assert!(
            ring.points.len() as u64 <= MAX_POINTS,
            "{}",
            ring.points.len()
        );
        assert!(ring.points.len() >= 5000, "one point each at least");
    }

    #[test]
    fn weights_set_the_shares_and_draining_instances_own_nothing() {
        let mut v = insts(&["/s/a"]);
        v.push(Instance::for_test("/s/b", 3, Health::Healthy));
        v.push(Instance::for_test("/s/c", 0, Health::Healthy));
        let ring = Ring::new(&v);
        let o = owners(&ring, &v, 8000);
        let b = o.iter().filter(|k| *k == "/s/b").count() as f64 / 8000.0;
        assert!((0.68..=0.82).contains(&b), "weight 3 of 4: {b}");
        assert!(!o.iter().any(|k| k == "/s/c"));
    }

    #[test]
    fn keys_come_from_a_header_a_cookie_or_the_client_ip() {
        let headers = [
            ("x-user", &b"alice"[..]),
            ("cookie", b"theme=dark; session=abc123"),
        ];
        let lookup = |name: &str| -> Values<'_> {
            (headers.iter())
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
                .collect()
        };
        let on = |s: &str| HashOn::parse(s).unwrap();
        assert_eq!(
            on("header:X-User").key(lookup, "1.2.3.4"),
            Some(hash(b"alice"))
        );
        assert_eq!(
            on("cookie:session").key(lookup, "1.2.3.4"),
            Some(hash(b"abc123"))
        );
        assert_eq!(on("cookie:none").key(lookup, "1.2.3.4"), None);
        assert_eq!(on("header:x-other").key(lookup, "1.2.3.4"), None);
        assert_eq!(
            on("client_ip").key(lookup, "1.2.3.4"),
            Some(hash(b"1.2.3.4"))
        );
        for bad in ["header:", "ip", "cookie:a b", "query:x"] {
            assert!(HashOn::parse(bad).is_err(), "{bad}");
        }
    }
}

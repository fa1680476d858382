//! switchyard's own addresses: its listeners and its etcd endpoints.
//!
//! An instance registered at one of them would make the proxy a door to itself: a registration at
//! the admin port serves `/metrics` and `/api/registry` through the proxy port, one at etcd's
//! client port makes etcd's API writable through the proxy, and one at the proxy's own port makes
//! a request recurse until the process runs out of file descriptors. Such a registration is
//! refused like any other invalid one (counted, logged with its key, shown with the reason).
//!
//! A listener bound to `0.0.0.0` or `[::]` is reached at every local address of its port, so an
//! instance at any local address (loopback, an interface's address, `0.0.0.0` itself) and that
//! port is refused. An etcd endpoint at a local address is treated the same way: etcd on this host
//! may listen on all of them.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// One address of switchyard itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnAddress {
    /// What listens there, for the refusal's reason: "proxy listener", "etcd endpoint".
    pub what: String,
    pub addr: SocketAddr,
    /// Not bound by us (etcd): when `addr` is local, the server may listen on every local
    /// address of the port.
    pub not_ours: bool,
}

impl OwnAddress {
    /// A listener of ours, bound to exactly `addr`.
    pub fn listener(what: impl Into<String>, addr: SocketAddr) -> Self {
        OwnAddress {
            what: what.into(),
            addr,
            not_ours: false,
        }
    }

    /// An endpoint of a server we use (etcd), whose bind address we do not know.
    pub fn endpoint(what: impl Into<String>, addr: SocketAddr) -> Self {
        OwnAddress {
            not_ours: true,
            ..OwnAddress::listener(what, addr)
        }
    }
}

impl fmt::Display for OwnAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.what, self.addr)
    }
}

/// Is this IP one of this host's addresses?
pub type IsLocal = Box<dyn Fn(IpAddr) -> bool + Send + Sync>;

/// The addresses an instance may not have.
pub struct OwnAddresses {
    entries: Vec<OwnAddress>,
    is_local: IsLocal,
    /// Answers of `is_local` (a bind per address): a list of 100,000 instances at the proxy's
    /// port asks once per address. Cleared at every full list, so an address this host gains
    /// later is seen then.
    local: HashMap<IpAddr, bool>,
}

impl Default for OwnAddresses {
    fn default() -> Self {
        OwnAddresses::new(Vec::new())
    }
}

impl fmt::Debug for OwnAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.entries).finish()
    }
}

impl OwnAddresses {
    /// Checks local addresses against this host's interfaces.
    pub fn new(entries: Vec<OwnAddress>) -> Self {
        OwnAddresses::with_is_local(entries, Box::new(host_has_address))
    }

    /// With another notion of "local" (unit tests).
    pub fn with_is_local(entries: Vec<OwnAddress>, is_local: IsLocal) -> Self {
        OwnAddresses {
            entries,
            is_local,
            local: HashMap::new(),
        }
    }

    /// Forgets which addresses were found local (the host's addresses may have changed).
    pub fn forget_local_addresses(&mut self) {
        self.local.clear();
    }

    pub fn add(&mut self, own: OwnAddress) {
        if !self.entries.contains(&own) {
            self.entries.push(own);
        }
    }

    pub fn entries(&self) -> &[OwnAddress] {
        &self.entries
    }

    /// The own address `addr` would reach, if any.
    pub fn refuses(&mut self, addr: SocketAddr) -> Option<&OwnAddress> {
        let ip = canonical(addr.ip());
        // an address at none of our ports is the common case: no local-address check for it
        let n = (0..self.entries.len()).find(|&n| {
            let e = &self.entries[n];
            if e.addr.port() != addr.port() {
                return false;
            }
            let (own, not_ours) = (canonical(e.addr.ip()), e.not_ours);
            // reached at every local address of the port
            let everywhere = own.is_unspecified() || (not_ours && self.local(own));
            own == ip
                // connecting to 0.0.0.0 or [::] reaches this host's loopback
                || (ip.is_unspecified() && (everywhere || own.is_loopback()))
                || (everywhere && self.local(ip))
        })?;
        self.entries.get(n)
    }

    fn local(&mut self, ip: IpAddr) -> bool {
        if ip.is_loopback() || ip.is_unspecified() {
            return true;
        }
        let is_local = &self.is_local;
        *self.local.entry(ip).or_insert_with(|| is_local(ip))
    }
}

/// `::ffff:10.0.0.1` is `10.0.0.1`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Binding a socket to an address succeeds only for this host's own addresses (no packet is
/// sent). Interfaces added later are seen at once, with no list to keep fresh.
pub fn host_has_address(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn own(entries: &[(&str, &str)]) -> OwnAddresses {
        let entries = entries
            .iter()
            .map(|(what, a)| match *what {
                "etcd endpoint" => OwnAddress::endpoint(*what, sa(a)),
                _ => OwnAddress::listener(*what, sa(a)),
            })
            .collect();
        // this "host" has 10.0.0.5 and fd00::5 besides loopback
        OwnAddresses::with_is_local(
            entries,
            Box::new(|ip| ip == sa("10.0.0.5:1").ip() || ip == sa("[fd00::5]:1").ip()),
        )
    }

    #[test]
    fn a_specific_listener_is_refused_at_its_address_only() {
        let mut o = own(&[("admin listener", "127.0.0.1:9090")]);
        assert_eq!(
            o.refuses(sa("127.0.0.1:9090")).map(|e| e.what.as_str()),
            Some("admin listener")
        );
        assert!(
            o.refuses(sa("0.0.0.0:9090")).is_some(),
            "0.0.0.0 connects locally"
        );
        assert!(o.refuses(sa("[::ffff:127.0.0.1]:9090")).is_some());
        assert!(o.refuses(sa("127.0.0.1:9091")).is_none());
        assert!(o.refuses(sa("10.0.0.9:9090")).is_none(), "another host");
        assert!(
            o.refuses(sa("10.0.0.5:9090")).is_none(),
            "a local address the listener is not bound to"
        );
    }

    #[test]
    fn a_wildcard_listener_is_refused_at_every_local_address() {
        let mut o = own(&[("proxy listener", "0.0.0.0:8080"), ("tls", "[::]:8443")]);
        for a in [
            "127.0.0.1:8080",
            "127.0.0.2:8080",
            "10.0.0.5:8080",
            "0.0.0.0:8080",
            "[::1]:8080",
            "[fd00::5]:8443",
            "[::ffff:10.0.0.5]:8443",
        ] {
            assert!(o.refuses(sa(a)).is_some(), "{a} is this host");
        }
        for a in ["10.0.0.6:8080", "[fd00::6]:8443", "127.0.0.1:8081"] {
            assert!(
                o.refuses(sa(a)).is_none(),
                "{a} is not this host's listener"
            );
        }
    }

    #[test]
    fn a_local_etcd_endpoint_is_refused_at_every_local_address_of_its_port() {
        let mut o = own(&[("etcd endpoint", "127.0.0.1:2379")]);
        assert!(o.refuses(sa("10.0.0.5:2379")).is_some());
        assert!(o.refuses(sa("10.0.0.6:2379")).is_none());
        let mut remote = own(&[("etcd endpoint", "10.0.0.7:2379")]);
        assert!(remote.refuses(sa("10.0.0.7:2379")).is_some());
        assert!(remote.refuses(sa("127.0.0.1:2379")).is_none());
    }

    #[test]
    fn each_address_is_checked_once_until_forgotten() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        let mut o = OwnAddresses::with_is_local(
            vec![OwnAddress::listener("proxy listener", sa("0.0.0.0:8080"))],
            Box::new(move |_| {
                counter.fetch_add(1, Ordering::Relaxed);
                false
            }),
        );
        for _ in 0..1000 {
            assert!(o.refuses(sa("10.0.0.9:8080")).is_none());
        }
        assert_eq!(asked.load(Ordering::Relaxed), 1);
        o.forget_local_addresses();
        assert!(o.refuses(sa("10.0.0.9:8080")).is_none());
        assert_eq!(asked.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn loopback_and_unspecified_are_always_local() {
        assert!(host_has_address(sa("127.0.0.1:0").ip()));
        assert!(
            !host_has_address(sa("192.0.2.77:0").ip()),
            "TEST-NET-1 is nobody's"
        );
    }
}

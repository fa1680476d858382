//! The routing snapshot: everything a request needs, behind one `ArcSwap`.
//!
//! A [`RoutingTable`] is immutable once published. The registry builds a new one for every applied
//! change and swaps it in whole; a request does one `load()` and sees a consistent table.
//! [`Instance`]s are shared between snapshots through their [`InstanceState`], which is keyed by the
//! instance's etcd key and therefore survives rebuilds, weight and metadata changes.

pub mod route;
pub mod select;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::registry::codec::HostPort;
pub use route::{RouteMatch, Router};
pub use select::{Policy, Selector};

/// Health of an instance, stored in an atomic inside [`InstanceState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Registered, not yet probed; gets no traffic while admission is gated.
    Pending = 0,
    Healthy = 1,
    Unhealthy = 2,
}

impl Health {
    fn from_u8(v: u8) -> Health {
        match v {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Pending,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Pending => "pending",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// Identity-stable state of one instance (one etcd key). Shared by every snapshot that contains
/// the key, and by the health checker.
#[derive(Debug)]
pub struct InstanceState {
    health: AtomicU8,
    /// Requests currently being proxied to this instance.
    pub inflight: AtomicUsize,
    /// Requests sent to this instance since it was registered.
    pub requests: AtomicU64,
    /// Consecutive connection failures seen by the proxy (passive detection).
    pub connect_failures: AtomicU64,
}

impl InstanceState {
    pub fn new(initial: Health) -> Self {
        InstanceState {
            health: AtomicU8::new(initial as u8),
            inflight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
        }
    }

    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
    }

    /// Sets the health and returns the previous value.
    pub fn set_health(&self, health: Health) -> Health {
        Health::from_u8(self.health.swap(health as u8, Ordering::Relaxed))
    }
}

/// One registered instance as of one snapshot.
#[derive(Debug)]
pub struct Instance {
    /// Full etcd key: the instance's identity.
    pub key: Arc<str>,
    /// Instance id (the key's last part).
    pub id: Arc<str>,
    /// Address as registered (IP or DNS name).
    pub registered: HostPort,
    /// Resolved socket address we connect to.
    pub addr: SocketAddr,
    /// 0 = draining.
    pub weight: u32,
    pub metadata: BTreeMap<String, String>,
    pub state: Arc<InstanceState>,
}

impl Instance {
    /// Can this instance take a new request?
    #[inline]
    pub fn usable(&self) -> bool {
        self.weight > 0 && self.state.health() == Health::Healthy
    }

    pub fn draining(&self) -> bool {
        self.weight == 0
    }
}

/// Per-service settings that the snapshot carries (from config).
#[derive(Debug, Clone, Default)]
pub struct ServiceSettings {
    pub policy: Policy,
}

/// One service in one snapshot: its instances and selection state.
#[derive(Debug)]
pub struct Service {
    pub name: Arc<str>,
    /// Instances sorted by key (stable order for selection and display).
    pub instances: Vec<Arc<Instance>>,
    /// Registrations under this service that could not be decoded.
    pub invalid: usize,
    pub selector: Selector,
}

impl Service {
    pub fn new(
        name: Arc<str>,
        mut instances: Vec<Arc<Instance>>,
        invalid: usize,
        settings: &ServiceSettings,
    ) -> Self {
        instances.sort_by(|a, b| a.key.cmp(&b.key));
        let selector = Selector::new(settings.policy, &instances);
        Service {
            name,
            instances,
            invalid,
            selector,
        }
    }

    /// Picks an instance for a new request, skipping the ones in `exclude` (already tried).
    pub fn select(&self, exclude: &[Arc<str>]) -> Option<Arc<Instance>> {
        self.selector.select(&self.instances, exclude)
    }

    pub fn usable_count(&self) -> usize {
        self.instances.iter().filter(|i| i.usable()).count()
    }

    /// A short reason why the service has no usable instance, for 503 bodies.
    pub fn unavailable_reason(&self) -> String {
        if self.instances.is_empty() {
            if self.invalid > 0 {
                return format!(
                    "no valid instance registered ({} invalid registration(s))",
                    self.invalid
                );
            }
            return "no instance registered".to_string();
        }
        let draining = self.instances.iter().filter(|i| i.draining()).count();
        let unhealthy = self.instances.len() - draining;
        format!(
            "no usable instance ({} registered: {draining} draining, {unhealthy} not healthy)",
            self.instances.len()
        )
    }
}

/// The immutable routing snapshot.
#[derive(Debug, Default)]
pub struct RoutingTable {
    pub services: HashMap<Arc<str>, Arc<Service>>,
    /// etcd revision this snapshot reflects.
    pub revision: i64,
}

impl RoutingTable {
    #[inline]
    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.get(name)
    }

    pub fn instance_count(&self) -> usize {
        self.services.values().map(|s| s.instances.len()).sum()
    }
}

/// Shared handle to the current snapshot.
pub type SharedTable = Arc<ArcSwap<RoutingTable>>;

pub fn new_shared_table() -> SharedTable {
    Arc::new(ArcSwap::from_pointee(RoutingTable::default()))
}

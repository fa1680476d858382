//! DNS names of registered instances, resolved off the registry task.
//!
//! ```text
//!  registry task: catalog + Names                      resolver task (one lookup task per name)
//!    put "db.internal:5432" ─ cached ─▶ routed at the cached address
//!          └─ not yet ─▶ pending (not routed, not invalid) ── name ──▶ lookup, dns_timeout
//!    Update::Resolved { names } ◀──────────────────────────────────────── addresses or error
//!    every dns_refresh: every name in use ─────────────────────────────▶
//! ```
//!
//! A lookup never runs on the registry task, so a silent DNS server delays nothing else (an IP
//! registration is routed while names wait). A name that resolved once keeps its last good
//! addresses while later lookups fail (SERVFAIL, timeouts): its instances keep routing, and the
//! name is listed as failing (`/api/registry`, the status page,
//! `switchyard_registry_dns_failing_names`). A re-list uses the cache: it never resolves again.
//! A name that never resolved makes its registrations invalid until it does.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tokio::sync::{mpsc, Semaphore};
use tracing::{info, warn};

use crate::metrics::METRICS;

/// Lookups at once; more names wait for a slot (a refresh of thousands of names does not start
/// thousands of blocking resolver threads).
const LOOKUP_CONCURRENCY: usize = 32;

/// Why a name did not resolve. Cloned into updates, so the resolver's error is kept as text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("cannot resolve {host}: {reason}")]
    Failed { host: String, reason: String },
    #[error("{host} resolved to no address")]
    NoAddress { host: String },
    #[error("resolving {host} timed out after {after:?}")]
    Timeout { host: String, after: Duration },
}

/// The answer for one name.
pub type Resolved = (String, Result<Vec<IpAddr>, DnsError>);

/// Resolves a host name to its addresses.
pub trait Lookup: Send + Sync + 'static {
    fn lookup(&self, host: String) -> BoxFuture<'static, Result<Vec<IpAddr>, DnsError>>;
}

/// The system resolver (getaddrinfo on tokio's blocking pool).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup(&self, host: String) -> BoxFuture<'static, Result<Vec<IpAddr>, DnsError>> {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| DnsError::Failed {
                    host: host.clone(),
                    reason: e.to_string(),
                })?;
            let ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
            if ips.is_empty() {
                return Err(DnsError::NoAddress { host });
            }
            Ok(ips)
        })
    }
}

/// Where the catalog sends names to resolve.
#[derive(Debug, Clone)]
pub struct Requests(Option<mpsc::UnboundedSender<String>>);

impl Requests {
    /// Names are never resolved (benchmarks, catalogs of IP registrations).
    pub fn detached() -> Self {
        Requests(None)
    }

    /// Requests and the receiver a resolver task (or a test) reads them from.
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Requests(Some(tx)), rx)
    }

    fn send(&self, host: &str) -> bool {
        self.0
            .as_ref()
            .is_some_and(|tx| tx.send(host.to_string()).is_ok())
    }
}

/// Runs until `requests` closes: each name is looked up in a task of its own, bounded by
/// `timeout` (getaddrinfo itself cannot be cancelled; its thread finishes in the background).
pub async fn resolve_requests(
    mut requests: mpsc::UnboundedReceiver<String>,
    results: mpsc::UnboundedSender<Resolved>,
    lookup: Arc<dyn Lookup>,
    timeout: Duration,
) {
    let slots = Arc::new(Semaphore::new(LOOKUP_CONCURRENCY));
    while let Some(host) = requests.recv().await {
        let (lookup, results, slots) = (lookup.clone(), results.clone(), slots.clone());
        tokio::spawn(async move {
            let Ok(_slot) = slots.acquire_owned().await else {
                return;
            };
            let answer = match tokio::time::timeout(timeout, lookup.lookup(host.clone())).await {
                Ok(answer) => answer,
                Err(_) => Err(DnsError::Timeout {
                    host: host.clone(),
                    after: timeout,
                }),
            };
            // the registry has stopped when this fails: nobody is waiting for the answer
            let _ = results.send((host, answer));
        });
    }
}

/// What the catalog can route to for a name now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Ready(IpAddr),
    /// Asked, no answer yet.
    Pending,
    /// Never resolved: the registration is invalid for now.
    Failed(String),
}

/// A name that does not resolve now, for the status page and `/api/registry`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailingName {
    pub name: String,
    pub since: SystemTime,
    pub error: String,
    /// The address still routed (resolved before), if any.
    pub last_good: Option<IpAddr>,
}

#[derive(Debug, Default)]
struct NameState {
    /// The address routed: the first IPv4 address of the last good answer, else its first.
    last_good: Option<IpAddr>,
    failing: Option<(SystemTime, DnsError)>,
    in_flight: bool,
    /// Keys registered with this name, and their values (re-applied when the answer changes).
    users: BTreeMap<Arc<str>, Vec<u8>>,
}

/// The names in use by registrations, their last answers, and who uses them. Owned by the
/// catalog (the registry task).
#[derive(Debug)]
pub struct Names {
    names: HashMap<String, NameState>,
    /// The name each key uses.
    key_name: HashMap<Arc<str>, String>,
    requests: Requests,
}

impl Names {
    pub fn new(requests: Requests) -> Self {
        Names {
            names: HashMap::new(),
            key_name: HashMap::new(),
            requests,
        }
    }

    /// `key` (with `value`) uses `host`; what to route it to now. Asks the resolver for a name
    /// not seen before.
    pub fn address(&mut self, key: &Arc<str>, value: &[u8], host: &str) -> Address {
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.forget(key);
            return Address::Ready(ip);
        }
        if self.key_name.get(key).is_some_and(|h| h != host) {
            self.forget(key);
        }
        self.key_name.insert(key.clone(), host.to_string());
        let state = self.names.entry(host.to_string()).or_default();
        state.users.insert(key.clone(), value.to_vec());
        if let Some(ip) = state.last_good {
            return Address::Ready(ip);
        }
        if let Some((_, e)) = &state.failing {
            return Address::Failed(e.to_string());
        }
        if !state.in_flight {
            state.in_flight = self.requests.send(host);
        }
        Address::Pending
    }

    /// `key` no longer uses a name (deleted, or registered by another address).
    pub fn forget(&mut self, key: &Arc<str>) {
        let Some(host) = self.key_name.remove(key) else {
            return;
        };
        if let Some(state) = self.names.get_mut(&host) {
            state.users.remove(key);
            if state.users.is_empty() {
                self.names.remove(&host);
            }
        }
    }

    /// Does `key` use a name (routed, pending or failed)?
    pub fn keys(&self) -> impl Iterator<Item = &Arc<str>> {
        self.key_name.keys()
    }

    /// Applies an answer; returns the registrations to apply again (their address changed, or
    /// their name resolved or failed for the first time).
    pub fn resolved(
        &mut self,
        host: &str,
        answer: Result<Vec<IpAddr>, DnsError>,
    ) -> Vec<(Arc<str>, Vec<u8>)> {
        let Some(state) = self.names.get_mut(host) else {
            // nobody uses it any more
            return Vec::new();
        };
        state.in_flight = false;
        let changed = match answer {
            Ok(ips) => {
                let pick = ips.iter().find(|ip| ip.is_ipv4()).or(ips.first()).copied();
                if let Some((since, e)) = state.failing.take() {
                    info!(name = %host, addr = ?pick, failing_since = %super::rfc3339(since), error = %e, "name resolves again");
                }
                let changed = pick.is_some() && pick != state.last_good;
                if changed && state.last_good.is_some() {
                    info!(name = %host, old = ?state.last_good, new = ?pick, "name resolves to a new address");
                }
                state.last_good = pick.or(state.last_good);
                changed
            }
            Err(e) => {
                METRICS.registry_dns_failures.inc();
                let first = state.failing.is_none();
                if first {
                    match state.last_good {
                        Some(ip) => {
                            warn!(name = %host, error = %e, keeping = %ip, "name stopped resolving; keeping its last good address")
                        }
                        None => warn!(name = %host, error = %e, "name does not resolve"),
                    }
                    state.failing = Some((SystemTime::now(), e));
                } else if let Some((_, last)) = state.failing.as_mut() {
                    *last = e;
                }
                // instances routed at the last good address stay; one that never resolved
                // becomes invalid (once)
                first && state.last_good.is_none()
            }
        };
        if !changed {
            return Vec::new();
        }
        state
            .users
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Asks the resolver again for every name in use (the refresh timer).
    pub fn refresh(&mut self) {
        for (host, state) in &mut self.names {
            if !state.in_flight {
                state.in_flight = self.requests.send(host);
            }
        }
    }

    /// Names that do not resolve now.
    pub fn failing(&self) -> Vec<FailingName> {
        let mut out: Vec<FailingName> = self
            .names
            .iter()
            .filter_map(|(name, s)| {
                let (since, e) = s.failing.as_ref()?;
                Some(FailingName {
                    name: name.clone(),
                    since: *since,
                    error: e.to_string(),
                    last_good: s.last_good,
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "slow.test" never answers; every other name answers at once.
    struct SilentForOne;
    impl Lookup for SilentForOne {
        fn lookup(&self, host: String) -> BoxFuture<'static, Result<Vec<IpAddr>, DnsError>> {
            Box::pin(async move {
                if host == "slow.test" {
                    std::future::pending::<()>().await;
                }
                Ok(vec![IpAddr::from([127, 0, 0, 7])])
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_name_delays_no_other_and_times_out() {
        let (requests, asked) = Requests::channel();
        let (answers_tx, mut answers) = mpsc::unbounded_channel();
        let timeout = Duration::from_secs(5);
        tokio::spawn(resolve_requests(
            asked,
            answers_tx,
            Arc::new(SilentForOne),
            timeout,
        ));
        let started = tokio::time::Instant::now();
        assert!(requests.send("slow.test"));
        assert!(requests.send("fast.test"));
        let (host, answer) = answers.recv().await.unwrap();
        assert_eq!(host, "fast.test");
        assert_eq!(answer, Ok(vec![IpAddr::from([127, 0, 0, 7])]));
        assert!(started.elapsed() < Duration::from_secs(1));
        let (host, answer) = answers.recv().await.unwrap();
        assert_eq!(host, "slow.test");
        assert!(
            matches!(answer, Err(DnsError::Timeout { .. })),
            "{answer:?}"
        );
        assert!(started.elapsed() >= timeout);
    }

    #[tokio::test]
    async fn the_system_resolver_answers_localhost_and_fails_an_invalid_name() {
        let ips = SystemLookup.lookup("localhost".into()).await.unwrap();
        assert!(ips.iter().all(|ip| ip.is_loopback()), "{ips:?}");
        let err = tokio::time::timeout(
            Duration::from_secs(30),
            SystemLookup.lookup("no-such-name.invalid".into()),
        )
        .await;
        if let Ok(answer) = err {
            assert!(answer.is_err(), "{answer:?}");
        }
    }
}

//! The registry: one task that lists and watches etcd and publishes routing snapshots.
//!
//! ```text
//! connect ─▶ list prefix at R ─▶ Update::Reset ─▶ watch prefix from R+1 ─▶ Update::Batch per response
//!    ▲                 ▲                                  │
//!    │                 └── compaction / resync timer ◀────┤
//!    └── error: keep the last snapshot, back off (capped, jittered), then list again ◀──┘
//! ```
//!
//! Every update is applied to the [`Catalog`] and published as one `ArcSwap` store. Readiness is a
//! latch set after the first complete list. DNS names of registrations are resolved by a task of
//! their own ([`dns`]) whose answers arrive as `Update::Resolved`; addresses that are switchyard
//! itself are refused ([`own`]).
//!
//! The registry talks to one endpoint at a time and moves to the next after every failure, with a
//! fresh client ([`endpoints`] says why). A hung member costs one keep-alive timeout (a PING 5 s
//! after its last frame, 3 s to answer) or one request timeout, then the next endpoint is asked.
//!
//! Every new watch follows a list: a watch that broke is never resumed from its old revision. A
//! resumed watch trusts that the member still holds the same history (a wiped etcd that was
//! re-registered past our revision does not), and its catch-up message can grow without bound
//! (the events of a long partition). A list is one consistent view at one revision, diffed
//! against the catalog, so instance state survives it.
//!
//! The watch counts as delivering (`connected`) once etcd has confirmed it: at once when it was
//! created at the revision just listed, else after its first response or
//! [`WATCH_CONFIRM`] without an error. Until then the registry is stale: `/api/registry` and
//! `/readyz` say since when. The reconnect backoff is reset only by a watch that delivered for
//! [`STABLE_WATCH`] before it broke: a watch that is created and fails again and again (a
//! "created" reply alone proves nothing) makes the backoff grow.

pub mod catalog;
pub(crate) mod codec;
pub mod dns;
pub(crate) mod endpoints;
pub(crate) mod own;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

pub use catalog::{Catalog, Change, Update};
pub use dns::{FailingName, Lookup, SystemLookup};
pub use own::{OwnAddress, OwnAddresses};

use crate::config::EtcdConfig;
use crate::events::RECENT;
use crate::metrics::METRICS;
use crate::routing::{Health, ServiceSettings, SharedTable};
use crate::sync::lock;
use endpoints::{ConnectError, Dial, Endpoints};

/// Keys per page when listing the prefix; a page larger than [`MAX_MESSAGE_BYTES`] (big values)
/// is asked again with a quarter of the keys, down to one.
const LIST_PAGE: i64 = 2_000;
/// Largest list page or watch response accepted (a page of big values, the events of one
/// revision); gRPC's default is 4 MiB.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// A watch created behind the store's revision (writes landed between the list and the watch)
/// counts as delivering after this long without an error, or at its first response.
pub const WATCH_CONFIRM: Duration = Duration::from_secs(1);
/// A watch that delivered at least this long before it broke resets the reconnect backoff; one
/// that breaks sooner (created, then an error, again and again) lets it grow, so a failure that
/// repeats at once costs a list per `etcd.backoff_max_ms`, not one per `backoff_initial_ms`.
pub const STABLE_WATCH: Duration = Duration::from_secs(10);

/// Why talking to etcd failed. The registry keeps routing with its last snapshot either way.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("list of the prefix timed out")]
    ListTimeout,
    #[error("list of the prefix failed: {0}")]
    List(#[source] etcd_client::Error),
}

/// The end of the key range `[prefix, end)` that holds every key starting with `prefix`.
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // all 0xff (or empty): to the end of the keyspace
    vec![0]
}

/// Registry state shared with the admin API and the health checker.
#[derive(Debug, Default)]
pub struct RegistryStatus {
    ready: AtomicBool,
    connected: AtomicBool,
    revision: AtomicI64,
    pub relists: AtomicU64,
    pub reconnects: AtomicU64,
    last_error: Mutex<Option<String>>,
    last_update: Mutex<Option<SystemTime>>,
    /// Since when the watch has not been delivering (broken, or created but not yet confirmed
    /// after a break); `None` while it delivers.
    stale_since: Mutex<Option<SystemTime>>,
    /// Invalid registrations currently in etcd: key and reason.
    invalid: Mutex<Vec<(String, String)>>,
    /// Registered DNS names that do not resolve now.
    dns_failing: Mutex<Vec<FailingName>>,
}

impl RegistryStatus {
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
    #[cfg(test)]
    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Relaxed)
    }
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }
    pub fn last_update(&self) -> Option<SystemTime> {
        *lock(&self.last_update)
    }
    pub fn invalid_entries(&self) -> Vec<(String, String)> {
        lock(&self.invalid).clone()
    }
    /// Registered DNS names that do not resolve now (sorted by name).
    pub fn failing_names(&self) -> Vec<FailingName> {
        lock(&self.dns_failing).clone()
    }
    /// Since when the routed view may lag etcd: the watch broke (or was never confirmed) then.
    pub fn stale_since(&self) -> Option<SystemTime> {
        *lock(&self.stale_since)
    }

    /// `stale since 2026-12-03T06:05:57Z (12 s ago): <last error>` while the watch is not
    /// delivering; `None` while it is.
    pub fn stale_detail(&self) -> Option<String> {
        let since = self.stale_since()?;
        let ago = SystemTime::now()
            .duration_since(since)
            .unwrap_or_default()
            .as_secs();
        let mut text = format!("stale since {} ({ago} s ago)", rfc3339(since));
        if let Some(e) = self.last_error() {
            text.push_str(": ");
            text.push_str(&e);
        }
        Some(text)
    }

    /// The watch stopped delivering: keep the first time it did.
    fn set_stale(&self) {
        lock(&self.stale_since).get_or_insert_with(SystemTime::now);
    }

    fn set_connected(&self, v: bool) {
        self.connected.store(v, Ordering::Relaxed);
        METRICS.registry_connected.set(v as i64);
    }
    fn set_error(&self, e: Option<String>) {
        *lock(&self.last_error) = e;
    }
}

/// `t` as UTC `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, proleptic Gregorian calendar).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

/// Capped exponential backoff with full jitter.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            current: initial,
        }
    }

    pub fn reset(&mut self) {
        self.current = self.initial;
    }

    /// Next delay: uniformly in [current/2, current], then current doubles up to max.
    pub fn next_delay(&mut self) -> Duration {
        let cur = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = cur / 2;
        let jitter = rand::thread_rng().gen_range(0..=half.as_millis().max(1) as u64);
        half + Duration::from_millis(jitter)
    }
}

/// The registry's side of the resolver task.
struct DnsIo {
    answers: mpsc::UnboundedReceiver<dns::Resolved>,
    refresh: tokio::time::Interval,
}

enum DnsEvent {
    /// Every answer waiting: applied as one snapshot.
    Answers(Vec<dns::Resolved>),
    Refresh,
}

impl DnsIo {
    async fn next(&mut self) -> DnsEvent {
        tokio::select! {
            Some(first) = self.answers.recv() => {
                let mut names = vec![first];
                while let Ok(more) = self.answers.try_recv() {
                    names.push(more);
                }
                DnsEvent::Answers(names)
            }
            _ = self.refresh.tick() => DnsEvent::Refresh,
        }
    }
}

/// Why a watch ended.
enum WatchEnd {
    Shutdown,
    /// Re-list: compaction.
    Relist(String),
    /// Re-list: the resync timer (routine, not an event worth recording).
    Resync,
    /// Stream broke: reconnect and resume from the last revision.
    Broken(String),
}

pub struct Registry {
    cfg: EtcdConfig,
    table: SharedTable,
    status: Arc<RegistryStatus>,
    catalog: Catalog,
    /// Bumped after every published snapshot; the health checker follows it.
    generation: watch::Sender<u64>,
    /// Names the catalog wants resolved (taken by the resolver task in `run`).
    dns_requests: Option<mpsc::UnboundedReceiver<String>>,
    lookup: Arc<dyn Lookup>,
    /// Cluster id seen at the last complete list.
    cluster_id: Option<u64>,
    /// Since when the watch has delivered without breaking (re-lists in between); `None` until
    /// one is confirmed after a break.
    delivering_since: Option<Instant>,
    /// The endpoint in use and its client; the next one after every failure.
    etcd: Endpoints,
}

/// How far a watch has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WatchState {
    /// Requested, no "created" reply yet.
    Requested,
    /// Created behind the store's revision: catch-up events may still be on their way.
    Unconfirmed,
    /// Confirmed: it delivers.
    Delivering,
}

impl Registry {
    pub fn new(
        cfg: EtcdConfig,
        table: SharedTable,
        status: Arc<RegistryStatus>,
        pinned: Vec<Arc<str>>,
        settings: Arc<dyn Fn(&str) -> ServiceSettings + Send + Sync>,
        initial_health: Health,
    ) -> Self {
        let (requests, dns_requests) = dns::Requests::channel();
        let catalog = Catalog::new(
            cfg.prefix.clone(),
            pinned,
            settings,
            initial_health,
            requests,
        );
        let (generation, _) = watch::channel(0);
        let etcd = Endpoints::new(
            cfg.endpoints.clone(),
            Dial {
                connect_timeout: cfg.dial_timeout,
                keep_alive_interval: Duration::from_secs(5),
                keep_alive_timeout: Duration::from_secs(3),
                credentials: cfg.credentials.clone(),
            },
        );
        Registry {
            cfg,
            table,
            status,
            catalog,
            generation,
            dns_requests: Some(dns_requests),
            lookup: Arc::new(SystemLookup),
            cluster_id: None,
            delivering_since: None,
            etcd,
        }
    }

    /// Resolves registered names with `lookup` instead of the system resolver.
    pub fn with_lookup(mut self, lookup: Arc<dyn Lookup>) -> Self {
        self.lookup = lookup;
        self
    }

    /// Starts the resolver task; returns the registry's side of it.
    fn start_resolver(&mut self) -> DnsIo {
        let (answers_tx, answers) = mpsc::unbounded_channel();
        if let Some(requests) = self.dns_requests.take() {
            tokio::spawn(dns::resolve_requests(
                requests,
                answers_tx,
                self.lookup.clone(),
                self.cfg.dns_timeout,
            ));
        }
        let period = self.cfg.dns_refresh;
        let mut refresh = tokio::time::interval_at((Instant::now() + period).into(), period);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        DnsIo { answers, refresh }
    }

    fn on_dns(&mut self, event: DnsEvent) {
        match event {
            DnsEvent::Answers(names) => self.publish(Update::Resolved { names }, "dns"),
            DnsEvent::Refresh => self.catalog.refresh_names(),
        }
    }

    /// Refuses instances at these addresses (switchyard's listeners); the etcd endpoints are
    /// added by [`Registry::run`].
    pub fn refusing(mut self, own: impl IntoIterator<Item = OwnAddress>) -> Self {
        for o in own {
            self.catalog.own_addresses_mut().add(o);
        }
        self
    }

    /// Adds the addresses of the etcd endpoints to the refused ones (names resolved off this
    /// task, each within the dial timeout).
    async fn refuse_etcd_endpoints(&mut self) {
        for ep in &self.cfg.endpoints {
            let hostport = ep.split_once("://").map_or(ep.as_str(), |(_, r)| r);
            let hostport = hostport.split('/').next().unwrap_or(hostport);
            let resolved =
                tokio::time::timeout(self.cfg.dial_timeout, tokio::net::lookup_host(hostport))
                    .await;
            match resolved {
                Ok(Ok(addrs)) => {
                    for addr in addrs {
                        let own = OwnAddress::endpoint(format!("etcd endpoint {ep}"), addr);
                        self.catalog.own_addresses_mut().add(own);
                    }
                }
                Ok(Err(e)) => warn!(endpoint = %ep, error = %e,
                    "cannot resolve an etcd endpoint: registrations at it are not refused"),
                Err(_) => warn!(endpoint = %ep,
                    "resolving an etcd endpoint timed out: registrations at it are not refused"),
            }
        }
        debug!(own = ?self.catalog.own_addresses_mut(), "instance addresses refused");
    }

    /// Receiver that changes after every published snapshot.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn status(&self) -> Arc<RegistryStatus> {
        self.status.clone()
    }

    /// Publishes `update` as one snapshot swap.
    fn publish(&mut self, update: Update, kind: &str) {
        let started = Instant::now();
        let current = self.table.load();
        let answers = matches!(update, Update::Resolved { .. });
        let (table, stats) = self.catalog.apply(&current, update);
        if answers && stats == catalog::ApplyStats::default() {
            // a refresh that changed no address (the usual one): no new snapshot
            self.publish_names();
            return;
        }
        let revision = table.revision;
        let table = Arc::new(table);
        self.table.store(table);
        // the health checker first: a new instance's first check waits for this wake-up
        self.generation.send_modify(|g| *g += 1);
        let elapsed = started.elapsed();
        METRICS
            .snapshot_apply_seconds
            .with_label_values(&[kind])
            .observe(elapsed.as_secs_f64());
        METRICS.snapshot_updates.inc();
        METRICS.registry_revision.set(revision);
        METRICS.registry_invalid.inc_by(stats.invalid as u64);
        let invalid: Vec<(String, String)> = self
            .catalog
            .invalid_entries()
            .map(|(k, e)| (k.to_string(), e.reason.clone()))
            .collect();
        METRICS.registry_invalid_current.set(invalid.len() as i64);
        *lock(&self.status.invalid) = invalid;
        self.publish_names();
        let now = SystemTime::now();
        METRICS
            .registry_last_update
            .set((crate::clock::unix_ms(now) / 1000) as i64);
        *lock(&self.status.last_update) = Some(now);
        self.status.revision.store(revision, Ordering::Relaxed);
        debug!(
            revision,
            kind,
            added = stats.added,
            updated = stats.updated,
            removed = stats.removed,
            invalid = stats.invalid,
            micros = elapsed.as_micros() as u64,
            "snapshot published"
        );
    }

    /// The names in use and those failing, for metrics and the status page.
    fn publish_names(&self) {
        let failing = self.catalog.failing_names();
        METRICS
            .registry_dns_names
            .set(self.catalog.name_count() as i64);
        METRICS.registry_dns_failing.set(failing.len() as i64);
        *lock(&self.status.dns_failing) = failing;
    }

    /// Lists the whole prefix at one revision, in pages (a single response for 100,000 keys would
    /// exceed gRPC's message limit), and publishes it as one `Update::Reset`.
    async fn list(&mut self, client: &mut Client) -> Result<i64, RegistryError> {
        let mut kv = client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (previous_revision, previous_cluster) = (self.status.revision(), self.cluster_id);
        let range_end = prefix_range_end(self.cfg.prefix.as_bytes());
        let mut start = self.cfg.prefix.as_bytes().to_vec();
        let mut revision = 0i64;
        let mut kvs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let deadline = Instant::now() + self.cfg.request_timeout.max(Duration::from_secs(1)) * 4;
        let mut page = LIST_PAGE;
        loop {
            let mut opts = GetOptions::new()
                .with_range(range_end.clone())
                .with_limit(page);
            if revision > 0 {
                // every page at the first page's revision: one consistent snapshot
                opts = opts.with_revision(revision);
            }
            let resp = tokio::time::timeout_at(deadline.into(), kv.get(start.clone(), Some(opts)))
                .await
                .map_err(|_| RegistryError::ListTimeout)?;
            let resp = match resp {
                // gRPC's answer to a message over the decode limit
                Err(etcd_client::Error::GRpcStatus(s))
                    if s.code() == tonic::Code::OutOfRange && page > 1 =>
                {
                    page = (page / 4).max(1);
                    debug!(
                        page,
                        "list page over the message limit: asking for fewer keys"
                    );
                    continue;
                }
                r => r.map_err(RegistryError::List)?,
            };
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                self.cluster_id = resp.header().map(|h| h.cluster_id());
            }
            let more = resp.more();
            let mut resp = resp;
            let page = resp.take_kvs();
            let Some(last) = page.last() else { break };
            start = last.key().to_vec();
            start.push(0);
            kvs.extend(page.into_iter().map(|kv| kv.into_key_value()));
            if !more {
                break;
            }
        }
        debug!(keys = kvs.len(), revision, "listed etcd prefix");
        // the list replaces everything either way; these only tell the operator what happened
        if previous_cluster.is_some() && self.cluster_id != previous_cluster {
            warn!(old = ?previous_cluster, new = ?self.cluster_id, "etcd cluster id changed");
        } else if revision < previous_revision {
            warn!(
                store_revision = revision,
                our_revision = previous_revision,
                "etcd revision went backwards (data lost or new cluster)"
            );
        }
        self.publish(Update::Reset { revision, kvs }, "list");
        // the listed pages are gone: at 100,000 keys tens of MB this thread will not use again
        crate::memory::release();
        METRICS.registry_relists.inc();
        self.status.relists.fetch_add(1, Ordering::Relaxed);
        Ok(revision)
    }

    /// The watch is confirmed: it delivers what etcd has.
    fn delivering(&mut self, revision: i64) {
        if !self.status.connected() {
            let endpoint = self.etcd.current();
            info!(endpoint, revision, "etcd watch established");
            RECENT.record(
                "registry",
                format!("etcd watch established at revision {revision}"),
            );
        }
        self.status.set_connected(true);
        self.status.set_error(None);
        *lock(&self.status.stale_since) = None;
        // kept through re-lists (resync, compaction): cleared only when the watch breaks
        self.delivering_since.get_or_insert_with(Instant::now);
    }

    async fn watch(
        &mut self,
        client: &mut Client,
        revision: &mut i64,
        shutdown: &mut watch::Receiver<bool>,
        resync_at: Instant,
        dns: &mut DnsIo,
    ) -> WatchEnd {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(*revision + 1)
            .with_progress_notify();
        // the events of one revision can be large (a transaction of big values)
        let mut watch_client = client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let created = tokio::time::timeout(
            self.cfg.request_timeout,
            watch_client.watch(self.cfg.prefix.as_bytes(), Some(opts)),
        )
        .await;
        let mut stream = match created {
            Err(_) => return WatchEnd::Broken("watch request timed out".into()),
            Ok(Err(e)) => return WatchEnd::Broken(format!("watch failed: {e}")),
            Ok(Ok(s)) => s,
        };
        let mut state = WatchState::Requested;
        let resync = tokio::time::sleep_until(resync_at.into());
        tokio::pin!(resync);
        // armed when the watch is created behind the store's revision
        let confirm = tokio::time::sleep(Duration::MAX / 4);
        tokio::pin!(confirm);
        loop {
            let msg = tokio::select! {
                _ = shutdown.changed() => return WatchEnd::Shutdown,
                _ = &mut resync => return WatchEnd::Resync,
                _ = &mut confirm, if state == WatchState::Unconfirmed => {
                    state = WatchState::Delivering;
                    self.delivering(*revision);
                    continue;
                }
                event = dns.next() => {
                    self.on_dns(event);
                    continue;
                }
                msg = stream.message() => msg,
            };
            let resp = match msg {
                Err(e) => return WatchEnd::Broken(format!("watch stream error: {e}")),
                Ok(None) => return WatchEnd::Broken("watch stream ended".into()),
                Ok(Some(r)) => r,
            };
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    return WatchEnd::Relist(format!(
                        "revision {} was compacted (oldest available {})",
                        *revision + 1,
                        resp.compact_revision()
                    ));
                }
                return WatchEnd::Broken(format!("watch canceled: {}", resp.cancel_reason()));
            }
            let header_rev = resp.header().map(|h| h.revision()).unwrap_or(0);
            if resp.created() {
                // created is not success on its own: a cancel or a stream error may follow
                let cluster = resp.header().map(|h| h.cluster_id());
                if cluster.is_some() && self.cluster_id.is_some() && cluster != self.cluster_id {
                    // with several endpoints the list and the watch may reach different members;
                    // one of another cluster (a wiped member that formed its own) has another
                    // history
                    return WatchEnd::Broken(format!(
                        "the watched etcd member is in cluster {:x}, the list came from {:x}",
                        cluster.unwrap_or(0),
                        self.cluster_id.unwrap_or(0)
                    ));
                }
                if header_rev <= *revision {
                    state = WatchState::Delivering;
                    self.delivering(*revision);
                } else {
                    state = WatchState::Unconfirmed;
                    confirm
                        .as_mut()
                        .reset((Instant::now() + WATCH_CONFIRM).into());
                }
                continue;
            }
            if state != WatchState::Delivering {
                state = WatchState::Delivering;
                self.delivering(*revision);
            }
            let events = resp.events();
            if events.is_empty() {
                // progress notification: everything up to header_rev has been delivered
                if header_rev > *revision {
                    *revision = header_rev;
                    self.status.revision.store(header_rev, Ordering::Relaxed);
                }
                continue;
            }
            let mut changes = Vec::with_capacity(events.len());
            let mut max_rev = *revision;
            for ev in events {
                let Some(kv) = ev.kv() else { continue };
                max_rev = max_rev.max(kv.mod_revision());
                changes.push(match ev.event_type() {
                    EventType::Put => Change::Put {
                        key: kv.key().to_vec(),
                        value: kv.value().to_vec(),
                    },
                    EventType::Delete => Change::Delete {
                        key: kv.key().to_vec(),
                    },
                });
            }
            METRICS.registry_events.inc_by(changes.len() as u64);
            // resume from the last event's revision, never from the header: events of a later
            // revision may still be on their way in the next response
            *revision = max_rev;
            self.publish(
                Update::Batch {
                    revision: max_rev,
                    changes,
                },
                "watch",
            );
        }
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(self.cfg.backoff_initial, self.cfg.backoff_max);
        let mut revision: i64 = 0;
        let mut failures: u64 = 0;
        info!(endpoints = ?self.cfg.endpoints, prefix = %self.cfg.prefix, "registry starting");
        self.refuse_etcd_endpoints().await;
        let mut dns = self.start_resolver();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let result: Result<WatchEnd, RegistryError> = async {
                let c = &mut self.etcd.client().await?;
                // every watch starts from a fresh list (see the module docs)
                revision = self.list(c).await?;
                if !self.status.ready.swap(true, Ordering::AcqRel) {
                    info!(
                        revision,
                        instances = self.catalog.instance_count(),
                        "registry ready: first complete list applied"
                    );
                }
                let resync_at = Instant::now() + self.cfg.resync_interval;
                Ok(self
                    .watch(c, &mut revision, &mut shutdown, resync_at, &mut dns)
                    .await)
            }
            .await;
            let error = match result {
                Ok(WatchEnd::Shutdown) => return,
                Ok(WatchEnd::Resync) => {
                    debug!(revision, "periodic resync: re-listing etcd prefix");
                    failures = 0;
                    continue;
                }
                Ok(WatchEnd::Relist(reason)) => {
                    info!(reason = %reason, revision, "re-listing etcd prefix");
                    RECENT.record("registry", format!("re-listing etcd prefix: {reason}"));
                    failures = 0;
                    continue;
                }
                Ok(WatchEnd::Broken(e)) => e,
                Err(e) => e.to_string(),
            };
            if self
                .delivering_since
                .take()
                .is_some_and(|t| t.elapsed() >= STABLE_WATCH)
            {
                backoff.reset();
            }
            failures += 1;
            let was_connected = self.status.connected();
            self.status.set_connected(false);
            self.status.set_stale();
            self.status.set_error(Some(error.clone()));
            let endpoint = self.etcd.current();
            if was_connected || failures == 1 {
                warn!(error = %error, endpoint, revision,
                    "etcd unavailable; routing with the last snapshot");
                RECENT.record(
                    "registry",
                    format!("etcd unavailable, routing with the last snapshot: {error}"),
                );
            } else {
                debug!(error = %error, endpoint, failures, "etcd still unavailable");
            }
            if was_connected {
                METRICS.registry_reconnects.inc();
                self.status.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            // the next endpoint, with a fresh client (see the module docs); its watch follows a
            // new list
            self.etcd.failed();
            let delay = tokio::time::sleep(backoff.next_delay());
            tokio::pin!(delay);
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = &mut delay => break,
                    // names keep resolving while etcd is away
                    event = dns.next() => self.on_dns(event),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_range_end_covers_exactly_the_prefix() {
        assert_eq!(prefix_range_end(b"/services/"), b"/services0".to_vec());
        assert_eq!(prefix_range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_range_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn rfc3339_formats_utc() {
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(rfc3339(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(at(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(at(1_796_281_557)), "2026-12-03T07:05:57Z");
    }

    #[test]
    fn stale_detail_names_the_time_and_the_error() {
        let st = RegistryStatus::default();
        assert_eq!(st.stale_detail(), None);
        st.set_error(Some("watch stream error: x".into()));
        st.set_stale();
        let first = st.stale_since();
        st.set_stale();
        assert_eq!(st.stale_since(), first, "the first time is kept");
        let d = st.stale_detail().unwrap();
        assert!(d.starts_with("stale since 20"), "{d}");
        assert!(d.ends_with("s ago): watch stream error: x"), "{d}");
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        for d in &delays {
            assert!(*d <= Duration::from_millis(1000), "{d:?} exceeds the cap");
        }
        assert!(delays[9] >= Duration::from_millis(500), "{:?}", delays[9]);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}

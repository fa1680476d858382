//! The scheduler: follows registry generations, keeps one compact entry per instance key and
//! runs the checks (see the picture in [`super`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::Either;
use futures::{FutureExt, StreamExt};
use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::admission::{admission_reserve, Admission};
use super::schedule::{Id, Schedule};
use super::transition::flip;
use super::{
    probe, report_transition, CheckSpec, Conn, HealthConfig, ProbeError, Protocol, Target, Tracker,
};
use crate::metrics::{HealthCounters, METRICS};
use crate::routing::{Health, Instance, RoutingTable, SharedTable};

/// Checks started, and results handled, per turn of the scheduler loop at most: between two
/// turns it looks at the registry again, so admission does not wait for a backlog.
const BATCH: usize = 256;

/// Kept-alive check connections at most: `health.max_idle_connections`, or half the open-file
/// limit when unset (the other half is for clients, upstreams and etcd).
pub fn idle_connection_cap(config: &HealthConfig) -> usize {
    if !config.reuse_connection {
        return 0;
    }
    config
        .max_idle_connections
        .unwrap_or_else(|| crate::limits::open_file_limit() / 2)
}

/// One registered instance in the schedule: at most 96 bytes (a unit test checks), plus a slot
/// in the key map and one in the deadline heap; no task, no timer, nothing per service.
struct Probe {
    /// The instance as of the last snapshot that changed it (its key and state).
    instance: Arc<Instance>,
    /// Its service's result counters, with the service's name.
    counters: Arc<HealthCounters>,
    target: Target,
    tracker: Tracker,
    /// What the last check kept: an idle HTTP connection or a gRPC channel.
    conn: Option<Conn>,
}

/// A finished check, back at the scheduler.
struct Done {
    id: Id,
    started: Instant,
    result: Result<(), ProbeError>,
    conn: Option<Conn>,
    /// The check held one of the `max_idle_connections`.
    counted: bool,
    /// It was the entry's first check.
    first: bool,
    /// The admission thread already moved the instance from pending to healthy.
    admitted: bool,
}

type InFlight = futures::stream::FuturesUnordered<
    std::pin::Pin<Box<dyn std::future::Future<Output = Done> + Send>>,
>;

/// Follows registry generations and checks every registered instance key from one task: a
/// deadline-ordered [`Schedule`] of compact entries, at most `max_concurrent` checks in flight.
/// A check that cannot start on time starts late: intervals stretch, memory does not grow
/// (`switchyard_health_schedule_lag_seconds` shows by how much).
pub struct HealthChecker {
    table: SharedTable,
    config: Arc<HealthConfig>,
    generations: watch::Receiver<u64>,
    /// The snapshot last reconciled: services whose `Arc` did not change since are skipped.
    last: Arc<RoutingTable>,
    /// `config.default`, shared by every service without a spec of its own.
    default_spec: Arc<CheckSpec>,
    /// The specs of services configured with their own, each shared by its instances.
    own_specs: HashMap<String, Arc<CheckSpec>>,
    keys: HashMap<Arc<str>, Id>,
    schedule: Schedule<Probe>,
    running: InFlight,
    /// Run first checks on their own thread ([`Admission`], started by `run`).
    admission_thread: bool,
    admission: Option<Admission>,
    /// Steady checks start only while fewer than this many checks run.
    steady_limit: usize,
    idle_cap: usize,
    /// Kept-alive connections: idle in entries or in use by a running check.
    connections: usize,
}

impl HealthChecker {
    pub fn new(
        table: SharedTable,
        config: HealthConfig,
        generations: watch::Receiver<u64>,
    ) -> HealthChecker {
        let max = config.max_concurrent.max(1);
        let default_spec = Arc::new(config.default.clone());
        let own_specs = (config.services.iter())
            .map(|(name, spec)| (name.clone(), Arc::new(spec.clone())))
            .collect();
        HealthChecker {
            table,
            steady_limit: max - admission_reserve(max),
            idle_cap: idle_connection_cap(&config),
            config: Arc::new(config),
            generations,
            last: Arc::new(RoutingTable::default()),
            default_spec,
            own_specs,
            keys: HashMap::new(),
            schedule: Schedule::default(),
            running: InFlight::new(),
            admission_thread: true,
            admission: None,
            connections: 0,
        }
    }

    /// First checks run on the scheduler's own task, queued with the steady checks' I/O, instead
    /// of on the admission thread (for tests on paused time, which another thread does not see).
    #[cfg(test)]
    pub fn first_checks_in_task(mut self) -> Self {
        self.admission_thread = false;
        self
    }

    /// Instance keys currently probed.
    #[cfg(test)]
    pub fn probed(&self) -> usize {
        self.schedule.len()
    }

    /// Checks running right now.
    #[cfg(test)]
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Runs until `shutdown` turns true; running checks end with it.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        info!(
            max_concurrent = self.config.max_concurrent,
            reuse_connection = self.config.reuse_connection,
            max_idle_connections = self.idle_cap,
            "health checker starting"
        );
        if self.admission_thread && self.admission.is_none() {
            match Admission::start() {
                Ok(a) => self.admission = Some(a),
                Err(e) => warn!(error = %e,
                    "cannot start the admission thread: first checks run with the steady ones"),
            }
        }
        let mut registry_alive = true;
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        self.reconcile();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let now = Instant::now();
            let more = self.start_checks(now);
            METRICS.health_checks_running.set(self.running.len() as i64);
            METRICS
                .health_first_checks_queued
                .set(self.schedule.urgent_len() as i64);
            METRICS.health_connections.set(self.connections as i64);
            // wake for the next due check only when there is room to start it; at once when a
            // full batch started and more may be waiting
            let wake = if more {
                Some(now)
            } else if self.running.len() < self.steady_limit {
                self.schedule.next_due()
            } else {
                None
            };
            if let Some(at) = wake {
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                r = self.generations.changed(), if registry_alive => {
                    // registry gone: keep probing what we have until shutdown
                    registry_alive = r.is_ok();
                    self.reconcile();
                }
                Some(done) = self.running.next(), if !self.running.is_empty() => {
                    self.complete(done);
                    for _ in 1..BATCH {
                        match self.running.next().now_or_never() {
                            Some(Some(done)) => self.complete(done),
                            _ => break,
                        }
                    }
                }
                _ = &mut timer, if wake.is_some() => {}
            }
        }
        METRICS.health_checks_running.set(0);
        METRICS.health_first_checks_queued.set(0);
        METRICS.health_connections.set(0);
        info!("health checker stopped");
    }

    /// Starts first checks (any free slot), then due steady checks (below `steady_limit`), one
    /// batch at most; true if the batch was full (more may be startable).
    fn start_checks(&mut self, now: Instant) -> bool {
        let max = self.config.max_concurrent.max(1);
        for _ in 0..BATCH {
            if self.running.len() >= max {
                return false;
            }
            if let Some(id) = self.schedule.pop_urgent() {
                self.start(id, now, true);
                continue;
            }
            if self.running.len() >= self.steady_limit {
                return false;
            }
            match self.schedule.pop_due(now) {
                Some((id, due)) => {
                    METRICS
                        .health_schedule_lag
                        .observe(now.saturating_duration_since(due).as_secs_f64());
                    self.start(id, now, false);
                }
                None => return false,
            }
        }
        true
    }

    fn start(&mut self, id: Id, now: Instant, first: bool) {
        let Some(p) = self.schedule.get_mut(id) else {
            return;
        };
        let conn = p.conn.take();
        let mut counted = matches!(conn, Some(Conn::Http(_)));
        let http = p.target.spec.protocol == Protocol::Http;
        if http && !counted && self.connections < self.idle_cap {
            self.connections += 1;
            counted = true;
        }
        let target = p.target.clone(); // an Arc and an address: nothing to allocate
        let check = match (first, &conn, &self.admission) {
            (true, None, Some(lane)) => {
                let state = p.instance.state.clone();
                let admit = p.tracker.admits_on_first_pass();
                let task = lane.handle.spawn(async move {
                    let (result, conn) = probe::check(&target, None, counted).await;
                    let admitted =
                        admit && result.is_ok() && flip(&state, Health::Pending, Health::Healthy);
                    (result, conn.filter(Conn::portable), admitted)
                });
                Either::Left(async move {
                    let (result, conn, admitted) = task
                        .await
                        .unwrap_or_else(|e| (Err(ProbeError::TaskEnded(e)), None, false));
                    (result, conn, admitted)
                })
            }
            _ => Either::Right(async move {
                let (result, conn) = probe::check(&target, conn, counted).await;
                (result, conn, false)
            }),
        };
        self.running.push(Box::pin(async move {
            let (result, conn, admitted) = check.await;
            Done {
                id,
                started: now,
                result,
                conn,
                counted,
                first,
                admitted,
            }
        }));
    }

    /// Records a result: counters, last check, thresholds, a flip; schedules the next check.
    fn complete(&mut self, done: Done) {
        let Some(p) = self.schedule.get_mut(done.id) else {
            // the key went away (or changed target) while its check ran
            if done.counted {
                self.connections -= 1;
            }
            return;
        };
        match done.conn {
            Some(conn) => p.conn = Some(conn),
            None if done.counted => self.connections -= 1,
            None => {}
        }
        let spec = &p.target.spec;
        if let Err(e) = &done.result {
            if e.is_local() {
                // the proxy's own shortage (out of open files): no verdict on the instance, which
                // keeps its health and its count of failures; checked again next interval
                METRICS.local_errors.inc();
                debug!(instance = %p.instance.key, error = %e,
                    "health check not made: the proxy is short of resources");
                let due = done.started + spec.interval.saturating_sub(jitter(spec, done.first));
                self.schedule.at(done.id, due);
                return;
            }
        }
        let ok = done.result.is_ok();
        p.counters.check(ok);
        p.instance.state.record_check(crate::routing::CheckRecord {
            at: std::time::SystemTime::now(),
            ok,
            detail: match &done.result {
                Ok(()) => "ok".into(),
                Err(e) => e.to_string().into(),
            },
            took: done.started.elapsed(),
        });
        // a real check that passed after an outlier ejection began may end it (the snapshot is
        // only looked at for an instance that is out)
        if ok && spec.protocol != Protocol::None && p.instance.state.outlier.ejected() {
            let began =
                crate::clock::clock_ms().saturating_sub(done.started.elapsed().as_millis() as u64);
            let service = &p.counters.service;
            if let Some(svc) = self.table.load().service(service) {
                crate::routing::outlier::end_on_check(
                    service,
                    &p.instance,
                    &svc.traffic.outlier,
                    began,
                );
            }
        }
        // an instance the admission thread admitted was pending when its check ended
        let current = if done.admitted {
            Health::Pending
        } else {
            p.instance.state.health()
        };
        if let Some(next) = p.tracker.observe(current, ok) {
            if done.admitted || flip(&p.instance.state, current, next) {
                let reason = match &done.result {
                    Ok(()) => format!("{:?} check passed", spec.protocol).to_lowercase(),
                    Err(e) => e.to_string(),
                };
                let (service, key) = (&p.counters.service, &p.instance.key);
                report_transition(service, key, current, next, &reason);
            }
        }
        let due = done.started + spec.interval.saturating_sub(jitter(spec, done.first));
        self.schedule.at(done.id, due);
    }

    /// Brings the schedule in line with the current snapshot. Only services whose `Arc` changed
    /// since the last call are looked at ([`ServiceMap::changes`] skips the shards both snapshots
    /// share, so a registry change costs its own size, not the number of services); the
    /// instances they added are checked first, ahead of every due check.
    ///
    /// [`ServiceMap::changes`]: crate::routing::ServiceMap::changes
    pub fn reconcile(&mut self) {
        let table = self.table.load_full();
        if Arc::ptr_eq(&table, &self.last) {
            return;
        }
        let last = std::mem::replace(&mut self.last, table.clone());
        let mut added = Vec::new();
        if self.schedule.is_empty() {
            // the first snapshot (or the first after all went away): room for all of it at once
            let n = table.instance_count();
            self.schedule.reserve(n);
            self.keys.reserve(n);
            added.reserve(n);
        }
        let mut removed = 0usize;
        for (name, old, now) in table.services.changes(&last.services) {
            let Some(svc) = now else {
                // the service went away entirely
                for i in old.map(|o| &o.instances[..]).unwrap_or_default() {
                    removed += self.remove(&i.key) as usize;
                }
                continue;
            };
            let spec = self.spec_for(name);
            let mut counters = None;
            for inst in &svc.instances {
                if let Some(id) = self.ensure(name, &spec, &mut counters, inst) {
                    added.push(id);
                }
            }
            if let Some(old) = old {
                let now: HashSet<&Arc<str>> = svc.instances.iter().map(|i| &i.key).collect();
                for i in &old.instances {
                    if !now.contains(&i.key) {
                        removed += self.remove(&i.key) as usize;
                    }
                }
            }
        }
        let started = added.len();
        if !added.is_empty() {
            self.schedule.urgent(added);
        }
        if started > 0 || removed > 0 {
            debug!(
                started,
                removed,
                probed = self.schedule.len(),
                "health probes reconciled"
            );
        }
    }

    /// The check spec of service `name`: its own, or the default shared by all the others.
    fn spec_for(&self, name: &str) -> Arc<CheckSpec> {
        self.own_specs
            .get(name)
            .unwrap_or(&self.default_spec)
            .clone()
    }

    /// Makes sure `inst` has an entry for its current state and target; returns the id of a new
    /// one (a new key, a re-registered key with new state, or a new target: the count starts
    /// over, the health stays in the instance's state).
    /// `counters` is the service's, looked up on the first new entry of a reconcile.
    fn ensure(
        &mut self,
        service: &Arc<str>,
        spec: &Arc<CheckSpec>,
        counters: &mut Option<Arc<HealthCounters>>,
        inst: &Arc<Instance>,
    ) -> Option<Id> {
        let (target, errors) = Target::for_instance(inst, spec);
        if let Some(p) = self
            .keys
            .get(&inst.key)
            .and_then(|id| self.schedule.get_mut(*id))
        {
            if Arc::ptr_eq(&p.instance.state, &inst.state) && p.target == target {
                // the same instance in a new value (a weight or metadata change)
                p.instance = inst.clone();
                return None;
            }
        }
        for e in &errors {
            warn!(service = %service, instance = %inst.key, error = %e, "ignoring invalid health metadata");
        }
        self.remove(&inst.key);
        let counters = counters.get_or_insert_with(|| crate::metrics::health_counters(service));
        let id = self.schedule.insert(Probe {
            instance: inst.clone(),
            counters: counters.clone(),
            tracker: Tracker::new(&target.spec),
            target,
            conn: None,
        });
        self.keys.insert(inst.key.clone(), id);
        Some(id)
    }

    /// Drops `key`'s entry and whatever it kept; a check of it still running is ignored.
    fn remove(&mut self, key: &Arc<str>) -> bool {
        let Some(id) = self.keys.remove(key) else {
            return false;
        };
        if let Some(p) = self.schedule.remove(id) {
            if matches!(p.conn, Some(Conn::Http(_))) {
                self.connections -= 1;
            }
        }
        true
    }
}

/// A random shortening of the next wait: 0..=jitter, or after an entry's first check
/// 0..=interval/2. Instances registered together (an initial list of thousands) are first checked
/// in one burst; without the wider spread, every later round would repeat that burst and its
/// CPU peak, which is what new instances' admission then waits behind. No jitter, no spread.
fn jitter(spec: &CheckSpec, first: bool) -> Duration {
    if spec.jitter.is_zero() {
        return Duration::ZERO;
    }
    let max = if first {
        spec.interval / 2
    } else {
        spec.jitter
    };
    Duration::from_millis(rand::thread_rng().gen_range(0..=max.as_millis() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::fixtures::{config, inst, publish, spec};
    use std::net::SocketAddr;

    use crate::routing::{new_shared_table, InstanceState, Service, ServiceSettings};
    use tokio::net::TcpListener;

    #[test]
    fn schedule_entries_stay_compact() {
        let size = std::mem::size_of::<Probe>();
        assert!(size <= 96, "a schedule entry is {size} bytes");
    }

    async fn wait_for(state: &InstanceState, want: Health) {
        for _ in 0..200 {
            if state.health() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("health stayed {:?}, wanted {want:?}", state.health());
    }

    /// A checker running in the background, told about new snapshots like the registry does.
    struct Background {
        generation: watch::Sender<u64>,
        _shutdown: watch::Sender<bool>,
    }

    impl Background {
        /// `in_task`: first checks on the scheduler's task (paused time), else on their thread.
        fn start(table: &SharedTable, config: HealthConfig, in_task: bool) -> Background {
            let (generation, rx) = watch::channel(0u64);
            let (shutdown, stop) = watch::channel(false);
            let mut checker = HealthChecker::new(table.clone(), config, rx);
            if in_task {
                checker = checker.first_checks_in_task();
            }
            tokio::spawn(checker.run(stop));
            Background {
                generation,
                _shutdown: shutdown,
            }
        }

        fn publish(&self, table: &SharedTable, services: &[(&str, Vec<Arc<Instance>>)]) {
            publish(table, services);
            self.generation.send_modify(|g| *g += 1);
        }
    }

    impl HealthChecker {
        /// One turn by hand: start what may start at `now`, then wait for all of it to end.
        async fn turn(&mut self, now: Instant) -> usize {
            self.start_checks(now);
            let started = self.running.len();
            while let Some(done) = self.running.next().await {
                self.complete(done);
            }
            started
        }
    }

    #[tokio::test]
    async fn first_check_is_immediate_and_failures_eject() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let table = new_shared_table();
        let mut s = spec();
        s.healthy_threshold = 1;
        s.unhealthy_threshold = 2;
        s.interval = Duration::from_millis(100);
        let checker = Background::start(&table, config(s), false);
        let i = inst("/s/a/1", addr, &[]);
        let started = std::time::Instant::now();
        checker.publish(&table, &[("a", vec![i.clone()])]);
        wait_for(&i.state, Health::Healthy).await;
        assert!(
            started.elapsed() < Duration::from_millis(90),
            "first check was not immediate: {:?}",
            started.elapsed()
        );
        drop(listener);
        wait_for(&i.state, Health::Unhealthy).await;
    }

    /// A new instance of a keep-alive HTTP server, published to a checker whose first checks run
    /// on the admission thread. Returns it, the server's connection and request counters, and
    /// the checker (running while it is held).
    async fn admitted_over_http(
        healthy_threshold: u32,
        interval_ms: u64,
    ) -> (
        Arc<Instance>,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<std::sync::atomic::AtomicUsize>,
        Background,
    ) {
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let (addr, conns, reqs) = probe::tests::keep_alive_server(ok, 0).await;
        let table = new_shared_table();
        let mut s = spec();
        s.protocol = Protocol::Http;
        s.healthy_threshold = healthy_threshold;
        s.interval = Duration::from_millis(interval_ms);
        let checker = Background::start(&table, config(s), false);
        let i = inst("/s/a/1", addr, &[]);
        checker.publish(&table, &[("a", vec![i.clone()])]);
        (i, conns, reqs, checker)
    }

    #[tokio::test]
    async fn first_checks_on_their_thread_admit_and_hand_their_connection_over() {
        use std::sync::atomic::Ordering::SeqCst;
        let (i, conns, reqs, _checker) = admitted_over_http(1, 50).await;
        wait_for(&i.state, Health::Healthy).await;
        // the steady checks after it run on the scheduler's runtime, on the same connection
        for _ in 0..200 {
            if reqs.load(SeqCst) >= 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(reqs.load(SeqCst) >= 4, "steady checks did not follow");
        assert_eq!(
            conns.load(SeqCst),
            1,
            "the steady checks should reuse the first check's connection"
        );
        assert_eq!(i.state.health(), Health::Healthy);
    }

    #[tokio::test]
    async fn a_first_pass_on_the_admission_thread_respects_the_healthy_threshold() {
        use std::sync::atomic::Ordering::SeqCst;
        let (i, _conns, reqs, _checker) = admitted_over_http(2, 400).await;
        for _ in 0..200 {
            if reqs.load(SeqCst) >= 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(reqs.load(SeqCst), 1, "the first check should have run");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            i.state.health(),
            Health::Pending,
            "one pass of two must not admit"
        );
        wait_for(&i.state, Health::Healthy).await;
    }

    #[tokio::test(start_paused = true)]
    async fn entries_follow_keys_and_state_survives_weight_changes() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let table = new_shared_table();
        let (_tx, rx) = watch::channel(0u64);
        let mut s = spec();
        s.protocol = Protocol::None;
        s.healthy_threshold = 1;
        let mut checker = HealthChecker::new(table.clone(), config(s), rx);
        let a = inst("/s/a/1", addr, &[]);
        let b = inst("/s/a/2", addr, &[]);
        let c = inst("/s/c/1", addr, &[]);
        publish(
            &table,
            &[("a", vec![a.clone(), b.clone()]), ("c", vec![c.clone()])],
        );
        checker.reconcile();
        assert_eq!(checker.probed(), 3);
        assert_eq!(checker.turn(Instant::now()).await, 3);
        assert_eq!(a.state.health(), Health::Healthy);
        let id_a = checker.keys["/s/a/1"];
        // weight change: same key, same state, new Instance value -> same entry
        let a2 = Arc::new(Instance::new(
            a.key.clone(),
            a.id(),
            &a.registered(),
            addr,
            5,
            Default::default(),
            a.state.clone(),
        ));
        publish(&table, &[("a", vec![a2]), ("c", vec![c.clone()])]);
        checker.reconcile();
        assert_eq!(checker.probed(), 2, "b's entry is gone");
        assert_eq!(checker.keys["/s/a/1"], id_a);
        assert_eq!(a.state.health(), Health::Healthy);
        // service c disappears entirely, with its shared spec
        publish(&table, &[("a", vec![a.clone()])]);
        checker.reconcile();
        assert_eq!(checker.probed(), 1);
        assert!(!checker.keys.contains_key("/s/c/1"));
        // nothing of b or c is checked again
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(checker.turn(Instant::now()).await, 1);
    }

    #[tokio::test]
    async fn unchanged_services_are_skipped_and_vanished_ones_dropped() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let table = new_shared_table();
        let (_tx, rx) = watch::channel(0u64);
        let mut s = spec();
        s.protocol = Protocol::None;
        let mut cfg = config(s.clone());
        let mut own = s;
        own.interval = Duration::from_millis(123);
        cfg.services.insert("d".into(), own);
        let mut checker = HealthChecker::new(table.clone(), cfg, rx);
        let service = |name: &str, keys: &[&str]| {
            let insts = keys.iter().map(|k| inst(k, addr, &[])).collect();
            Arc::new(Service::new(
                name.into(),
                insts,
                0,
                &ServiceSettings::default(),
            ))
        };
        let store = |services: &[&Arc<Service>]| {
            let mut t = RoutingTable::default();
            for svc in services {
                t.services.insert(svc.name.clone(), Arc::clone(svc));
            }
            table.store(Arc::new(t));
        };
        let a = service("a", &["/s/a/1", "/s/a/2"]);
        let b = service("b", &["/s/b/1"]);
        store(&[&a, &b]);
        checker.reconcile();
        assert_eq!(checker.probed(), 3);
        let id = checker.keys["/s/a/1"];
        // a is the same Arc, b is gone, c is new
        let c = service("c", &["/s/c/1"]);
        store(&[&a, &c]);
        checker.reconcile();
        assert_eq!(checker.probed(), 3);
        assert!(!checker.keys.contains_key("/s/b/1"));
        assert_eq!(checker.keys["/s/a/1"], id);
        // c changes (one instance more), a does not
        let c2 = service("c", &["/s/c/1", "/s/c/2"]);
        let d = service("d", &["/s/d/1", "/s/d/2"]);
        store(&[&a, &c2, &d]);
        checker.reconcile();
        assert_eq!(checker.probed(), 6);
        let spec_of = |key: &str| {
            checker
                .schedule
                .get(checker.keys[key])
                .unwrap()
                .target
                .spec
                .clone()
        };
        assert!(
            Arc::ptr_eq(&spec_of("/s/a/1"), &spec_of("/s/c/2")),
            "services without their own spec share the default"
        );
        let own = spec_of("/s/d/1");
        assert_eq!(
            own.interval,
            Duration::from_millis(123),
            "d has its own spec"
        );
        assert!(
            Arc::ptr_eq(&own, &spec_of("/s/d/2")),
            "shared by d's instances"
        );
        // everything goes
        store(&[]);
        checker.reconcile();
        assert_eq!(checker.probed(), 0);
        assert!(checker.keys.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn new_instances_go_first_and_at_most_max_concurrent_run() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let table = new_shared_table();
        let (_tx, rx) = watch::channel(0u64);
        let mut s = spec();
        s.protocol = Protocol::None;
        s.healthy_threshold = 1;
        let mut c = config(s);
        c.max_concurrent = 16; // 2 kept for first checks
        let mut checker = HealthChecker::new(table.clone(), c, rx);
        let old: Vec<Arc<Instance>> = (0..1000)
            .map(|i| inst(&format!("/s/old/{i:04}"), addr, &[]))
            .collect();
        publish(&table, &[("old", old.clone())]);
        checker.reconcile();
        // the initial list: first checks use every slot
        let mut first = 0;
        while first < old.len() {
            let n = checker.turn(Instant::now()).await;
            assert_eq!(n, 16.min(old.len() - first), "checks running at once");
            first += n;
        }
        assert!(old.iter().all(|i| i.state.health() == Health::Healthy));
        // every old instance is overdue; a new one registers
        tokio::time::sleep(Duration::from_secs(5)).await;
        let marker = std::time::SystemTime::now();
        let new = inst("/s/new/1", addr, &[]);
        publish(&table, &[("old", old.clone()), ("new", vec![new.clone()])]);
        checker.reconcile();
        let now = Instant::now();
        checker.start_checks(now);
        assert_eq!(checker.running(), 14, "steady checks leave 2 slots free");
        while let Some(done) = checker.running.next().await {
            checker.complete(done);
        }
        assert_eq!(
            new.state.health(),
            Health::Healthy,
            "the new instance was checked in the first turn"
        );
        let rechecked = old
            .iter()
            .filter(|i| i.state.last_check().is_some_and(|c| c.at >= marker))
            .count();
        assert_eq!(rechecked, 13, "the rest of the turn went to overdue checks");
        assert_eq!(checker.turn(Instant::now()).await, 14);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_target_fails_by_timeout() {
        // accepts (the kernel does) and never answers
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let table = new_shared_table();
        let mut s = spec();
        s.protocol = Protocol::Http;
        s.timeout = Duration::from_millis(300);
        s.interval = Duration::from_millis(500);
        let checker = Background::start(&table, config(s), true);
        let i = inst("/s/h/1", addr, &[]);
        i.state.set_health(Health::Healthy);
        checker.publish(&table, &[("h", vec![i.clone()])]);
        // unhealthy_threshold 3: checks at 0, 500, 1000 ms each time out after 300 ms
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(i.state.health(), Health::Healthy);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(i.state.health(), Health::Unhealthy);
        drop(listener);
    }
}

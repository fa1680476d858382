//! Test support: real processes on ephemeral ports.
//!
//! - [`EtcdServer::start`]: a real `etcd` (Debian `etcd-server`) with a temporary data dir.
//! - [`EtcdCluster::start`]: three of them forming one cluster, to kill the leader or the quorum,
//!   or to freeze a member (SIGSTOP).
//! - [`Backend::start`]: a real HTTP/1.1 server (hyper) that reports who answered.
//! - [`raw::RawBackend::start`]: a raw instance that records the exact bytes and requests it
//!   received and answers hostile scripts (tests/hostile.rs).
//! - [`relay::Relay::start`]: a TCP relay that pauses, drops and refuses connections (to etcd).
//! - [`Proxy::start`]: the `switchyard` binary with a generated config.
//! - [`traffic::Traffic`]: requests sent one after another through the proxy, failures kept.
//! - [`eventually`]: a bounded poll instead of sleeps.
//!
//! Everything is stopped on drop, by pid.

#![allow(dead_code)]

pub mod backend;
pub mod certs;
pub mod grpc;
pub mod raw;
pub mod relay;
pub mod traffic;

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use backend::Backend;

/// Ports [`free_port`] handed out in this process.
static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// A port that was free a moment ago and that this process never handed out before (two
/// servers a test starts never get the same one). Another process can still take it before the
/// server binds it: [`ProxyBuilder::start`] checks that its listeners are alone on their ports
/// and starts again on other ports when they are not.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("binding an ephemeral port on 127.0.0.1");
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// Why `port` is not `pid`'s alone: a listening socket on it that `pid` does not hold (another
/// process got the port first: pingora then keeps retrying its bind while the test would talk to
/// the other process; or, both with `SO_REUSEPORT`, they share it and split the traffic), or no
/// listener of `pid` on it at all. `None`: only `pid` listens there.
fn port_not_owned(pid: u32, port: u16) -> Option<String> {
    let own = socket_inodes(pid);
    let listening: Vec<u64> = tcp_sockets()
        .into_iter()
        .filter(|s| s.local_port == port && s.state == TcpState::LISTEN)
        .map(|s| s.inode)
        .collect();
    let foreign = listening.iter().filter(|i| !own.contains(i)).count();
    if foreign > 0 {
        return Some(format!(
            "{foreign} listener(s) of another process on port {port}"
        ));
    }
    if listening.is_empty() {
        return Some(format!("no listener of pid {pid} on port {port}"));
    }
    None
}

/// How many established TCP connections `pid` holds to a peer at `port` (any local address).
pub fn connections_to(pid: u32, port: u16) -> usize {
    let own = socket_inodes(pid);
    tcp_sockets()
        .into_iter()
        .filter(|s| s.remote_port == port && s.state == TcpState::ESTABLISHED)
        .filter(|s| own.contains(&s.inode))
        .count()
}

/// Inodes of the sockets `pid` has open, from `/proc/<pid>/fd`.
fn socket_inodes(pid: u32) -> std::collections::HashSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?;
            l.parse().ok()
        })
        .collect()
}

/// A row of `/proc/net/tcp*`.
struct TcpSocket {
    local_port: u16,
    remote_port: u16,
    state: TcpState,
    inode: u64,
}

/// The `st` column of `/proc/net/tcp*` (the kernel's `TCP_*` states, in hex).
#[derive(PartialEq, Eq)]
struct TcpState(u8);

impl TcpState {
    const ESTABLISHED: TcpState = TcpState(0x01);
    const LISTEN: TcpState = TcpState(0x0A);
}

/// Every TCP socket of this network namespace (IPv4 and IPv6), from `/proc/net/tcp*`.
fn tcp_sockets() -> Vec<TcpSocket> {
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        out.extend(text.lines().skip(1).filter_map(TcpSocket::parse));
    }
    out
}

impl TcpSocket {
    /// `sl local_address rem_address st ... inode`, addresses as hex `ADDR:PORT`.
    fn parse(line: &str) -> Option<TcpSocket> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
        Some(TcpSocket {
            local_port: port(f.get(1)?)?,
            remote_port: port(f.get(2)?)?,
            state: TcpState(u8::from_str_radix(f.get(3)?, 16).ok()?),
            inode: f.get(9)?.parse().ok()?,
        })
    }
}

/// Polls `check` until it returns `Ok`, or panics after `patience` with the last error.
pub async fn eventually<T, F, Fut>(patience: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    let mut last = String::from("never checked");
    while start.elapsed() < patience {
        match check().await {
            Ok(v) => return v,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out after {patience:?} waiting for {what}: last result: {last}");
}

/// Sends `sig` (e.g. `-STOP`) to `pid`; panics when `kill` fails (the process is gone).
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pid} failed");
}

fn kill_child(child: &mut Child, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
}

fn wait_exit(child: &mut Child, patience: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < patience {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// A real etcd process.
pub struct EtcdServer {
    child: Option<Child>,
    pub client_port: u16,
    pub peer_port: u16,
    dir: tempfile::TempDir,
    name: String,
    /// Extra command-line flags (kept across restarts).
    args: Vec<String>,
    /// `--initial-cluster`: this member alone, or every member of an [`EtcdCluster`].
    initial_cluster: String,
    /// `--initial-cluster-state`: `new`, or `existing` for a cluster member started again.
    cluster_state: &'static str,
    /// SIGSTOPped by [`EtcdServer::freeze`]: alive, its sockets open, answering nothing.
    frozen: bool,
}

impl EtcdServer {
    pub fn start() -> EtcdServer {
        EtcdServer::start_with_args(&[])
    }

    /// A real etcd with extra flags, e.g. `--max-request-bytes`.
    pub fn start_with_args(args: &[&str]) -> EtcdServer {
        let mut s = EtcdServer::unstarted(format!("sy-test-{}", free_port()), args);
        s.initial_cluster = s.peer_entry();
        s.spawn();
        s
    }

    /// A member on fresh ports and a fresh data dir, not started; `initial_cluster` to be set.
    fn unstarted(name: String, args: &[&str]) -> EtcdServer {
        EtcdServer {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            dir: tempfile::tempdir().expect("temp dir for etcd"),
            name,
            args: args.iter().map(|a| a.to_string()).collect(),
            initial_cluster: String::new(),
            cluster_state: "new",
            frozen: false,
        }
    }

    /// This member's `name=peer-url` entry of `--initial-cluster`.
    fn peer_entry(&self) -> String {
        format!("{}=http://127.0.0.1:{}", self.name, self.peer_port)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn spawn(&mut self) {
        self.launch();
        self.wait_healthy();
    }

    /// Starts the process without waiting: a cluster member is healthy only once a quorum runs.
    fn launch(&mut self) {
        let etcd = which("etcd").unwrap_or_else(|| {
            panic!(
                "etcd is not installed: integration tests need a real etcd \
                 (apt-get install etcd-server, or run scripts/test.sh which installs it)"
            )
        });
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).expect("etcd log file");
        let child = Command::new(etcd)
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen-client-urls")
            .arg(self.endpoint())
            .arg("--advertise-client-urls")
            .arg(self.endpoint())
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", self.peer_port))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", self.peer_port))
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-state")
            .arg(self.cluster_state)
            .arg("--log-level")
            .arg("warn")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting etcd");
        self.child = Some(child);
    }

    fn wait_healthy(&self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(resp) = http_get_blocking(self.client_port, "/health") {
                if resp.contains("\"health\":\"true\"") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "etcd {} did not become healthy within 20s; log:\n{}",
            self.name,
            self.log()
        );
    }

    /// The etcd process id (to SIGSTOP it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, keeping the data dir (a frozen process is killed too: SIGKILL needs no CONT).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c, "-KILL");
            let _ = c.wait();
        }
        self.frozen = false;
    }

    /// SIGSTOP: the process hangs (a stalled VM) while the kernel keeps its sockets open and
    /// still accepts connections on them. [`EtcdServer::thaw`] or a kill ends it.
    pub fn freeze(&mut self) {
        let pid = self.pid().expect("freezing an etcd that is not running");
        signal(pid, "-STOP");
        self.frozen = true;
    }

    /// SIGCONT after [`EtcdServer::freeze`], then waits until it is healthy: a cluster member
    /// opens its peer streams again first, and a write through it meanwhile is lost (it times
    /// out).
    pub fn thaw(&mut self) {
        let pid = self.pid().expect("thawing an etcd that is not running");
        signal(pid, "-CONT");
        self.frozen = false;
        self.wait_healthy();
    }

    /// Starts again on the same ports with the same data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts again on the same ports with an empty data dir (etcd lost everything).
    pub fn wipe_and_restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(self.data_dir());
        self.spawn();
    }

    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint()], None)
            .await
            .expect("connecting to the test etcd")
    }

    pub async fn put(&self, key: &str, value: impl AsRef<[u8]>) -> i64 {
        let resp = self
            .client()
            .await
            .put(key, value.as_ref(), None)
            .await
            .expect("etcd put");
        resp.header().map(|h| h.revision()).unwrap_or(0)
    }

    /// Puts `key` under a fresh lease of `ttl` seconds that nobody keeps alive; returns the lease.
    pub async fn put_with_lease(&self, key: &str, value: &str, ttl: i64) -> i64 {
        let mut c = self.client().await;
        let lease = c.lease_grant(ttl, None).await.expect("lease grant").id();
        c.put(
            key,
            value,
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .expect("etcd put with lease");
        lease
    }

    pub async fn delete(&self, key: &str) {
        self.client()
            .await
            .delete(key, None)
            .await
            .expect("etcd delete");
    }

    pub async fn compact_to_current(&self) -> i64 {
        let mut c = self.client().await;
        let rev = c
            .get("/", None)
            .await
            .expect("etcd get")
            .header()
            .map(|h| h.revision())
            .unwrap_or(0);
        c.compact(
            rev,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
        .expect("etcd compact");
        rev
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three real etcd members forming one cluster, each on ports and a data dir of its own, with
/// fast elections (heartbeat 50 ms, election timeout 300 ms): a killed leader is replaced within
/// about a second, and a member that lost its quorum notices as soon.
pub struct EtcdCluster {
    members: Vec<EtcdServer>,
}

impl EtcdCluster {
    pub fn start() -> EtcdCluster {
        let token = format!("sy-cluster-{}", free_port());
        let args = [
            "--initial-cluster-token",
            token.as_str(),
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "300",
        ];
        let mut members: Vec<EtcdServer> = (0..3)
            .map(|i| EtcdServer::unstarted(format!("{token}-{i}"), &args))
            .collect();
        let initial_cluster = members
            .iter()
            .map(EtcdServer::peer_entry)
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.initial_cluster = initial_cluster.clone();
            m.launch();
        }
        // owned before waiting: a member that never becomes healthy stops them all
        let cluster = EtcdCluster { members };
        for m in &cluster.members {
            m.wait_healthy();
        }
        cluster
    }

    /// The client URLs of every member, running or not.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdServer::endpoint).collect()
    }

    /// Member `i` runs and answers: started, neither killed nor frozen.
    pub fn running(&self, i: usize) -> bool {
        self.members[i].child.is_some() && !self.members[i].frozen
    }

    /// A running member, to write and read through (a follower forwards to the leader).
    pub fn live(&self) -> &EtcdServer {
        (0..self.members.len())
            .find(|&i| self.running(i))
            .map(|i| &self.members[i])
            .expect("no etcd member is running")
    }

    /// SIGKILL member `i`, keeping its data dir.
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// SIGSTOP member `i` (hung, connections open); the drop kills it all the same.
    pub fn freeze(&mut self, i: usize) {
        self.members[i].freeze();
    }

    /// Member `i`, running or not.
    pub fn member(&self, i: usize) -> &EtcdServer {
        &self.members[i]
    }

    /// SIGCONT member `i` after [`EtcdCluster::freeze`], then waits until it is healthy.
    pub fn thaw(&mut self, i: usize) {
        self.members[i].thaw();
    }

    /// Starts these members again with their data (they rejoin as `existing`), then waits until
    /// each is healthy (has a leader): together, when the others alone have no quorum.
    pub fn restart(&mut self, which: &[usize]) {
        for &i in which {
            let m = &mut self.members[i];
            m.kill();
            m.cluster_state = "existing";
            m.launch();
        }
        for &i in which {
            self.members[i].wait_healthy();
        }
    }

    /// Member `i`'s id and the id of the leader it follows (0: none), from its status.
    async fn status(&self, i: usize) -> Result<(u64, u64), String> {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(2));
        let mut c = etcd_client::Client::connect([self.members[i].endpoint()], Some(opts))
            .await
            .map_err(|e| format!("member {i}: {e}"))?;
        let s = c.status().await.map_err(|e| format!("member {i}: {e}"))?;
        let id = s.header().map(|h| h.member_id()).unwrap_or(0);
        Ok((id, s.leader()))
    }

    /// The index of the leader, when every running member follows the same running one.
    async fn current_leader(&self) -> Result<usize, String> {
        let mut ids = Vec::new();
        for i in (0..self.members.len()).filter(|&i| self.running(i)) {
            ids.push((i, self.status(i).await?));
        }
        let leader = ids.first().map_or(0, |(_, (_, l))| *l);
        let agreed = ids.iter().all(|(_, (_, l))| *l == leader);
        match ids.iter().find(|(_, (id, _))| *id == leader) {
            Some((i, _)) if agreed => Ok(*i),
            _ => Err(format!("(index, (member id, leader id)): {ids:?}")),
        }
    }

    /// The index of the leader once every running member follows the same running one.
    pub async fn leader(&self) -> usize {
        eventually(
            Duration::from_secs(10),
            "every running etcd member to follow one running leader",
            || self.current_leader(),
        )
        .await
    }

    /// Makes member `to` the leader (asked of the current one) and waits until all follow it.
    pub async fn move_leader(&self, to: usize) {
        let from = self.leader().await;
        if from == to {
            return;
        }
        let (target, _) = self.status(to).await.expect("status of the new leader");
        let mut c = self.members[from].client().await;
        c.move_leader(target).await.expect("etcd move-leader");
        eventually(
            Duration::from_secs(10),
            &format!("member {to} to lead"),
            || async {
                let now = self.current_leader().await?;
                (now == to)
                    .then_some(())
                    .ok_or(format!("member {now} leads"))
            },
        )
        .await;
    }

    /// Watchers member `i` serves now, from its metrics (the tests' own clients do not watch).
    pub async fn watchers(&self, i: usize) -> Result<f64, String> {
        let url = format!("{}/metrics", self.members[i].endpoint());
        let resp = client().get(url).send().await.map_err(|e| e.to_string())?;
        let text = resp.text().await.map_err(|e| e.to_string())?;
        metric_value(&text, "etcd_debugging_mvcc_watcher_total")
            .ok_or_else(|| format!("member {i} exports no watcher count"))
    }

    /// Lease keep-alive messages member `i` has received from its clients, from its metrics (a
    /// follower forwards them to the leader over the peer port, which this does not count).
    pub async fn keep_alives(&self, i: usize) -> Result<f64, String> {
        let url = format!("{}/metrics", self.members[i].endpoint());
        let resp = client().get(url).send().await.map_err(|e| e.to_string())?;
        let text = resp.text().await.map_err(|e| e.to_string())?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with("grpc_server_msg_received_total{"))
            .filter(|l| l.contains("grpc_method=\"LeaseKeepAlive\""))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum())
    }

    /// The one running member that receives lease keep-alives (a registrar's), once exactly one
    /// does: sampled `period` apart, which must cover one keep-alive.
    pub async fn keeping_alive(&self, period: Duration) -> usize {
        eventually(
            Duration::from_secs(20),
            "exactly one running etcd member to receive lease keep-alives",
            || async {
                let running: Vec<usize> = (0..self.members.len())
                    .filter(|&i| self.running(i))
                    .collect();
                let mut before = Vec::new();
                for &i in &running {
                    before.push(self.keep_alives(i).await?);
                }
                tokio::time::sleep(period).await;
                let mut grew = Vec::new();
                for (&i, b) in running.iter().zip(before) {
                    grew.push((i, self.keep_alives(i).await? - b));
                }
                match grew.iter().filter(|(_, n)| *n > 0.0).collect::<Vec<_>>()[..] {
                    [(i, _)] => Ok(*i),
                    _ => Err(format!("(member, keep-alives received): {grew:?}")),
                }
            },
        )
        .await
    }

    /// The one running member that serves a watch (the proxy's), once there is exactly one.
    pub async fn watched(&self) -> usize {
        eventually(
            Duration::from_secs(10),
            "exactly one running etcd member to serve a watch",
            || async {
                let mut counts = Vec::new();
                for i in (0..self.members.len()).filter(|&i| self.running(i)) {
                    counts.push((i, self.watchers(i).await?));
                }
                match counts.iter().filter(|(_, n)| *n > 0.0).collect::<Vec<_>>()[..] {
                    [(i, n)] if *n == 1.0 => Ok(*i),
                    _ => Err(format!("(member, watchers): {counts:?}")),
                }
            },
        )
        .await
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
        if std::thread::panicking() {
            for m in &self.members {
                eprintln!("---- etcd {} log ----\n{}", m.name, m.log());
            }
        }
    }
}

pub fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(bin))
            .find(|p| p.is_file())
    })
}

/// Minimal blocking GET for readiness polls (no client library needed).
pub fn http_get_blocking(port: u16, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The switchyard binary, running as a real process.
pub struct Proxy {
    child: Option<Child>,
    pub port: u16,
    pub admin_port: u16,
    /// The Consul-compatible API's port (0 when the config turns it off or sets it).
    pub consul_port: u16,
    dir: tempfile::TempDir,
}

pub struct ProxyBuilder {
    etcd: Vec<String>,
    extra: String,
    prefix: Option<String>,
    wait_ready: bool,
    resync_ms: Option<u64>,
    listen_host: Option<String>,
    etcd_extra: String,
    open_files: Option<u64>,
    resolver: Option<(PathBuf, PathBuf)>,
}

impl ProxyBuilder {
    /// Bind the proxy listener to this host (default 127.0.0.1), e.g. "0.0.0.0".
    pub fn listen_host(mut self, host: &str) -> Self {
        self.listen_host = Some(host.to_string());
        self
    }

    /// Extra TOML appended to the generated config (sections other than [proxy]/[admin]/[etcd]).
    pub fn config(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    pub fn prefix(mut self, p: &str) -> Self {
        self.prefix = Some(p.to_string());
        self
    }

    /// A line added to the generated `[etcd]` section, e.g. `dns_timeout_ms = 500`.
    pub fn etcd_config(mut self, line: &str) -> Self {
        self.etcd_extra.push_str(line);
        self.etcd_extra.push('\n');
        self
    }

    /// etcd.resync_interval_ms (periodic full re-list).
    pub fn resync_ms(mut self, ms: u64) -> Self {
        self.resync_ms = Some(ms);
        self
    }

    /// Starts the process with this open-file limit, soft and hard (it cannot raise it).
    pub fn open_files(mut self, n: u64) -> Self {
        self.open_files = Some(n);
        self
    }

    /// Runs the process in a mount namespace of its own where these files are `/etc/hosts` and
    /// `/etc/resolv.conf` (needs root and `unshare`): the test decides what names resolve to, and
    /// edits the files in place (the same inode) to change it.
    pub fn resolver_files(mut self, hosts: &Path, resolv_conf: &Path) -> Self {
        self.resolver = Some((hosts.to_path_buf(), resolv_conf.to_path_buf()));
        self
    }

    /// Don't wait for /readyz (etcd down at start).
    pub fn no_wait_ready(mut self) -> Self {
        self.wait_ready = false;
        self
    }

    /// Starts the process and waits for it to be ready (or only alive, see
    /// [`Self::no_wait_ready`]); on a port another process took meanwhile, starts again on
    /// fresh ones.
    pub async fn start(self) -> Proxy {
        let mut conflicts = Vec::new();
        for _ in 0..5 {
            match self.start_once().await {
                Ok(p) => return p,
                Err(conflict) => {
                    eprintln!("switchyard starts again on other ports: {conflict}");
                    conflicts.push(conflict);
                }
            }
        }
        panic!("switchyard could not get ports of its own: {conflicts:?}");
    }

    /// One start on fresh ports; `Err` when one of them turned out not to be its own.
    async fn start_once(&self) -> Result<Proxy, String> {
        let dir = tempfile::tempdir().expect("temp dir for proxy");
        let port = free_port();
        let admin_port = free_port();
        let etcd = self
            .etcd
            .iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let prefix = self.prefix.clone().unwrap_or_else(|| "/services/".into());
        let mut text = self.extra.clone();
        if !text.contains("[proxy]") {
            text.push_str("\n[proxy]\nconnect_timeout_ms = 500\nread_timeout_ms = 2000\n");
        }
        text.push_str(&format!(
            "\n[etcd]\nendpoints = [{etcd}]\nprefix = {prefix:?}\nbackoff_initial_ms = 50\nbackoff_max_ms = 500\nrequest_timeout_ms = 1000\ndial_timeout_ms = 1000\n"
        ));
        if let Some(ms) = self.resync_ms {
            text.push_str(&format!("resync_interval_ms = {ms}\n"));
        }
        text.push_str(&self.etcd_extra);
        // never Consul's default 8500: tests run many proxies at once
        let mut consul_port = 0;
        if !text.contains("[consul]") {
            consul_port = free_port();
            text.push_str(&format!(
                "\n[consul]\nlisten = \"127.0.0.1:{consul_port}\"\n"
            ));
        }
        let path = dir.path().join("switchyard.toml");
        std::fs::write(&path, &text).expect("writing proxy config");
        let log = std::fs::File::create(dir.path().join("proxy.log")).expect("proxy log");
        let bin = env!("CARGO_BIN_EXE_switchyard");
        let mut command = match &self.resolver {
            None => Command::new(bin),
            Some((hosts, resolv_conf)) => {
                let unshare = which("unshare").unwrap_or_else(|| {
                    panic!("unshare (util-linux) is needed for a resolver of the test's own")
                });
                let mut c = Command::new(unshare);
                // unshare makes the new namespace's mounts private: the host's files stay as
                // they are
                c.args(["-m", "--", "sh", "-c"])
                    .arg(
                        "mount --bind \"$1\" /etc/hosts && mount --bind \"$2\" /etc/resolv.conf \
                         && shift 2 && exec \"$@\"",
                    )
                    .arg("sh")
                    .arg(hosts)
                    .arg(resolv_conf)
                    .arg(bin);
                c
            }
        };
        if let Some(n) = self.open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec the closure only calls setrlimit, which is
            // async-signal-safe, and allocates nothing.
            #[allow(unsafe_code)]
            unsafe {
                command.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .arg("--listen")
            .arg(format!(
                "{}:{port}",
                self.listen_host.as_deref().unwrap_or("127.0.0.1")
            ))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{admin_port}"))
            .env("RUST_LOG", "info,switchyard=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting switchyard");
        let mut p = Proxy {
            child: Some(child),
            port,
            admin_port,
            consul_port,
            dir,
        };
        let path = if self.wait_ready {
            "/readyz"
        } else {
            "/healthz"
        };
        let admin_port = p.admin_port;
        let started = Instant::now();
        loop {
            if let Ok(r) = http_get_blocking(admin_port, path) {
                if r.starts_with("HTTP/1.1 200") {
                    break;
                }
            }
            if let Some(Ok(Some(status))) = p.child.as_mut().map(|c| c.try_wait()) {
                let log = p.log();
                if log.contains("Address already in use") {
                    return Err(format!("exited with {status}: a port was taken"));
                }
                panic!("switchyard exited with {status} at start; log:\n{log}");
            }
            if started.elapsed() > Duration::from_secs(20) {
                panic!(
                    "switchyard did not answer {path} within 20s; log:\n{}",
                    p.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // the proxy listener is a service of its own, bound on its own thread: /readyz waits for
        // it, /healthz (a proxy started without waiting for readiness) does not
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", p.port)).is_ok() {
                break;
            }
            if started.elapsed() > Duration::from_secs(20) {
                panic!(
                    "switchyard's proxy listener 127.0.0.1:{} did not accept within 20s; log:\n{}",
                    p.port,
                    p.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let pid = p.pid().expect("the process just started");
        let ports = [p.port, p.admin_port, p.consul_port];
        if let Some(why) =
            (ports.into_iter().filter(|port| *port != 0)).find_map(|port| port_not_owned(pid, port))
        {
            // dropping `p` stops the process
            return Err(why);
        }
        Ok(p)
    }
}

impl Proxy {
    pub fn builder(etcd: &EtcdServer) -> ProxyBuilder {
        ProxyBuilder {
            etcd: vec![etcd.endpoint()],
            extra: String::new(),
            prefix: None,
            wait_ready: true,
            resync_ms: None,
            listen_host: None,
            etcd_extra: String::new(),
            open_files: None,
            resolver: None,
        }
    }

    pub fn builder_endpoints(endpoints: Vec<String>) -> ProxyBuilder {
        ProxyBuilder {
            etcd: endpoints,
            extra: String::new(),
            prefix: None,
            wait_ready: true,
            resync_ms: None,
            listen_host: None,
            etcd_extra: String::new(),
            open_files: None,
            resolver: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn consul_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.consul_port)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("proxy.log")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, patience: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        kill_child(&mut c, "-TERM");
        let status = wait_exit(&mut c, patience);
        if status.is_none() {
            kill_child(&mut c, "-KILL");
            let _ = c.wait();
        }
        status
    }

    /// A GET through the proxy with `Host: <service>`; returns (status, body).
    pub async fn get_service(&self, service: &str, path: &str) -> (u16, String) {
        let resp = client()
            .get(self.url(path))
            .header("host", service)
            .send()
            .await;
        match resp {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.text().await.unwrap_or_default())
            }
            Err(e) => (0, format!("request failed: {e}")),
        }
    }

    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let text = client()
            .get(self.admin_url(path))
            .send()
            .await
            .expect("admin request")
            .text()
            .await
            .expect("admin body");
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("admin {path} is not json ({e}): {text}"))
    }

    /// Waits until `service` has exactly `n` usable instances in the proxy's snapshot.
    pub async fn wait_usable(&self, service: &str, n: u64) {
        eventually(
            Duration::from_secs(10),
            &format!("{service} to have {n} usable instance(s)"),
            || async {
                let v = self.admin_json(&format!("/api/services/{service}")).await;
                match v["usable"].as_u64() {
                    Some(u) if u == n => Ok(()),
                    other => Err(format!("usable = {other:?}")),
                }
            },
        )
        .await;
    }

    pub async fn metrics(&self) -> String {
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("metrics request")
            .text()
            .await
            .expect("metrics body")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c, "-KILL");
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- switchyard log ----\n{}", self.log());
        }
    }
}

/// An HTTP client that never uses an environment proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .pool_max_idle_per_host(16)
        .build()
        .expect("building reqwest client")
}

/// Value of one sample in Prometheus text, e.g. `metric_value(text, "x_total{a=\"b\"}")`.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// The value of `series` in the exposition `text`; 0 when the sample is absent but its family is
/// exported (switchyard writes no per-service counter that is still 0). Panics when the family
/// itself is missing: a misspelled or removed metric fails the test instead of reading 0 on both
/// sides of a comparison.
pub fn counter_value(text: &str, series: &str) -> f64 {
    if let Some(v) = metric_value(text, series) {
        return v;
    }
    let name = series.split('{').next().unwrap_or(series);
    let family = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .filter(|f| text.contains(&format!("# TYPE {f} histogram")))
        .unwrap_or(name);
    assert!(
        text.contains(&format!("# TYPE {family} ")),
        "metric family {family} is not exported at all (reading {series}):\n{text}"
    );
    0.0
}

pub fn temp_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("writing temp file");
    p
}

/// py-consul driven from the tests (tests/consul.rs).
pub mod consul;

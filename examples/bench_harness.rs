//! Measuring harness for the benchmark scripts in `scripts/bench/` (see BENCHMARKS.md).
//!
//! Subcommands, each driven by a script that starts etcd, backends and switchyard:
//! - `bulk-load`: writes many registrations into etcd quickly (txn batches, concurrent).
//! - `propagation`: time from an etcd write (new instance; deletion) to the first request through
//!   the proxy that reflects it, over many trials.
//! - `failover`: keeps a closed-loop load on the proxy, sends a signal (KILL or STOP) to one
//!   backend, and reports failed requests, latency and how long the victim still got traffic.
//! - `scale-probe`: starts switchyard, measures time to `/readyz` and resident memory.
//! - `open-loop`: a latency-correct load at a fixed rate (each request's latency counts from when
//!   it was due, so a stall is not hidden by the client waiting: no coordinated omission), with
//!   p50/p99/p99.9, errors and which backend answered.
//!
//! The HTTP client is a deliberately small blocking HTTP/1.1 keep-alive client on std sockets, so
//! that polling intervals of a fraction of a millisecond are possible and its own cost is tiny.
//! Every loop is bounded by a count and a deadline.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use etcd_client::{Client, EventType, Txn, TxnOp, WatchOptions};

#[derive(Parser)]
#[command(about = "switchyard benchmark harness (driven by scripts/bench/*.sh)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A fixed-rate GET load; prints one TSV line: label, requests, errors, p50, p99, p99.9 and
    /// max in ms, then `name=count` for every answering backend (from a `hello from <name>` body).
    OpenLoop {
        /// host:port of the proxy.
        #[arg(long)]
        proxy: String,
        /// Host header.
        #[arg(long, default_value = "bench")]
        host: String,
        /// Requests per second.
        #[arg(long)]
        rate: u64,
        #[arg(long)]
        duration_ms: u64,
        /// Client threads, each with one keep-alive connection (enough to never run out).
        #[arg(long, default_value_t = 64)]
        conns: usize,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Put `services * per_service` registrations `<prefix><service_prefix>-<s>/<i>` = addr.
    BulkLoad {
        #[arg(long)]
        etcd: String,
        #[arg(long, default_value = "/services/")]
        prefix: String,
        #[arg(long, default_value = "filler")]
        service_prefix: String,
        #[arg(long)]
        services: usize,
        #[arg(long, default_value_t = 1)]
        per_service: usize,
        /// Value of every registration (host:port).
        #[arg(long)]
        addr: String,
        /// Puts per transaction (etcd's default limit is 128).
        #[arg(long, default_value_t = 128)]
        batch: usize,
        /// Transactions in flight at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Propagation trials: add a new service's instance, poll until routed; delete, poll until not.
    Propagation {
        #[arg(long)]
        etcd: String,
        #[arg(long, default_value = "/services/")]
        prefix: String,
        /// Proxy address (host:port).
        #[arg(long)]
        proxy: String,
        /// Backend address the new instances are registered with.
        #[arg(long)]
        addr: String,
        #[arg(long, default_value_t = 100)]
        trials: usize,
        /// Pause between two polls, in microseconds.
        #[arg(long, default_value_t = 250)]
        poll_us: u64,
        /// Give up on one trial after this long.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Label for the output row.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Closed-loop load, a signal to one backend, and what the clients saw.
    Failover {
        /// Proxy address (host:port).
        #[arg(long)]
        proxy: String,
        /// Admin address (host:port) for /api/services/<service>.
        #[arg(long)]
        admin: String,
        #[arg(long, default_value = "bench")]
        service: String,
        /// Instance id of the victim (as registered) and the body marker it answers with.
        #[arg(long)]
        victim_id: String,
        #[arg(long)]
        victim_marker: String,
        #[arg(long)]
        pid: u32,
        /// KILL or STOP.
        #[arg(long)]
        signal: String,
        #[arg(long, default_value_t = 16)]
        conns: usize,
        #[arg(long, default_value_t = 2000)]
        before_ms: u64,
        #[arg(long, default_value_t = 8000)]
        after_ms: u64,
        /// Client-side timeout of one request.
        #[arg(long, default_value_t = 20000)]
        client_timeout_ms: u64,
        /// A request slower than this counts as affected (in ms).
        #[arg(long, default_value_t = 100)]
        slow_ms: u64,
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Start a command (switchyard serve ...), time /readyz, sample RSS and CPU, stop it.
    ScaleProbe {
        /// Admin address (host:port) of the started switchyard.
        #[arg(long)]
        admin: String,
        /// Where to write the child's pid (so the calling script can clean up).
        #[arg(long)]
        pid_file: String,
        /// After ready, wait this long and sample RSS and CPU again.
        #[arg(long, default_value_t = 5000)]
        settle_ms: u64,
        #[arg(long, default_value_t = 30000)]
        ready_timeout_ms: u64,
        #[arg(long, default_value = "")]
        label: String,
        /// Proxy address: with --traffic N, after the admin calls, one GET / to each of the
        /// services <traffic-prefix>-0 .. -(N-1) (as bulk-load names them), then RSS again.
        #[arg(long)]
        proxy: Option<String>,
        #[arg(long, default_value_t = 0)]
        traffic: usize,
        #[arg(long, default_value = "filler")]
        traffic_prefix: String,
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::OpenLoop {
            proxy,
            host,
            rate,
            duration_ms,
            conns,
            timeout_ms,
            label,
        } => open_loop(
            resolve(&proxy)?,
            &host,
            rate.clamp(1, 200_000),
            Duration::from_millis(duration_ms.clamp(1, 600_000)),
            conns.clamp(1, 1024),
            Duration::from_millis(timeout_ms),
            &label,
        ),
        Cmd::BulkLoad {
            etcd,
            prefix,
            service_prefix,
            services,
            per_service,
            addr,
            batch,
            concurrency,
        } => bulk_load(
            &etcd,
            &prefix,
            &service_prefix,
            services,
            per_service,
            &addr,
            batch.clamp(1, 128),
            concurrency.clamp(1, 256),
        ),
        Cmd::Propagation {
            etcd,
            prefix,
            proxy,
            addr,
            trials,
            poll_us,
            timeout_ms,
            label,
        } => propagation(
            &etcd,
            &prefix,
            &proxy,
            &addr,
            trials.clamp(1, 100_000),
            Duration::from_micros(poll_us),
            Duration::from_millis(timeout_ms),
            &label,
        ),
        Cmd::Failover {
            proxy,
            admin,
            service,
            victim_id,
            victim_marker,
            pid,
            signal,
            conns,
            before_ms,
            after_ms,
            client_timeout_ms,
            slow_ms,
            label,
        } => failover(FailoverArgs {
            proxy: resolve(&proxy)?,
            admin: resolve(&admin)?,
            service,
            victim_id,
            victim_marker,
            pid,
            signal,
            conns: conns.clamp(1, 512),
            before: Duration::from_millis(before_ms),
            after: Duration::from_millis(after_ms),
            client_timeout: Duration::from_millis(client_timeout_ms),
            slow: Duration::from_millis(slow_ms),
            label,
        }),
        Cmd::ScaleProbe {
            admin,
            pid_file,
            settle_ms,
            ready_timeout_ms,
            label,
            proxy,
            traffic,
            traffic_prefix,
            cmd,
        } => {
            let traffic = match proxy {
                Some(p) if traffic > 0 => Some((resolve(&p)?, traffic, traffic_prefix)),
                _ => None,
            };
            scale_probe(
                resolve(&admin)?,
                &pid_file,
                Duration::from_millis(settle_ms),
                Duration::from_millis(ready_timeout_ms),
                &label,
                traffic,
                &cmd,
            )
        }
    }
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("no address for {addr}"))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

// ---------------------------------------------------------------------------------------------
// A minimal blocking HTTP/1.1 keep-alive client.

struct HttpConn {
    addr: SocketAddr,
    timeout: Duration,
    stream: Option<BufReader<TcpStream>>,
    header: String,
}

struct Response {
    status: u16,
    body: Vec<u8>,
}

impl HttpConn {
    fn new(addr: SocketAddr, timeout: Duration) -> HttpConn {
        HttpConn {
            addr,
            timeout,
            stream: None,
            header: String::with_capacity(256),
        }
    }

    /// GET `path` with `Host: host`. A failure on a reused connection before any response byte
    /// arrived (the server closed an idle connection) is retried once on a fresh connection.
    fn get(&mut self, host: &str, path: &str) -> io::Result<Response> {
        let reused = self.stream.is_some();
        match self.try_get(host, path) {
            Ok(r) => Ok(r),
            Err((e, got_bytes)) => {
                self.stream = None;
                if reused && !got_bytes {
                    self.try_get(host, path).map_err(|(e, _)| {
                        self.stream = None;
                        e
                    })
                } else {
                    Err(e)
                }
            }
        }
    }

    fn connect(&mut self) -> io::Result<&mut BufReader<TcpStream>> {
        if self.stream.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, self.timeout)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(self.timeout))?;
            s.set_write_timeout(Some(self.timeout))?;
            self.stream = Some(BufReader::with_capacity(16 * 1024, s));
        }
        self.stream
            .as_mut()
            .ok_or_else(|| io::Error::other("no stream"))
    }

    fn try_get(&mut self, host: &str, path: &str) -> Result<Response, (io::Error, bool)> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sy-bench\r\n\r\n");
        let mut header = std::mem::take(&mut self.header);
        let res = (|| {
            let s = self.connect().map_err(|e| (e, false))?;
            s.get_mut()
                .write_all(req.as_bytes())
                .map_err(|e| (e, false))?;
            // status line
            header.clear();
            let n = s.read_line(&mut header).map_err(|e| (e, false))?;
            if n == 0 {
                return Err((
                    io::Error::new(io::ErrorKind::UnexpectedEof, "closed"),
                    false,
                ));
            }
            let status: u16 = header
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| {
                    (
                        io::Error::other(format!("bad status line {header:?}")),
                        true,
                    )
                })?;
            let mut content_length: Option<usize> = None;
            let mut chunked = false;
            let mut close = false;
            loop {
                header.clear();
                let n = s.read_line(&mut header).map_err(|e| (e, true))?;
                if n == 0 {
                    return Err((
                        io::Error::new(io::ErrorKind::UnexpectedEof, "eof in headers"),
                        true,
                    ));
                }
                let line = header.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    let v = v.trim();
                    if k.eq_ignore_ascii_case("content-length") {
                        content_length = v.parse().ok();
                    } else if k.eq_ignore_ascii_case("transfer-encoding") {
                        chunked = v.eq_ignore_ascii_case("chunked");
                    } else if k.eq_ignore_ascii_case("connection") {
                        close = v.eq_ignore_ascii_case("close");
                    }
                }
            }
            let mut body = Vec::new();
            if chunked {
                loop {
                    header.clear();
                    s.read_line(&mut header).map_err(|e| (e, true))?;
                    let size =
                        usize::from_str_radix(header.trim().split(';').next().unwrap_or(""), 16)
                            .map_err(|_| (io::Error::other("bad chunk size"), true))?;
                    if size == 0 {
                        // trailers until the empty line
                        loop {
                            header.clear();
                            let n = s.read_line(&mut header).map_err(|e| (e, true))?;
                            if n == 0 || header.trim_end().is_empty() {
                                break;
                            }
                        }
                        break;
                    }
                    let start = body.len();
                    body.resize(start + size, 0);
                    s.read_exact(&mut body[start..]).map_err(|e| (e, true))?;
                    let mut crlf = [0u8; 2];
                    s.read_exact(&mut crlf).map_err(|e| (e, true))?;
                }
            } else if let Some(len) = content_length {
                body.resize(len, 0);
                s.read_exact(&mut body).map_err(|e| (e, true))?;
            } else {
                s.read_to_end(&mut body).map_err(|e| (e, true))?;
                close = true;
            }
            Ok((Response { status, body }, close))
        })();
        self.header = header;
        match res {
            Ok((r, close)) => {
                if close {
                    self.stream = None;
                }
                Ok(r)
            }
            Err(e) => Err(e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics helpers.

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn summary_ms(xs: &mut [f64]) -> String {
    xs.sort_by(|a, b| a.total_cmp(b));
    format!(
        "n={} p50={:.3} p90={:.3} p99={:.3} max={:.3} mean={:.3}",
        xs.len(),
        percentile(xs, 50.0),
        percentile(xs, 90.0),
        percentile(xs, 99.0),
        xs.last().copied().unwrap_or(f64::NAN),
        if xs.is_empty() {
            f64::NAN
        } else {
            xs.iter().sum::<f64>() / xs.len() as f64
        }
    )
}

// ---------------------------------------------------------------------------------------------
// open-loop

/// Request `i` is due at `start + i / rate`; `conns` threads take the next due request, wait
/// until it is due, send it, and count its latency from when it was due (a request that waited
/// for a free thread counts the wait).
fn open_loop(
    proxy: SocketAddr,
    host: &str,
    rate: u64,
    duration: Duration,
    conns: usize,
    timeout: Duration,
    label: &str,
) -> Result<()> {
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicU64;
    let total = rate * duration.as_millis() as u64 / 1000;
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(50);
    let period_ns = 1_000_000_000 / rate;
    let mut workers = Vec::new();
    for _ in 0..conns {
        let (next, host) = (next.clone(), host.to_string());
        workers.push(std::thread::spawn(move || {
            let mut conn = HttpConn::new(proxy, timeout);
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut by: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let due = start + Duration::from_nanos(i * period_ns);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                match conn.get(&host, "/") {
                    Ok(r) => {
                        lat.push(due.elapsed().as_secs_f64() * 1000.0);
                        if !(200..300).contains(&r.status) {
                            errors += 1;
                        }
                        let body = String::from_utf8_lossy(&r.body);
                        let name = body
                            .trim()
                            .strip_prefix("hello from ")
                            .unwrap_or(if r.status >= 500 { "error" } else { "?" })
                            .to_string();
                        *by.entry(name).or_default() += 1;
                    }
                    Err(_) => {
                        lat.push(due.elapsed().as_secs_f64() * 1000.0);
                        errors += 1;
                        *by.entry("failed".into()).or_default() += 1;
                    }
                }
            }
            (lat, errors, by)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    let mut by: BTreeMap<String, u64> = BTreeMap::new();
    for w in workers {
        let (l, e, b) = w.join().map_err(|_| anyhow!("a client thread panicked"))?;
        lat.extend(l);
        errors += e;
        for (k, v) in b {
            *by.entry(k).or_default() += v;
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let shares: Vec<String> = by.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "{label}\t{}\t{errors}\t{:.3}\t{:.3}\t{:.3}\t{:.3}\t{}",
        lat.len(),
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        percentile(&lat, 99.9),
        lat.last().copied().unwrap_or(f64::NAN),
        shares.join(",")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// bulk-load

#[allow(clippy::too_many_arguments)]
fn bulk_load(
    etcd: &str,
    prefix: &str,
    service_prefix: &str,
    services: usize,
    per_service: usize,
    addr: &str,
    batch: usize,
    concurrency: usize,
) -> Result<()> {
    let rt = runtime()?;
    let keys: Vec<String> = (0..services)
        .flat_map(|s| (0..per_service).map(move |i| (s, i)))
        .map(|(s, i)| format!("{prefix}{service_prefix}-{s}/{i}"))
        .collect();
    let total = keys.len();
    let started = Instant::now();
    rt.block_on(async {
        let client = Client::connect([etcd], None)
            .await
            .with_context(|| format!("connecting to etcd at {etcd}"))?;
        let chunks: Vec<Vec<String>> = keys.chunks(batch).map(|c| c.to_vec()).collect();
        let queue = Arc::new(Mutex::new(chunks));
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let queue = queue.clone();
            let mut kv = client.kv_client();
            let addr = addr.to_string();
            tasks.push(tokio::spawn(async move {
                loop {
                    let chunk = match queue.lock() {
                        Ok(mut q) => q.pop(),
                        Err(_) => None,
                    };
                    let Some(chunk) = chunk else { break };
                    let ops: Vec<TxnOp> = chunk
                        .into_iter()
                        .map(|k| TxnOp::put(k, addr.clone(), None))
                        .collect();
                    kv.txn(Txn::new().and_then(ops)).await?;
                }
                Ok::<(), etcd_client::Error>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok::<(), anyhow::Error>(())
    })?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "bulk-load: {total} keys ({services} services x {per_service}) in {secs:.2} s ({:.0} keys/s)",
        total as f64 / secs.max(1e-9)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// propagation

/// Polls until `pred(status)` holds; returns the time from `t0` to the end of that response.
fn poll_until(
    conn: &mut HttpConn,
    host: &str,
    t0: Instant,
    interval: Duration,
    timeout: Duration,
    pred: impl Fn(u16) -> bool,
    polls: &mut u64,
) -> Option<Duration> {
    while t0.elapsed() < timeout {
        *polls += 1;
        if let Ok(r) = conn.get(host, "/") {
            if pred(r.status) {
                return Some(t0.elapsed());
            }
        }
        std::thread::sleep(interval);
    }
    None
}

/// When the harness's own watch of `prefix` received each event: (key, put?) → time.
type Seen = Arc<Mutex<std::collections::HashMap<(Vec<u8>, bool), Instant>>>;

/// Watches `prefix` from now on in the background and records when each event arrives: the
/// time from a write to its watch event is etcd's part of propagation (switchyard's watch gets
/// the same events from the same server).
async fn watch_events(client: &mut Client, prefix: &str) -> Result<Seen> {
    let mut stream = client
        .watch(prefix, Some(WatchOptions::new().with_prefix()))
        .await
        .context("watching the prefix")?;
    let seen: Seen = Arc::default();
    let out = seen.clone();
    tokio::spawn(async move {
        while let Ok(Some(resp)) = stream.message().await {
            let at = Instant::now();
            let Ok(mut seen) = out.lock() else { return };
            for ev in resp.events() {
                if let Some(kv) = ev.kv() {
                    let put = ev.event_type() == EventType::Put;
                    seen.insert((kv.key().to_vec(), put), at);
                }
            }
        }
    });
    Ok(seen)
}

/// Splits one trial that started at `t0` and was seen by the proxy after `total` into etcd's
/// part (write to watch event) and the rest (0 when our watch got the event after the proxy
/// reflected it). Waits up to a second for our watch; a trial whose event never came is left
/// out of both.
fn split(
    seen: &Seen,
    key: &str,
    put: bool,
    t0: Instant,
    total: Duration,
    etcd_part: &mut Vec<f64>,
    rest: &mut Vec<f64>,
) {
    let wanted = (key.as_bytes().to_vec(), put);
    let deadline = Instant::now() + Duration::from_secs(1);
    let at = loop {
        let at = seen.lock().ok().and_then(|mut s| s.remove(&wanted));
        if at.is_some() || Instant::now() > deadline {
            break at;
        }
        std::thread::sleep(Duration::from_micros(100));
    };
    if let Some(at) = at {
        let watched = at.saturating_duration_since(t0);
        etcd_part.push(watched.as_secs_f64() * 1e3);
        rest.push(total.saturating_sub(watched).as_secs_f64() * 1e3);
    }
}

#[allow(clippy::too_many_arguments)]
fn propagation(
    etcd: &str,
    prefix: &str,
    proxy: &str,
    addr: &str,
    trials: usize,
    interval: Duration,
    timeout: Duration,
    label: &str,
) -> Result<()> {
    let rt = runtime()?;
    let mut client = rt
        .block_on(Client::connect([etcd], None))
        .with_context(|| format!("connecting to etcd at {etcd}"))?;
    let seen = rt.block_on(watch_events(&mut client, prefix))?;
    let mut conn = HttpConn::new(resolve(proxy)?, Duration::from_secs(2));
    let tag = std::process::id();
    let (mut adds, mut dels) = (Vec::new(), Vec::new());
    // how long etcd took to acknowledge the write (a floor for propagation)
    let (mut put_acks, mut del_acks) = (Vec::new(), Vec::new());
    // when our own watch saw the event (etcd's part, the same for every client of etcd), and the
    // rest of each trial (switchyard's part: apply, first check, the poll that sees it)
    let (mut put_seen, mut del_seen) = (Vec::new(), Vec::new());
    let (mut add_after, mut del_after) = (Vec::new(), Vec::new());
    let (mut add_timeouts, mut del_timeouts, mut polls) = (0usize, 0usize, 0u64);
    let started = Instant::now();
    for i in 0..trials {
        let svc = format!("prop{tag}-{i}");
        let key = format!("{prefix}{svc}/x");
        let before = conn
            .get(&svc, "/")
            .with_context(|| format!("request for {svc} before registering it"))?;
        if before.status == 200 {
            bail!("service {svc} routed before it was registered");
        }

        let mut kv = client.kv_client();
        let (k, v) = (key.clone(), addr.to_string());
        let t0 = Instant::now();
        let put = rt.spawn(async move {
            let r = kv.put(k, v, None).await;
            (r, t0.elapsed())
        });
        match poll_until(
            &mut conn,
            &svc,
            t0,
            interval,
            timeout,
            |s| s == 200,
            &mut polls,
        ) {
            Some(d) => {
                adds.push(d.as_secs_f64() * 1e3);
                split(&seen, &key, true, t0, d, &mut put_seen, &mut add_after);
            }
            None => add_timeouts += 1,
        }
        let (r, acked) = rt.block_on(put)?;
        r.context("etcd put")?;
        put_acks.push(acked.as_secs_f64() * 1e3);

        let mut kv = client.kv_client();
        let k = key.clone();
        let t0 = Instant::now();
        let del = rt.spawn(async move {
            let r = kv.delete(k, None).await;
            (r, t0.elapsed())
        });
        match poll_until(
            &mut conn,
            &svc,
            t0,
            interval,
            timeout,
            |s| s != 200,
            &mut polls,
        ) {
            Some(d) => {
                dels.push(d.as_secs_f64() * 1e3);
                split(&seen, &key, false, t0, d, &mut del_seen, &mut del_after);
            }
            None => del_timeouts += 1,
        }
        let (r, acked) = rt.block_on(del)?;
        r.context("etcd delete")?;
        del_acks.push(acked.as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(2));
    }
    let label = if label.is_empty() { "-" } else { label };
    println!(
        "propagation {label}: {trials} trials in {:.1} s, poll every {} us, {polls} polls",
        started.elapsed().as_secs_f64(),
        interval.as_micros()
    );
    println!(
        "add    ms: {} timeouts={add_timeouts}",
        summary_ms(&mut adds)
    );
    println!(
        "delete ms: {} timeouts={del_timeouts}",
        summary_ms(&mut dels)
    );
    println!("etcd put ack ms:    {}", summary_ms(&mut put_acks));
    println!("etcd delete ack ms: {}", summary_ms(&mut del_acks));
    println!("etcd put watched ms:    {}", summary_ms(&mut put_seen));
    println!("etcd delete watched ms: {}", summary_ms(&mut del_seen));
    println!("add after watch ms:    {}", summary_ms(&mut add_after));
    println!("delete after watch ms: {}", summary_ms(&mut del_after));
    // machine-readable: label kind n p50 p90 p99 max timeouts ack_p50 ack_p99 watched_p50
    // watched_p99 after_p50 after_p99
    for (kind, xs, to, acks, watched, after) in [
        ("add", &adds, add_timeouts, &put_acks, &put_seen, &add_after),
        (
            "delete",
            &dels,
            del_timeouts,
            &del_acks,
            &del_seen,
            &del_after,
        ),
    ] {
        println!(
            "ROW\t{label}\t{kind}\t{}\t{:.3}\t{:.3}\t{:.3}\t{:.3}\t{to}\t{:.3}\t{:.3}\t{:.3}\t{:.3}\t{:.3}\t{:.3}",
            xs.len(),
            percentile(xs, 50.0),
            percentile(xs, 90.0),
            percentile(xs, 99.0),
            xs.last().copied().unwrap_or(f64::NAN),
            percentile(acks, 50.0),
            percentile(acks, 99.0),
            percentile(watched, 50.0),
            percentile(watched, 99.0),
            percentile(after, 50.0),
            percentile(after, 99.0)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// failover

struct FailoverArgs {
    proxy: SocketAddr,
    admin: SocketAddr,
    service: String,
    victim_id: String,
    victim_marker: String,
    pid: u32,
    signal: String,
    conns: usize,
    before: Duration,
    after: Duration,
    client_timeout: Duration,
    slow: Duration,
    label: String,
}

#[derive(Clone, Copy, PartialEq)]
enum Outcome {
    Victim,
    Other,
    HttpError(u16),
    IoError,
}

struct Sample {
    start: Duration,
    dur: Duration,
    outcome: Outcome,
}

/// What the admin API said about the victim at one moment.
struct AdminSample {
    at: Duration,
    requests: u64,
    health: String,
}

fn failover(a: FailoverArgs) -> Result<()> {
    if a.signal != "KILL" && a.signal != "STOP" {
        bail!("--signal must be KILL or STOP, not {:?}", a.signal);
    }
    let t0 = Instant::now();
    let end = a.before + a.after;
    let stop = Arc::new(AtomicBool::new(false));
    let marker = a.victim_marker.as_bytes().to_vec();
    let mut workers = Vec::new();
    for _ in 0..a.conns {
        let stop = stop.clone();
        let marker = marker.clone();
        let (proxy, timeout, service) = (a.proxy, a.client_timeout, a.service.clone());
        workers.push(std::thread::spawn(move || {
            let mut conn = HttpConn::new(proxy, timeout);
            let mut out = Vec::with_capacity(100_000);
            // bounded: stops at `end`, each request bounded by the client timeout
            while !stop.load(Ordering::Relaxed) && out.len() < 5_000_000 {
                let start = t0.elapsed();
                let outcome = match conn.get(&service, "/") {
                    Ok(r) if r.status == 200 => {
                        if r.body.windows(marker.len()).any(|w| w == marker.as_slice()) {
                            Outcome::Victim
                        } else {
                            Outcome::Other
                        }
                    }
                    Ok(r) => Outcome::HttpError(r.status),
                    Err(_) => Outcome::IoError,
                };
                out.push(Sample {
                    start,
                    dur: t0.elapsed().saturating_sub(start),
                    outcome,
                });
            }
            out
        }));
    }

    // admin poller: the victim's request counter (incremented each time it is picked) and health
    let admin_samples = Arc::new(Mutex::new(Vec::<AdminSample>::new()));
    let poller = {
        let stop = stop.clone();
        let samples = admin_samples.clone();
        let (admin, service, victim) = (a.admin, a.service.clone(), a.victim_id.clone());
        std::thread::spawn(move || {
            let mut conn = HttpConn::new(admin, Duration::from_secs(2));
            let path = format!("/api/services/{service}");
            let host = admin.to_string();
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) && n < 100_000 {
                n += 1;
                let at = t0.elapsed();
                if let Ok(r) = conn.get(&host, &path) {
                    if let Some(s) = victim_state(&r.body, &victim) {
                        if let Ok(mut v) = samples.lock() {
                            v.push(AdminSample {
                                at,
                                requests: s.0,
                                health: s.1,
                            });
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    std::thread::sleep(a.before);
    let event = t0.elapsed();
    let status = Command::new("kill")
        .arg(format!("-{}", a.signal))
        .arg(a.pid.to_string())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{} {} failed", a.signal, a.pid);
    }
    while t0.elapsed() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    for w in workers {
        samples.extend(w.join().map_err(|_| anyhow!("load thread panicked"))?);
    }
    poller
        .join()
        .map_err(|_| anyhow!("admin poller panicked"))?;

    // --- report
    let (before, after): (Vec<&Sample>, Vec<&Sample>) =
        samples.iter().partition(|s| s.start < event);
    let failed = |xs: &[&Sample]| {
        xs.iter()
            .filter(|s| matches!(s.outcome, Outcome::HttpError(_) | Outcome::IoError))
            .count()
    };
    // requests in flight at the event count as "after": they may be the ones that fail
    let in_flight_at_event = before
        .iter()
        .filter(|s| s.start + s.dur > event)
        .copied()
        .collect::<Vec<_>>();
    let failed_before = before
        .iter()
        .filter(|s| s.start + s.dur <= event)
        .filter(|s| matches!(s.outcome, Outcome::HttpError(_) | Outcome::IoError))
        .count();
    let failed_after = failed(&after) + failed(&in_flight_at_event);
    let mut codes: std::collections::BTreeMap<String, usize> = Default::default();
    for s in after.iter().chain(in_flight_at_event.iter()) {
        match s.outcome {
            Outcome::HttpError(c) => *codes.entry(c.to_string()).or_default() += 1,
            Outcome::IoError => *codes.entry("io".into()).or_default() += 1,
            _ => {}
        }
    }
    let lat = |xs: &[&Sample]| {
        let mut v: Vec<f64> = xs.iter().map(|s| s.dur.as_secs_f64() * 1e3).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    };
    let lb = lat(&before);
    let la = lat(&after);
    let victim_after = after
        .iter()
        .filter(|s| s.outcome == Outcome::Victim)
        .count();
    // client view: the last request, started after the event, that failed or was slow
    let affected: Vec<&&Sample> = after
        .iter()
        .filter(|s| {
            matches!(s.outcome, Outcome::HttpError(_) | Outcome::IoError) || s.dur >= a.slow
        })
        .collect();
    let last_affected_ms = affected
        .iter()
        .map(|s| s.start.saturating_sub(event).as_secs_f64() * 1e3)
        .fold(f64::NAN, f64::max);
    // proxy view: the last time the victim's pick counter went up, and when it turned unhealthy
    let admin = admin_samples
        .lock()
        .map_err(|_| anyhow!("admin samples poisoned"))?;
    let mut last_pick_ms = f64::NAN;
    let mut unhealthy_ms = f64::NAN;
    for w in admin.windows(2) {
        if w[1].requests > w[0].requests && w[1].at > event {
            // the counter rose somewhere in (w[0].at, w[1].at]
            last_pick_ms = (w[1].at.saturating_sub(event)).as_secs_f64() * 1e3;
        }
    }
    for s in admin.iter().filter(|s| s.at > event) {
        if s.health != "healthy" {
            unhealthy_ms = s.at.saturating_sub(event).as_secs_f64() * 1e3;
            break;
        }
    }
    let final_health = admin.last().map(|s| s.health.clone()).unwrap_or_default();
    let secs_before = event.as_secs_f64();
    let secs_after = (end.saturating_sub(event)).as_secs_f64();
    let label = if a.label.is_empty() { "-" } else { &a.label };
    println!(
        "failover {label}: kill -{} at {:.0} ms, {} connections, {} requests",
        a.signal,
        event.as_secs_f64() * 1e3,
        a.conns,
        samples.len()
    );
    println!(
        "  before: {:.0} rps, failed {failed_before}, latency p50 {:.3} ms p99 {:.3} ms max {:.3} ms",
        lb.len() as f64 / secs_before,
        percentile(&lb, 50.0),
        percentile(&lb, 99.0),
        lb.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "  after:  {:.0} rps, failed {failed_after} {codes:?}, latency p50 {:.3} ms p99 {:.3} ms max {:.3} ms",
        la.len() as f64 / secs_after,
        percentile(&la, 50.0),
        percentile(&la, 99.0),
        la.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "  victim answered {victim_after} requests started after the event; affected (failed or >= {} ms) requests: {}, last one started {last_affected_ms:.0} ms after the event",
        a.slow.as_millis(),
        affected.len()
    );
    println!(
        "  proxy view: victim last picked {last_pick_ms:.0} ms after the event (5 ms admin polling), not healthy from {unhealthy_ms:.0} ms, final state {final_health:?}"
    );
    // machine-readable: label signal requests failed_after codes p99_after_ms max_after_ms
    //                   last_affected_ms last_pick_ms unhealthy_ms
    println!(
        "ROW\t{label}\t{}\t{}\t{failed_after}\t{codes:?}\t{:.3}\t{:.3}\t{last_affected_ms:.0}\t{last_pick_ms:.0}\t{unhealthy_ms:.0}\t{:.0}\t{:.0}",
        a.signal,
        samples.len(),
        percentile(&la, 99.0),
        la.last().copied().unwrap_or(f64::NAN),
        lb.len() as f64 / secs_before,
        la.len() as f64 / secs_after,
    );
    Ok(())
}

/// (requests, health) of instance `id` in an /api/services/<name> answer.
fn victim_state(body: &[u8], id: &str) -> Option<(u64, String)> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let inst = v
        .get("instances")?
        .as_array()?
        .iter()
        .find(|i| i.get("id").and_then(|x| x.as_str()) == Some(id))?;
    Some((
        inst.get("requests")?.as_u64()?,
        inst.get("state")
            .or_else(|| inst.get("health"))?
            .as_str()?
            .to_string(),
    ))
}

// ---------------------------------------------------------------------------------------------
// scale-probe

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn stop_child(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn scale_probe(
    admin: SocketAddr,
    pid_file: &str,
    settle: Duration,
    ready_timeout: Duration,
    label: &str,
    traffic: Option<(SocketAddr, usize, String)>,
    cmd: &[String],
) -> Result<()> {
    let (prog, args) = cmd.split_first().ok_or_else(|| anyhow!("no command"))?;
    let log = std::fs::File::create(format!("{pid_file}.log"))?;
    let t0 = Instant::now();
    let mut child = Command::new(prog)
        .args(args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {prog}"))?;
    let pid = child.id();
    std::fs::write(pid_file, pid.to_string())?;
    let mut conn = HttpConn::new(admin, Duration::from_secs(2));
    let mut ready = None;
    while t0.elapsed() < ready_timeout {
        if let Ok(Some(st)) = child.try_wait() {
            bail!("switchyard exited before it was ready: {st}");
        }
        if let Ok(r) = conn.get(&admin.to_string(), "/readyz") {
            if r.status == 200 {
                ready = Some(t0.elapsed());
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let label = if label.is_empty() { "-" } else { label };
    let Some(ready) = ready else {
        // a result, not a harness failure: report it with the reason /readyz gives
        let reason = conn
            .get(&admin.to_string(), "/readyz")
            .map(|r| String::from_utf8_lossy(&r.body).trim().to_string())
            .unwrap_or_else(|e| e.to_string());
        let rss = rss_kib(pid).unwrap_or(0) as f64 / 1024.0;
        stop_child(&mut child);
        println!(
            "scale {label}: NOT READY after {:.0} s (/readyz: {reason}); RSS {rss:.1} MiB",
            ready_timeout.as_secs_f64()
        );
        println!(
            "ROW\t{label}\tnot ready in {:.0} s\t{rss:.1}\t-\t-\t-\t-\t-",
            ready_timeout.as_secs_f64()
        );
        return Ok(());
    };
    let rss_ready = rss_kib(pid).unwrap_or(0);
    let ticks0 = cpu_ticks(pid).unwrap_or(0);
    let mut peak = rss_ready;
    let s0 = Instant::now();
    while s0.elapsed() < settle {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(rss_kib(pid).unwrap_or(0));
    }
    let rss_settled = rss_kib(pid).unwrap_or(0);
    let ticks1 = cpu_ticks(pid).unwrap_or(0);
    let cpu = (ticks1.saturating_sub(ticks0)) as f64 / 100.0 / s0.elapsed().as_secs_f64();
    // what one Prometheus scrape costs: its time, its size, and the resident memory 1 s after it (a large
    // body is given back to the system 0.5 s after it was sent: src/memory.rs)
    let t_scrape = Instant::now();
    let scrape_kib = match conn.get(&admin.to_string(), "/metrics") {
        Ok(r) if r.status == 200 => r.body.len() as f64 / 1024.0,
        _ => f64::NAN,
    };
    let scrape_ms = t_scrape.elapsed().as_secs_f64() * 1e3;
    std::thread::sleep(Duration::from_millis(1000));
    let rss_scraped = rss_kib(pid).unwrap_or(0);
    // how many services/instances does it report?
    let (mut services, mut instances) = (0usize, 0usize);
    let t_api = Instant::now();
    let api = conn.get(&admin.to_string(), "/api/services");
    let api_ms = t_api.elapsed().as_secs_f64() * 1e3;
    std::thread::sleep(Duration::from_millis(1000));
    let rss_api = rss_kib(pid).unwrap_or(0);
    if let Ok(r) = api {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.body) {
            if let Some(a) = v.get("services").and_then(|s| s.as_array()) {
                services = a.len();
                instances = a
                    .iter()
                    .filter_map(|s| s.get("instances").and_then(|i| i.as_array()))
                    .map(|i| i.len())
                    .sum();
            }
        }
    }
    // memory with traffic: one request to each service (its request metrics, pooled connections)
    if let Some((proxy, n, prefix)) = traffic {
        let before = rss_kib(pid).unwrap_or(0);
        let mut client = HttpConn::new(proxy, Duration::from_secs(5));
        let t = Instant::now();
        let ok = (0..n)
            .filter(|s| {
                let host = format!("{prefix}-{s}");
                matches!(client.get(&host, "/"), Ok(r) if r.status == 200)
            })
            .count();
        let secs = t.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(1000));
        let after = rss_kib(pid).unwrap_or(0);
        let per = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
        println!(
            "scale {label}: one request to each of {n} services ({ok} answered 200, {secs:.1} s): RSS {:.1} -> {:.1} MiB, {per:.0} bytes per service",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
        );
        println!(
            "TRAFFIC\t{label}\t{ok} / {n}\t{:.1}\t{:.1}\t{per:.0}",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
        );
    }
    stop_child(&mut child);
    println!(
        "scale {label}: ready after {:.0} ms; RSS at ready {:.1} MiB, after {:.1} s {:.1} MiB (peak {:.1} MiB); CPU while settling {:.2} cores; /metrics {scrape_kib:.0} KiB in {scrape_ms:.1} ms, RSS 1 s after it {:.1} MiB; /api/services in {api_ms:.0} ms lists {services} services / {instances} instances, RSS 1 s after it {:.1} MiB",
        ready.as_secs_f64() * 1e3,
        rss_ready as f64 / 1024.0,
        settle.as_secs_f64(),
        rss_settled as f64 / 1024.0,
        peak as f64 / 1024.0,
        cpu,
        rss_scraped as f64 / 1024.0,
        rss_api as f64 / 1024.0,
    );
    println!(
        "ROW\t{label}\t{:.0}\t{:.1}\t{:.1}\t{:.1}\t{cpu:.2}\t{scrape_kib:.0} KiB, {scrape_ms:.0} ms\t{:.1}\t{services} / {instances} in {api_ms:.0} ms\t{:.1}",
        ready.as_secs_f64() * 1e3,
        rss_ready as f64 / 1024.0,
        rss_settled as f64 / 1024.0,
        peak as f64 / 1024.0,
        rss_scraped as f64 / 1024.0,
        rss_api as f64 / 1024.0,
    );
    Ok(())
}

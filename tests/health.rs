//! Health checks against a real etcd, real backends and the real switchyard binary: ejection by
//! active checks (HTTP, hanging, gRPC) and by passive detection, gated admission, identity-stable
//! health, the all-unhealthy behaviours, and probing thousands of keys.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{client, eventually, metric_value, Backend, EtcdServer, Proxy};

const PATIENCE: Duration = Duration::from_secs(10);

/// Fast checks so tests stay short: eject after 2 failures 300 ms apart.
const FAST: &str = "[health]\ninterval_ms = 300\ntimeout_ms = 300\njitter_ms = 0\nunhealthy_threshold = 2\nhealthy_threshold = 1\n";

/// Health of instance `key` as the admin API reports it ("" when not registered).
async fn health_of(proxy: &Proxy, service: &str, key: &str) -> String {
    let v = proxy.admin_json(&format!("/api/services/{service}")).await;
    v["instances"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["key"] == key))
        .map(|i| i["health"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// Waits until `key` reports `want`; returns how long that took.
async fn wait_health(proxy: &Proxy, service: &str, key: &str, want: &str) -> Duration {
    let start = Instant::now();
    eventually(PATIENCE, &format!("{key} to be {want}"), || async {
        match health_of(proxy, service, key).await {
            h if h == want => Ok(()),
            h => Err(format!("health is {h:?}")),
        }
    })
    .await;
    start.elapsed()
}

/// Sends `n` requests and returns how many each backend answered; every one must succeed.
async fn answered_by(
    proxy: &Proxy,
    service: &str,
    n: usize,
) -> std::collections::HashMap<String, usize> {
    let mut counts = std::collections::HashMap::new();
    for _ in 0..n {
        let (status, body) = proxy.get_service(service, "/").await;
        assert_eq!(status, 200, "request to {service} failed: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("echo json");
        *counts
            .entry(v["backend"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    counts
}

async fn metrics_value(proxy: &Proxy, series: &str) -> f64 {
    support::counter_value(&proxy.metrics().await, series)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_instance_fails_no_client_request() {
    let etcd = EtcdServer::start();
    // default check settings: this is about retries and passive detection
    let proxy = Proxy::builder(&etcd).start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    etcd.put("/services/k/a", a.addr_string()).await;
    etcd.put("/services/k/b", b.addr_string()).await;
    wait_health(&proxy, "k", "/services/k/a", "healthy").await;
    wait_health(&proxy, "k", "/services/k/b", "healthy").await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        // slow enough that requests are in flight on the instance when it dies
        let url = proxy.url("/slow?ms=20");
        clients.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                match c.get(&url).header("host", "k").send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        let s = r.status();
                        let body = r.text().await.unwrap_or_default();
                        failures.lock().unwrap().push(format!("{s} {body}"));
                    }
                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ok.load(Ordering::Relaxed);
    a.stop(); // closes the listener and every connection, like kill -9
    let ejected = wait_health(&proxy, "k", "/services/k/a", "unhealthy").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let after = ok.load(Ordering::Relaxed);
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} client requests failed after the kill: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        before > 10 && after > before + 10,
        "too few requests: {before} then {after}"
    );
    assert!(
        ejected < Duration::from_secs(4),
        "ejected after {ejected:?}"
    );
    let counts = answered_by(&proxy, "k", 10).await;
    assert_eq!(counts.get("b"), Some(&10), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_failures_eject_before_the_next_active_check() {
    let etcd = EtcdServer::start();
    // the first check is immediate, the next one a minute later: only passive detection can eject
    let proxy = Proxy::builder(&etcd)
        .config("[health]\ninterval_ms = 60000\npassive_failures = 2\n")
        .start()
        .await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    etcd.put("/services/p/a", a.addr_string()).await;
    etcd.put("/services/p/b", b.addr_string()).await;
    wait_health(&proxy, "p", "/services/p/a", "healthy").await;
    wait_health(&proxy, "p", "/services/p/b", "healthy").await;
    a.stop();
    // every request succeeds (refused connections are retried on b) and a is ejected quickly
    let counts = answered_by(&proxy, "p", 10).await;
    assert_eq!(counts.get("b"), Some(&10), "{counts:?}");
    let took = wait_health(&proxy, "p", "/services/p/a", "unhealthy").await;
    assert!(took < Duration::from_secs(2), "ejected after {took:?}");
    let log = proxy.log();
    assert!(log.contains("2 consecutive connection failures"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_endpoint_ejects_within_budget_and_recovery_readmits() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).config(FAST).start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    etcd.put("/services/h/a", a.addr_string()).await;
    etcd.put("/services/h/b", b.addr_string()).await;
    wait_health(&proxy, "h", "/services/h/a", "healthy").await;
    wait_health(&proxy, "h", "/services/h/b", "healthy").await;

    a.set_health(503);
    let took = wait_health(&proxy, "h", "/services/h/a", "unhealthy").await;
    // interval 300 ms x threshold 2 + timeout 300 ms, plus slack for a busy machine
    let budget = Duration::from_millis(300 * 2 + 300 + 700);
    assert!(took < budget, "ejected after {took:?}, budget {budget:?}");
    let hits = a.hits();
    let counts = answered_by(&proxy, "h", 20).await;
    assert_eq!(counts.get("b"), Some(&20), "{counts:?}");
    assert_eq!(a.hits(), hits, "an ejected instance got traffic");

    a.set_health(200);
    let took = wait_health(&proxy, "h", "/services/h/a", "healthy").await;
    assert!(
        took < Duration::from_millis(300 + 300 + 700),
        "readmitted after {took:?}"
    );
    let counts = answered_by(&proxy, "h", 20).await;
    assert!(counts.get("a").is_some_and(|n| *n >= 5), "{counts:?}");

    let m = proxy.metrics().await;
    let unhealthy = "switchyard_health_transitions_total{service=\"h\",state=\"unhealthy\"}";
    assert_eq!(metric_value(&m, unhealthy), Some(1.0), "{m}");
    assert!(
        support::counter_value(
            &m,
            "switchyard_health_checks_total{result=\"failure\",service=\"h\"}"
        ) >= 2.0,
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "switchyard_upstream_instances{service=\"h\",state=\"healthy\"}"
        ),
        Some(2.0),
        "{m}"
    );
    let log = proxy.log();
    assert_eq!(
        log.matches("instance ejected").count(),
        1,
        "one flip, one log line:\n{log}"
    );
    assert!(log.contains("unexpected status 503"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_never_answers_is_ejected_within_its_timeout_budget() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config("[health]\ninterval_ms = 300\ntimeout_ms = 500\njitter_ms = 0\nunhealthy_threshold = 2\n")
        .start()
        .await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    etcd.put("/services/hang/a", a.addr_string()).await;
    etcd.put("/services/hang/b", b.addr_string()).await;
    wait_health(&proxy, "hang", "/services/hang/a", "healthy").await;
    wait_health(&proxy, "hang", "/services/hang/b", "healthy").await;

    a.set_hang(true);
    let took = wait_health(&proxy, "hang", "/services/hang/a", "unhealthy").await;
    // the failing checks start at most 300 ms apart and each gives up after 500 ms; the margin
    // is for a loaded host (the read timeout, 30 s, is the mechanism this rules out)
    let budget = Duration::from_millis(300 * 2 + 500 + 2000);
    assert!(took < budget, "ejected after {took:?}, budget {budget:?}");
    assert!(
        proxy.log().contains("no answer within 500ms"),
        "{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_not_serving_is_ejected() {
    use tonic_health::ServingStatus;
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).config(FAST).start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, service) = tonic_health::server::health_reporter();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    etcd.put(
        "/services/g/1",
        format!(r#"{{"addr":"{addr}","metadata":{{"health_protocol":"grpc"}}}}"#),
    )
    .await;
    wait_health(&proxy, "g", "/services/g/1", "healthy").await;
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let took = wait_health(&proxy, "g", "/services/g/1", "unhealthy").await;
    assert!(
        took < Duration::from_millis(300 * 2 + 300 + 700),
        "ejected after {took:?}"
    );
    assert!(proxy.log().contains("NOT_SERVING"), "{}", proxy.log());
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    wait_health(&proxy, "g", "/services/g/1", "healthy").await;
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_whose_check_fails_never_receives_traffic() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).config(FAST).start().await;
    let good = Backend::start("good").await;
    let bad = Backend::start("bad").await;
    bad.set_health(500);
    etcd.put("/services/n/good", good.addr_string()).await;
    wait_health(&proxy, "n", "/services/n/good", "healthy").await;
    // clients are busy while the new instance registers
    let sender = {
        let url = proxy.url("/");
        tokio::spawn(async move {
            let c = client();
            let mut statuses = Vec::new();
            for _ in 0..150 {
                let r = c.get(&url).header("host", "n").send().await;
                statuses.push(r.map(|r| r.status().as_u16()).unwrap_or(0));
            }
            statuses
        })
    };
    etcd.put("/services/n/bad", bad.addr_string()).await;
    wait_health(&proxy, "n", "/services/n/bad", "unhealthy").await;
    let statuses = sender.await.unwrap();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    answered_by(&proxy, "n", 20).await;
    assert_eq!(
        bad.hits(),
        0,
        "an instance that never passed its check got traffic"
    );
    // and a fresh instance that passes is admitted within a second
    let late = Backend::start("late").await;
    let start = Instant::now();
    etcd.put("/services/n/late", late.addr_string()).await;
    wait_health(&proxy, "n", "/services/n/late", "healthy").await;
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "admitted after {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_survives_a_weight_change() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).config(FAST).start().await;
    let sick = Backend::start("sick").await;
    let fine = Backend::start("fine").await;
    etcd.put("/services/w/sick", sick.addr_string()).await;
    etcd.put("/services/w/fine", fine.addr_string()).await;
    wait_health(&proxy, "w", "/services/w/sick", "healthy").await;
    wait_health(&proxy, "w", "/services/w/fine", "healthy").await;
    sick.set_health(503);
    wait_health(&proxy, "w", "/services/w/sick", "unhealthy").await;
    let healthy_flips = "switchyard_health_transitions_total{service=\"w\",state=\"healthy\"}";
    let flips_before = metrics_value(&proxy, healthy_flips).await;

    for (key, addr) in [("/services/w/sick", &sick), ("/services/w/fine", &fine)] {
        etcd.put(
            key,
            format!(
                r#"{{"addr":"{}","weight":5,"metadata":{{"zone":"b"}}}}"#,
                addr.addr
            ),
        )
        .await;
    }
    eventually(PATIENCE, "weights to change", || async {
        let v = proxy.admin_json("/api/services/w").await;
        let weights: Vec<u64> = v["instances"]
            .as_array()
            .map(|a| a.iter().filter_map(|i| i["weight"].as_u64()).collect())
            .unwrap_or_default();
        (weights == [5, 5]).then_some(()).ok_or(v.to_string())
    })
    .await;
    // no reset to pending, no re-admission: same health, no new transitions
    assert_eq!(
        health_of(&proxy, "w", "/services/w/sick").await,
        "unhealthy"
    );
    assert_eq!(health_of(&proxy, "w", "/services/w/fine").await, "healthy");
    let counts = answered_by(&proxy, "w", 20).await;
    assert_eq!(counts.get("fine"), Some(&20), "{counts:?}");
    assert_eq!(metrics_value(&proxy, healthy_flips).await, flips_before);
    assert_eq!(sick.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_unhealthy_fails_or_fails_open_as_configured() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config(FAST)
        .config("[services.open.health]\nall_unhealthy = \"fail_open\"\n")
        .start()
        .await;
    let s1 = Backend::start("strict").await;
    let o1 = Backend::start("open1").await;
    let o2 = Backend::start("open2").await;
    for b in [&s1, &o1, &o2] {
        b.set_health(503);
    }
    etcd.put("/services/strict/1", s1.addr_string()).await;
    etcd.put("/services/open/1", o1.addr_string()).await;
    etcd.put("/services/open/2", o2.addr_string()).await;
    wait_health(&proxy, "strict", "/services/strict/1", "unhealthy").await;
    wait_health(&proxy, "open", "/services/open/1", "unhealthy").await;
    wait_health(&proxy, "open", "/services/open/2", "unhealthy").await;

    // "fail" (default): 503 naming the service and why
    let (status, body) = proxy.get_service("strict", "/").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("strict") && body.contains("not healthy"),
        "{body}"
    );
    assert_eq!(s1.hits(), 0);

    // "fail_open": every non-draining instance takes traffic anyway
    let counts = answered_by(&proxy, "open", 20).await;
    assert!(
        counts.get("open1").is_some_and(|n| *n >= 5)
            && counts.get("open2").is_some_and(|n| *n >= 5),
        "{counts:?}"
    );
    // as soon as one is healthy again, only it gets traffic
    o2.set_health(200);
    wait_health(&proxy, "open", "/services/open/2", "healthy").await;
    let counts = answered_by(&proxy, "open", 10).await;
    assert_eq!(counts.get("open2"), Some(&10), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_keys_are_probed_while_requests_stay_fast() {
    const GHOSTS: usize = 3000;
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    etcd.put("/services/real/a", a.addr_string()).await;
    etcd.put("/services/real/b", b.addr_string()).await;
    wait_health(&proxy, "real", "/services/real/a", "healthy").await;

    // a listener that never accepts: connections queue, then hang (checks time out)
    let stuck = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stuck_port = stuck.local_addr().unwrap().port();
    // closed ports refuse at once
    let closed: Vec<u16> = (0..50).map(|_| support::free_port()).collect();
    let mut c = etcd.client().await;
    let keys: Vec<(String, String)> = (0..GHOSTS)
        .map(|i| {
            let addr = if i % 10 == 0 {
                format!("127.0.0.1:{stuck_port}")
            } else {
                format!("127.0.0.{}:{}", 1 + i % 3, closed[i % closed.len()])
            };
            (format!("/services/ghost/{i:05}"), addr)
        })
        .collect();
    for chunk in keys.chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|(k, v)| etcd_client::TxnOp::put(k.as_str(), v.as_str(), None))
            .collect();
        c.txn(etcd_client::Txn::new().and_then(ops))
            .await
            .expect("etcd txn");
    }

    // while every ghost is being checked, real requests go through quickly
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    for _ in 0..200 {
        let t = Instant::now();
        let (status, body) = proxy.get_service("real", "/").await;
        assert_eq!(status, 200, "{body}");
        slowest = slowest.max(t.elapsed());
    }
    let total = start.elapsed();
    assert!(
        total < Duration::from_secs(10) && slowest < Duration::from_secs(1),
        "200 requests took {total:?}, slowest {slowest:?}"
    );

    let unhealthy = "switchyard_upstream_instances{service=\"ghost\",state=\"unhealthy\"}";
    eventually(
        Duration::from_secs(30),
        "every ghost to be checked and kept out",
        || async {
            match metric_value(&proxy.metrics().await, unhealthy) {
                Some(n) if n as usize == GHOSTS => Ok(()),
                other => Err(format!("{other:?} unhealthy")),
            }
        },
    )
    .await;
    assert_eq!(a.hits() + b.hits(), 200);

    // the hanging ghosts fill every steady slot; a new instance is still checked at once
    let late = Backend::start("late").await;
    etcd.put("/services/real/late", late.addr_string()).await;
    let took = wait_health(&proxy, "real", "/services/real/late", "healthy").await;
    assert!(
        took < Duration::from_secs(3),
        "admitted after {took:?} behind the ghosts' checks"
    );

    // deregistering stops their probes at once
    c.delete(
        "/services/ghost/",
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await
    .expect("etcd delete");
    let checks = "switchyard_health_checks_total{result=\"failure\",service=\"ghost\"}";
    eventually(PATIENCE, "ghost service to disappear", || async {
        let v = proxy.admin_json("/api/services").await;
        let names: Vec<String> = v["services"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        (!names.iter().any(|n| n == "ghost"))
            .then_some(())
            .ok_or(format!("{names:?}"))
    })
    .await;
    // a check already running when the key went away may still finish and count
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let settled = metrics_value(&proxy, checks).await;
    assert!(
        settled > 0.0,
        "the ghosts were checked before they went away"
    );
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        metrics_value(&proxy, checks).await,
        settled,
        "deregistered keys are still probed"
    );
    drop(stuck);
}

/// A raw HTTP/1.1 keep-alive server on a thread of its own: answers every request with 200 and
/// counts connections and requests; [`CountingServer::close_all`] closes the connections open at
/// that moment from its side.
struct CountingServer {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    /// Connections opened before the current epoch close.
    epoch: Arc<AtomicU64>,
}

impl CountingServer {
    fn start() -> CountingServer {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let epoch = Arc::new(AtomicU64::new(0));
        let (c, r, e) = (connections.clone(), requests.clone(), epoch.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { return };
                c.fetch_add(1, Ordering::SeqCst);
                let (r, e) = (r.clone(), e.clone());
                let born = e.load(Ordering::SeqCst);
                std::thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        if e.load(Ordering::SeqCst) > born {
                            return; // drops the socket: closed from our side
                        }
                        match s.read(&mut chunk) {
                            Ok(0) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) =>
                            {
                                continue
                            }
                            Err(_) => return,
                        }
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            r.fetch_add(1, Ordering::SeqCst);
                            let body = "ok\n";
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if s.write_all(resp.as_bytes()).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        CountingServer {
            addr,
            connections,
            requests,
            epoch,
        }
    }

    fn close_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Waits until `server` has answered at least `n` requests.
async fn wait_requests(server: &CountingServer, n: u64) {
    eventually(PATIENCE, &format!("{n} health checks"), || async {
        match server.requests() {
            r if r >= n => Ok(()),
            r => Err(format!("{r} requests")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_checks_keep_their_connection_and_reconnect_after_the_backend_closes_it() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config("[health]\ninterval_ms = 100\njitter_ms = 0\n")
        .start()
        .await;
    let server = CountingServer::start();
    etcd.put("/services/ka/1", server.addr.to_string()).await;
    wait_health(&proxy, "ka", "/services/ka/1", "healthy").await;
    wait_requests(&server, 10).await;
    assert_eq!(server.connections(), 1, "every check on one connection");
    let m = proxy.metrics().await;
    assert_eq!(
        metric_value(&m, "switchyard_health_connections"),
        Some(1.0),
        "{m}"
    );

    // the backend closes it (a keep-alive timeout, a restart): the next check opens a new one
    // and nothing fails
    server.close_all();
    let before = server.requests();
    wait_requests(&server, before + 10).await;
    assert_eq!(server.connections(), 2, "one reconnect");
    assert_eq!(health_of(&proxy, "ka", "/services/ka/1").await, "healthy");
    let failures = "switchyard_health_checks_total{result=\"failure\",service=\"ka\"}";
    assert_eq!(metrics_value(&proxy, failures).await, 0.0);

    // deregistered: its connection is closed with it
    etcd.delete("/services/ka/1").await;
    eventually(PATIENCE, "the kept connection to be dropped", || async {
        match metric_value(&proxy.metrics().await, "switchyard_health_connections") {
            Some(0.0) => Ok(()),
            other => Err(format!("{other:?} connections")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_reuse_every_http_check_opens_a_connection() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config("[health]\ninterval_ms = 100\njitter_ms = 0\nreuse_connection = false\n")
        .start()
        .await;
    let server = CountingServer::start();
    etcd.put("/services/once/1", server.addr.to_string()).await;
    wait_health(&proxy, "once", "/services/once/1", "healthy").await;
    wait_requests(&server, 5).await;
    let (c, r) = (server.connections(), server.requests());
    assert!(c >= r, "{c} connections for {r} checks");
}

/// A listener that accepts and never answers, on a thread of its own; records the most
/// connections it ever held open at once.
struct HangingServer {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
}

impl HangingServer {
    fn start() -> HangingServer {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let peak = Arc::new(AtomicU64::new(0));
        let (a, p) = (accepted.clone(), peak.clone());
        std::thread::spawn(move || {
            let mut open: Vec<std::net::TcpStream> = Vec::new();
            for stream in listener.incoming() {
                let Ok(s) = stream else { return };
                let _ = s.set_nonblocking(true);
                // the client closes a timed-out check before it opens the next connection, so
                // its FIN is here by now: drop what is closed, then count
                open.retain_mut(|o| {
                    let mut b = [0u8; 512];
                    loop {
                        match o.read(&mut b) {
                            Ok(0) => return false,
                            Ok(_) => continue, // the request; keep reading
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                            Err(_) => return false,
                        }
                    }
                });
                open.push(s);
                a.fetch_add(1, Ordering::SeqCst);
                p.fetch_max(open.len() as u64, Ordering::SeqCst);
            }
        });
        HangingServer {
            addr,
            accepted,
            peak,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_in_flight_never_exceed_max_concurrent() {
    const INSTANCES: usize = 100;
    const MAX: u64 = 8;
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config(
            "[health]\nmax_concurrent = 8\ninterval_ms = 300\ntimeout_ms = 200\njitter_ms = 0\n",
        )
        .start()
        .await;
    let hanging = HangingServer::start();
    let mut c = etcd.client().await;
    let ops: Vec<etcd_client::TxnOp> = (0..INSTANCES)
        .map(|i| {
            etcd_client::TxnOp::put(
                format!("/services/slow/{i:03}"),
                hanging.addr.to_string(),
                None,
            )
        })
        .collect();
    c.txn(etcd_client::Txn::new().and_then(ops))
        .await
        .expect("etcd txn");
    // two rounds' worth of checks, each holding its slot for the whole timeout
    eventually(Duration::from_secs(30), "checks to go on", || async {
        match hanging.accepted.load(Ordering::SeqCst) {
            n if n >= 2 * INSTANCES as u64 => Ok(()),
            n => Err(format!("{n} connections")),
        }
    })
    .await;
    let peak = hanging.peak.load(Ordering::SeqCst);
    assert!(
        peak <= MAX,
        "{peak} checks ran at once, max_concurrent is {MAX}"
    );
    // 100 checks of 200 ms through 8 slots take 2.5 s, not 300 ms: the schedule runs late and
    // says so
    let m = proxy.metrics().await;
    let running = metric_value(&m, "switchyard_health_checks_running").unwrap_or(-1.0);
    assert!((0.0..=MAX as f64).contains(&running), "{m}");
    let late = support::counter_value(
        &m,
        "switchyard_health_schedule_lag_seconds_bucket{le=\"0.5\"}",
    );
    let all = support::counter_value(&m, "switchyard_health_schedule_lag_seconds_count");
    assert!(all > 0.0 && late < all, "lag not reported:\n{m}");
}

/// With active checks off, an instance that stops answering is ejected by passive detection for
/// `passive_cooldown_ms` (requests meanwhile go straight to the other instance, none waits on it),
/// then tried again, and re-admitted by its first answer: nginx's max_fails / fail_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_checks_a_silent_instance_sits_out_its_cool_down_then_is_tried_again() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config(
            "[proxy]\nconnect_timeout_ms = 300\nread_timeout_ms = 300\nmax_tries = 2\n\
             [health]\nenabled = false\npassive_failures = 1\npassive_cooldown_ms = 4000\n",
        )
        .start()
        .await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    etcd.put("/services/cool/a", a.addr_string()).await;
    etcd.put("/services/cool/b", b.addr_string()).await;
    proxy.wait_usable("cool", 2).await;
    let retries = "switchyard_retries_total{service=\"cool\"}";
    let ejected = "switchyard_health_transitions_total{service=\"cool\",state=\"unhealthy\"}";
    let readmitted = "switchyard_health_transitions_total{service=\"cool\",state=\"healthy\"}";

    b.set_hang(true);
    // round robin sends one of the first two requests to b: it times out and is retried on a
    let counts = answered_by(&proxy, "cool", 2).await;
    assert_eq!(counts.get("a"), Some(&2), "{counts:?}");
    assert_eq!(metrics_value(&proxy, ejected).await, 1.0);
    assert_eq!(
        health_of(&proxy, "cool", "/services/cool/b").await,
        "unhealthy"
    );
    let retried = metrics_value(&proxy, retries).await;
    assert_eq!(retried, 1.0);

    // during the cool-down nothing is sent to b: no request waits for it, none is retried
    let counts = answered_by(&proxy, "cool", 20).await;
    let usable = proxy.admin_json("/api/services/cool").await["usable"].as_u64();
    assert_eq!(
        usable,
        Some(1),
        "b's cool-down must outlast the 20 requests for this to test it"
    );
    assert_eq!(counts.get("a"), Some(&20), "{counts:?}");
    assert_eq!(metrics_value(&proxy, retries).await, retried);

    // b answers again; once the cool-down is over a request tries it, and its answer re-admits it
    b.set_hang(false);
    proxy.wait_usable("cool", 2).await;
    eventually(PATIENCE, "b to be tried again and answer", || async {
        let counts = answered_by(&proxy, "cool", 2).await;
        if counts.contains_key("b") {
            Ok(())
        } else {
            Err(format!("{counts:?}"))
        }
    })
    .await;
    assert_eq!(
        health_of(&proxy, "cool", "/services/cool/b").await,
        "healthy"
    );
    assert_eq!(metrics_value(&proxy, readmitted).await, 1.0);
    let log = proxy.log();
    assert!(log.contains("out for 4000 ms"), "{log}");
    assert!(
        log.contains("answered after its passive cool-down"),
        "{log}"
    );
}

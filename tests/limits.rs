//! The proxy's own limits (issue 17, findings 5-7): client connections are bounded with a clear
//! answer, a slow request body is cut off, a silent or ejected instance costs an idempotent
//! request one try, not the read timeout, and a proxy run out of open files blames no instance
//! for it (the exact errno classification is also a unit test of `engine::exchange`).

mod support;

use std::time::Duration;

use support::{eventually, Backend, EtcdServer, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn get(port: u16, host: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connections_over_the_bound_are_answered_503() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config("[proxy]\nmax_client_connections = 3\nconnect_timeout_ms = 500\nread_timeout_ms = 2000\n")
        .start()
        .await;
    let b = Backend::start("b").await;
    etcd.put("/services/b/1", b.addr_string()).await;
    proxy.wait_usable("b", 1).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap());
    }
    // the proxy accepts asynchronously: wait until it serves the three
    eventually(
        Duration::from_secs(10),
        "three client connections open",
        || async {
            let text = proxy.metrics().await;
            let open: f64 = text
                .lines()
                .filter(|l| l.starts_with("switchyard_client_connections{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            if open >= 3.0 {
                Ok(())
            } else {
                Err(format!("{open} open"))
            }
        },
    )
    .await;
    let got = eventually(
        Duration::from_secs(5),
        "the fourth connection refused",
        || async {
            let got = get(proxy.port, "b").await;
            if got.starts_with("HTTP/1.1 503 ") {
                Ok(got)
            } else {
                Err(format!("got {got:?}"))
            }
        },
    )
    .await;
    assert!(got.contains("too many client connections"), "{got}");
    drop(held);
    eventually(
        Duration::from_secs(5),
        "served again once the held ones closed",
        || async {
            let got = get(proxy.port, "b").await;
            if got.starts_with("HTTP/1.1 200 ") {
                Ok(())
            } else {
                Err(format!("got {got:?}"))
            }
        },
    )
    .await;
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("switchyard_client_connections_refused_total"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_slower_than_the_minimum_rate_is_answered_408() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config("[proxy]\nmin_request_body_rate = 1000\nrequest_body_rate_grace_ms = 300\nconnect_timeout_ms = 500\nread_timeout_ms = 5000\n")
        .start()
        .await;
    let b = Backend::start("b").await;
    etcd.put("/services/b/1", b.addr_string()).await;
    proxy.wait_usable("b", 1).await;
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    let started = std::time::Instant::now();
    // 10 bytes of 100,000, then a byte every 200 ms: well within the per-read timeout
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: b\r\nContent-Length: 100000\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        tokio::select! {
            r = s.read(&mut chunk) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                let _ = s.write_all(b"x").await;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no answer: {out:?}"
        );
    }
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(text.contains("too slowly"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "408 after {:?}",
        started.elapsed()
    );
}

/// A proxy with `config` and service `s` of two instances, the first of which then stops
/// answering (on every connection).
async fn one_hung_one_live(config: &str) -> (EtcdServer, Proxy, (Backend, Backend)) {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).config(config).start().await;
    let (hung, live) = (Backend::start("hung").await, Backend::start("live").await);
    etcd.put("/services/s/hung", hung.addr_string()).await;
    etcd.put("/services/s/live", live.addr_string()).await;
    proxy.wait_usable("s", 2).await;
    hung.set_hang(true);
    (etcd, proxy, (hung, live))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_instance_costs_an_idempotent_request_one_try_not_the_read_timeout() {
    let (_etcd, proxy, _backends) = one_hung_one_live(
        "[proxy]\nper_try_timeout_ms = 300\nconnect_timeout_ms = 500\nread_timeout_ms = 20000\n[health]\nenabled = false\n",
    )
    .await;
    let c = support::client();
    for i in 0..6 {
        let started = std::time::Instant::now();
        let r = c
            .get(proxy.url("/s/x"))
            .header("host", "s")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "request {i} took {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_on_an_instance_that_gets_ejected_go_to_another_one() {
    let (_etcd, proxy, _backends) = one_hung_one_live(
        "[proxy]\nconnect_timeout_ms = 500\nread_timeout_ms = 30000\n[health]\ninterval_ms = 200\ntimeout_ms = 200\njitter_ms = 0\n",
    )
    .await;
    // requests in flight on the hung instance finish on the live one once checks eject it
    let started = std::time::Instant::now();
    let mut calls = Vec::new();
    for _ in 0..8 {
        let url = proxy.url("/x");
        calls.push(tokio::spawn(async move {
            support::client()
                .get(url)
                .header("host", "s")
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "requests waited {:?} (read_timeout is 30 s)",
        started.elapsed()
    );
}

/// `log` without its terminal colour sequences (`ESC [ ... m`).
fn without_colours(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut rest = log;
    while let Some(at) = rest.find('\x1b') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        rest = rest.find('m').map_or("", |end| &rest[end + 1..]);
    }
    out.push_str(rest);
    out
}

/// The status line of the answer to a GET sent on `s` ("" when none came within 5 s).
async fn status_of_a_request(s: &mut TcpStream) -> String {
    if s.write_all(b"GET /x HTTP/1.1\r\nHost: s\r\n\r\n")
        .await
        .is_err()
    {
        return String::new();
    }
    let mut out = Vec::new();
    let mut chunk = [0u8; 512];
    while !out.windows(2).any(|w| w == b"\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&out);
    text.lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_open_files_blames_no_instance_and_serves_again_after() {
    const OPEN_FILES: u64 = 256;
    let etcd = EtcdServer::start();
    // the client bound above what the files carry, so the files run out first; a new connection
    // per check, so checks need files too
    let proxy = Proxy::builder(&etcd)
        .open_files(OPEN_FILES)
        .config(
            "[proxy]\nmax_client_connections = 10000\nconnect_timeout_ms = 500\nread_timeout_ms = 5000\n\
             [health]\ninterval_ms = 100\ntimeout_ms = 500\njitter_ms = 0\nreuse_connection = false\n",
        )
        .start()
        .await;
    let log = without_colours(&proxy.log());
    assert!(
        log.lines().any(|l| l.contains("connection capacity")
            && l.contains(&format!("open_files={OPEN_FILES}"))),
        "the capacity must be logged at start with the limit in force: {log}"
    );
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    etcd.put("/services/s/a", a.addr_string()).await;
    etcd.put("/services/s/b", b.addr_string()).await;
    proxy.wait_usable("s", 2).await;
    // twice as many clients as the proxy has files, idle: the files stay taken, without churn
    let mut held = Vec::new();
    for i in 0..OPEN_FILES * 2 {
        held.push(
            TcpStream::connect(("127.0.0.1", proxy.port))
                .await
                .unwrap_or_else(|e| panic!("client {i} could not connect: {e}")),
        );
    }
    // the shortage goes on while accept() keeps failing (pingora retries it once a second):
    // five failures are 4 s, 40 check intervals, of a proxy without a file to spare
    eventually(
        Duration::from_secs(20),
        "accept() to fail five times for want of open files",
        || async {
            let n = without_colours(&proxy.log())
                .lines()
                .filter(|l| l.contains("Accept() failed") && l.contains("Too many open files"))
                .count();
            (n >= 5).then_some(()).ok_or(format!("{n} times"))
        },
    )
    .await;
    // requests on the first connections (accepted ones): served, or 503 for the proxy's own
    // shortage; never 502 (an instance's fault)
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    for s in held.iter_mut().take(20) {
        let line = status_of_a_request(s).await;
        let code = line.split(' ').nth(1).unwrap_or("none").to_string();
        *statuses.entry(code).or_default() += 1;
    }
    for code in statuses.keys() {
        assert!(
            ["200", "503", "none"].contains(&code.as_str()),
            "a client got {code} during the shortage: {statuses:?}"
        );
    }
    drop(held);
    eventually(
        Duration::from_secs(15),
        "requests to succeed once the clients are gone",
        || async {
            let got = get(proxy.port, "s").await;
            got.starts_with("HTTP/1.1 200 ")
                .then_some(())
                .ok_or(format!("got {got:?}"))
        },
    )
    .await;
    let m = proxy.metrics().await;
    let series = |name: &str| support::counter_value(&m, name);
    assert!(
        series("switchyard_proxy_local_errors_total") > 0.0,
        "the shortage must have hit connections to instances ({statuses:?}): {m}"
    );
    assert_eq!(
        series("switchyard_health_transitions_total{service=\"s\",state=\"unhealthy\"}"),
        0.0,
        "no instance may be ejected for the proxy's shortage: {m}"
    );
    assert_eq!(
        series("switchyard_health_checks_total{result=\"failure\",service=\"s\"}"),
        0.0,
        "a check that could not open a socket is no failed check of the instance: {m}"
    );
    let log = proxy.log();
    assert!(!log.contains("instance ejected"), "{log}");
    proxy.wait_usable("s", 2).await;
}

//! The proxy's own limits (issue 17, findings 5-7): client connections are bounded with a clear
//! answer, a slow request body is cut off, and a silent or ejected instance costs an idempotent
//! request one try, not the read timeout. (That a local shortage is never blamed on an instance is a unit test of
//! `engine::exchange`: running a real proxy out of descriptors at the moment it connects is a
//! race, since every failed accept frees the descriptor it took.)

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

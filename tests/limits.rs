//! The proxy's own limits (issue 17, finding 5): client connections are bounded with a clear
//! answer. (That a local shortage is never blamed on an instance is a unit test of
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

//! The native HTTP/1.1 engine on the wire: malformed requests, pipelining, HTTP/1.0 clients,
//! `Expect: 100-continue`, upgrades, and pooled connections the instance closed. Every test runs
//! the real binary against a real etcd and real backends, and speaks raw HTTP/1.x to the proxy so
//! the exact bytes are checked. Hostile messages are in tests/hostile.rs.

mod support;

use std::time::Duration;

use support::{client, Backend, EtcdServer, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Sends `request` on a new connection and reads until the proxy closes it (bounded).
async fn exchange(port: u16, request: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(request).await.unwrap();
    read_to_close(&mut s).await
}

async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "proxy did not close the connection; got {:?}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one response with a Content-Length body from a kept-alive connection.
async fn read_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return String::from_utf8_lossy(&buf[..end + 4 + len]).into_owned();
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("response in time")
            .unwrap();
        assert!(
            n > 0,
            "closed mid-response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn proxy_with_echo(etcd: &EtcdServer) -> (Proxy, Backend) {
    let proxy = Proxy::builder(etcd).start().await;
    let b = Backend::start("echo").await;
    etcd.put("/services/echo/1", b.addr_string()).await;
    proxy.wait_usable("echo", 1).await;
    (proxy, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_a_clear_status_and_the_proxy_keeps_serving() {
    let etcd = EtcdServer::start();
    let (proxy, backend) = proxy_with_echo(&etcd).await;
    let port = proxy.port;
    let long = format!(
        "GET / HTTP/1.1\r\nHost: echo\r\nX-Long: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "garbage",
            b"\x16\x03\x01 hello\r\n\r\n".to_vec(),
            "400 Bad Request",
            "malformed",
        ),
        (
            "no host",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            "400 Bad Request",
            "without Host",
        ),
        (
            "two lengths",
            b"POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
                .to_vec(),
            "400 Bad Request",
            "conflicting content-length",
        ),
        (
            "coding that does not end in chunked",
            b"POST / HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
            "400 Bad Request",
            "does not end in chunked",
        ),
        (
            "unknown coding before chunked",
            b"POST / HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".to_vec(),
            "501 Not Implemented",
            "transfer coding",
        ),
        (
            "huge head",
            long.into_bytes(),
            "431 Request Header Fields Too Large",
            "larger than",
        ),
        (
            "connect",
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n".to_vec(),
            "405 Method Not Allowed",
            "not a forward proxy",
        ),
    ];
    for (what, req, status, text) in cases {
        let got = exchange(port, &req).await;
        assert!(
            got.starts_with(&format!("HTTP/1.1 {status}\r\n")),
            "{what}: {got:?}"
        );
        assert!(
            got.contains(text),
            "{what}: body should say {text:?}: {got:?}"
        );
    }
    assert_eq!(
        backend.hits(),
        0,
        "no malformed request reached the instance"
    );
    let got = exchange(
        port,
        b"GET /x HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(
        got.contains("connection: close") || got.contains("Connection: close"),
        "{got}"
    );
    assert_eq!(backend.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_and_http10_clients() {
    let etcd = EtcdServer::start();
    let (proxy, _b) = proxy_with_echo(&etcd).await;
    // two requests in one write: two answers, in order, on one connection
    let got = exchange(
        proxy.port,
        b"GET /first HTTP/1.1\r\nHost: echo\r\n\r\nGET /second HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(got.matches("HTTP/1.1 200 OK").count(), 2, "{got}");
    let (first, second) = (got.find("/first").unwrap(), got.find("/second").unwrap());
    assert!(first < second, "{got}");

    // our own answer to HEAD has a length but no body: the next response follows the head
    let got = exchange(
        proxy.port,
        b"HEAD / HTTP/1.1\r\nHost: nope\r\n\r\nGET /third HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (head, rest) = got.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{got}");
    assert!(head.contains("content-length: "), "{got}");
    assert!(rest.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");

    // HTTP/1.0 without keep-alive: answered, then closed
    let got = exchange(proxy.port, b"GET /ten HTTP/1.0\r\nHost: echo\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.contains("Connection: close\r\n"), "{got}");
    // HTTP/1.0 without Host routes by path
    let got = exchange(proxy.port, b"GET /echo/p HTTP/1.0\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");

    // a chunked (streamed) response to an HTTP/1.0 client arrives de-chunked, closed-delimited
    let got = exchange(
        proxy.port,
        b"GET /bytes?n=200000 HTTP/1.0\r\nHost: echo\r\n\r\n",
    )
    .await;
    let (head, body) = got.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{head}"
    );
    assert_eq!(body.len(), 200_000);
    assert!(body
        .bytes()
        .enumerate()
        .all(|(i, b)| b == b"0123456789"[i % 10]));

    // HTTP/1.0 with keep-alive stays open
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    for i in 0..3 {
        let req = format!("GET /ka{i} HTTP/1.0\r\nHost: echo\r\nConnection: keep-alive\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let resp = read_response(&mut s).await;
        assert!(resp.contains("Connection: keep-alive\r\n"), "{resp}");
        assert!(resp.contains(&format!("/ka{i}")), "{resp}");
    }
    // an idle connection holds no buffers: after a pause, a request larger than the first read
    // buffer still arrives whole
    tokio::time::sleep(Duration::from_millis(200)).await;
    let big = format!(
        "GET /after-idle HTTP/1.0\r\nHost: echo\r\nConnection: keep-alive\r\nX-Big: {}\r\n\r\n",
        "b".repeat(20_000)
    );
    s.write_all(big.as_bytes()).await.unwrap();
    let resp = read_response(&mut s).await;
    assert!(resp.contains("/after-idle"), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_is_answered_by_the_proxy_and_chunked_uploads_pass() {
    let etcd = EtcdServer::start();
    let (proxy, _b) = proxy_with_echo(&etcd).await;
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("100 Continue before the body is sent")
        .unwrap();
    assert_eq!(&buf[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"hello").await.unwrap();
    let resp = read_response(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
    let sum: u64 = b"hello".iter().map(|b| *b as u64).sum();
    assert!(resp.contains(&format!("\"len\":5,\"sum\":{sum}")), "{resp}");

    // chunked upload in pieces, with an extension and a trailer, then another request on the
    // same connection
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"2\r\nde\r\n0\r\nX-T: 1\r\n\r\n")
        .await
        .unwrap();
    let resp = read_response(&mut s).await;
    let sum: u64 = b"abcde".iter().map(|b| *b as u64).sum();
    assert!(resp.contains(&format!("\"len\":5,\"sum\":{sum}")), "{resp}");
    s.write_all(b"GET /after HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await
        .unwrap();
    let resp = read_response(&mut s).await;
    assert!(resp.contains("/after"), "{resp}");
}

/// A raw instance: answers `101` to an upgrade and then echoes bytes; any other request gets a
/// keep-alive `200` with `Content-Length`, after which it closes the connection anyway (as an
/// instance whose keep-alive timer fired just after answering).
async fn raw_instance() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                if head.contains("upgrade: echo") && head.contains("connection: upgrade") {
                    let _ = s
                        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
                        .await;
                    loop {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&chunk[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
                    )
                    .await;
                // closes without saying so
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_become_a_tunnel() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let (addr, _task) = raw_instance().await;
    etcd.put("/services/ws/1", addr.to_string()).await;
    proxy.wait_usable("ws", 1).await;
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("101 in time")
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got).to_string();
    assert!(
        head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{head}"
    );
    assert!(
        head.contains("Upgrade: echo\r\n") && head.contains("Connection: upgrade\r\n"),
        "{head}"
    );
    for msg in [&b"ping"[..], b"a longer frame of bytes \x00\x01\x02"] {
        s.write_all(msg).await.unwrap();
        let mut echoed = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echoed))
            .await
            .expect("echo through the tunnel")
            .unwrap();
        assert_eq!(echoed, msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_the_instance_closed_are_not_client_errors() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let (addr, _task) = raw_instance().await;
    etcd.put("/services/flaky/1", addr.to_string()).await;
    proxy.wait_usable("flaky", 1).await;
    // Every response says keep-alive, then the instance closes: each next request either finds
    // the pooled connection closed (seen before it is reused), or sends on it and reads nothing.
    // A GET is retried on a fresh connection to the same (only) instance either way. A POST may
    // have reached the instance in the second case and is not sent again (tests/hostile.rs), so
    // here it goes only once the close had time to arrive: a closed pooled connection is never
    // used for it.
    let c = client();
    for i in 0..30 {
        let r = if i % 2 == 0 {
            c.get(proxy.url("/flaky/x")).send().await.unwrap()
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            c.post(proxy.url("/flaky/x"))
                .body("payload")
                .send()
                .await
                .unwrap()
        };
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await.unwrap(), "ok");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_to_a_silent_instance_go_to_another_one() {
    let etcd = EtcdServer::start();
    // active checks and passive ejection off, so the silent instance stays in rotation
    let proxy = Proxy::builder(&etcd)
        .config("[proxy]\nconnect_timeout_ms = 300\nread_timeout_ms = 400\nmax_tries = 2\n[health]\nenabled = false\npassive_failures = 0\n")
        .start()
        .await;
    let live = Backend::start("live").await;
    // accepts connections, reads, never answers
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let _silent_task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    etcd.put("/services/mixed/live", live.addr_string()).await;
    etcd.put("/services/mixed/silent", silent_addr.to_string())
        .await;
    proxy.wait_usable("mixed", 2).await;
    let c = client();
    for i in 0..6 {
        let r = c.get(proxy.url("/mixed/get")).send().await.unwrap();
        assert_eq!(r.status(), 200, "GET {i} is retried on the live instance");
    }
    // a POST is not retried after it was sent: the silent instance's share gets 504
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let r = c
            .post(proxy.url("/mixed/post"))
            .body("x")
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 504),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&504),
        "some POST went to the silent instance: {statuses:?}"
    );
}

/// Client connections are placed on the least loaded proxy thread (pingora alone picks one at
/// random), counted per thread in `switchyard_client_connections`, and uncounted when they close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_spread_evenly_over_the_proxy_threads() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config("[proxy]\nthreads = 2\nconnect_timeout_ms = 500\nread_timeout_ms = 2000\n")
        .start()
        .await;
    let b = Backend::start("spread").await;
    etcd.put("/services/spread/1", b.addr_string()).await;
    proxy.wait_usable("spread", 1).await;

    let per_thread = |text: &str| -> Vec<f64> {
        (0..4)
            .filter_map(|t| {
                support::metric_value(
                    text,
                    &format!("switchyard_client_connections{{thread=\"{t}\"}}"),
                )
            })
            .collect()
    };
    // one at a time, each answered before the next opens: placement sees every earlier one
    let mut conns = Vec::new();
    for i in 0..20 {
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        s.write_all(b"GET /x HTTP/1.1\r\nHost: spread\r\n\r\n")
            .await
            .unwrap();
        let resp = read_response(&mut s).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "connection {i}: {resp}");
        conns.push(s);
    }
    let text = proxy.metrics().await;
    let counts = per_thread(&text);
    assert_eq!(
        counts.len(),
        2,
        "both threads serve connections: {counts:?}"
    );
    assert_eq!(counts.iter().sum::<f64>(), 20.0, "{counts:?}");
    assert!((counts[0] - counts[1]).abs() <= 1.0, "uneven: {counts:?}");

    // every connection still works where it was placed
    for s in &mut conns {
        s.write_all(b"GET /y HTTP/1.1\r\nHost: spread\r\n\r\n")
            .await
            .unwrap();
        let resp = read_response(s).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }
    drop(conns);
    support::eventually(Duration::from_secs(5), "connections uncounted", || async {
        let counts = per_thread(&proxy.metrics().await);
        if counts.iter().sum::<f64>() == 0.0 {
            Ok(())
        } else {
            Err(format!("{counts:?}"))
        }
    })
    .await;
}

/// A client that stops sending in the middle of its request head gets 408 after
/// `downstream_read_timeout_ms`, and the connection is closed; one idle between requests is just
/// closed. (Timeouts are pingora's 10 ms fast timers, not a tokio timer per read.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_head_gets_408_and_an_idle_connection_is_closed() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config("[proxy]\ndownstream_read_timeout_ms = 300\n")
        .start()
        .await;
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    let started = std::time::Instant::now();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: some").await.unwrap();
    let answer = read_to_close(&mut s).await;
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(5),
        "{took:?}"
    );

    let mut idle = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    let answer = read_to_close(&mut idle).await;
    assert_eq!(answer, "", "an idle connection is closed without an answer");
}

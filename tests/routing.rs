//! Registration formats, routing rules, load balancing and our own status codes, against a real
//! etcd, real backends and the real switchyard binary.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::{client, eventually, metric_value, Backend, EtcdServer, Proxy};

const PATIENCE: Duration = Duration::from_secs(10);

/// Waits until `service` answers 200 through the proxy and returns the answering backend.
async fn wait_routed(proxy: &Proxy, service: &str) -> String {
    eventually(PATIENCE, &format!("{service} to be routed"), || async {
        let (status, body) = proxy.get_service(service, "/").await;
        if status == 200 {
            let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
            Ok(v["backend"].as_str().unwrap_or("").to_string())
        } else {
            Err(format!("{status} {body}"))
        }
    })
    .await
}

/// Which backends answered `n` requests to `service`; every request must succeed.
async fn backend_counts(proxy: &Proxy, service: &str, n: usize) -> HashMap<String, usize> {
    try_backend_counts(proxy, service, n)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`backend_counts`], for inside `eventually`: a failed request is "not yet" (a new
/// instance is pending until its first check passes).
async fn try_backend_counts(
    proxy: &Proxy,
    service: &str,
    n: usize,
) -> Result<HashMap<String, usize>, String> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let (status, body) = proxy.get_service(service, "/").await;
        if status != 200 {
            return Err(format!("request to {service} failed: {status} {body}"));
        }
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        *counts
            .entry(v["backend"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    Ok(counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_value_format_routes() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let plain = Backend::start("plain").await;
    let json = Backend::start("json").await;
    let naming = Backend::start("naming").await;
    let dns = Backend::start("dns").await;
    etcd.put("/services/plain/1", plain.addr_string()).await;
    etcd.put(
        "/services/json/1",
        format!(
            r#"{{"addr":"{}","weight":2,"metadata":{{"zone":"a"}}}}"#,
            json.addr
        ),
    )
    .await;
    etcd.put(
        "/services/naming/1",
        format!(r#"{{"Op":0,"Addr":"{}","Metadata":null}}"#, naming.addr),
    )
    .await;
    etcd.put("/services/dns/1", format!("localhost:{}", dns.addr.port()))
        .await;
    for name in ["plain", "json", "naming", "dns"] {
        assert_eq!(wait_routed(&proxy, name).await, name);
    }
    let svc = proxy.admin_json("/api/services/json").await;
    assert_eq!(svc["instances"][0]["weight"], 2);
    assert_eq!(svc["instances"][0]["metadata"]["zone"], "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_instance_receives_traffic_within_a_second() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let b = Backend::start("fast").await;
    let start = Instant::now();
    etcd.put("/services/fast/a", b.addr_string()).await;
    wait_routed(&proxy, "fast").await;
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "first routed request after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_are_respected_and_zero_drains() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let heavy = Backend::start("heavy").await;
    let light = Backend::start("light").await;
    etcd.put(
        "/services/w/heavy",
        format!(r#"{{"addr":"{}","weight":3}}"#, heavy.addr),
    )
    .await;
    etcd.put(
        "/services/w/light",
        format!(r#"{{"addr":"{}","weight":1}}"#, light.addr),
    )
    .await;
    proxy.wait_usable("w", 2).await;
    let counts = backend_counts(&proxy, "w", 400).await;
    // smooth weighted round robin is exact over whole cycles
    assert_eq!(counts.get("heavy"), Some(&300), "{counts:?}");
    assert_eq!(counts.get("light"), Some(&100), "{counts:?}");

    // weight 0: registered but draining, gets no new requests
    etcd.put(
        "/services/w/heavy",
        format!(r#"{{"addr":"{}","weight":0}}"#, heavy.addr),
    )
    .await;
    proxy.wait_usable("w", 1).await;
    let counts = backend_counts(&proxy, "w", 20).await;
    assert_eq!(counts.get("light"), Some(&20), "{counts:?}");

    // every instance draining: 503 naming the service
    etcd.put(
        "/services/w/light",
        format!(r#"{{"addr":"{}","weight":0}}"#, light.addr),
    )
    .await;
    let body = eventually(PATIENCE, "503 for an all-draining service", || async {
        match proxy.get_service("w", "/").await {
            (503, body) => Ok(body),
            (s, b) => Err(format!("{s} {b}")),
        }
    })
    .await;
    assert!(
        body.contains("\"w\"") && body.contains("draining"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_lease_expiry_remove_instances() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    etcd.put("/services/svc/a", a.addr_string()).await;
    etcd.put_with_lease("/services/svc/b", &b.addr_string(), 2)
        .await;
    eventually(PATIENCE, "two instances", || async {
        let c = try_backend_counts(&proxy, "svc", 4).await?;
        (c.len() == 2).then_some(()).ok_or(format!("{c:?}"))
    })
    .await;
    // lease expiry (nobody keeps it alive) removes b
    eventually(
        Duration::from_secs(15),
        "lease expiry to remove b",
        || async {
            let c = try_backend_counts(&proxy, "svc", 4).await?;
            (c.get("a") == Some(&4))
                .then_some(())
                .ok_or(format!("{c:?}"))
        },
    )
    .await;
    // delete removes a: the service is gone
    etcd.delete("/services/svc/a").await;
    eventually(PATIENCE, "404 after the last delete", || async {
        match proxy.get_service("svc", "/svc/x").await {
            (404, _) => Ok(()),
            (s, b) => Err(format!("{s} {b}")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_values_are_skipped_while_valid_ones_keep_serving() {
    let etcd = EtcdServer::start();
    let good = Backend::start("good").await;
    etcd.put("/services/mixed/good", good.addr_string()).await;
    // invalid registrations present before the proxy starts (list path) ...
    etcd.put("/services/mixed/noport", "10.0.0.1").await;
    etcd.put("/services/bad name/x", good.addr_string()).await;
    let proxy = Proxy::builder(&etcd).start().await;
    assert_eq!(wait_routed(&proxy, "mixed").await, "good");
    // ... and arriving through the watch
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("/services/mixed/empty", b"".to_vec()),
        ("/services/mixed/port0", b"127.0.0.1:0".to_vec()),
        ("/services/mixed/bigport", b"127.0.0.1:65536".to_vec()),
        ("/services/mixed/json", b"{\"addr\":".to_vec()),
        ("/services/mixed/utf8", vec![0xff, 0xfe, 0x00]),
        ("/services/noinstance", good.addr_string().into_bytes()),
    ];
    for (k, v) in &garbage {
        etcd.put(k, v).await;
    }
    eventually(PATIENCE, "invalid entries to be counted", || async {
        let m = proxy.metrics().await;
        match metric_value(&m, "switchyard_registry_invalid_entries") {
            Some(8.0) => Ok(()),
            other => Err(format!("invalid entries = {other:?}")),
        }
    })
    .await;
    let reg = proxy.admin_json("/api/registry").await;
    let keys: Vec<&str> = reg["invalid_registrations"]
        .as_array()
        .expect("invalid list")
        .iter()
        .filter_map(|e| e["key"].as_str())
        .collect();
    assert!(keys.contains(&"/services/mixed/port0"), "{keys:?}");
    // the valid instance of the same service is unaffected
    let c = backend_counts(&proxy, "mixed", 10).await;
    assert_eq!(c.get("good"), Some(&10));
    // a valid instance that turns invalid is removed, others keep serving
    let other = Backend::start("other").await;
    etcd.put("/services/mixed/other", other.addr_string()).await;
    eventually(PATIENCE, "other to be routed", || async {
        let c = try_backend_counts(&proxy, "mixed", 4).await?;
        (c.len() == 2).then_some(()).ok_or(format!("{c:?}"))
    })
    .await;
    etcd.put("/services/mixed/other", "not an address").await;
    eventually(PATIENCE, "other to be removed", || async {
        let c = try_backend_counts(&proxy, "mixed", 4).await?;
        (c.get("good") == Some(&4))
            .then_some(())
            .ok_or(format!("{c:?}"))
    })
    .await;
    assert!(proxy.log().contains("skipping invalid registration"));
    assert!(!proxy.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_empty_dead_and_slow_services_get_our_status_codes() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config("[proxy]\nconnect_timeout_ms = 300\nread_timeout_ms = 500\nmax_tries = 2\n")
        .config("[[routing.routes]]\npath_prefix = \"/reserved\"\nservice = \"reserved\"\n")
        // health checks off: the dead instance stays routed, so its 502 can be seen
        .config("[health]\nenabled = false\n")
        .start()
        .await;
    // 404: unknown service, by host and by path
    let (s, body) = proxy.get_service("nosuch", "/nosuch/x").await;
    assert_eq!(s, 404, "{body}");
    assert!(body.contains("nosuch"), "{body}");
    // 503: configured route, nothing registered
    let r = client().get(proxy.url("/reserved/x")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("reserved"));
    // 502: registered, nothing listening
    let dead = Backend::start("dead").await;
    let dead_addr = dead.addr_string();
    dead.stop();
    drop(dead);
    etcd.put("/services/dead/1", &dead_addr).await;
    let body = eventually(PATIENCE, "502 for a dead upstream", || async {
        match proxy.get_service("dead", "/").await {
            (502, b) => Ok(b),
            (s, b) => Err(format!("{s} {b}")),
        }
    })
    .await;
    assert!(body.contains("\"dead\""), "{body}");
    // 504: upstream slower than read_timeout_ms
    let slow = Backend::start("slow").await;
    etcd.put("/services/slow/1", slow.addr_string()).await;
    wait_routed(&proxy, "slow").await;
    let (s, body) = proxy.get_service("slow", "/slow?ms=3000").await;
    assert_eq!(s, 504, "{body}");
    assert!(
        body.contains("\"slow\"") && body.contains("timed out"),
        "{body}"
    );
    // counted once the answer is written: a scrape right after the answer may come first
    eventually(PATIENCE, "the 504 counted under its service", || async {
        let m = proxy.metrics().await;
        match metric_value(
            &m,
            "switchyard_requests_total{code=\"5xx\",service=\"slow\"}",
        ) {
            Some(1.0) => Ok(()),
            other => Err(format!("{other:?} in {m}")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_retried_on_another_instance() {
    let etcd = EtcdServer::start();
    // health checks off: the dead instance stays routed, so every request may hit it first
    let proxy = Proxy::builder(&etcd)
        .config("[health]\nenabled = false\n")
        .start()
        .await;
    let live = Backend::start("live").await;
    let dead = Backend::start("dead").await;
    let dead_addr = dead.addr_string();
    dead.stop();
    etcd.put("/services/r/live", live.addr_string()).await;
    etcd.put("/services/r/dead", &dead_addr).await;
    eventually(PATIENCE, "both registered", || async {
        let v = proxy.admin_json("/api/services/r").await;
        (v["instances"].as_array().map(|a| a.len()) == Some(2))
            .then_some(())
            .ok_or(v.to_string())
    })
    .await;
    // POST is not idempotent, but nothing reached the dead instance: retrying is safe
    for _ in 0..20 {
        let r = client()
            .post(proxy.url("/r/upload"))
            .body("hello")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "{\"len\":5,\"sum\":532}");
    }
    let m = proxy.metrics().await;
    assert!(
        metric_value(&m, "switchyard_retries_total{service=\"r\"}").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_rules_headers_and_paths() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config(
            "[routing]\nhost_suffixes = [\"svc.test\"]\n\
             [[routing.routes]]\nhost = \"api.example.com\"\npath_prefix = \"/v1\"\nservice = \"echo\"\nstrip_prefix = true\n",
        )
        .start()
        .await;
    let b = Backend::start("echo").await;
    etcd.put("/services/echo/1", b.addr_string()).await;
    wait_routed(&proxy, "echo").await;
    let get = |host: &'static str, path: &'static str| {
        let url = proxy.url(path);
        async move {
            let r = client()
                .get(url)
                .header("host", host)
                .header("connection", "keep-alive, x-secret-hop")
                .header("x-secret-hop", "must not pass")
                .header("keep-alive", "timeout=5")
                .header("x-forwarded-for", "203.0.113.9")
                .header("x-custom", "kept")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{host} {path}");
            serde_json::from_str::<serde_json::Value>(&r.text().await.unwrap()).unwrap()
        }
    };
    // explicit route with strip
    let v = get("api.example.com", "/v1/users/7?q=a%20b&x=1").await;
    assert_eq!(v["uri"], "/users/7?q=a%20b&x=1");
    // host suffix
    let v = get("echo.svc.test:8080", "/keep/path?z=1").await;
    assert_eq!(v["uri"], "/keep/path?z=1");
    // path routing strips the service segment
    let v = get("localhost", "/echo/a/b?c=d").await;
    assert_eq!(v["uri"], "/a/b?c=d");
    let v = get("localhost", "/echo").await;
    assert_eq!(v["uri"], "/");
    let h = &v["headers"];
    assert_eq!(h["x-forwarded-for"][0], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"][0], "http");
    assert_eq!(h["x-forwarded-host"][0], "localhost");
    assert_eq!(h["host"][0], "localhost", "Host passes through");
    assert_eq!(h["x-custom"][0], "kept");
    assert!(
        h.get("x-secret-hop").is_none(),
        "Connection-nominated header leaked: {h}"
    );
    assert!(
        h.get("keep-alive").is_none(),
        "hop-by-hop header leaked: {h}"
    );
    // methods and bodies pass through
    let r = client()
        .put(proxy.url("/echo/thing"))
        .body(vec![b'x'; 1234])
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["method"], "PUT");
    assert_eq!(v["body_len"], 1234);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_connects_to_an_address_the_registry_did_not_give() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let secret = Backend::start("secret").await;
    // absolute-form request naming an unregistered address, and a Host header naming it
    for req in [
        format!(
            "GET http://{}/ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            secret.addr, secret.addr
        ),
        format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            secret.addr
        ),
        format!(
            "CONNECT {} HTTP/1.1\r\nHost: {}\r\n\r\n",
            secret.addr, secret.addr
        ),
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
            .await
            .unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("HTTP/1.1 4"),
            "{req:?} should be refused, got {text}"
        );
    }
    assert_eq!(secret.hits(), 0, "an unregistered address was contacted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_through() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let b = Backend::start("big").await;
    etcd.put("/services/big/1", b.addr_string()).await;
    wait_routed(&proxy, "big").await;
    const N: usize = 10 * 1024 * 1024;
    // download
    let r = client()
        .get(proxy.url(&format!("/big/bytes?n={N}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    assert_eq!(body.len(), N);
    assert!(body.chunks(10).all(|c| c == &b"0123456789"[..c.len()]));
    // upload with content-length
    let data: Vec<u8> = (0..N).map(|i| (i % 251) as u8).collect();
    let sum: u64 = data.iter().map(|b| *b as u64).sum();
    let r = client()
        .post(proxy.url("/big/upload"))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.text().await.unwrap(),
        format!("{{\"len\":{N},\"sum\":{sum}}}")
    );
    // chunked upload (a stream body has no content-length)
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        data.chunks(100_000).map(|c| Ok(c.to_vec())).collect();
    let r = client()
        .post(proxy.url("/big/upload"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.text().await.unwrap(),
        format!("{{\"len\":{N},\"sum\":{sum}}}")
    );
}

/// `proxy.work_stealing = true`: connection tasks may move between threads, so the engine keeps
/// pingora's timeouts instead of its per-thread timer wheel. Routing, keep-alive and the upstream
/// read timeout still work there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_stealing_runtime_routes_and_times_out() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config("[proxy]\nwork_stealing = true\nthreads = 2\nread_timeout_ms = 500\n")
        .start()
        .await;
    let b = Backend::start("ws").await;
    etcd.put("/services/ws/1", b.addr_string()).await;
    wait_routed(&proxy, "ws").await;
    // one keep-alive client, many requests
    let c = client();
    for i in 0..20 {
        let r = c
            .get(proxy.url(&format!("/n{i}")))
            .header("host", "ws")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
    }
    // the backend would answer after 3 s with 200: a 504 means the read timeout fired
    let started = Instant::now();
    let (s, body) = proxy.get_service("ws", "/slow?ms=3000").await;
    assert_eq!(s, 504, "{body}");
    assert!(body.contains("timed out"), "{body}");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "504 before read_timeout_ms"
    );
}

/// A keep-alive instance that answers every request `delay` late, with the body `slow`.
async fn slow_instance(delay: Duration) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        tokio::time::sleep(delay).await;
                        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow";
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_ewma_sends_fewer_requests_to_a_slow_instance() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config("[services.lat]\npolicy = \"p2c_ewma\"\n")
        .start()
        .await;
    let fast = Backend::start("fast").await;
    let slow = slow_instance(Duration::from_millis(30)).await;
    etcd.put("/services/lat/fast", fast.addr_string()).await;
    etcd.put("/services/lat/slow", slow.to_string()).await;
    proxy.wait_usable("lat", 2).await;
    let c = client();
    let mut to_slow = 0;
    for _ in 0..200 {
        let r = c.get(proxy.url("/lat/x")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        if r.text().await.unwrap() == "slow" {
            to_slow += 1;
        }
    }
    // round robin would send it half; p2c_ewma only when both of its two choices are the slow one
    assert!(to_slow < 80, "the slow instance got {to_slow} of 200");
    assert!(to_slow > 0, "the slow instance was never tried");
}

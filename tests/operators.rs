//! What operators see: metric values after real traffic, the admin API and status page, logs,
//! readiness and graceful shutdown.

mod support;

use std::time::{Duration, Instant};

use support::{client, eventually, metric_value, Backend, EtcdServer, Proxy};

const PATIENCE: Duration = Duration::from_secs(10);

fn m(text: &str, series: &str) -> f64 {
    metric_value(text, series).unwrap_or_else(|| panic!("metric {series} missing in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_real_traffic_and_registry_state() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config("[proxy]\nconnect_timeout_ms = 300\nread_timeout_ms = 2000\nmax_tries = 2\n")
        .start()
        .await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let dead = Backend::start("dead").await;
    let dead_addr = dead.addr_string();
    dead.stop();
    etcd.put("/services/m/a", a.addr_string()).await;
    etcd.put("/services/m/b", b.addr_string()).await;
    etcd.put(
        "/services/m/drain",
        format!(r#"{{"addr":"{}","weight":0}}"#, a.addr),
    )
    .await;
    let rev = etcd.put("/services/d/1", &dead_addr).await;
    eventually(PATIENCE, "snapshot at the last revision", || async {
        let text = proxy.metrics().await;
        let r = metric_value(&text, "switchyard_registry_revision");
        (r == Some(rev as f64))
            .then_some(())
            .ok_or(format!("{r:?} != {rev}"))
    })
    .await;
    // wait until both are admitted (first health check passed), without sending traffic
    proxy.wait_usable("m", 2).await;
    for _ in 0..10 {
        assert_eq!(proxy.get_service("m", "/").await.0, 200);
    }
    assert_eq!(proxy.get_service("nope", "/nope/").await.0, 404);
    // never admitted (its health check cannot pass): 503, counted under its service
    assert_eq!(proxy.get_service("d", "/").await.0, 503);

    // a request is counted once its answer is written: a scrape right after the last answer may
    // come first, so wait until the last one is in
    let t = eventually(PATIENCE, "every request counted", || async {
        let t = proxy.metrics().await;
        let counted = m(&t, "switchyard_requests_total{code=\"2xx\",service=\"m\"}") >= 10.0
            && m(
                &t,
                "switchyard_request_duration_seconds_count{service=\"m\"}",
            ) >= 10.0
            && m(&t, "switchyard_requests_total{code=\"5xx\",service=\"d\"}") >= 1.0;
        if counted {
            Ok(t)
        } else {
            Err(t)
        }
    })
    .await;
    assert_eq!(
        m(&t, "switchyard_requests_total{code=\"2xx\",service=\"m\"}"),
        10.0
    );
    assert_eq!(
        m(
            &t,
            "switchyard_requests_total{code=\"4xx\",service=\"(unknown)\"}"
        ),
        1.0
    );
    assert_eq!(
        m(&t, "switchyard_requests_total{code=\"5xx\",service=\"d\"}"),
        1.0
    );
    assert!(
        !t.contains("service=\"nope\""),
        "a client-chosen name became a label value"
    );
    assert_eq!(
        m(
            &t,
            "switchyard_request_duration_seconds_count{service=\"m\"}"
        ),
        10.0
    );
    assert_eq!(
        m(
            &t,
            "switchyard_upstream_response_seconds_count{service=\"m\"}"
        ),
        10.0
    );
    assert_eq!(
        m(
            &t,
            "switchyard_upstream_instances{service=\"m\",state=\"healthy\"}"
        ),
        2.0
    );
    assert_eq!(
        m(
            &t,
            "switchyard_upstream_instances{service=\"m\",state=\"draining\"}"
        ),
        1.0
    );
    assert_eq!(m(&t, "switchyard_registry_connected"), 1.0);
    assert_eq!(m(&t, "switchyard_registry_relists_total"), 1.0);
    assert_eq!(m(&t, "switchyard_registry_events_total"), 4.0);
    assert!(m(&t, "switchyard_snapshot_updates_total") >= 5.0);
    assert!(
        m(
            &t,
            "switchyard_snapshot_apply_seconds_count{kind=\"watch\"}"
        ) >= 4.0
    );
    let last = m(&t, "switchyard_registry_last_update_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - last).abs() < 60.0, "last update {last} vs now {now}");
    // a deregistered service's gauges disappear rather than linger
    etcd.delete("/services/d/1").await;
    eventually(PATIENCE, "gauges of a removed service to go", || async {
        let t = proxy.metrics().await;
        (!t.contains("switchyard_upstream_instances{service=\"d\""))
            .then_some(())
            .ok_or("still there".to_string())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_status_page_follow_registrations() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let b = Backend::start("b").await;
    etcd.put(
        "/services/shop/i-1",
        format!(
            r#"{{"addr":"{}","weight":2,"metadata":{{"zone":"<z1>"}}}}"#,
            b.addr
        ),
    )
    .await;
    eventually(PATIENCE, "api to list shop", || async {
        let v = proxy.admin_json("/api/services/shop").await;
        (v["instances"][0]["id"] == "i-1")
            .then_some(())
            .ok_or(v.to_string())
    })
    .await;
    let check = eventually(PATIENCE, "a passed health check in the api", || async {
        let v = proxy.admin_json("/api/services/shop").await;
        let c = v["instances"][0]["last_check"].clone();
        (c["ok"] == true).then_some(c.clone()).ok_or(c.to_string())
    })
    .await;
    assert_eq!(check["detail"], "ok");
    assert!(check["at_unix_ms"].as_u64().unwrap_or(0) > 0, "{check}");
    let v = proxy.admin_json("/api/services").await;
    assert_eq!(v["registry"]["ready"], true);
    assert_eq!(v["registry"]["connected"], true);
    let inst = &v["services"][0]["instances"][0];
    assert_eq!(inst["addr"], b.addr_string());
    assert_eq!(inst["weight"], 2);
    assert_eq!(inst["metadata"]["zone"], "<z1>");
    assert!(
        inst["health"].is_string() && inst["inflight"].is_number(),
        "{inst}"
    );

    let page = client().get(proxy.admin_url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page
        .headers()
        .get("content-type")
        .is_some_and(|c| c.to_str().unwrap_or("").starts_with("text/html")));
    let html = page.text().await.unwrap();
    assert!(html.contains("shop") && html.contains("i-1"), "{html}");
    assert!(html.contains("&lt;z1&gt;"), "metadata must be escaped");
    assert!(
        html.contains("http-equiv=\"refresh\""),
        "page refreshes itself"
    );
    for external in [
        "src=\"http",
        "href=\"http",
        "src=\"//",
        "href=\"//",
        "@import",
    ] {
        assert!(
            !html.contains(external),
            "external asset ({external}) in the status page"
        );
    }

    etcd.delete("/services/shop/i-1").await;
    eventually(PATIENCE, "api to drop shop", || async {
        let r = client()
            .get(proxy.admin_url("/api/services/shop"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        (r.status() == 404)
            .then_some(())
            .ok_or(format!("{}", r.status()))
    })
    .await;
    let html = client()
        .get(proxy.admin_url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let services_part = html.split("Recent events").next().unwrap_or("");
    assert!(
        !services_part.contains("<code>i-1</code>"),
        "deregistered instance still listed"
    );
    assert!(html.contains("Recent events"));
    // unknown admin paths and methods
    let r = client().get(proxy.admin_url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = client()
        .post(proxy.admin_url("/api/services"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_and_access_log_when_enabled() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config("[log]\nformat = \"json\"\naccess_log = true\n")
        .start()
        .await;
    let b = Backend::start("b").await;
    etcd.put("/services/logged/1", b.addr_string()).await;
    eventually(PATIENCE, "logged to route", || async {
        match proxy.get_service("logged", "/some/path?secret=1").await {
            (200, _) => Ok(()),
            (s, body) => Err(format!("{s} {body}")),
        }
    })
    .await;
    let line = eventually(PATIENCE, "an access log line", || async {
        proxy
            .log()
            .lines()
            .find(|l| l.contains("switchyard::access") && l.contains("\"status\":200"))
            .map(str::to_string)
            .ok_or("no access line yet".to_string())
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(&line).expect("access log line is json");
    assert_eq!(v["fields"]["service"], "logged", "{v}");
    assert_eq!(v["fields"]["method"], "GET");
    assert_eq!(v["fields"]["path"], "/some/path");
    assert_eq!(v["fields"]["instance"], b.addr_string());
    assert!(v["fields"]["duration_ms"].is_number());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_access_log_by_default() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let b = Backend::start("b").await;
    etcd.put("/services/quiet/1", b.addr_string()).await;
    eventually(PATIENCE, "quiet to route", || async {
        match proxy.get_service("quiet", "/").await {
            (200, _) => Ok(()),
            (s, body) => Err(format!("{s} {body}")),
        }
    })
    .await;
    assert!(!proxy.log().contains("switchyard::access"));
    assert!(
        proxy.log().contains("switchyard starting: proxy on"),
        "startup line says what listens where"
    );
}

/// A proxy (10 s drain budget) with service "slow" routed to one backend.
async fn slow_service() -> (EtcdServer, Backend, Proxy) {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config("[proxy]\nread_timeout_ms = 10000\nshutdown_timeout_seconds = 10\n")
        .start()
        .await;
    let b = Backend::start("b").await;
    etcd.put("/services/slow/1", b.addr_string()).await;
    eventually(PATIENCE, "slow to route", || async {
        match proxy.get_service("slow", "/").await {
            (200, _) => Ok(()),
            (s, body) => Err(format!("{s} {body}")),
        }
    })
    .await;
    (etcd, b, proxy)
}

/// Waits until the instance has received `n` requests (the routing check made by
/// [`slow_service`] is the first): the request just started is in flight there.
async fn reached(b: &Backend, n: u64) {
    eventually(
        PATIENCE,
        "the slow request to reach the instance",
        || async {
            let hits = b.hits();
            (hits >= n).then_some(()).ok_or(format!("{hits} requests"))
        },
    )
    .await;
}

/// The body of a request started by [`slow_request`], which must have been answered 200.
async fn finished(in_flight: tokio::task::JoinHandle<(u16, String)>, proxy: &Proxy) -> String {
    let (code, body) = in_flight.await.unwrap();
    assert_eq!(
        code,
        200,
        "in-flight request was cut: {body}\n{}",
        proxy.log()
    );
    body
}

/// A request to "slow" that the backend answers after `ms`; yields (status, body).
fn slow_request(proxy: &Proxy, ms: u64) -> tokio::task::JoinHandle<(u16, String)> {
    let url = proxy.url(&format!("/slow?ms={ms}"));
    tokio::spawn(async move {
        let r = client().get(url).header("host", "slow").send().await;
        match r {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_request_finish_then_exits_zero() {
    let (_etcd, b, mut proxy) = slow_service().await;
    let in_flight = slow_request(&proxy, 2000);
    reached(&b, 2).await;
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let s = proxy.terminate(Duration::from_secs(20));
        (s, proxy)
    })
    .await
    .unwrap();
    let (exit, proxy) = status;
    let body = finished(in_flight, &proxy).await;
    assert!(body.contains("slow 2000"), "{body}");
    let exit = exit.expect("switchyard did not exit within 20s of SIGTERM");
    assert!(exit.success(), "exit status {exit:?}\n{}", proxy.log());
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// Reads one response (head and a `content-length` body) from a raw connection.
async fn read_response(conn: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return text;
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(PATIENCE, conn.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "connection closed inside a response: {text}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_keep_alive_connections_while_a_request_finishes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_etcd, b, mut proxy) = slow_service().await;
    // a keep-alive connection that has been answered once and then sits idle
    let addr = proxy.url("").trim_start_matches("http://").to_string();
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: slow\r\n\r\n")
        .await
        .unwrap();
    let first = read_response(&mut idle).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // and a request still in flight when the signal comes
    let in_flight = slow_request(&proxy, 3000);
    reached(&b, 3).await;
    let pid = proxy.pid().expect("proxy running").to_string();
    let signalled = Instant::now();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    // the idle connection is closed at once, long before the in-flight request's 3 s are up
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut byte))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "idle keep-alive connection still open 2 s after SIGTERM\n{}",
                proxy.log()
            )
        });
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "idle connection got bytes instead of a close: {closed:?}"
    );
    assert!(
        !in_flight.is_finished(),
        "the slow request ended before the idle connection closed ({:?} after SIGTERM)",
        signalled.elapsed()
    );
    finished(in_flight, &proxy).await;
    let exit = tokio::task::spawn_blocking(move || proxy.terminate(Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(
        exit.is_some_and(|e| e.success()),
        "switchyard did not exit cleanly: {exit:?}"
    );
}

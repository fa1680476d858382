//! Watch correctness against a real etcd: outages, restarts, compaction, data loss, clusters.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::relay::Relay;
use support::traffic::Traffic;
use support::{eventually, metric_value, signal, Backend, EtcdCluster, EtcdServer, Proxy};

const PATIENCE: Duration = Duration::from_secs(15);

/// Instance keys of `service` (of every service: `None`) in the proxy's current snapshot.
async fn snapshot_keys(proxy: &Proxy, service: Option<&str>) -> BTreeSet<String> {
    let v = proxy.admin_json("/api/services").await;
    v["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| service.is_none_or(|name| s["name"] == name))
        .flat_map(|s| s["instances"].as_array().cloned().unwrap_or_default())
        .filter_map(|i| i["key"].as_str().map(str::to_string))
        .collect()
}

async fn wait_keys(proxy: &Proxy, service: &str, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    eventually(
        PATIENCE,
        &format!("snapshot of {service} to be {want:?}"),
        || {
            let want = want.clone();
            async move {
                let got = snapshot_keys(proxy, Some(service)).await;
                (got == want).then_some(()).ok_or(format!("{got:?}"))
            }
        },
    )
    .await;
}

/// Waits until the counter `name` reaches at least `n`.
async fn wait_metric_at_least(proxy: &Proxy, name: &str, n: f64) {
    eventually(PATIENCE, &format!("{name} >= {n}"), || async {
        let m = proxy.metrics().await;
        let v = support::counter_value(&m, name);
        (v >= n).then_some(()).ok_or(format!("{name} = {v}"))
    })
    .await;
}

async fn wait_connected(proxy: &Proxy, connected: bool) {
    eventually(
        PATIENCE,
        &format!("registry connected = {connected}"),
        || async {
            let m = proxy.metrics().await;
            let v = metric_value(&m, "switchyard_registry_connected");
            (v == Some(connected as i64 as f64))
                .then_some(())
                .ok_or(format!("{v:?}"))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_requests_keep_succeeding_from_the_last_snapshot() {
    let mut etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    etcd.put("/services/s/a", a.addr_string()).await;
    etcd.put("/services/s/b", b.addr_string()).await;
    wait_keys(&proxy, "s", &["/services/s/a", "/services/s/b"]).await;
    etcd.kill();
    wait_connected(&proxy, false).await;
    for i in 0..100 {
        let (status, body) = proxy.get_service("s", "/").await;
        assert_eq!(
            status, 200,
            "request {i} during the etcd outage failed: {body}"
        );
    }
    assert!(a.hits() + b.hits() >= 100);
    assert!(a.hits() > 0 && b.hits() > 0, "both instances keep serving");
    // still ready: readiness is a latch, the last snapshot is good
    let r = support::http_get_blocking(proxy.admin_port, "/readyz").unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let status = proxy.admin_json("/api/registry").await;
    assert_eq!(status["connected"], false);
    assert!(status["last_error"].is_string(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted_changes_made_meanwhile_are_applied() {
    let mut etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let old = Backend::start("old").await;
    let new = Backend::start("new").await;
    etcd.put("/services/s/old", old.addr_string()).await;
    wait_keys(&proxy, "s", &["/services/s/old"]).await;
    let pid = proxy.pid().expect("proxy pid");
    // freeze the proxy so the changes certainly happen while it is disconnected
    signal(pid, "-STOP");
    etcd.restart();
    etcd.put("/services/s/new", new.addr_string()).await;
    etcd.delete("/services/s/old").await;
    etcd.put("/services/t/1", new.addr_string()).await;
    signal(pid, "-CONT");
    wait_keys(&proxy, "s", &["/services/s/new"]).await;
    wait_keys(&proxy, "t", &["/services/t/1"]).await;
    wait_connected(&proxy, true).await;
    let m = proxy.metrics().await;
    assert!(
        support::counter_value(&m, "switchyard_registry_reconnects_total") >= 1.0,
        "{m}"
    );
    // every new watch follows a list: the reconnect listed again
    assert!(
        support::counter_value(&m, "switchyard_registry_relists_total") >= 2.0,
        "{m}"
    );
    let (status, body) = proxy.get_service("s", "/").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"new\""), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_past_the_watch_revision_relists_to_the_exact_state() {
    let mut etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let b = Backend::start("b").await;
    for i in 0..5 {
        etcd.put(&format!("/services/c/{i}"), b.addr_string()).await;
    }
    wait_keys(
        &proxy,
        "c",
        &[
            "/services/c/0",
            "/services/c/1",
            "/services/c/2",
            "/services/c/3",
            "/services/c/4",
        ],
    )
    .await;
    let pid = proxy.pid().expect("proxy pid");
    signal(pid, "-STOP");
    etcd.restart();
    // changes the proxy misses, then compaction removes their history
    etcd.delete("/services/c/0").await;
    etcd.delete("/services/c/1").await;
    etcd.put("/services/c/5", b.addr_string()).await;
    etcd.put(
        "/services/c/2",
        format!(r#"{{"addr":"{}","weight":7}}"#, b.addr),
    )
    .await;
    etcd.delete("/services/gone/x").await;
    etcd.compact_to_current().await;
    signal(pid, "-CONT");
    wait_keys(
        &proxy,
        "c",
        &[
            "/services/c/2",
            "/services/c/3",
            "/services/c/4",
            "/services/c/5",
        ],
    )
    .await;
    let v = proxy.admin_json("/api/services/c").await;
    let w = v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["key"] == "/services/c/2")
        .map(|i| i["weight"].clone());
    assert_eq!(w, Some(serde_json::json!(7)));
    let m = proxy.metrics().await;
    assert!(
        support::counter_value(&m, "switchyard_registry_relists_total") >= 2.0,
        "compaction must cause a re-list: {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_wiped_and_restarted_relists_instead_of_waiting_for_old_revisions() {
    let mut etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let b = Backend::start("b").await;
    for i in 0..10 {
        etcd.put(&format!("/services/w/{i}"), b.addr_string()).await;
    }
    wait_keys(
        &proxy,
        "w",
        &(0..10)
            .map(|i| format!("/services/w/{i}"))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .await;
    let pid = proxy.pid().expect("proxy pid");
    signal(pid, "-STOP");
    etcd.wipe_and_restart();
    etcd.put("/services/w/fresh", b.addr_string()).await;
    signal(pid, "-CONT");
    wait_keys(&proxy, "w", &["/services/w/fresh"]).await;
    assert!(proxy.log().contains("revision went backwards"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_at_start_is_not_ready_then_becomes_ready() {
    let mut etcd = EtcdServer::start();
    etcd.kill();
    let proxy = Proxy::builder(&etcd).no_wait_ready().start().await;
    let r = support::http_get_blocking(proxy.admin_port, "/readyz").unwrap();
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(r.contains("not ready"), "{r}");
    // a request meanwhile is a clean 404 (nothing known yet), not a hang or crash
    let (status, _) = proxy.get_service("s", "/").await;
    assert_eq!(status, 404);
    // keep retrying; become ready once etcd is up
    tokio::time::sleep(Duration::from_millis(300)).await;
    etcd.restart();
    let b = Backend::start("b").await;
    etcd.put("/services/s/1", b.addr_string()).await;
    eventually(PATIENCE, "ready after etcd came up", || async {
        let r =
            support::http_get_blocking(proxy.admin_port, "/readyz").map_err(|e| e.to_string())?;
        r.starts_with("HTTP/1.1 200").then_some(()).ok_or(r)
    })
    .await;
    wait_keys(&proxy, "s", &["/services/s/1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_endpoints_are_accepted_and_a_dead_one_is_tolerated() {
    let etcd = EtcdServer::start();
    let dead = format!("http://127.0.0.1:{}", support::free_port());
    let proxy = Proxy::builder_endpoints(vec![dead, etcd.endpoint()])
        .start()
        .await;
    let b = Backend::start("b").await;
    etcd.put("/services/m/1", b.addr_string()).await;
    wait_keys(&proxy, "m", &["/services/m/1"]).await;
    // listed is not yet admitted: the first health check decides
    proxy.wait_usable("m", 1).await;
    let (status, body) = proxy.get_service("m", "/").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_is_limited_to_the_prefix_with_its_slash() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).prefix("/svc").start().await;
    let b = Backend::start("b").await;
    etcd.put("/svc/in/1", b.addr_string()).await;
    etcd.put("/svc-other/out/1", b.addr_string()).await;
    etcd.put("/svcx/out/1", b.addr_string()).await;
    wait_keys(&proxy, "in", &["/svc/in/1"]).await;
    let v = proxy.admin_json("/api/services").await;
    assert_eq!(v["services"].as_array().map(|a| a.len()), Some(1), "{v}");
    assert_eq!(
        v["registry"]["invalid_registrations"]
            .as_array()
            .map(|a| a.len()),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_registry_is_listed_in_pages_at_one_revision() {
    use etcd_client::{Txn, TxnOp};
    let etcd = EtcdServer::start();
    let mut c = etcd.client().await;
    const N: usize = 4_500; // more than two list pages
    for chunk in (0..N).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|i| {
                TxnOp::put(
                    format!("/services/big-{}/{i}", i % 50),
                    format!("127.0.0.{}:{}", 1 + i % 200, 1024 + i),
                    None,
                )
            })
            .collect();
        c.txn(Txn::new().and_then(ops)).await.expect("bulk txn");
    }
    let proxy = Proxy::builder(&etcd)
        .config("[health]\nenabled = false\n")
        .start()
        .await;
    let v = proxy.admin_json("/api/services").await;
    let services = v["services"].as_array().expect("services");
    let instances: usize = services
        .iter()
        .map(|s| s["instances"].as_array().map_or(0, |a| a.len()))
        .sum();
    assert_eq!((services.len(), instances), (50, N));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_resync_relists_without_disturbing_routing() {
    let etcd = EtcdServer::start();
    let b = Backend::start("b").await;
    etcd.put("/services/r/1", b.addr_string()).await;
    let proxy = Proxy::builder(&etcd)
        .resync_ms(300)
        .config("[health]\nenabled = false\n")
        .start()
        .await;
    wait_keys(&proxy, "r", &["/services/r/1"]).await;
    wait_metric_at_least(&proxy, "switchyard_registry_relists_total", 3.0).await;
    // a resync is a diff, not a reset of state: the instance is still there, routed
    wait_keys(&proxy, "r", &["/services/r/1"]).await;
    let (status, body) = proxy.get_service("r", "/").await;
    assert_eq!(status, 200, "{body}");
}

/// The routed keys equal etcd's `get --prefix`, or the last difference.
async fn wait_view_equals_etcd(proxy: &Proxy, etcd: &EtcdServer, patience: Duration) {
    eventually(patience, "the routed view to equal etcd's", || async {
        let mut c = etcd.client().await;
        let resp = c
            .get(
                "/services/",
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_keys_only(),
                ),
            )
            .await
            .map_err(|e| e.to_string())?;
        let want: BTreeSet<String> = resp
            .kvs()
            .iter()
            .map(|kv| kv.key_str().unwrap_or_default().to_string())
            .collect();
        let got = snapshot_keys(proxy, None).await;
        (got == want)
            .then_some(())
            .ok_or(format!("proxy {got:?} != etcd {want:?}"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_wiped_and_rewritten_past_the_old_revision_is_listed_again_at_once() {
    let mut etcd = EtcdServer::start();
    // the periodic re-list is far away: only the reconnect can fix the view in time
    let proxy = Proxy::builder(&etcd)
        .resync_ms(600_000)
        .config("[health]\nenabled = false\n")
        .start()
        .await;
    let b = Backend::start("b").await;
    for i in 0..5 {
        etcd.put(&format!("/services/w/old-{i}"), b.addr_string())
            .await;
    }
    wait_keys(
        &proxy,
        "w",
        &[
            "/services/w/old-0",
            "/services/w/old-1",
            "/services/w/old-2",
            "/services/w/old-3",
            "/services/w/old-4",
        ],
    )
    .await;
    let old_revision = proxy.admin_json("/api/registry").await["revision"]
        .as_i64()
        .expect("revision");
    let pid = proxy.pid().expect("proxy pid");
    signal(pid, "-STOP");
    etcd.wipe_and_restart();
    // same name, peer URL and token: same cluster id; more writes than the old revision, so
    // the revision does not go backwards either
    let mut rev = 0;
    let mut i = 0;
    while rev <= old_revision + 2 {
        rev = etcd
            .put(&format!("/services/w/new-{i}"), b.addr_string())
            .await;
        i += 1;
    }
    etcd.put("/services/w/old-1", b.addr_string()).await;
    signal(pid, "-CONT");
    wait_view_equals_etcd(&proxy, &etcd, Duration::from_secs(5)).await;
    wait_connected(&proxy, true).await;
    let (status, body) = proxy.get_service("w", "/").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_larger_than_grpcs_default_limit_is_applied() {
    // etcd accepts values up to 6 MiB here: a single event larger than gRPC's default 4 MiB
    let mut etcd = EtcdServer::start_with_args(&["--max-request-bytes", "6291456"]);
    let proxy = Proxy::builder(&etcd)
        .resync_ms(600_000)
        .config("[health]\nenabled = false\n")
        .start()
        .await;
    let b = Backend::start("b").await;
    let blob = "x".repeat(1_400_000);
    let value = |blob: &str| format!(r#"{{"addr":"{}","metadata":{{"blob":"{blob}"}}}}"#, b.addr);
    // 1. one 5 MiB value arrives as one watch event
    etcd.put("/services/big/huge", value(&"y".repeat(5 << 20)))
        .await;
    wait_keys(&proxy, "big", &["/services/big/huge"]).await;
    // 2. four 1.4 MiB values missed while disconnected: more than 4 MiB to catch up
    let pid = proxy.pid().expect("proxy pid");
    signal(pid, "-STOP");
    etcd.restart();
    for i in 0..4 {
        etcd.put(&format!("/services/big/{i}"), value(&blob)).await;
    }
    signal(pid, "-CONT");
    wait_view_equals_etcd(&proxy, &etcd, Duration::from_secs(10)).await;
    wait_connected(&proxy, true).await;
    // 3. and the watch delivers afterwards
    etcd.put("/services/big/later", b.addr_string()).await;
    wait_view_equals_etcd(&proxy, &etcd, Duration::from_secs(5)).await;
    let status = proxy.admin_json("/api/registry").await;
    assert_eq!(status["stale_since"], serde_json::Value::Null, "{status}");
    assert!(
        !proxy.log().contains("decoded message length too large"),
        "the watch must accept large messages"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_says_stale_since_when_while_the_watch_does_not_deliver() {
    let mut etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let status = proxy.admin_json("/api/registry").await;
    assert_eq!(status["connected"], true, "{status}");
    assert_eq!(status["stale_since"], serde_json::Value::Null, "{status}");
    etcd.kill();
    wait_connected(&proxy, false).await;
    let status = proxy.admin_json("/api/registry").await;
    let since = status["stale_since"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        since.ends_with('Z'),
        "stale_since must be a UTC time: {status}"
    );
    assert!(
        status["stale"]
            .as_str()
            .unwrap_or_default()
            .contains("stale since"),
        "{status}"
    );
    let r = support::http_get_blocking(proxy.admin_port, "/readyz").unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "still ready: {r}");
    assert!(r.contains(&format!("stale since {since}")), "{r}");
    etcd.restart();
    wait_connected(&proxy, true).await;
    let status = proxy.admin_json("/api/registry").await;
    assert_eq!(status["stale_since"], serde_json::Value::Null, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_invalid_key_is_counted_and_logged_once_across_relists() {
    let etcd = EtcdServer::start();
    let b = Backend::start("b").await;
    etcd.put("/services/ok/1", b.addr_string()).await;
    etcd.put("/services/ok/bad", "garbage").await;
    etcd.put("/services/./x", b.addr_string()).await;
    etcd.put("/services/../x", b.addr_string()).await;
    let proxy = Proxy::builder(&etcd)
        .resync_ms(200)
        .config("[health]\nenabled = false\n")
        .start()
        .await;
    wait_metric_at_least(&proxy, "switchyard_registry_relists_total", 4.0).await;
    let m = proxy.metrics().await;
    assert_eq!(
        metric_value(&m, "switchyard_registry_invalid_entries_total"),
        Some(3.0),
        "three invalid keys, each counted once: {m}"
    );
    assert_eq!(
        metric_value(&m, "switchyard_registry_invalid_entries"),
        Some(3.0)
    );
    let log = proxy.log();
    assert_eq!(
        log.matches("skipping invalid registration").count(),
        3,
        "each invalid key is logged once: {log}"
    );
    let v = proxy.admin_json("/api/services").await;
    let names: Vec<&str> = v["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["ok"], "'.' and '..' are not services: {v}");
    let invalid = v["registry"]["invalid_registrations"].to_string();
    assert!(
        invalid.contains("/services/../x") && invalid.contains("/services/./x"),
        "{invalid}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_at_the_proxys_own_addresses_are_refused_and_never_routed() {
    let etcd = EtcdServer::start();
    // bound to every address: 127.0.0.2, localhost and 0.0.0.0 at its port are the proxy too
    let proxy = Proxy::builder(&etcd).listen_host("0.0.0.0").start().await;
    let ok = Backend::start("ok").await;
    let refused = [
        (
            "/services/adm/1",
            format!(
                r#"{{"addr":"127.0.0.1:{}","metadata":{{"health_path":"/healthz"}}}}"#,
                proxy.admin_port
            ),
        ),
        (
            "/services/etcd/1",
            format!("127.0.0.1:{}", etcd.client_port),
        ),
        ("/services/self/1", format!("127.0.0.1:{}", proxy.port)),
        ("/services/self/2", format!("127.0.0.2:{}", proxy.port)),
        ("/services/self/3", format!("localhost:{}", proxy.port)),
        ("/services/self/4", format!("0.0.0.0:{}", proxy.port)),
    ];
    for (key, value) in &refused {
        etcd.put(key, value).await;
    }
    etcd.put("/services/ok/1", ok.addr_string()).await;
    wait_keys(&proxy, "ok", &["/services/ok/1"]).await;
    let invalid = eventually(PATIENCE, "six refused registrations", || async {
        let v = proxy.admin_json("/api/registry").await;
        let invalid = v["invalid_registrations"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        (invalid.len() == refused.len())
            .then_some(invalid)
            .ok_or(format!("{v}"))
    })
    .await;
    for entry in &invalid {
        let reason = entry["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("is switchyard's own"), "{entry}");
    }
    let reason_of = |key: &str| {
        invalid
            .iter()
            .find(|e| e["key"] == key)
            .map(|e| e["reason"].to_string())
            .unwrap_or_default()
    };
    assert!(reason_of("/services/adm/1").contains("admin listener"));
    assert!(reason_of("/services/etcd/1").contains("etcd endpoint"));
    assert!(reason_of("/services/self/2").contains("proxy listener"));
    for service in ["adm", "etcd", "self"] {
        let (status, body) = proxy.get_service(service, "/metrics").await;
        assert_eq!(status, 503, "{service}: {body}");
        assert!(!body.contains("switchyard_"), "{service}: {body}");
    }
    let (status, body) = proxy.get_service("ok", "/").await;
    assert_eq!(status, 200, "{body}");
    let m = proxy.metrics().await;
    assert_eq!(
        metric_value(&m, "switchyard_registry_invalid_entries_total"),
        Some(refused.len() as f64),
        "{m}"
    );
    let log = proxy.log();
    assert!(
        log.contains("/services/self/1"),
        "refusals are logged with their key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolve_off_the_registry_path_and_failing_ones_are_shown() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .etcd_config("dns_timeout_ms = 2000\ndns_refresh_ms = 300")
        .config("[health]\nenabled = false\n")
        .start()
        .await;
    let named = Backend::start("named").await;
    let ip = Backend::start("ip").await;
    for name in ["a", "b", "c"] {
        etcd.put(
            &format!("/services/nowhere/{name}"),
            format!("{name}.switchyard-test.invalid:80"),
        )
        .await;
    }
    let started = std::time::Instant::now();
    etcd.put("/services/ip/1", ip.addr_string()).await;
    etcd.put(
        "/services/named/1",
        format!("localhost:{}", named.addr.port()),
    )
    .await;
    wait_keys(&proxy, "ip", &["/services/ip/1"]).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "names waiting for DNS delayed an IP registration by {:?}",
        started.elapsed()
    );
    wait_keys(&proxy, "named", &["/services/named/1"]).await;
    let (status, body) = proxy.get_service("named", "/").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"named\""), "{body}");
    // the names that do not resolve: invalid registrations and failing names, counted once
    let v = eventually(PATIENCE, "three failing names", || async {
        let v = proxy.admin_json("/api/registry").await;
        let n = v["dns_failing"].as_array().map_or(0, |a| a.len());
        (n == 3).then_some(v.clone()).ok_or(format!("{v}"))
    })
    .await;
    assert_eq!(
        v["dns_failing"][0]["name"], "a.switchyard-test.invalid",
        "{v}"
    );
    assert_eq!(
        v["dns_failing"][0]["last_good"],
        serde_json::Value::Null,
        "{v}"
    );
    let invalid = v["invalid_registrations"].to_string();
    assert!(invalid.contains("/services/nowhere/a"), "{invalid}");
    // refreshed every 300 ms: the lookups are repeated, the keys not counted again
    wait_metric_at_least(&proxy, "switchyard_registry_dns_lookup_failures_total", 6.0).await;
    let m = proxy.metrics().await;
    assert_eq!(
        metric_value(&m, "switchyard_registry_dns_failing_names"),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "switchyard_registry_invalid_entries_total"),
        Some(3.0),
        "{m}"
    );
    let page = support::http_get_blocking(proxy.admin_port, "/").unwrap();
    assert!(page.contains("Names not resolving"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_page_over_the_message_limit_is_asked_again_with_fewer_keys() {
    use etcd_client::{Txn, TxnOp};
    let etcd = EtcdServer::start();
    let b = Backend::start("b").await;
    // 50 values of 1.4 MiB: 70 MiB in one page of the usual size, over the 64 MiB limit
    let blob = "z".repeat(1_400_000);
    let mut c = etcd.client().await;
    for i in 0..50 {
        let value = format!(r#"{{"addr":"{}","metadata":{{"blob":"{blob}"}}}}"#, b.addr);
        c.txn(Txn::new().and_then([TxnOp::put(format!("/services/heavy/{i:02}"), value, None)]))
            .await
            .expect("put of a big value");
    }
    let proxy = Proxy::builder(&etcd)
        .config("[health]\nenabled = false\n")
        .start()
        .await;
    let keys = snapshot_keys(&proxy, Some("heavy")).await;
    assert_eq!(keys.len(), 50, "{keys:?}");
    assert!(proxy.log().contains("asking for fewer keys"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_etcd_makes_the_registry_stale_while_routing_goes_on() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config("[health]\nenabled = false\n")
        .start()
        .await;
    let b = Backend::start("b").await;
    etcd.put("/services/h/1", b.addr_string()).await;
    wait_keys(&proxy, "h", &["/services/h/1"]).await;
    let pid = etcd.pid().expect("etcd pid");
    // frozen, not dead: the connection stays open and nothing arrives (keep-alive finds it)
    signal(pid, "-STOP");
    wait_connected(&proxy, false).await;
    let status = proxy.admin_json("/api/registry").await;
    assert!(status["stale_since"].is_string(), "{status}");
    let (code, body) = proxy.get_service("h", "/").await;
    assert_eq!(code, 200, "routing goes on from the last snapshot: {body}");
    signal(pid, "-CONT");
    wait_connected(&proxy, true).await;
    let status = proxy.admin_json("/api/registry").await;
    assert_eq!(status["stale_since"], serde_json::Value::Null, "{status}");
    etcd.put("/services/h/2", b.addr_string()).await;
    wait_keys(&proxy, "h", &["/services/h/1", "/services/h/2"]).await;
}

/// etcd behind a [`Relay`], and a proxy that reaches etcd only through it (the periodic re-list
/// far away: only reconnects can correct the view).
async fn behind_a_relay() -> (EtcdServer, Relay, Proxy) {
    let etcd = EtcdServer::start();
    let relay = Relay::start(([127, 0, 0, 1], etcd.client_port).into()).await;
    let proxy = Proxy::builder_endpoints(vec![relay.endpoint()])
        .resync_ms(600_000)
        .config("[health]\nenabled = false\n")
        .start()
        .await;
    (etcd, relay, proxy)
}

async fn metric(proxy: &Proxy, name: &str) -> f64 {
    support::counter_value(&proxy.metrics().await, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_etcd_connection_relists_and_converges_to_etcds_view() {
    let (etcd, relay, proxy) = behind_a_relay().await;
    let b = Backend::start("b").await;
    for i in 0..5 {
        etcd.put(&format!("/services/d/{i}"), b.addr_string()).await;
    }
    wait_view_equals_etcd(&proxy, &etcd, PATIENCE).await;
    let relists = metric(&proxy, "switchyard_registry_relists_total").await;
    let reconnects = metric(&proxy, "switchyard_registry_reconnects_total").await;
    let accepted = relay.accepted();
    // changes the watch cannot deliver, then the connection is gone
    relay.pause();
    etcd.delete("/services/d/0").await;
    etcd.delete("/services/d/1").await;
    etcd.put(
        "/services/d/2",
        format!(r#"{{"addr":"{}","weight":5}}"#, b.addr),
    )
    .await;
    for i in 0..3 {
        etcd.put(&format!("/services/e/{i}"), b.addr_string()).await;
    }
    relay.drop_connections();
    relay.resume();
    wait_view_equals_etcd(&proxy, &etcd, PATIENCE).await;
    wait_connected(&proxy, true).await;
    let weight = proxy.admin_json("/api/services/d").await["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["key"] == "/services/d/2")
        .map(|i| i["weight"].clone());
    assert_eq!(weight, Some(serde_json::json!(5)), "the changed weight");
    assert!(
        relay.accepted() > accepted,
        "the registry must reconnect through the relay"
    );
    let m = proxy.metrics().await;
    assert_eq!(
        metric_value(&m, "switchyard_registry_reconnects_total"),
        Some(reconnects + 1.0),
        "one lost connection, one reconnect: {m}"
    );
    assert!(
        support::counter_value(&m, "switchyard_registry_relists_total") > relists,
        "the reconnect must list again (was {relists}): {m}"
    );
    // and the new watch delivers
    etcd.put("/services/e/later", b.addr_string()).await;
    wait_view_equals_etcd(&proxy, &etcd, PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_etcd_connection_shows_stale_since_and_recovers_on_resume() {
    let (etcd, relay, proxy) = behind_a_relay().await;
    let b = Backend::start("b").await;
    etcd.put("/services/p/1", b.addr_string()).await;
    wait_keys(&proxy, "p", &["/services/p/1"]).await;
    relay.pause();
    // written while the proxy cannot hear it
    etcd.put("/services/p/2", b.addr_string()).await;
    // nothing passes, nothing closes: the registry's keep-alive must notice
    wait_connected(&proxy, false).await;
    assert!(
        relay.open_connections() >= 1,
        "a pause keeps the sockets open"
    );
    assert_shown_stale(&proxy).await;
    let (code, body) = proxy.get_service("p", "/").await;
    assert_eq!(code, 200, "routing goes on from the last snapshot: {body}");
    relay.resume();
    wait_connected(&proxy, true).await;
    wait_view_equals_etcd(&proxy, &etcd, PATIENCE).await;
    assert_not_shown_stale(&proxy).await;
}

/// `/api/registry` says since when the view is stale, and `/readyz` still answers 200 and says
/// the same; returns that time.
async fn assert_shown_stale(proxy: &Proxy) -> String {
    let status = proxy.admin_json("/api/registry").await;
    let since = status["stale_since"]
        .as_str()
        .unwrap_or_else(|| panic!("stale_since must be set: {status}"))
        .to_string();
    assert!(
        status["stale"]
            .as_str()
            .is_some_and(|s| s.contains(&format!("stale since {since}"))),
        "{status}"
    );
    let r = support::http_get_blocking(proxy.admin_port, "/readyz").unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "still ready: {r}");
    assert!(
        r.contains(&format!("stale since {since}")),
        "/readyz must say since when the view is stale: {r}"
    );
    since
}

/// Neither `/api/registry` nor `/readyz` says the view is stale.
async fn assert_not_shown_stale(proxy: &Proxy) {
    let status = proxy.admin_json("/api/registry").await;
    assert_eq!(status["stale_since"], serde_json::Value::Null, "{status}");
    let r = support::http_get_blocking(proxy.admin_port, "/readyz").unwrap();
    assert!(!r.contains("stale since"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_connection_failures_are_retried_with_a_capped_backoff() {
    // backoff_initial_ms = 50, backoff_max_ms = 500 (the builder's): at the cap, an attempt every
    // 250-500 ms
    let (etcd, relay, proxy) = behind_a_relay().await;
    let reconnects = metric(&proxy, "switchyard_registry_reconnects_total").await;
    let before = relay.accepted();
    relay.refuse();
    wait_connected(&proxy, false).await;
    // past the first, short delays (50 + 100 + 200 + 400 ms at most)
    let warm = before + 5;
    eventually(PATIENCE, "five refused connection attempts", || async {
        let n = relay.accepted();
        (n >= warm)
            .then_some(())
            .ok_or(format!("{} attempts", n - before))
    })
    .await;
    let window = Duration::from_secs(4);
    let start = relay.accepted();
    let started = std::time::Instant::now();
    tokio::time::sleep(window).await;
    let attempts = relay.accepted() - start;
    let elapsed = started.elapsed();
    // one connection per attempt at most 1 per 250 ms; without a backoff it is hundreds
    let most = (elapsed.as_millis() / 250) as u64 + 2;
    assert!(
        (2..=most).contains(&attempts),
        "expected 2..={most} connection attempts in {elapsed:?} at a 500 ms backoff cap, got {attempts}"
    );
    // many failed attempts, one lost connection
    assert_eq!(
        metric(&proxy, "switchyard_registry_reconnects_total").await,
        reconnects + 1.0
    );
    relay.resume();
    wait_connected(&proxy, true).await;
    let b = Backend::start("b").await;
    etcd.put("/services/back/1", b.addr_string()).await;
    wait_view_equals_etcd(&proxy, &etcd, PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_stops_resolving_keeps_its_last_good_address_through_relists() {
    let etcd = EtcdServer::start();
    let files = tempfile::tempdir().expect("temp dir for resolver files");
    let hosts = files.path().join("hosts");
    let resolv_conf = files.path().join("resolv.conf");
    let name = "named-backend.switchyard-test";
    std::fs::write(&hosts, format!("127.0.0.1 {name}\n")).unwrap();
    // no DNS server there: a name missing from the hosts file fails at once
    std::fs::write(
        &resolv_conf,
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    )
    .unwrap();
    let proxy = Proxy::builder(&etcd)
        .resolver_files(&hosts, &resolv_conf)
        .resync_ms(300)
        .etcd_config("dns_timeout_ms = 2000\ndns_refresh_ms = 200")
        .config("[health]\nenabled = false\n")
        .start()
        .await;
    let b = Backend::start("named").await;
    etcd.put("/services/n/1", format!("{name}:{}", b.addr.port()))
        .await;
    wait_keys(&proxy, "n", &["/services/n/1"]).await;
    let (status, body) = proxy.get_service("n", "/").await;
    assert_eq!(status, 200, "{body}");
    // the name is gone from the resolver (written in place: the bind mount holds the inode)
    std::fs::write(&hosts, "").unwrap();
    let v = eventually(PATIENCE, "the name to be shown as failing", || async {
        let v = proxy.admin_json("/api/registry").await;
        let n = v["dns_failing"].as_array().map_or(0, |a| a.len());
        (n == 1).then_some(v.clone()).ok_or(format!("{v}"))
    })
    .await;
    assert_eq!(v["dns_failing"][0]["name"], name, "{v}");
    assert_eq!(v["dns_failing"][0]["last_good"], "127.0.0.1", "{v}");
    // re-lists and refreshes while it fails remove nothing
    let relists = metric(&proxy, "switchyard_registry_relists_total").await;
    wait_metric_at_least(&proxy, "switchyard_registry_relists_total", relists + 3.0).await;
    wait_metric_at_least(&proxy, "switchyard_registry_dns_lookup_failures_total", 3.0).await;
    for i in 0..50 {
        let (status, body) = proxy.get_service("n", "/").await;
        assert_eq!(status, 200, "request {i} while DNS fails: {body}");
    }
    wait_keys(&proxy, "n", &["/services/n/1"]).await;
    let v = proxy.admin_json("/api/registry").await;
    assert_eq!(
        v["invalid_registrations"].as_array().map(Vec::len),
        Some(0),
        "an unchanged registration stays valid while its name fails: {v}"
    );
    assert_eq!(
        metric(&proxy, "switchyard_registry_dns_failing_names").await,
        1.0
    );
    // resolving again: no longer failing
    std::fs::write(&hosts, format!("127.0.0.1 {name}\n")).unwrap();
    eventually(PATIENCE, "the name to resolve again", || async {
        let v = proxy.admin_json("/api/registry").await;
        let n = v["dns_failing"].as_array().map_or(usize::MAX, |a| a.len());
        (n == 0).then_some(()).ok_or(format!("{v}"))
    })
    .await;
    let (status, body) = proxy.get_service("n", "/").await;
    assert_eq!(status, 200, "{body}");
}

/// A 3-member etcd cluster, a proxy given every member as an endpoint (the periodic re-list far
/// away: only the watch and reconnects can keep the view right), and service `s` registered at
/// instances `a` and `b`, both usable; `c` is started, not registered.
async fn cluster_with_two_instances() -> (EtcdCluster, Proxy, [Backend; 3]) {
    let cluster = EtcdCluster::start();
    let proxy = Proxy::builder_endpoints(cluster.endpoints())
        .resync_ms(600_000)
        .start()
        .await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    cluster.live().put("/services/s/a", a.addr_string()).await;
    cluster.live().put("/services/s/b", b.addr_string()).await;
    proxy.wait_usable("s", 2).await;
    (cluster, proxy, [a, b, c])
}

/// Makes the member the proxy watches through the leader (`lead`) or a follower and starts
/// traffic to `s`; returns the traffic and that member.
async fn watched_member_under_traffic(
    cluster: &EtcdCluster,
    proxy: &Proxy,
    lead: bool,
) -> (Traffic, usize) {
    let watched = cluster.watched().await;
    if lead {
        cluster.move_leader(watched).await;
    } else if cluster.leader().await == watched {
        cluster.move_leader((watched + 1) % 3).await;
    }
    let traffic = Traffic::start(proxy, "s");
    traffic.wait_more(20).await;
    (traffic, watched)
}

/// [`watched_member_under_traffic`], then kills that member; returns the traffic and the killed
/// member.
async fn kill_the_watched_member(
    cluster: &mut EtcdCluster,
    proxy: &Proxy,
    lead: bool,
) -> (Traffic, usize) {
    let (traffic, watched) = watched_member_under_traffic(cluster, proxy, lead).await;
    cluster.kill(watched);
    (traffic, watched)
}

/// Waits until `backend` has answered a request routed through the proxy.
async fn wait_routed_to(backend: &Backend, patience: Duration) {
    eventually(
        patience,
        &format!("{} to answer requests", backend.name),
        || async {
            (backend.hits() > 0)
                .then_some(())
                .ok_or("no hits".to_string())
        },
    )
    .await;
}

/// One more change to `s` after `c` was added and `a` removed (`d`, at `b`'s address) is seen,
/// and the routed view equals etcd's: the watch that replaced a broken one delivers.
async fn assert_a_later_change_is_seen(proxy: &Proxy, cluster: &EtcdCluster, b: &Backend) {
    cluster.live().put("/services/s/d", b.addr_string()).await;
    wait_keys(
        proxy,
        "s",
        &["/services/s/b", "/services/s/c", "/services/s/d"],
    )
    .await;
    wait_view_equals_etcd(proxy, cluster.live(), Duration::from_secs(10)).await;
}

/// The proxy lost its watch once and serves a new one from a running member.
async fn assert_watch_moved(proxy: &Proxy, cluster: &EtcdCluster) {
    // at least once: an election on a loaded machine may cut a watch again
    let reconnects = metric(proxy, "switchyard_registry_reconnects_total").await;
    assert!(reconnects >= 1.0, "the killed member's watch must break");
    // only running members are asked: one of them serves the proxy's watch
    cluster.watched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_leader_killed_requests_keep_succeeding_and_later_changes_are_routed() {
    let (mut cluster, proxy, [a, b, c]) = cluster_with_two_instances().await;
    // the leader is the member the proxy watches through: killing it breaks the watch too
    let (traffic, killed) = kill_the_watched_member(&mut cluster, &proxy, true).await;
    let elected = Instant::now();
    let leader = cluster.leader().await;
    assert_ne!(leader, killed, "a killed member cannot lead");
    eprintln!("new leader after {:?}", elected.elapsed());
    // changes after the election: add c, remove a
    let changed = Instant::now();
    cluster.live().put("/services/s/c", c.addr_string()).await;
    cluster.live().delete("/services/s/a").await;
    // elections, reconnect backoff and c's first health check all vary on a loaded machine
    wait_routed_to(&c, Duration::from_secs(10)).await;
    eventually(Duration::from_secs(10), "a to be removed", || async {
        let got = snapshot_keys(&proxy, Some("s")).await;
        (!got.contains("/services/s/a"))
            .then_some(())
            .ok_or(format!("{got:?}"))
    })
    .await;
    eprintln!("change routed after {:?}", changed.elapsed());
    // a request already on its way to a may still end there; none sent after
    traffic.wait_more(2).await;
    let a_hits = a.hits();
    traffic.wait_more(50).await;
    assert_eq!(a.hits(), a_hits, "a removed instance must not be routed to");
    assert!(b.hits() > 0 && c.hits() > 0, "b and c share the traffic");
    wait_view_equals_etcd(&proxy, cluster.live(), Duration::from_secs(10)).await;
    wait_connected(&proxy, true).await;
    assert_watch_moved(&proxy, &cluster).await;
    let n = traffic.assert_all_succeeded().await;
    eprintln!("{n} requests, all 200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watched_member_killed_the_watch_resumes_on_another_without_a_gap() {
    let (mut cluster, proxy, [_a, b, c]) = cluster_with_two_instances().await;
    // a follower: the cluster keeps its leader, only the proxy's watch is cut
    let (traffic, _) = kill_the_watched_member(&mut cluster, &proxy, false).await;
    // written at once, while the proxy is still finding another member
    let changed = Instant::now();
    cluster.live().put("/services/s/c", c.addr_string()).await;
    cluster.live().delete("/services/s/a").await;
    wait_keys(&proxy, "s", &["/services/s/b", "/services/s/c"]).await;
    eprintln!("change seen after {:?}", changed.elapsed());
    wait_connected(&proxy, true).await;
    assert_watch_moved(&proxy, &cluster).await;
    // the resumed watch delivers
    assert_a_later_change_is_seen(&proxy, &cluster, &b).await;
    wait_routed_to(&c, Duration::from_secs(10)).await;
    traffic.assert_all_succeeded().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_quorum_lost_routes_the_last_view_shown_stale_until_it_is_back() {
    let (mut cluster, proxy, [a, b, c]) = cluster_with_two_instances().await;
    // the member the proxy watches through survives: its connection stays open, and only etcd
    // cancelling the watches of a member without a leader (the proxy requires one) says that
    // nothing will arrive on it
    let watched = cluster.watched().await;
    let others: Vec<usize> = (0..3).filter(|&i| i != watched).collect();
    let traffic = Traffic::start(&proxy, "s");
    traffic.wait_more(20).await;
    let killed = Instant::now();
    for &i in &others {
        cluster.kill(i);
    }
    wait_connected(&proxy, false).await;
    eprintln!("stale after {:?}", killed.elapsed());
    assert_shown_stale(&proxy).await;
    // the last known instances keep serving
    let before = (a.hits(), b.hits());
    traffic.wait_more(50).await;
    assert!(
        a.hits() > before.0 && b.hits() > before.1,
        "both instances keep serving without a quorum"
    );
    cluster.restart(&others);
    let restarted = Instant::now();
    cluster.live().put("/services/s/c", c.addr_string()).await;
    wait_routed_to(&c, Duration::from_secs(10)).await;
    eprintln!("change routed {:?} after the restart", restarted.elapsed());
    wait_connected(&proxy, true).await;
    assert_not_shown_stale(&proxy).await;
    wait_view_equals_etcd(&proxy, cluster.live(), Duration::from_secs(10)).await;
    traffic.assert_all_succeeded().await;
}

/// How long the proxy may take to notice a member that hangs with its connections open and to
/// watch through another: the HTTP/2 keep-alive (a PING 5 s after the last frame, 3 s to answer)
/// closes the connection, then a reconnect, a list and a watch; with room for a loaded machine.
const HUNG_PATIENCE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_hung_watched_member_the_watch_moves_to_a_live_one() {
    let (mut cluster, proxy, [_a, b, c]) = cluster_with_two_instances().await;
    // a follower: the cluster keeps its leader and quorum, only the proxy's member hangs
    let (traffic, hung) = watched_member_under_traffic(&cluster, &proxy, false).await;
    let reconnects = metric(&proxy, "switchyard_registry_reconnects_total").await;
    cluster.freeze(hung);
    let frozen = Instant::now();
    // written at once through a live member: the hung one can neither deliver nor refuse it
    cluster.live().put("/services/s/c", c.addr_string()).await;
    cluster.live().delete("/services/s/a").await;
    let left = || HUNG_PATIENCE.saturating_sub(frozen.elapsed());
    eventually(left(), "the hung member's watch to break", || async {
        let now = metric(&proxy, "switchyard_registry_reconnects_total").await;
        (now > reconnects)
            .then_some(())
            .ok_or(format!("reconnects {now}, was {reconnects}"))
    })
    .await;
    eprintln!("hung member noticed after {:?}", frozen.elapsed());
    let want = BTreeSet::from(["/services/s/b".to_string(), "/services/s/c".to_string()]);
    eventually(
        left(),
        "a watch delivering again, c in and a out",
        || async {
            let connected = metric(&proxy, "switchyard_registry_connected").await;
            let got = snapshot_keys(&proxy, Some("s")).await;
            (connected == 1.0 && got == want)
                .then_some(())
                .ok_or(format!("connected {connected}, {got:?}"))
        },
    )
    .await;
    eprintln!("watch delivering again after {:?}", frozen.elapsed());
    // nothing is sent to the hung member any more: a request there would hang until its timeout
    let pid = proxy.pid().expect("the proxy runs");
    let to_hung = support::connections_to(pid, cluster.member(hung).client_port);
    assert_eq!(
        to_hung, 0,
        "the proxy must hold no connection to the hung member (a request on it waits for its \
         timeout)"
    );
    // a frozen member is not asked: a running one serves the watch
    assert_watch_moved(&proxy, &cluster).await;
    wait_routed_to(&c, Duration::from_secs(10)).await;
    wait_view_equals_etcd(&proxy, cluster.live(), Duration::from_secs(10)).await;
    // back: the member catches up, keeps no watch of the proxy's, and the watch goes on
    cluster.thaw(hung);
    assert_a_later_change_is_seen(&proxy, &cluster, &b).await;
    cluster.watched().await;
    wait_connected(&proxy, true).await;
    traffic.assert_all_succeeded().await;
}

//! Traffic policies (issue 18) against a real etcd, real backends and the real switchyard
//! binary: outlier ejection on answers and its cap, retries on 5xx and the retry budget, slow
//! start, panic mode, consistent hashing and zone preference.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::backend::Mode;
use support::{client, eventually, metric_value, Backend, EtcdServer, Proxy};

const PATIENCE: Duration = Duration::from_secs(10);

/// No active checks and no passive ejection: only what the test turns on decides.
const NO_CHECKS: &str = "[health]\nenabled = false\npassive_failures = 0\n";

/// Fast active checks (every 200 ms, one failure ejects, one pass admits).
const FAST_CHECKS: &str = "[health]\ninterval_ms = 200\ntimeout_ms = 300\njitter_ms = 0\nunhealthy_threshold = 1\nhealthy_threshold = 1\n";

/// The instance `key` of `service` as the admin API shows it.
async fn instance(proxy: &Proxy, service: &str, key: &str) -> serde_json::Value {
    let v = proxy.admin_json(&format!("/api/services/{service}")).await;
    v["instances"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["key"] == key).cloned())
        .unwrap_or_default()
}

/// Waits until instance `key` is in `state` ("ejected", "healthy", ...); returns it.
async fn wait_state(proxy: &Proxy, service: &str, key: &str, state: &str) -> serde_json::Value {
    eventually(PATIENCE, &format!("{key} to be {state}"), || async {
        let i = instance(proxy, service, key).await;
        if i["state"] == state {
            Ok(i)
        } else {
            Err(format!("instance: {i}"))
        }
    })
    .await
}

/// Sends `n` GETs with `Host: service`; returns the statuses and which backend answered.
async fn send(
    proxy: &Proxy,
    service: &str,
    n: usize,
) -> (HashMap<u16, usize>, HashMap<String, usize>) {
    let mut statuses = HashMap::new();
    let mut backends = HashMap::new();
    for _ in 0..n {
        let resp = client()
            .get(proxy.url("/"))
            .header("host", service)
            .send()
            .await
            .expect("request through the proxy");
        *statuses.entry(resp.status().as_u16()).or_default() += 1;
        let by = resp
            .headers()
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("switchyard")
            .to_string();
        *backends.entry(by).or_default() += 1;
    }
    (statuses, backends)
}

async fn metric(proxy: &Proxy, series: &str) -> f64 {
    support::counter_value(&proxy.metrics().await, series)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_5xx_eject_an_instance_until_its_ejection_time_is_over() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config(NO_CHECKS)
        .config("[traffic]\noutlier_consecutive_5xx = 3\noutlier_base_ejection_ms = 2000\noutlier_interval_ms = 100\n")
        .start()
        .await;
    let good = Backend::start("good").await;
    let bad = Backend::start("bad").await;
    etcd.put("/services/o/good", good.addr_string()).await;
    etcd.put("/services/o/bad", bad.addr_string()).await;
    proxy.wait_usable("o", 2).await;
    bad.set_status(500);

    // round robin: the bad one answers every other request until its third 500 in a row
    let (statuses, _) = send(&proxy, "o", 6).await;
    assert_eq!(statuses.get(&500), Some(&3), "{statuses:?}");
    let ejected_at = Instant::now();
    let i = wait_state(&proxy, "o", "/services/o/bad", "ejected").await;
    assert_eq!(i["outlier"]["reason"], "consecutive_5xx", "{i}");
    assert!(
        i["outlier"]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("3 consecutive"),
        "{i}"
    );
    let hits = bad.hits();
    let (statuses, backends) = send(&proxy, "o", 20).await;
    assert_eq!(statuses.get(&200), Some(&20), "{statuses:?} {backends:?}");
    assert_eq!(bad.hits(), hits, "an ejected instance got requests");

    // visible in metrics and on the status page, with the reason
    let m = proxy.metrics().await;
    let series = "switchyard_outlier_ejections_total{reason=\"consecutive_5xx\",service=\"o\"}";
    assert_eq!(metric_value(&m, series), Some(1.0), "{m}");
    let gauge = "switchyard_upstream_instances{service=\"o\",state=\"ejected\"}";
    assert_eq!(metric_value(&m, gauge), Some(1.0));
    let page = client()
        .get(proxy.admin_url("/"))
        .send()
        .await
        .expect("status page")
        .text()
        .await
        .expect("page body");
    assert!(
        page.contains("ejected") && page.contains("consecutive_5xx"),
        "{page}"
    );

    // fixed, and back once its 2 s are over (not before)
    bad.set_status(0);
    eventually(
        PATIENCE,
        "the bad instance to get requests again",
        || async {
            send(&proxy, "o", 4).await;
            (bad.hits() > hits)
                .then_some(())
                .ok_or("no request yet".to_string())
        },
    )
    .await;
    let out = ejected_at.elapsed();
    assert!(
        out >= Duration::from_millis(1800),
        "back after {out:?}, ejected for 2 s"
    );
    assert_eq!(
        instance(&proxy, "o", "/services/o/bad").await["state"],
        "healthy"
    );
    // the sweep after the ejection's end says so (every 100 ms here)
    eventually(PATIENCE, "the return to be logged", || async {
        let log = proxy.log();
        log.contains("back from an outlier ejection")
            .then_some(())
            .ok_or(log)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_three_failing_instances_at_most_one_is_ejected() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config(NO_CHECKS)
        .config("[traffic]\noutlier_consecutive_5xx = 2\noutlier_base_ejection_ms = 60000\n")
        .start()
        .await;
    let backends: Vec<Backend> =
        futures::future::join_all(["x", "y", "z"].map(Backend::start)).await;
    for b in &backends {
        b.set_status(503);
        etcd.put(&format!("/services/c/{}", b.name), b.addr_string())
            .await;
    }
    proxy.wait_usable("c", 3).await;
    let (statuses, _) = send(&proxy, "c", 30).await;
    assert_eq!(
        statuses.get(&503),
        Some(&30),
        "answers are relayed: {statuses:?}"
    );
    let v = proxy.admin_json("/api/services/c").await;
    let states: Vec<&str> = v["instances"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["state"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        states.iter().filter(|s| **s == "ejected").count(),
        1,
        "3 instances: one out at most ({states:?})"
    );
    assert_eq!(
        states.iter().filter(|s| **s == "healthy").count(),
        2,
        "{states:?}"
    );
    let ejections = "switchyard_outlier_ejections_total{reason=\"consecutive_5xx\",service=\"c\"}";
    assert_eq!(metric(&proxy, ejections).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passing_active_check_ends_an_ejection_early() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config(FAST_CHECKS)
        .config("[traffic]\noutlier_consecutive_5xx = 2\noutlier_base_ejection_ms = 60000\n")
        .start()
        .await;
    let good = Backend::start("good").await;
    let bad = Backend::start("bad").await;
    etcd.put("/services/u/good", good.addr_string()).await;
    etcd.put("/services/u/bad", bad.addr_string()).await;
    proxy.wait_usable("u", 2).await;
    // its checks fail while it answers 500, so that only a later pass can end the ejection
    bad.set_health(503);
    bad.set_status(500);
    send(&proxy, "u", 4).await;
    eventually(PATIENCE, "the bad instance to be out", || async {
        let i = instance(&proxy, "u", "/services/u/bad").await;
        (i["outlier"]["reason"] == "consecutive_5xx")
            .then_some(())
            .ok_or(i.to_string())
    })
    .await;
    bad.set_status(0);
    bad.set_health(200);
    // a 60 s ejection, ended by the next passing check
    let start = Instant::now();
    wait_state(&proxy, "u", "/services/u/bad", "healthy").await;
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(instance(&proxy, "u", "/services/u/bad").await["outlier"].is_null());
    assert!(
        proxy.log().contains("an active check passed"),
        "{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_on_the_gateway_path_feed_outlier_detection_too() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config(NO_CHECKS)
        .config("[traffic]\noutlier_consecutive_5xx = 3\noutlier_base_ejection_ms = 60000\n")
        .start()
        .await;
    let good = Backend::start_mode("good", Mode::H2cOrHttp1).await;
    let bad = Backend::start_mode("bad", Mode::H2cOrHttp1).await;
    for b in [&good, &bad] {
        let value = format!(r#"{{"addr":"{}","metadata":{{"protocol":"h2c"}}}}"#, b.addr);
        etcd.put(&format!("/services/g/{}", b.name), value).await;
    }
    proxy.wait_usable("g", 2).await;
    bad.set_status(502);
    send(&proxy, "g", 8).await;
    let i = wait_state(&proxy, "g", "/services/g/bad", "ejected").await;
    assert_eq!(i["outlier"]["reason"], "consecutive_5xx", "{i}");
    let (statuses, _) = send(&proxy, "g", 10).await;
    assert_eq!(statuses.get(&200), Some(&10), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_5xx_hides_a_failing_instance_from_idempotent_requests_only() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config(NO_CHECKS)
        // outlier detection off: the retries alone are under test
        .config("[traffic]\noutlier_consecutive_5xx = 0\noutlier_consecutive_gateway_errors = 0\noutlier_success_rate_gap_percent = 0\n")
        .config("[services.r]\nretry_on = [\"5xx\"]\n")
        .start()
        .await;
    let good = Backend::start("good").await;
    let bad = Backend::start("bad").await;
    for svc in ["r", "plain"] {
        etcd.put(&format!("/services/{svc}/good"), good.addr_string())
            .await;
        etcd.put(&format!("/services/{svc}/bad"), bad.addr_string())
            .await;
        proxy.wait_usable(svc, 2).await;
    }
    bad.set_status(503);
    let (statuses, _) = send(&proxy, "r", 30).await;
    assert_eq!(
        statuses.get(&200),
        Some(&30),
        "retried on the other: {statuses:?}"
    );
    assert!(bad.hits() >= 10, "the bad one was tried ({})", bad.hits());
    let retries = metric(&proxy, "switchyard_retries_total{service=\"r\"}").await;
    assert!(retries >= 10.0, "retries counted: {retries}");
    // without retry_on the client sees the 503s
    let (statuses, _) = send(&proxy, "plain", 10).await;
    assert_eq!(statuses.get(&503), Some(&5), "{statuses:?}");
    // a POST that reached an instance is never sent again
    let mut posts = HashMap::new();
    for _ in 0..10 {
        let s = client()
            .post(proxy.url("/"))
            .header("host", "r")
            .body("x")
            .send()
            .await
            .expect("post")
            .status()
            .as_u16();
        *posts.entry(s).or_insert(0) += 1;
    }
    assert_eq!(posts.get(&503), Some(&5), "{posts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_stops_retries_during_a_full_outage() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config(NO_CHECKS)
        .config("[traffic]\nretry_budget_min_per_sec = 1\n")
        .config("[services.loose]\nretry_budget_percent = 1000\nretry_budget_min_per_sec = 1000\n")
        .start()
        .await;
    // three instances per service that refuse every connection
    let dead: Vec<Backend> =
        futures::future::join_all(["d1", "d2", "d3"].map(Backend::start)).await;
    for d in &dead {
        d.stop();
        for svc in ["tight", "loose"] {
            etcd.put(&format!("/services/{svc}/{}", d.name), d.addr_string())
                .await;
        }
    }
    proxy.wait_usable("tight", 3).await;
    proxy.wait_usable("loose", 3).await;
    let start = Instant::now();
    let (tight, _) = send(&proxy, "tight", 100).await;
    let elapsed = start.elapsed().as_secs_f64();
    let (loose, _) = send(&proxy, "loose", 100).await;
    assert_eq!(tight.get(&502), Some(&100), "{tight:?}");
    assert_eq!(loose.get(&502), Some(&100), "{loose:?}");
    // a budget that allows them: every request tried all three (2 retries each)
    let loose_retries = metric(&proxy, "switchyard_retries_total{service=\"loose\"}").await;
    assert_eq!(loose_retries, 200.0);
    // the default 20 % (+ 1 per second): about 20 retries, not 200
    let tight_retries = metric(&proxy, "switchyard_retries_total{service=\"tight\"}").await;
    let bound = 20.0 + (elapsed + 2.0) * 1.0 + 3.0;
    assert!(
        tight_retries <= bound,
        "{tight_retries} retries in {elapsed:.1} s, at most {bound:.0} expected"
    );
    let refused = metric(
        &proxy,
        "switchyard_retry_budget_exhausted_total{service=\"tight\"}",
    )
    .await;
    assert!(refused >= 100.0, "refused retries counted: {refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_gives_a_new_instance_a_small_share_at_first() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config(NO_CHECKS)
        .config("[traffic]\nslow_start_ms = 4000\n")
        .start()
        .await;
    let old = Backend::start("old").await;
    let new = Backend::start("new").await;
    etcd.put("/services/s/old", old.addr_string()).await;
    proxy.wait_usable("s", 1).await;
    // the first instance ramps too (alone, it gets everything anyway): wait until it is done
    let ramping = wait_state(&proxy, "s", "/services/s/old", "healthy").await;
    assert!(
        ramping["slow_start_percent"].as_u64().is_some(),
        "{ramping}"
    );
    eventually(PATIENCE, "the old instance's slow start to end", || async {
        let i = instance(&proxy, "s", "/services/s/old").await;
        i["slow_start_percent"]
            .is_null()
            .then_some(())
            .ok_or(i.to_string())
    })
    .await;
    etcd.put("/services/s/new", new.addr_string()).await;
    proxy.wait_usable("s", 2).await;
    let (_, by) = send(&proxy, "s", 100).await;
    let share = *by.get("new").unwrap_or(&0) as f64 / 100.0;
    // round robin would give it half; ramping from 10 % over 4 s it gets far less
    assert!(
        share > 0.0 && share < 0.35,
        "new instance's share {share}: {by:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_mode_spreads_requests_when_too_few_instances_are_healthy() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config(FAST_CHECKS)
        .config("[services.strict]\npanic_threshold_percent = 0\n")
        .start()
        .await;
    let backends: Vec<Backend> =
        futures::future::join_all(["p1", "p2", "p3"].map(Backend::start)).await;
    for svc in ["panicky", "strict"] {
        for b in &backends {
            etcd.put(&format!("/services/{svc}/{}", b.name), b.addr_string())
                .await;
        }
        proxy.wait_usable(svc, 3).await;
    }
    // two of three fail their checks (but still answer requests): 1 of 3 usable < 50 %
    backends[1].set_health(503);
    backends[2].set_health(503);
    proxy.wait_usable("panicky", 1).await;
    proxy.wait_usable("strict", 1).await;
    let (statuses, by) = send(&proxy, "panicky", 30).await;
    assert_eq!(statuses.get(&200), Some(&30));
    assert!(
        ["p1", "p2", "p3"]
            .iter()
            .all(|b| by.get(*b).is_some_and(|n| *n >= 5)),
        "panic: every admitted instance takes requests: {by:?}"
    );
    let (_, by) = send(&proxy, "strict", 20).await;
    assert_eq!(
        by.get("p1"),
        Some(&20),
        "panic off: only the healthy one: {by:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashing_keeps_keys_in_place_and_removing_one_of_five_moves_few() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config(NO_CHECKS)
        .config("[services.h]\npolicy = \"hash\"\nhash_on = \"header:x-user\"\n")
        .start()
        .await;
    let names = ["h1", "h2", "h3", "h4", "h5"];
    let backends: Vec<Backend> = futures::future::join_all(names.map(Backend::start)).await;
    for b in &backends {
        etcd.put(&format!("/services/h/{}", b.name), b.addr_string())
            .await;
    }
    proxy.wait_usable("h", 5).await;
    let owners = |keys: usize| {
        let proxy = &proxy;
        async move {
            let mut owner = Vec::new();
            for k in 0..keys {
                let resp = client()
                    .get(proxy.url("/"))
                    .header("host", "h")
                    .header("x-user", format!("user-{k}"))
                    .send()
                    .await
                    .expect("request");
                assert_eq!(resp.status().as_u16(), 200);
                let by = resp
                    .headers()
                    .get("x-backend")
                    .and_then(|v| v.to_str().ok());
                owner.push(by.unwrap_or("?").to_string());
            }
            owner
        }
    };
    let keys = 200;
    let before = owners(keys).await;
    assert_eq!(
        owners(keys).await,
        before,
        "the same key goes to the same instance"
    );
    let spread: std::collections::HashSet<&String> = before.iter().collect();
    assert_eq!(spread.len(), 5, "keys spread over all five");
    etcd.delete("/services/h/h3").await;
    proxy.wait_usable("h", 4).await;
    let after = owners(keys).await;
    let moved: Vec<usize> = (0..keys).filter(|k| before[*k] != after[*k]).collect();
    assert!(
        moved.iter().all(|k| before[*k] == "h3"),
        "only the removed instance's keys move"
    );
    assert!(
        moved.len() <= keys / 5 + keys / 10,
        "{} of {keys} keys moved (1/5 + margin at most)",
        moved.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_preference_keeps_requests_in_zone_and_spills_over() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config(FAST_CHECKS)
        .config("[proxy]\nzone = \"z1\"\n")
        .start()
        .await;
    let backends: Vec<Backend> =
        futures::future::join_all(["near1", "near2", "far"].map(Backend::start)).await;
    for (b, zone) in backends.iter().zip(["z1", "z1", "z2"]) {
        let value = format!(r#"{{"addr":"{}","metadata":{{"zone":"{zone}"}}}}"#, b.addr);
        etcd.put(&format!("/services/z/{}", b.name), value).await;
    }
    proxy.wait_usable("z", 3).await;
    let (_, by) = send(&proxy, "z", 20).await;
    assert_eq!(by.get("far"), None, "same zone only: {by:?}");
    assert_eq!(by.values().sum::<usize>(), 20);
    // one of the two near ones down: 50 % of the zone usable is below 70 %: every zone
    backends[0].set_health(503);
    proxy.wait_usable("z", 2).await;
    let (_, by) = send(&proxy, "z", 20).await;
    assert!(
        by.get("far").is_some_and(|n| *n >= 4),
        "spilled over: {by:?}"
    );
}

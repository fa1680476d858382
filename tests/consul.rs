//! The Consul-compatible API against a real etcd, real backends, the real switchyard binary and a
//! real Consul client library (py-consul, driven through `tests/support/consul_driver.py`):
//! registration with an HTTP check, TTL checks and heartbeats, deregistration, blocking queries,
//! the catalog, two switchyards on one etcd, and the errors Consul clients match on.

mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use support::consul::{service_check_statuses, ConsulClient};
use support::{client, eventually, metric_value, Backend, EtcdServer, Proxy};

const PATIENCE: Duration = Duration::from_secs(10);

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A real etcd, a switchyard on it, and py-consul pointed at the switchyard's Consul API.
struct World {
    etcd: EtcdServer,
    proxy: Proxy,
    c: ConsulClient,
}

async fn world() -> World {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let c = ConsulClient::new(proxy.consul_port);
    World { etcd, proxy, c }
}

/// Waits until `name` has exactly `n` instances whose checks all pass.
async fn wait_passing(c: &ConsulClient, name: &str, n: usize) -> Vec<Value> {
    eventually(
        PATIENCE,
        &format!("{n} passing instance(s) of {name}"),
        || async {
            let (_, nodes) = c.health(name, true).await;
            if nodes.len() == n {
                Ok(nodes)
            } else {
                Err(format!("{} passing: {nodes:?}", nodes.len()))
            }
        },
    )
    .await
}

/// Waits until `proxy` answers `service` with `status`.
async fn wait_routed(proxy: &Proxy, service: &str, status: u16) {
    eventually(
        PATIENCE,
        &format!("{service} answered {status}"),
        || async {
            match proxy.get_service(service, "/").await {
                (s, _) if s == status => Ok(()),
                (s, body) => Err(format!("{s}: {body}")),
            }
        },
    )
    .await;
}

/// The weight of `service`'s first instance, as the admin API shows it.
async fn weight(proxy: &Proxy, service: &str) -> Option<u64> {
    proxy.admin_json(&format!("/api/services/{service}")).await["instances"][0]["weight"].as_u64()
}

/// A raw request to the Consul API: (status, body).
async fn raw(proxy: &Proxy, method: reqwest::Method, path: &str, body: &str) -> (u16, String) {
    let resp = client()
        .request(method, proxy.consul_url(path))
        .body(body.to_string())
        .send()
        .await
        .expect("Consul API request");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

#[tokio::test]
async fn http_check_registration_is_routed_and_turns_critical_with_its_health_endpoint() {
    let World {
        etcd: _etcd,
        proxy,
        c,
    } = world().await;
    let backend = Backend::start("web-a").await;
    let reg = c
        .register(json!({
            "name": "web", "service_id": "web-1", "address": "127.0.0.1",
            "port": backend.addr.port(), "tags": ["v1", "primary"], "meta": {"zone": "a"},
            "check": {"kind": "http", "url": format!("http://127.0.0.1:{}/health", backend.addr.port()),
                      "interval": "1s", "timeout": "1s"},
        }))
        .await;
    assert_eq!(reg["ok"], true, "register: {reg}");

    // passing, routed, and described as registered
    let nodes = wait_passing(&c, "web", 1).await;
    let svc = &nodes[0]["Service"];
    assert_eq!(svc["ID"], "web-1");
    assert_eq!(svc["Port"], backend.addr.port());
    assert_eq!(svc["Address"], "127.0.0.1");
    assert_eq!(svc["Tags"], json!(["v1", "primary"]));
    assert_eq!(svc["Meta"]["zone"], "a");
    let check = nodes[0]["Checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["CheckID"] == "service:web-1"))
        .unwrap_or_else(|| panic!("no check service:web-1 in {}", nodes[0]));
    assert_eq!(
        (check["Status"].as_str(), check["Type"].as_str()),
        (Some("passing"), Some("http"))
    );
    wait_routed(&proxy, "web", 200).await;
    let services = c.call(&["agent_services"]).await;
    assert_eq!(
        services["services"]["web-1"]["Service"], "web",
        "{services}"
    );
    let catalog = c.call(&["catalog_services"]).await;
    assert_eq!(
        catalog["services"]["web"],
        json!(["primary", "v1"]),
        "{catalog}"
    );
    // every switchyard tool sees it as an ordinary registration
    let api = proxy.admin_json("/api/services/web").await;
    let inst = &api["instances"][0];
    assert_eq!(inst["key"], "/services/web/web-1", "{api}");
    assert_eq!(inst["metadata"]["health_path"], "/health");
    assert_eq!(inst["metadata"]["zone"], "a");

    // the health endpoint fails: critical, out of passing=1, no traffic
    backend.set_health(503);
    eventually(PATIENCE, "web-1 to be critical", || async {
        let (_, all) = c.health("web", false).await;
        match all.first().map(service_check_statuses) {
            Some(s) if s == ["critical"] => Ok(()),
            other => Err(format!("statuses {other:?}")),
        }
    })
    .await;
    let (_, passing) = c.health("web", true).await;
    assert!(
        passing.is_empty(),
        "a critical instance is not passing: {passing:?}"
    );
    let hits = backend.hits();
    wait_routed(&proxy, "web", 503).await;
    assert_eq!(
        backend.hits(),
        hits,
        "no request reached the critical instance"
    );

    // and back
    backend.set_health(200);
    wait_passing(&c, "web", 1).await;
    wait_routed(&proxy, "web", 200).await;
}

#[tokio::test]
async fn ttl_check_stays_while_heartbeats_come_and_goes_within_the_ttl_after() {
    let World {
        etcd: _etcd,
        proxy,
        c,
    } = world().await;
    let backend = Backend::start("worker-a").await;
    // register, then heartbeats every 500 ms for 3x the TTL: passing and routed all along
    let registration = json!({
        "name": "worker", "service_id": "w1", "address": "127.0.0.1",
        "port": backend.addr.port(), "check": {"kind": "ttl", "ttl": "2s"},
    })
    .to_string();
    let heartbeats = tokio::spawn({
        let c = ConsulClient::new(proxy.consul_port);
        async move {
            c.call(&["heartbeat", "service:w1", "0.5", "6", &registration])
                .await
        }
    });
    wait_passing(&c, "worker", 1).await;
    let started = Instant::now();
    while !heartbeats.is_finished() {
        let (status, body) = proxy.get_service("worker", "/").await;
        assert_eq!(
            status,
            200,
            "worker must stay routed while heartbeats come ({:?} in): {body}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let beats = heartbeats.await.expect("heartbeat task");
    assert_eq!(beats["ok"], true, "heartbeats: {beats}");
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "the heartbeats lasted {:?}",
        started.elapsed()
    );

    // no more heartbeats: gone within the TTL (2 s) + 1 s of the last one
    let last_beat = beats["last_beat"].as_f64().unwrap_or(0.0);
    eventually(Duration::from_secs(5), "worker to be gone", || async {
        let (_, body) = raw(
            &proxy,
            reqwest::Method::GET,
            "/v1/health/service/worker",
            "",
        )
        .await;
        match body.trim() {
            "[]" => Ok(()),
            _ => Err(format!("still there: {body}")),
        }
    })
    .await;
    let gone_after = unix_now() - last_beat;
    assert!(
        gone_after <= 3.0,
        "gone {gone_after:.2} s after the last heartbeat; the TTL is 2 s"
    );
    wait_routed(&proxy, "worker", 404).await;
}

#[tokio::test]
async fn ttl_fail_keeps_the_instance_registered_but_not_routed_and_warn_uses_the_warning_weight() {
    let World {
        etcd: _etcd,
        proxy,
        c,
    } = world().await;
    let backend = Backend::start("job-a").await;
    c.register(json!({
        "name": "job", "service_id": "j1", "address": "127.0.0.1", "port": backend.addr.port(),
        "weights": {"Passing": 5, "Warning": 1}, "check": {"kind": "ttl", "ttl": "30s"},
    }))
    .await;
    // a TTL check starts critical (as Consul's): registered, not routed
    let (_, all) = c.health("job", false).await;
    assert_eq!(
        all.first().map(service_check_statuses),
        Some(vec!["critical".to_string()])
    );
    assert_eq!(proxy.get_service("job", "/").await.0, 503);
    assert_eq!(c.call(&["ttl", "pass", "service:j1"]).await["ok"], true);
    wait_routed(&proxy, "job", 200).await;
    assert_eq!(weight(&proxy, "job").await, Some(5));

    assert_eq!(
        c.call(&["ttl", "fail", "service:j1", "disk full"]).await["ok"],
        true
    );
    let (_, all) = c.health("job", false).await;
    assert_eq!(all.len(), 1, "still registered after fail: {all:?}");
    let check = &all[0]["Checks"][1];
    assert_eq!(
        (check["Status"].as_str(), check["Output"].as_str()),
        (Some("critical"), Some("disk full"))
    );
    assert!(c.health("job", true).await.1.is_empty());
    assert_eq!(
        proxy.get_service("job", "/").await.0,
        503,
        "a failed instance is not routed"
    );

    assert_eq!(c.call(&["ttl", "warn", "service:j1"]).await["ok"], true);
    assert_eq!(
        weight(&proxy, "job").await,
        Some(1),
        "warning: the Warning weight"
    );
    wait_routed(&proxy, "job", 200).await;

    // Go's UpdateTTL: /v1/agent/check/update/<id> with a status and an output
    let path = "/v1/agent/check/update/service:j1";
    let body = r#"{"Status":"passing","Output":"all good"}"#;
    let (status, text) = raw(&proxy, reqwest::Method::PUT, path, body).await;
    assert_eq!(status, 200, "{text}");
    let (_, all) = c.health("job", true).await;
    assert_eq!(all[0]["Checks"][1]["Output"], "all good", "{all:?}");
    assert_eq!(weight(&proxy, "job").await, Some(5));
    let (status, text) = raw(&proxy, reqwest::Method::PUT, path, r#"{"Status":"fine"}"#).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("Invalid check status"), "{text}");
}

#[tokio::test]
async fn checks_can_be_added_to_a_service_and_removed_again() {
    let World {
        etcd: _etcd,
        proxy: _proxy,
        c,
    } = world().await;
    // no address: over loopback, this host's address towards etcd (127.0.0.1 here)
    c.register(json!({"name": "late", "service_id": "l1", "port": 1}))
        .await;
    let nodes = wait_passing(&c, "late", 1).await;
    assert_eq!(nodes[0]["Service"]["Address"], "127.0.0.1", "{nodes:?}");
    let out = c
        .call(&[
            "check_register",
            &json!({"name": "heartbeat", "check_id": "hb", "service_id": "l1",
                    "check": {"kind": "ttl", "ttl": "30s"}})
            .to_string(),
        ])
        .await;
    assert_eq!(out["ok"], true, "{out}");
    // the new TTL check starts critical
    let (_, all) = c.health("late", false).await;
    assert_eq!(
        all.first().map(service_check_statuses),
        Some(vec!["critical".to_string()])
    );
    assert_eq!(c.call(&["ttl", "pass", "hb"]).await["ok"], true);
    wait_passing(&c, "late", 1).await;
    assert_eq!(c.call(&["check_deregister", "hb"]).await["ok"], true);
    let (_, all) = c.health("late", true).await;
    assert_eq!(
        all.first().map(service_check_statuses),
        Some(vec![]),
        "{all:?}"
    );
    // a check for a service that does not exist
    let out = c
        .call(&[
            "check_register",
            &json!({"name": "x", "service_id": "nope", "check": {"kind": "ttl", "ttl": "5s"}})
                .to_string(),
        ])
        .await;
    assert_eq!(out["error"], "BadRequest", "{out}");
}

#[tokio::test]
async fn maintenance_mode_keeps_an_instance_registered_but_not_routed() {
    let World {
        etcd: _etcd,
        proxy,
        c,
    } = world().await;
    let backend = Backend::start("maint-a").await;
    c.register(
        json!({"name": "maint", "service_id": "m1", "address": "127.0.0.1",
                      "port": backend.addr.port()}),
    )
    .await;
    wait_routed(&proxy, "maint", 200).await;
    let out = c.call(&["maintenance", "m1", "true", "deploying"]).await;
    assert_eq!(out["ok"], true, "{out}");
    let (_, all) = c.health("maint", false).await;
    assert_eq!(all.len(), 1, "still registered: {all:?}");
    let check = &all[0]["Checks"][1];
    assert_eq!(check["CheckID"], "_service_maintenance:m1", "{all:?}");
    assert_eq!(
        (check["Status"].as_str(), check["Notes"].as_str()),
        (Some("critical"), Some("deploying"))
    );
    assert!(c.health("maint", true).await.1.is_empty());
    assert_eq!(proxy.get_service("maint", "/").await.0, 503);
    // the agent's own health endpoints answer with the worst status as the code
    let by_id = "/v1/agent/health/service/id/m1?format=text";
    let (status, body) = raw(&proxy, reqwest::Method::GET, by_id, "").await;
    assert_eq!((status, body.as_str()), (503, "critical"));
    let by_name = "/v1/agent/health/service/name/maint";
    let (status, body) = raw(&proxy, reqwest::Method::GET, by_name, "").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"AggregatedStatus\":\"critical\""), "{body}");
    assert_eq!(c.call(&["maintenance", "m1", "false"]).await["ok"], true);
    wait_passing(&c, "maint", 1).await;
    wait_routed(&proxy, "maint", 200).await;
    let (status, body) = raw(&proxy, reqwest::Method::GET, by_id, "").await;
    assert_eq!((status, body.as_str()), (200, "passing"));
    let nobody = "/v1/agent/health/service/id/nobody";
    assert_eq!(raw(&proxy, reqwest::Method::GET, nobody, "").await.0, 404);
    let (status, body) = raw(
        &proxy,
        reqwest::Method::PUT,
        "/v1/agent/service/maintenance/m1",
        "",
    )
    .await;
    assert_eq!((status, body.as_str()), (400, "Missing value for enable"));
}

#[tokio::test]
async fn deregister_removes_the_instance_at_once() {
    let World {
        etcd: _etcd,
        proxy,
        c,
    } = world().await;
    let backend = Backend::start("api-a").await;
    c.register(
        json!({"name": "api", "service_id": "api-1", "address": "127.0.0.1",
                      "port": backend.addr.port()}),
    )
    .await;
    // no check: passing, as in Consul
    wait_passing(&c, "api", 1).await;
    wait_routed(&proxy, "api", 200).await;
    let out = c.call(&["deregister", "api-1"]).await;
    assert_eq!(out["ok"], true, "deregister: {out}");
    // no waiting: the answer comes once this switchyard's view has it
    let (_, all) = c.health("api", false).await;
    assert!(
        all.is_empty(),
        "still there right after deregister: {all:?}"
    );
    assert_eq!(proxy.get_service("api", "/").await.0, 404);
    assert!(c.call(&["agent_services"]).await["services"]
        .as_object()
        .is_some_and(|m| m.is_empty()));
    // an unknown id: 404, which py-consul reports as False
    assert_eq!(c.call(&["deregister", "api-1"]).await["ok"], false);
}

#[tokio::test]
async fn a_blocking_query_returns_on_a_change_and_after_its_wait_otherwise() {
    let World { etcd, proxy, c } = world().await;
    c.register(json!({"name": "blk", "service_id": "b1", "address": "127.0.0.1", "port": 1}))
        .await;
    let (index, _) = c.health("blk", false).await;

    // nothing changes: it answers after `wait`, with the same index
    let quiet = c.call(&["block", "blk", &index.to_string(), "1s"]).await;
    let elapsed = quiet["elapsed"].as_f64().unwrap_or(0.0);
    assert!(
        (1.0..2.5).contains(&elapsed),
        "a quiet blocking query with wait=1s took {elapsed} s"
    );
    assert_eq!(quiet["index"].as_u64(), Some(index));

    // a change: it answers at once
    let blocked = tokio::spawn({
        let c = ConsulClient::new(proxy.consul_port);
        async move { c.call(&["block", "blk", &index.to_string(), "10s"]).await }
    });
    eventually(PATIENCE, "the blocking query to be held", || async {
        let text = proxy.metrics().await;
        match metric_value(&text, "switchyard_consul_blocking_queries") {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(format!("held: {other:?}")),
        }
    })
    .await;
    // another service's change does not end it
    etcd.put("/services/other/o1", "127.0.0.1:2").await;
    etcd.put("/services/blk/b2", "127.0.0.1:3").await;
    let changed_at = unix_now();
    let answer = blocked.await.expect("blocking query task");
    let after = answer["returned_at"].as_f64().unwrap_or(f64::MAX) - changed_at;
    assert!(
        after < 0.1,
        "the blocking query answered {:.0} ms after the change",
        after * 1000.0
    );
    assert!(answer["index"].as_u64() > Some(index), "{answer}");
    assert_eq!(
        answer["nodes"].as_array().map(Vec::len),
        Some(2),
        "{answer}"
    );
}

#[tokio::test]
async fn a_blocking_query_returns_when_an_instance_turns_critical() {
    let World {
        etcd: _etcd,
        proxy,
        c,
    } = world().await;
    let backend = Backend::start("watched-a").await;
    c.register(json!({
        "name": "watched", "service_id": "wa", "address": "127.0.0.1", "port": backend.addr.port(),
        "check": {"kind": "http", "url": format!("http://127.0.0.1:{}/health", backend.addr.port()),
                  "interval": "1s", "timeout": "1s"},
    }))
    .await;
    wait_passing(&c, "watched", 1).await;
    let (index, _) = c.health("watched", true).await;
    // etcd never hears of a health change: the index moves with it all the same
    let blocked = tokio::spawn({
        let c = ConsulClient::new(proxy.consul_port);
        async move {
            c.call(&["block", "watched", &index.to_string(), "30s", "passing"])
                .await
        }
    });
    eventually(PATIENCE, "the blocking query to be held", || async {
        let text = proxy.metrics().await;
        match metric_value(&text, "switchyard_consul_blocking_queries") {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(format!("held: {other:?}")),
        }
    })
    .await;
    backend.set_health(503);
    let answer = blocked.await.expect("blocking query task");
    let elapsed = answer["elapsed"].as_f64().unwrap_or(f64::MAX);
    assert!(
        elapsed < 5.0,
        "answered after {elapsed} s, not at the health change"
    );
    assert!(answer["index"].as_u64() > Some(index), "{answer}");
    assert_eq!(
        answer["nodes"],
        json!([]),
        "no passing instance left: {answer}"
    );
}

#[tokio::test]
async fn two_switchyards_on_one_etcd_route_a_service_registered_through_one_and_it_outlives_it() {
    let etcd = EtcdServer::start();
    let one = Proxy::builder(&etcd).start().await;
    let two = Proxy::builder(&etcd).start().await;
    let backend = Backend::start("shared-a").await;
    let c = ConsulClient::new(one.consul_port);
    c.register(json!({
        "name": "shared", "service_id": "s1", "address": "127.0.0.1", "port": backend.addr.port(),
        "check": {"kind": "tcp", "addr": format!("127.0.0.1:{}", backend.addr.port()), "interval": "1s"},
    }))
    .await;
    wait_routed(&one, "shared", 200).await;
    wait_routed(&two, "shared", 200).await;
    let other = ConsulClient::new(two.consul_port);
    wait_passing(&other, "shared", 1).await;
    // the one it was registered through goes away: no TTL check, so it stays registered
    let mut one = one;
    one.terminate(Duration::from_secs(15));
    drop(one);
    wait_routed(&two, "shared", 200).await;
    // a switchyard started afterwards finds it too (a restart of the first one)
    let three = Proxy::builder(&etcd).start().await;
    wait_routed(&three, "shared", 200).await;
    // and the other agent can deregister it
    assert_eq!(other.call(&["deregister", "s1"]).await["ok"], true);
    assert_eq!(two.get_service("shared", "/").await.0, 404);
}

#[tokio::test]
async fn deregister_critical_service_after_removes_an_instance_that_stays_critical() {
    let World {
        etcd: _etcd,
        proxy: _proxy,
        c,
    } = world().await;
    let backend = Backend::start("flaky-a").await;
    backend.set_health(500);
    // before the registration: the instance goes critical after it, so it cannot be deregistered
    // sooner than 2 s from here (taken later, the Python client's own calls shorten the window)
    let start = Instant::now();
    c.register(json!({
        "name": "flaky", "service_id": "f1", "address": "127.0.0.1", "port": backend.addr.port(),
        "check": {"kind": "http", "url": format!("http://127.0.0.1:{}/health", backend.addr.port()),
                  "interval": "1s", "deregister": "2s"},
    }))
    .await;
    assert_eq!(c.health("flaky", false).await.1.len(), 1);
    eventually(PATIENCE, "flaky to be deregistered", || async {
        match c.health("flaky", false).await.1.len() {
            0 => Ok(()),
            n => Err(format!("{n} instance(s)")),
        }
    })
    .await;
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "deregistered after {:?}, before DeregisterCriticalServiceAfter",
        start.elapsed()
    );
}

#[tokio::test]
async fn errors_are_the_ones_consul_gives() {
    let World { mut etcd, proxy, c } = world().await;
    c.register(json!({
        "name": "err", "service_id": "e1", "address": "127.0.0.1", "port": 1,
        "check": {"kind": "tcp", "addr": "127.0.0.1:1", "interval": "10s"},
    }))
    .await;
    // pass on a check that is not a TTL check: 500 with Consul's message
    let out = c.call(&["ttl", "pass", "service:e1"]).await;
    assert_eq!(out["error"], "ConsulException", "{out}");
    let message = out["message"].as_str().unwrap_or("");
    assert!(
        message.starts_with("500")
            && message.contains("CheckID \"service:e1\" does not have associated TTL"),
        "{message}"
    );
    // an unknown check: 404 with Consul's message
    let (status, body) = raw(
        &proxy,
        reqwest::Method::PUT,
        "/v1/agent/check/pass/nope",
        "",
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("Unknown check ID \"nope\""), "{body}");
    // a malformed body: 400 naming the field
    let (status, body) = raw(
        &proxy,
        reqwest::Method::PUT,
        "/v1/agent/service/register",
        r#"{"Name":"x","Port":"eighty"}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.starts_with("Request decode failed: Port"), "{body}");
    let (status, body) = raw(
        &proxy,
        reqwest::Method::PUT,
        "/v1/agent/service/register",
        "{",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = raw(
        &proxy,
        reqwest::Method::PUT,
        "/v1/agent/service/register",
        r#"{"Port":1}"#,
    )
    .await;
    assert_eq!((status, body.as_str()), (400, "Missing service name"));
    // what switchyard does not implement says so, loudly
    let (status, body) = raw(&proxy, reqwest::Method::GET, "/v1/kv/some/key", "").await;
    assert_eq!(status, 501, "{body}");
    assert!(body.contains("/v1/kv"), "{body}");
    // reads carry Consul's headers
    let resp = client()
        .get(proxy.consul_url("/v1/health/service/err"))
        .send()
        .await
        .expect("health request");
    for h in [
        "x-consul-index",
        "x-consul-knownleader",
        "x-consul-lastcontact",
    ] {
        assert!(
            resp.headers().contains_key(h),
            "{h} missing: {:?}",
            resp.headers()
        );
    }
    // a key some other registrar keeps is not overwritten
    etcd.put("/services/plain/p1", "127.0.0.1:9").await;
    eventually(PATIENCE, "plain/p1 in the view", || async {
        match raw(
            &proxy,
            reqwest::Method::GET,
            "/v1/catalog/service/plain",
            "",
        )
        .await
        {
            (200, body) if body.contains("\"p1\"") => Ok(()),
            (status, body) => Err(format!("{status}: {body}")),
        }
    })
    .await;
    let body = r#"{"Name":"plain","ID":"p1","Port":1,"Address":"127.0.0.1"}"#;
    let (status, text) = raw(
        &proxy,
        reqwest::Method::PUT,
        "/v1/agent/service/register",
        body,
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("other than the Consul API"), "{text}");
    // etcd gone: a registration fails loudly (500), it is never reported as done
    etcd.kill();
    let body = r#"{"Name":"later","Port":1,"Address":"127.0.0.1"}"#;
    let (status, text) = raw(
        &proxy,
        reqwest::Method::PUT,
        "/v1/agent/service/register",
        body,
    )
    .await;
    assert_eq!(status, 500, "{text}");
    assert!(text.starts_with("etcd at "), "{text}");
}

#[tokio::test]
async fn checks_by_state_datacenters_and_nodes_are_answered() {
    let World {
        etcd: _etcd,
        proxy,
        c,
    } = world().await;
    c.register(json!({
        "name": "down", "service_id": "d1", "address": "127.0.0.1", "port": 1,
        "check": {"kind": "tcp", "addr": "127.0.0.1:1", "interval": "10s"},
    }))
    .await;
    eventually(PATIENCE, "the TCP check to be critical", || async {
        let (_, body) = raw(
            &proxy,
            reqwest::Method::GET,
            "/v1/health/state/critical",
            "",
        )
        .await;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        match v
            .as_array()
            .map(|a| a.iter().any(|c| c["CheckID"] == "service:d1"))
        {
            Some(true) => Ok(()),
            _ => Err(body),
        }
    })
    .await;
    let (_, body) = raw(&proxy, reqwest::Method::GET, "/v1/health/state/passing", "").await;
    assert!(
        !body.contains("service:d1") && body.contains("serfHealth"),
        "{body}"
    );
    let (status, body) = raw(&proxy, reqwest::Method::GET, "/v1/health/state/sick", "").await;
    assert_eq!(status, 400, "{body}");
    let (_, body) = raw(&proxy, reqwest::Method::GET, "/v1/catalog/datacenters", "").await;
    assert_eq!(body.trim(), r#"["dc1"]"#);
    let (_, body) = raw(&proxy, reqwest::Method::GET, "/v1/catalog/nodes", "").await;
    let nodes: Value = serde_json::from_str(&body).expect("nodes json");
    assert_eq!(nodes.as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(nodes[0]["Datacenter"], "dc1");
}

#[tokio::test]
async fn a_token_is_required_when_configured() {
    let etcd = EtcdServer::start();
    let port = support::free_port();
    let proxy = Proxy::builder(&etcd)
        .config(&format!(
            "[consul]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"s3cret\"\n"
        ))
        .start()
        .await;
    let mut proxy = proxy;
    proxy.consul_port = port;
    let anonymous = ConsulClient::new(port);
    let out = anonymous.call(&["agent_services"]).await;
    assert_eq!(out["error"], "ACLPermissionDenied", "{out}");
    let wrong = ConsulClient::with_token(port, "guess");
    assert_eq!(
        wrong.call(&["agent_services"]).await["error"],
        "ACLPermissionDenied"
    );
    let right = ConsulClient::with_token(port, "s3cret");
    let reg = right
        .register(json!({"name": "tok", "service_id": "t1", "address": "127.0.0.1", "port": 1}))
        .await;
    assert_eq!(reg["ok"], true, "{reg}");
    let (status, body) = raw(
        &proxy,
        reqwest::Method::GET,
        "/v1/agent/services?token=s3cret",
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"t1\""), "{body}");
    // the leader is public, as in Consul
    let (status, _) = raw(&proxy, reqwest::Method::GET, "/v1/status/leader", "").await;
    assert_eq!(status, 200);
}

#[test]
fn a_consul_port_in_use_is_a_start_up_error_naming_the_setting() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let port = taken.local_addr().expect("its address").port();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = support::temp_file(
        dir.path(),
        "sy.toml",
        &format!(
            "[proxy]\nlisten = \"127.0.0.1:{}\"\n[admin]\nlisten = \"127.0.0.1:{}\"\n\
             [etcd]\nendpoints = [\"http://127.0.0.1:9\"]\n[consul]\nlisten = \"127.0.0.1:{port}\"\n",
            support::free_port(),
            support::free_port()
        ),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("running switchyard");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started with its Consul port taken: {stderr}"
    );
    assert!(
        stderr.contains(&format!("consul.listen 127.0.0.1:{port}")) && stderr.contains("in use"),
        "{stderr}"
    );
}

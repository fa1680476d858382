//! gRPC through the proxy, with real gRPC peers (Python grpcio servers and clients, installed with
//! pip by the test support when missing), real etcd and the real binary.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::grpc::{call, call_tls, GrpcPeer, Running};
use support::{EtcdServer, Proxy};

fn names(v: &Value) -> Vec<String> {
    v["replies"]
        .as_array()
        .unwrap_or_else(|| panic!("no replies in {v}"))
        .iter()
        .map(|r| {
            r.as_str()
                .unwrap_or("")
                .split(':')
                .next()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

/// Two grpcio servers registered as plain `host:port`, as the examples do, with no protocol and
/// no health configuration: gRPC goes to them over h2c, and the failing HTTP/1.1 health check
/// makes switchyard ask them over gRPC health instead.
#[tokio::test]
async fn grpc_calls_of_every_kind_pass_through_to_plain_registrations() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config("[[routing.routes]]\npath_prefix = \"/test.Echo/\"\nservice = \"echo\"\n")
        .start()
        .await;
    let a = GrpcPeer::start("a");
    let b = GrpcPeer::start("b");
    etcd.put("/services/echo/a", a.addr.to_string()).await;
    etcd.put("/services/echo/b", b.addr.to_string()).await;
    proxy.wait_usable("echo", 2).await;

    let target = format!("127.0.0.1:{}", proxy.port);
    let t = target.as_str();
    let big = (4 * 1024 * 1024).to_string();
    let (unary, spread, server, client, bidi, fail, deadline, down, up, health, unknown) = tokio::join!(
        call(t, "", "unary", "hello"),
        call(t, "", "spread", "12"),
        call(t, "", "server_stream", "5"),
        call(t, "", "client_stream", "4"),
        call(t, "", "bidi", "6"),
        call(t, "", "fail", ""),
        call(t, "", "deadline", "0.3"),
        call(t, "", "big", &big),
        call(t, "", "big_upload", &big),
        // routed by :authority, exactly as by Host
        call(t, "echo", "health", ""),
        call(t, "", "method", "/nope.Missing/Call"),
    );
    let reply = unary["reply"].as_str().unwrap_or("");
    assert!(reply == "a:hello" || reply == "b:hello", "unary: {unary}");

    // one client connection, calls balanced per request over both instances
    let spread_names = names(&spread);
    assert_eq!(spread_names.len(), 12, "spread: {spread}");
    assert!(
        spread_names.iter().any(|n| n == "a") && spread_names.iter().any(|n| n == "b"),
        "12 calls over one connection should reach both instances: {spread_names:?}"
    );

    let server_names = names(&server);
    assert_eq!(server_names.len(), 5, "server stream: {server}");
    let c = client["reply"].as_str().unwrap_or("");
    assert!(
        c.ends_with(":4:10"),
        "client stream of 4 messages, 10 bytes: {client}"
    );
    assert_eq!(names(&bidi).len(), 6, "bidi: {bidi}");

    // an error status with trailers, as the instance sent them
    assert_eq!(fail["code"], "INVALID_ARGUMENT", "{fail}");
    assert_eq!(fail["details"], "bad input", "{fail}");
    assert_eq!(fail["trailers"]["x-why"], "testing", "{fail}");

    assert_eq!(deadline["code"], "DEADLINE_EXCEEDED", "{deadline}");
    assert_eq!(down["len"], 4 * 1024 * 1024, "4 MiB response: {down}");
    let up_reply = up["reply"].as_str().unwrap_or("");
    assert!(up_reply.ends_with(":1:4194304"), "4 MiB request: {up}");
    assert_eq!(health["status"], "SERVING", "{health}");

    // our own answer as a gRPC status naming the service and the reason
    assert_eq!(unknown["code"], "UNIMPLEMENTED", "{unknown}");
    let details = unknown["details"].as_str().unwrap_or("");
    assert!(
        details.contains("nope.Missing") && details.contains("unknown service"),
        "{unknown}"
    );
    // counted like HTTP/1.1 requests, per stream
    let m = proxy.metrics().await;
    let ok = support::metric_value(
        &m,
        "switchyard_requests_total{code=\"2xx\",service=\"echo\"}",
    );
    assert!(ok.is_some_and(|n| n >= 20.0), "2xx of echo: {ok:?}");
    let unknown = support::metric_value(
        &m,
        "switchyard_requests_total{code=\"4xx\",service=\"(unknown)\"}",
    );
    assert_eq!(unknown, Some(1.0));
    drop((a, b));
}

/// Instances registered with `protocol: grpc` are checked with gRPC health: a NOT_SERVING one
/// gets no calls, none serving answers UNAVAILABLE, and an instance killed in the middle of a
/// stream ends the call with UNAVAILABLE within a bounded time.
#[tokio::test]
async fn not_serving_instances_get_no_calls_and_a_killed_one_ends_its_stream_unavailable() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config("[health]\ninterval_ms = 200\ntimeout_ms = 500\njitter_ms = 20\nunhealthy_threshold = 1\n")
        .start()
        .await;
    let mut a = GrpcPeer::start("a");
    let mut b = GrpcPeer::start("b");
    for p in [&a, &b] {
        let value = format!(
            r#"{{"addr":"{}","metadata":{{"protocol":"grpc"}}}}"#,
            p.addr
        );
        etcd.put(&format!("/services/echo/{}", p.name), value).await;
    }
    proxy.wait_usable("echo", 2).await;
    let target = format!("127.0.0.1:{}", proxy.port);

    let set = call(&b.addr.to_string(), "", "set_serving", "0").await;
    assert_eq!(set["reply"], "ok", "{set}");
    proxy.wait_usable("echo", 1).await;
    let spread = call(&target, "echo", "spread", "8").await;
    assert_eq!(
        names(&spread),
        vec!["a"; 8],
        "NOT_SERVING b got calls: {spread}"
    );

    call(&a.addr.to_string(), "", "set_serving", "0").await;
    proxy.wait_usable("echo", 0).await;
    let none = call(&target, "echo", "unary", "x").await;
    assert_eq!(none["code"], "UNAVAILABLE", "{none}");
    let details = none["details"].as_str().unwrap_or("");
    assert!(
        details.contains("\"echo\""),
        "the status names the service: {none}"
    );

    for p in [&a, &b] {
        call(&p.addr.to_string(), "", "set_serving", "1").await;
    }
    proxy.wait_usable("echo", 2).await;

    // a stream of 100 messages, 100 ms apart; its instance is killed after two
    let mut stream = Running::start(&target, "echo", "slow", "100");
    stream.next(Duration::from_secs(10)).await;
    let second = stream.next(Duration::from_secs(10)).await;
    let last = second["last"].as_str().unwrap_or("");
    let killed_at = Instant::now();
    if last.starts_with("a:") {
        a.kill();
    } else {
        b.kill();
    }
    let result = loop {
        let v = stream.next(Duration::from_secs(10)).await;
        if v.get("code").is_some() {
            break v;
        }
    };
    let took = killed_at.elapsed();
    assert_eq!(result["code"], "UNAVAILABLE", "{result}");
    assert!(
        took < Duration::from_secs(5),
        "the client should learn within 5 s, took {took:?}"
    );
    stream.wait().await;

    // the survivor takes the next calls
    let after = call(&target, "echo", "unary", "again").await;
    assert_eq!(after["code"], "OK", "{after}");
}

/// A client's cancellation (RST_STREAM) reaches the instance: its handler sees the call end.
#[tokio::test]
async fn a_cancelled_call_is_cancelled_on_the_instance() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let peer = GrpcPeer::start("only");
    etcd.put("/services/echo/1", peer.addr.to_string()).await;
    proxy.wait_usable("echo", 1).await;
    let target = format!("127.0.0.1:{}", proxy.port);

    let cancel = call(&target, "echo", "cancel", "").await;
    assert_eq!(names(&cancel), vec!["only"; 2], "{cancel}");
    let direct = peer.addr.to_string();
    // (each check starts a Python gRPC client: a loaded host needs patience)
    support::eventually(
        Duration::from_secs(30),
        "the instance to see the cancellation",
        || {
            let direct = direct.clone();
            async move {
                let v = call(&direct, "", "cancelled", "").await;
                match v["reply"].as_str() {
                    Some("1") => Ok(()),
                    other => Err(format!("cancelled = {other:?}")),
                }
            }
        },
    )
    .await;
}

/// gRPC over TLS (ALPN h2) to the TLS listener, on to a plain h2c instance.
#[tokio::test]
async fn grpc_over_tls_reaches_plain_instances() {
    let dir = tempfile::tempdir().unwrap();
    let ca = support::certs::TestCa::new("grpc CA");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let (cert, key) = ca.leaf(&["echo"]).write(dir.path(), "echo");
    let port = support::free_port();
    let etcd = EtcdServer::start();
    let config = format!(
        "[tls]\nlisten = \"127.0.0.1:{port}\"\n[[tls.certificates]]\ncert_file = {:?}\nkey_file = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    let proxy = Proxy::builder(&etcd).config(&config).start().await;
    let peer = GrpcPeer::start("secure");
    etcd.put("/services/echo/1", peer.addr.to_string()).await;
    proxy.wait_usable("echo", 1).await;
    let target = format!("127.0.0.1:{port}");
    let (unary, bidi) = tokio::join!(
        call_tls(&target, "echo", "unary", "over tls", &ca_file),
        call_tls(&target, "echo", "bidi", "3", &ca_file),
    );
    assert_eq!(unary["reply"], "secure:over tls", "{unary}");
    assert_eq!(names(&bidi), vec!["secure"; 3], "{bidi}");
}

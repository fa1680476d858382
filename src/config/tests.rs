use std::time::Duration;

use super::*;
use crate::health::Protocol;
use crate::routing::AllUnhealthy;

fn check(text: &str) -> Result<Config, ConfigError> {
    FileConfig::parse(text, "test")?.validate()
}

#[test]
fn embedded_default_is_valid_and_documents_defaults() {
    let c = FileConfig::embedded().unwrap().validate().unwrap();
    assert_eq!(c.proxy.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9090");
    assert_eq!(c.etcd.endpoints, ["http://127.0.0.1:2379"]);
    assert_eq!(c.etcd.prefix, "/services/");
    // the embedded file and the code defaults agree
    let d = check("").unwrap();
    assert_eq!(format!("{:?}", c.proxy), format!("{:?}", d.proxy));
    assert_eq!(format!("{:?}", c.etcd), format!("{:?}", d.etcd));
    assert_eq!(format!("{:?}", c.health), format!("{:?}", d.health));
    assert_eq!(
        format!("{:?}", c.default_service),
        format!("{:?}", d.default_service)
    );
    assert_eq!(c.http2, d.http2);
    assert!(c.tls.is_none(), "no TLS listener by default");
}

#[test]
fn errors_name_the_key_and_value() {
    let cases = [
        ("[proxy]\nlisten = \"nope\"", "proxy.listen"),
        ("[proxy]\nmax_tries = 0", "proxy.max_tries"),
        ("[proxy]\nengine = \"pingora\"", "proxy.engine"),
        (
            "[proxy]\nrequest_header_timeout_ms = 0",
            "proxy.request_header_timeout_ms",
        ),
        (
            "[proxy]\nconnect_timeout_ms = 0",
            "proxy.connect_timeout_ms",
        ),
        ("[proxy]\nlisten_typo = 1", "listen_typo"),
        ("[etcd]\nendpoints = []", "etcd.endpoints"),
        ("[etcd]\nendpoints = [\"http://x\"]", "etcd.endpoints"),
        ("[etcd]\nprefix = \"services\"", "etcd.prefix"),
        ("[etcd]\ndns_refresh_ms = 0", "etcd.dns_refresh_ms"),
        ("[etcd]\ndns_timeout_ms = 0", "etcd.dns_timeout_ms"),
        (
            "[[routing.routes]]\nservice = \"bad name\"\npath_prefix=\"/a\"",
            "routing.routes[0].service",
        ),
        ("[[routing.routes]]\nservice = \"a\"", "routing.routes[0]"),
        ("[services.a]\npolicy = \"fastest\"", "fastest"),
        ("[health]\nprotocol = \"udp\"", "udp"),
        ("[health]\ninterval_ms = 0", "health.interval_ms"),
        ("[health]\njitter_ms = 1000", "health.jitter_ms"),
        (
            "[health]\nunhealthy_threshold = 0",
            "health.unhealthy_threshold",
        ),
        (
            "[health]\nexpected_statuses = \"2xx\"",
            "health.expected_statuses",
        ),
        ("[health]\nall_unhealthy = \"maybe\"", "maybe"),
        (
            "[services.a.health]\npath = \"health\"",
            "services.a.health.path",
        ),
        ("[services.a.health]\ntypo = 1", "typo"),
        ("[log]\nformat = \"xml\"", "xml"),
        ("[tls]\nlisten = \"127.0.0.1:8443\"", "tls.certificates"),
        (
            "[tls]\nlisten = [\"127.0.0.1:8443\", \"nope\"]\n[[tls.certificates]]\ncert_file = \"/c\"\nkey_file = \"/k\"",
            "nope",
        ),
        (
            "[[tls.certificates]]\ncert_file = \"/nonexistent.crt\"\nkey_file = \"/k\"",
            "tls.listen",
        ),
        (
            "[tls]\nlisten = \"127.0.0.1:8443\"\n[[tls.certificates]]\ncert_file = \"/nonexistent.crt\"\nkey_file = \"/k\"",
            "/nonexistent.crt",
        ),
        ("[upstream_tls]\nca_file = \"/nonexistent-ca.pem\"", "/nonexistent-ca.pem"),
        (
            "[services.a.tls]\ncert_file = \"/c.pem\"",
            "services.a.tls",
        ),
        ("[services.a]\nprotocol = \"spdy\"", "spdy"),
        ("[http2]\nmax_concurrent_streams = 0", "http2.max_concurrent_streams"),
        ("not toml at all [", "invalid config"),
    ];
    for (text, want) in cases {
        let err = check(text).expect_err(text).to_string();
        assert!(err.contains(want), "{text:?}: {err} should mention {want}");
    }
}

#[test]
fn service_health_overrides_inherit_the_rest() {
    let c = check(
        "[health]\ninterval_ms = 2000\npassive_failures = 3\n\
         [services.a.health]\nprotocol = \"grpc\"\nall_unhealthy = \"fail_open\"\n\
         [services.b]\npolicy = \"random\"\n",
    )
    .unwrap();
    let a = c.health.spec_for("a");
    assert_eq!(a.protocol, Protocol::Grpc);
    assert_eq!(a.interval, Duration::from_millis(2000));
    assert_eq!(c.health.spec_for("b"), &c.health.default);
    assert_eq!(c.health.spec_for("other").protocol, Protocol::Http);
    // a gRPC service is checked over gRPC unless its health section says otherwise
    let g = check("[services.g]\nprotocol = \"grpc\"\n[services.t]\nprotocol = \"h2\"\n").unwrap();
    assert_eq!(g.health.spec_for("g").protocol, Protocol::Grpc);
    assert_eq!(g.health.spec_for("t").protocol, Protocol::Https);
    assert_eq!(
        g.service_settings("g").upstream.protocol,
        Some(crate::upstream::Protocol::Grpc)
    );
    let sa = c.service_settings("a");
    assert_eq!(sa.all_unhealthy, AllUnhealthy::FailOpen);
    assert_eq!(sa.passive_failures, 3);
    assert_eq!(c.service_settings("other").passive_failures, 3);
    assert_eq!(c.health.initial_health(), crate::routing::Health::Pending);
    let off = check("[health]\nenabled = false").unwrap();
    assert_eq!(off.health.initial_health(), crate::routing::Health::Healthy);
    // without checks, passive ejection lasts the cool-down (nginx's max_fails / fail_timeout)
    assert_eq!(off.service_settings("x").passive_failures, 2);
    assert_eq!(
        off.service_settings("x").passive_cooldown,
        Some(Duration::from_secs(10))
    );
    assert_eq!(sa.passive_cooldown, None);
    let short =
        check("[health]\nenabled = false\n[services.s.health]\npassive_cooldown_ms = 500").unwrap();
    assert_eq!(
        short.service_settings("s").passive_cooldown,
        Some(Duration::from_millis(500))
    );
}

#[test]
fn the_consul_api_is_on_at_8500_by_default_and_validated() {
    let c = FileConfig::embedded().unwrap().validate().unwrap();
    let consul = c.consul.as_ref().expect("the Consul API is on by default");
    assert_eq!(consul.listen.to_string(), "127.0.0.1:8500");
    assert_eq!(consul.token, None);
    assert_eq!(
        check("").unwrap().consul,
        c.consul,
        "the file and the code agree"
    );
    assert!(check("[consul]\nenabled = false").unwrap().consul.is_none());
    let with_token = check("[consul]\ntoken = \"s\"").unwrap().consul.unwrap();
    assert_eq!(with_token.token.as_deref(), Some("s"));
    for (text, want) in [
        ("[consul]\nlisten = \"8500\"", "consul.listen"),
        ("[consul]\ntoken = \" \"", "consul.token"),
        ("[consul]\nport = 1", "port"),
        ("[consul]\nlisten = \"127.0.0.1:9090\"", "consul.listen"),
    ] {
        let err = check(text).expect_err(text).to_string();
        assert!(err.contains(want), "{text:?}: {err} should mention {want}");
    }
}

#[test]
fn overrides_win_and_prefix_gets_trailing_slash() {
    let mut f = FileConfig::parse("", "t").unwrap();
    f.apply(&Overrides {
        listen: Some("127.0.0.1:1".into()),
        admin_listen: Some("127.0.0.1:2".into()),
        etcd: vec!["127.0.0.1:3".into(), "http://127.0.0.1:4".into()],
        prefix: Some("/svc".into()),
        ..Default::default()
    });
    let c = f.validate().unwrap();
    assert_eq!(c.proxy.listen.port(), 1);
    assert_eq!(c.admin_listen.port(), 2);
    assert_eq!(
        c.etcd.endpoints,
        ["http://127.0.0.1:3", "http://127.0.0.1:4"]
    );
    assert_eq!(c.etcd.prefix, "/svc/");
}

#[test]
fn traffic_keys_inherit_from_the_traffic_section_and_name_bad_values() {
    use crate::routing::Policy;
    let c = check(
        "[proxy]\nzone = \"z1\"\n[traffic]\nslow_start_ms = 500\nretry_on = [\"5xx\"]\n\
         [services.a]\npolicy = \"hash\"\nhash_on = \"cookie:sid\"\noutlier_max_ejection_percent = 30\n",
    )
    .unwrap();
    let a = c.service_settings("a");
    assert_eq!(a.policy, Policy::Hash);
    assert_eq!(
        a.traffic.slow_start,
        Duration::from_millis(500),
        "inherited"
    );
    assert!(a.traffic.retry.on.status_5xx && !a.traffic.retry.on.reset);
    assert_eq!(a.traffic.outlier.max_ejection_percent, 30);
    assert_eq!(a.traffic.zone.as_deref(), Some("z1"));
    let other = c.service_settings("b");
    assert_eq!(other.policy, Policy::RoundRobin);
    assert_eq!(other.traffic.slow_start, Duration::from_millis(500));
    assert_eq!(other.traffic.outlier.max_ejection_percent, 50);
    assert_eq!(c.outlier_interval, Duration::from_secs(10));
    for (text, needle) in [
        ("[services.a]\npolicy = \"hash\"", "services.a.policy"),
        ("[traffic]\nretry_on = [\"timeout\"]", "\"timeout\""),
        (
            "[traffic]\npanic_threshold_percent = 101",
            "traffic.panic_threshold_percent",
        ),
        (
            "[traffic]\noutlier_max_ejection_ms = 10",
            "traffic.outlier_max_ejection_ms",
        ),
        ("[services.a]\nhash_on = \"query:x\"", "services.a.hash_on"),
        (
            "[traffic]\noutlier_interval_ms = 0",
            "traffic.outlier_interval_ms",
        ),
    ] {
        let err = check(text).expect_err(text).to_string();
        assert!(err.contains(needle), "{text}: {err}");
    }
}

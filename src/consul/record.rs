//! A Consul registration as switchyard keeps it in etcd: an ordinary JSON registration
//! (`addr`, `weight`, `metadata`) whose metadata carries
//! - the service's own `Meta`, as any registration's metadata;
//! - `health_*` keys that make the first HTTP, TCP or gRPC check the instance's active check
//!   (`health_protocol = "none"` when there is none: TTL checks and check-less services are
//!   never probed);
//! - `consul`: this [`Record`] (id, name, tags, meta, weights, address as given, and every check
//!   with its definition and, for TTL checks, its status), so every switchyard can answer for it.
//!
//! The weight follows the TTL checks' status as Consul's `Weights` do: `Passing` while all pass,
//! `Warning` while one warns, 0 (registered, not routed) while one is critical.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::decode::{CheckDefinition, CheckKind, ServiceDefinition, Status, Weights};
use crate::registry::codec::{HostPort, MAX_WEIGHT};

/// The metadata key that holds the [`Record`].
pub const META_KEY: &str = "consul";

/// One check as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCheck {
    pub id: String,
    pub name: String,
    /// `http`, `tcp`, `grpc` or `ttl`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The URL (`http`), `host:port` (`tcp`) or `host:port[/service]` (`grpc`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deregister_after_ms: Option<u64>,
    /// A TTL check's status as last reported; the initial status of the others (theirs comes
    /// from switchyard's own checks).
    pub status: Status,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub notes: String,
    /// Consecutive passes before an HTTP/TCP/gRPC check passes (0 and 1: the first).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub success_before_passing: u32,
    /// Consecutive failures before it is critical (0 and 1: the first).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failures_before_critical: u32,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl StoredCheck {
    /// The stored form of definition `c`, with its id and the name it has when `c` gives none.
    pub fn new(id: String, default_name: String, c: &CheckDefinition) -> StoredCheck {
        let (kind, target, ttl) = match &c.kind {
            CheckKind::Http { url } => ("http", url.clone(), None),
            CheckKind::Tcp { addr } => ("tcp", addr.clone(), None),
            CheckKind::Grpc { target } => ("grpc", target.clone(), None),
            CheckKind::Ttl { ttl } => ("ttl", String::new(), Some(*ttl)),
        };
        StoredCheck {
            id,
            name: c.name.clone().unwrap_or(default_name),
            kind: kind.into(),
            target,
            interval_ms: millis(c.interval),
            timeout_ms: millis(c.timeout),
            ttl_ms: millis(ttl),
            deregister_after_ms: millis(c.deregister_after),
            status: c.status.unwrap_or(Status::Critical),
            output: String::new(),
            notes: c.notes.clone(),
            success_before_passing: c.success_before_passing,
            failures_before_critical: c.failures_before_critical,
        }
    }

    pub fn is_ttl(&self) -> bool {
        self.kind == "ttl"
    }

    pub fn ms(v: Option<u64>) -> Option<Duration> {
        v.map(Duration::from_millis)
    }
}

/// A Consul registration: what the API answers for it, and what makes its etcd value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// The address as registered ("" = none given; the instance's address is then the
    /// registering client's).
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub weights: Weights,
    #[serde(default)]
    pub enable_tag_override: bool,
    #[serde(default)]
    pub checks: Vec<StoredCheck>,
    /// Maintenance mode (`/v1/agent/service/maintenance/<id>?enable=true`): its reason. The
    /// instance stays registered with weight 0 and a critical maintenance check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<String>,
}

/// What Consul says when maintenance mode is enabled without a reason.
pub const DEFAULT_MAINTENANCE_REASON: &str =
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message.";

fn millis(d: Option<Duration>) -> Option<u64> {
    d.map(|d| d.as_millis().min(u64::MAX as u128) as u64)
}

impl Record {
    /// The record of a registration. Checks get Consul's ids (`service:<id>`, or
    /// `service:<id>:N` for several) and names; a re-registered check keeps the status of the
    /// check of the same id in `previous` (Consul restores it too); without `replace`, the
    /// checks of `previous` that the new definition does not name are kept.
    pub fn new(def: &ServiceDefinition, previous: Option<&Record>, replace: bool) -> Record {
        let several = def.checks.len() > 1;
        let mut checks: Vec<StoredCheck> = def
            .checks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let id = c.id.clone().unwrap_or_else(|| {
                    if several {
                        format!("service:{}:{}", def.id, i + 1)
                    } else {
                        format!("service:{}", def.id)
                    }
                });
                let name = format!("Service '{}' check", def.name);
                let mut check = StoredCheck::new(id, name, c);
                let before = previous.and_then(|p| p.checks.iter().find(|o| o.id == check.id));
                if let Some(before) = before.filter(|b| b.is_ttl() && check.is_ttl()) {
                    check.status = before.status;
                    check.output = before.output.clone();
                }
                check
            })
            .collect();
        if let (Some(previous), false) = (previous, replace) {
            for old in &previous.checks {
                if !checks.iter().any(|c| c.id == old.id) {
                    checks.push(old.clone());
                }
            }
        }
        Record {
            id: def.id.clone(),
            name: def.name.clone(),
            tags: def.tags.clone(),
            meta: def.meta.clone(),
            address: def.address.clone(),
            weights: def.weights,
            enable_tag_override: def.enable_tag_override,
            checks,
            // a re-registration does not end maintenance (Consul keeps its check too)
            maintenance: previous.and_then(|p| p.maintenance.clone()),
        }
    }

    /// The record kept in an instance's metadata, if it has one that parses.
    pub fn of_metadata(metadata: &BTreeMap<String, String>) -> Option<Record> {
        serde_json::from_str(metadata.get(META_KEY)?).ok()
    }

    /// The worst status of the TTL checks (passing when there is none).
    pub fn ttl_status(&self) -> Status {
        self.checks
            .iter()
            .filter(|c| c.is_ttl())
            .fold(Status::Passing, |s, c| s.worst(c.status))
    }

    /// The routing weight: `Weights.Passing`, `Weights.Warning` while a TTL check warns, 0 while
    /// one is critical.
    pub fn weight(&self) -> u32 {
        if self.maintenance.is_some() {
            return 0;
        }
        let w = match self.ttl_status() {
            Status::Passing => self.weights.passing,
            Status::Warning => self.weights.warning,
            Status::Critical => 0,
        };
        w.min(MAX_WEIGHT)
    }

    /// The lease TTL in whole seconds (the shortest TTL check, rounded up), if there is a TTL
    /// check.
    pub fn lease_ttl(&self) -> Option<i64> {
        self.checks
            .iter()
            .filter_map(|c| c.ttl_ms)
            .min()
            .map(|ms| (ms.div_ceil(1000)).max(1) as i64)
    }

    /// The check probed by switchyard's health checker: the first HTTP, TCP or gRPC check.
    pub fn active_check(&self) -> Option<&StoredCheck> {
        self.checks.iter().find(|c| !c.is_ttl())
    }

    /// The `health_*` metadata that makes [`Record::active_check`] the instance's check.
    fn health_metadata(&self, meta: &mut BTreeMap<String, String>) {
        let mut set = |k: &str, v: String| {
            meta.insert(k.to_string(), v);
        };
        let Some(c) = self.active_check() else {
            set("health_protocol", "none".into());
            return;
        };
        match c.kind.as_str() {
            "http" => {
                let (https, port, path) = split_url(&c.target);
                if https {
                    // no TLS probe: an https check is a connection to its port
                    set("health_protocol", "tcp".into());
                } else {
                    set("health_protocol", "http".into());
                    set("health_path", path);
                    set("health_expected_statuses", "200-299".into());
                }
                if let Some(p) = port {
                    set("health_port", p.to_string());
                }
            }
            "grpc" => {
                set("health_protocol", "grpc".into());
                let (addr, service) = c.target.split_once('/').unwrap_or((&c.target, ""));
                set("health_grpc_service", service.to_string());
                if let Some(p) = port_of(addr) {
                    set("health_port", p.to_string());
                }
            }
            _ => {
                set("health_protocol", "tcp".into());
                if let Some(p) = port_of(&c.target) {
                    set("health_port", p.to_string());
                }
            }
        }
        let clamp = |ms: u64| ms.clamp(100, 3_600_000).to_string();
        if let Some(ms) = c.interval_ms {
            set("health_interval_ms", clamp(ms));
        }
        // Consul's default check timeout is 10 s
        set("health_timeout_ms", clamp(c.timeout_ms.unwrap_or(10_000)));
        // Consul: one failure is critical, one pass is passing, unless told otherwise
        let threshold = |n: u32| n.clamp(1, 100).to_string();
        set(
            "health_healthy_threshold",
            threshold(c.success_before_passing),
        );
        set(
            "health_unhealthy_threshold",
            threshold(c.failures_before_critical),
        );
    }

    /// The etcd value: a JSON registration at `addr`.
    pub fn to_value(&self, addr: &HostPort) -> String {
        let mut metadata: BTreeMap<String, String> = self.meta.clone();
        self.health_metadata(&mut metadata);
        let mut metadata = serde_json::to_value(metadata).unwrap_or_default();
        if let Some(m) = metadata.as_object_mut() {
            m.insert(
                META_KEY.into(),
                serde_json::to_value(self).unwrap_or_default(),
            );
        }
        json!({
            "addr": addr.to_string(),
            "weight": self.weight(),
            "metadata": metadata,
        })
        .to_string()
    }
}

/// `http[s]://host[:port]/path?query` → (https, port, path and query). The host is not used:
/// the instance's own address is probed.
fn split_url(url: &str) -> (bool, Option<u16>, String) {
    let (https, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (scheme.eq_ignore_ascii_case("https"), rest),
        None => (false, url),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let port = port_of(authority).or(Some(if https { 443 } else { 80 }));
    (https, port, path)
}

/// The port of `host:port` or `[v6]:port`.
fn port_of(addr: &str) -> Option<u16> {
    let (_, port) = addr.rsplit_once(':')?;
    port.parse().ok().filter(|p| *p > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::decode::service_definition;

    fn def(body: &str) -> ServiceDefinition {
        service_definition(body.as_bytes()).unwrap()
    }

    fn addr() -> HostPort {
        HostPort {
            host: "127.0.0.1".into(),
            port: 8080,
        }
    }

    #[test]
    fn check_ids_and_names_follow_consul() {
        let one = Record::new(
            &def(r#"{"Name":"web","ID":"w1","Port":1,"Check":{"TTL":"5s"}}"#),
            None,
            false,
        );
        assert_eq!(one.checks[0].id, "service:w1");
        assert_eq!(one.checks[0].name, "Service 'web' check");
        assert_eq!(one.checks[0].status, Status::Critical);
        let two = Record::new(
            &def(r#"{"Name":"web","ID":"w1","Port":1,"Checks":[{"TTL":"5s"},
                   {"TCP":"127.0.0.1:1","Interval":"1s","Name":"tcp"}]}"#),
            None,
            false,
        );
        let ids: Vec<&str> = two.checks.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["service:w1:1", "service:w1:2"]);
        assert_eq!(two.checks[1].name, "tcp");
    }

    #[test]
    fn re_registration_keeps_ttl_status_and_unnamed_checks_unless_replaced() {
        let mut first = Record::new(
            &def(
                r#"{"Name":"a","Port":1,"Checks":[{"TTL":"5s","CheckID":"t"},{"TTL":"5s","CheckID":"u"}]}"#,
            ),
            None,
            false,
        );
        first.checks[0].status = Status::Passing;
        let again = def(r#"{"Name":"a","Port":1,"Check":{"TTL":"9s","CheckID":"t"}}"#);
        let merged = Record::new(&again, Some(&first), false);
        assert_eq!(merged.checks.len(), 2);
        assert_eq!(merged.checks[0].status, Status::Passing);
        assert_eq!(merged.checks[0].ttl_ms, Some(9_000));
        let replaced = Record::new(&again, Some(&first), true);
        assert_eq!(replaced.checks.len(), 1);
    }

    #[test]
    fn weight_follows_ttl_status() {
        let mut r = Record::new(
            &def(
                r#"{"Name":"a","Port":1,"Weights":{"Passing":5,"Warning":2},"Check":{"TTL":"2500ms"}}"#,
            ),
            None,
            false,
        );
        assert_eq!(r.weight(), 0, "a TTL check starts critical");
        r.checks[0].status = Status::Warning;
        assert_eq!(r.weight(), 2);
        r.checks[0].status = Status::Passing;
        assert_eq!(r.weight(), 5);
        r.maintenance = Some("deploy".into());
        assert_eq!(r.weight(), 0, "in maintenance: not routed");
        assert_eq!(r.lease_ttl(), Some(3));
    }

    #[test]
    fn the_value_is_a_registration_with_health_metadata() {
        let r = Record::new(
            &def(
                r#"{"Name":"web","ID":"w1","Port":8080,"Tags":["v1"],"Meta":{"zone":"a"},
                   "Check":{"HTTP":"http://localhost:9000/ready?x=1","Interval":"2s","Timeout":"1s"}}"#,
            ),
            None,
            false,
        );
        let value = r.to_value(&addr());
        let reg = crate::registry::codec::decode_value(value.as_bytes()).unwrap();
        assert_eq!(reg.addr, addr());
        assert_eq!(reg.weight, 1);
        let m = &reg.metadata;
        assert_eq!(m["zone"], "a");
        assert_eq!(m["health_protocol"], "http");
        assert_eq!(m["health_path"], "/ready?x=1");
        assert_eq!(m["health_port"], "9000");
        assert_eq!(m["health_interval_ms"], "2000");
        assert_eq!(m["health_timeout_ms"], "1000");
        assert_eq!(Record::of_metadata(m), Some(r));
        let ttl = Record::new(
            &def(r#"{"Name":"web","Port":8080,"Check":{"TTL":"5s"}}"#),
            None,
            false,
        );
        let reg = crate::registry::codec::decode_value(ttl.to_value(&addr()).as_bytes()).unwrap();
        assert_eq!(reg.metadata["health_protocol"], "none");
        assert_eq!(reg.weight, 0);
        let grpc = Record::new(
            &def(
                r#"{"Name":"g","Port":50051,"Check":{"GRPC":"127.0.0.1:50052/my.Svc","Interval":"1s"}}"#,
            ),
            None,
            false,
        );
        let reg = crate::registry::codec::decode_value(grpc.to_value(&addr()).as_bytes()).unwrap();
        assert_eq!(reg.metadata["health_protocol"], "grpc");
        assert_eq!(reg.metadata["health_port"], "50052");
        assert_eq!(reg.metadata["health_grpc_service"], "my.Svc");
    }
}

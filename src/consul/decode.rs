//! Request bodies as Consul reads them: JSON keys matched case-insensitively (and with Consul's
//! snake_case aliases: `deregister_critical_service_after` = `DeregisterCriticalServiceAfter`),
//! durations as Go writes them (`"10s"`, `"1m30s"`, `"500ms"`, or a number of nanoseconds).
//! Every error names the field, as Consul's "Request decode failed: ..." does.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};

/// What a body could not be decoded as; shown to the client after "Request decode failed: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct DecodeError {
    pub field: String,
    pub message: String,
}

fn err(field: &str, message: impl Into<String>) -> DecodeError {
    DecodeError {
        field: field.to_string(),
        message: message.into(),
    }
}

/// Check status, as Consul spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Passing,
    Warning,
    Critical,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Passing => "passing",
            Status::Warning => "warning",
            Status::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "passing" => Some(Status::Passing),
            "warning" => Some(Status::Warning),
            "critical" => Some(Status::Critical),
            _ => None,
        }
    }

    /// The worse of two statuses (critical > warning > passing).
    pub fn worst(self, other: Status) -> Status {
        let rank = |s: Status| match s {
            Status::Passing => 0,
            Status::Warning => 1,
            Status::Critical => 2,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

/// What a check probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// `HTTP`: a URL; 2xx passes.
    Http { url: String },
    /// `TCP`: `host:port`; a connection opening passes.
    Tcp { addr: String },
    /// `GRPC`: `host:port` or `host:port/service`; SERVING passes.
    Grpc { target: String },
    /// `TTL`: the service reports its own status before the TTL runs out.
    Ttl { ttl: Duration },
}

/// One check of a service registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckDefinition {
    /// `CheckID` (or `ID`); `None`: `service:<id>` (`service:<id>:N` when there are several).
    pub id: Option<String>,
    pub name: Option<String>,
    pub kind: CheckKind,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub deregister_after: Option<Duration>,
    /// Initial status (default critical, as Consul).
    pub status: Option<Status>,
    pub notes: String,
    pub success_before_passing: u32,
    pub failures_before_critical: u32,
}

/// `Weights`: the routing weight while all checks pass, and while one warns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Weights {
    #[serde(rename = "Passing")]
    pub passing: u32,
    #[serde(rename = "Warning")]
    pub warning: u32,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            passing: 1,
            warning: 1,
        }
    }
}

/// The body of `PUT /v1/agent/service/register`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDefinition {
    /// Defaults to the name.
    pub id: String,
    pub name: String,
    pub tags: Vec<String>,
    /// "" when not given.
    pub address: String,
    pub port: u16,
    pub meta: BTreeMap<String, String>,
    pub weights: Weights,
    /// `Check` first, then `Checks`, as Consul orders them.
    pub checks: Vec<CheckDefinition>,
    pub enable_tag_override: bool,
}

/// `Key` and `key`, `DeregisterCriticalServiceAfter` and `deregister_critical_service_after`
/// are the same field.
fn norm(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

/// A JSON object whose fields are looked up the way Consul decodes them.
struct Fields<'a> {
    /// Where the object is, for error messages ("" at the top, "Checks[1]." inside).
    at: String,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn new(at: String, value: &'a Value) -> Result<Fields<'a>, DecodeError> {
        match value {
            Value::Object(map) => Ok(Fields { at, map }),
            other => Err(err(
                at.trim_end_matches('.'),
                format!("expected an object, got {}", kind_of(other)),
            )),
        }
    }

    /// The field named `name` (any case, underscores ignored); null counts as absent.
    fn get(&self, name: &str) -> Option<&'a Value> {
        let want = norm(name);
        self.map
            .iter()
            .find(|(k, _)| norm(k) == want)
            .map(|(_, v)| v)
            .filter(|v| !v.is_null())
    }

    fn field(&self, name: &str) -> String {
        format!("{}{name}", self.at)
    }

    fn string(&self, name: &str) -> Result<Option<String>, DecodeError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(err(
                &self.field(name),
                format!("expected a string, got {}", kind_of(other)),
            )),
        }
    }

    fn uint(&self, name: &str, max: u64) -> Result<Option<u64>, DecodeError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if v <= max => Ok(Some(v)),
                _ => Err(err(
                    &self.field(name),
                    format!("expected an integer 0-{max}, got {n}"),
                )),
            },
            Some(other) => Err(err(
                &self.field(name),
                format!("expected an integer 0-{max}, got {}", kind_of(other)),
            )),
        }
    }

    fn boolean(&self, name: &str) -> Result<Option<bool>, DecodeError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(err(
                &self.field(name),
                format!("expected true or false, got {}", kind_of(other)),
            )),
        }
    }

    fn duration(&self, name: &str) -> Result<Option<Duration>, DecodeError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => parse_go_duration(s)
                .map(Some)
                .map_err(|m| err(&self.field(name), m)),
            // Go's time.Duration in JSON: nanoseconds
            Some(Value::Number(n)) => match n.as_u64() {
                Some(ns) => Ok(Some(Duration::from_nanos(ns))),
                None => Err(err(
                    &self.field(name),
                    format!("{n} is not a duration (a negative or fractional number)"),
                )),
            },
            Some(other) => Err(err(
                &self.field(name),
                format!("expected a duration like \"10s\", got {}", kind_of(other)),
            )),
        }
    }

    fn strings(&self, name: &str) -> Result<Vec<String>, DecodeError> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(err(
                        &format!("{}[{i}]", self.field(name)),
                        format!("expected a string, got {}", kind_of(other)),
                    )),
                })
                .collect(),
            Some(other) => Err(err(
                &self.field(name),
                format!("expected a list of strings, got {}", kind_of(other)),
            )),
        }
    }

    fn string_map(&self, name: &str) -> Result<BTreeMap<String, String>, DecodeError> {
        match self.get(name) {
            None => Ok(BTreeMap::new()),
            Some(Value::Object(map)) => map
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    other => Err(err(
                        &format!("{}[{k:?}]", self.field(name)),
                        format!("expected a string, got {}", kind_of(other)),
                    )),
                })
                .collect(),
            Some(other) => Err(err(
                &self.field(name),
                format!("expected an object of strings, got {}", kind_of(other)),
            )),
        }
    }
}

fn kind_of(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// Parses a Go duration: `"300ms"`, `"1.5h"`, `"2h45m"`, `"0"`. Units: ns, us (µs), ms, s, m, h.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration like \"10s\", \"1m30s\" or \"500ms\"");
    let s = text.trim();
    let s = s.strip_prefix('+').unwrap_or(s);
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() || s.starts_with('-') {
        return Err(bad());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    if !total.is_finite() || total > 1e9 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(total))
}

/// Formats a duration as Go prints it, for the durations answers show (`"10s"`, `"1m30s"`,
/// `"500ms"`).
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m, s, frac) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if frac > 0 {
        let f = format!("{frac:03}");
        out.push_str(&format!("{s}.{}s", f.trim_end_matches('0')));
    } else {
        out.push_str(&format!("{s}s"));
    }
    out
}

fn check_definition(f: &Fields<'_>) -> Result<Option<CheckDefinition>, DecodeError> {
    let http = f.string("HTTP")?.filter(|s| !s.is_empty());
    let tcp = f.string("TCP")?.filter(|s| !s.is_empty());
    let grpc = f.string("GRPC")?.filter(|s| !s.is_empty());
    let ttl = f.duration("TTL")?.filter(|d| !d.is_zero());
    let unsupported = [
        ("Args", "script"),
        ("ScriptArgs", "script"),
        ("Script", "script"),
        ("DockerContainerID", "docker"),
        ("H2PING", "h2ping"),
        ("UDP", "udp"),
        ("OSService", "os_service"),
        ("AliasService", "alias"),
        ("AliasNode", "alias"),
    ];
    // clients that send every field send those of other check kinds empty
    let empty = |v: &Value| match v {
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Bool(b) => !b,
        _ => false,
    };
    for (field, kind) in unsupported {
        if f.get(field).is_some_and(|v| !empty(v)) {
            return Err(err(
                &f.field(field),
                format!(
                    "{kind} checks are not supported by switchyard (HTTP, TCP, GRPC and TTL are)"
                ),
            ));
        }
    }
    let kinds = [
        http.as_ref().map(|u| CheckKind::Http { url: u.clone() }),
        tcp.as_ref().map(|a| CheckKind::Tcp { addr: a.clone() }),
        grpc.as_ref().map(|t| CheckKind::Grpc { target: t.clone() }),
        ttl.map(|ttl| CheckKind::Ttl { ttl }),
    ];
    let mut given = kinds.into_iter().flatten();
    let Some(kind) = given.next() else {
        // Consul skips an empty check object (py-consul sends `{}` for "no check")
        if f.map.is_empty() {
            return Ok(None);
        }
        return Err(err(
            f.at.trim_end_matches('.'),
            "a check needs one of HTTP, TCP, GRPC or TTL",
        ));
    };
    if given.next().is_some() {
        return Err(err(
            f.at.trim_end_matches('.'),
            "a check takes only one of HTTP, TCP, GRPC and TTL",
        ));
    }
    let interval = f.duration("Interval")?;
    if !matches!(kind, CheckKind::Ttl { .. }) && interval.is_none_or(|d| d.is_zero()) {
        return Err(err(
            &f.field("Interval"),
            "Interval must be > 0 for HTTP, TCP and GRPC checks",
        ));
    }
    let status = match f.string("Status")? {
        None => None,
        Some(s) if s.is_empty() => None,
        Some(s) => Some(Status::parse(&s).ok_or_else(|| {
            err(
                &f.field("Status"),
                "Status for checks must 'passing', 'warning', 'critical'",
            )
        })?),
    };
    let id = match f.string("CheckID")? {
        Some(id) if !id.is_empty() => Some(id),
        _ => f.string("ID")?.filter(|s| !s.is_empty()),
    };
    let count =
        |name: &str| -> Result<u32, DecodeError> { Ok(f.uint(name, 100)?.unwrap_or(0) as u32) };
    Ok(Some(CheckDefinition {
        id,
        name: f.string("Name")?.filter(|s| !s.is_empty()),
        kind,
        interval,
        timeout: f.duration("Timeout")?,
        deregister_after: f.duration("DeregisterCriticalServiceAfter")?,
        status,
        notes: f.string("Notes")?.unwrap_or_default(),
        success_before_passing: count("SuccessBeforePassing")?,
        failures_before_critical: count("FailuresBeforeCritical")?,
    }))
}

/// Decodes a `PUT /v1/agent/service/register` body.
pub fn service_definition(body: &[u8]) -> Result<ServiceDefinition, DecodeError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| err("body", e.to_string()))?;
    let f = Fields::new(String::new(), &value)?;
    let name = f.string("Name")?.unwrap_or_default();
    if name.is_empty() {
        return Err(err("Name", "Missing service name"));
    }
    let id = f
        .string("ID")?
        .filter(|s| !s.is_empty())
        .unwrap_or(name.clone());
    let port = f.uint("Port", u16::MAX as u64)?.unwrap_or(0) as u16;
    let weights = match f.get("Weights") {
        None => Weights::default(),
        Some(v) => {
            let w = Fields::new("Weights.".into(), v)?;
            let weights = Weights {
                passing: w.uint("Passing", u32::MAX as u64)?.unwrap_or(1) as u32,
                warning: w.uint("Warning", u32::MAX as u64)?.unwrap_or(1) as u32,
            };
            if weights.passing == 0 {
                return Err(err("Weights.Passing", "Passing must be greater than 0"));
            }
            weights
        }
    };
    let mut checks = Vec::new();
    if let Some(v) = f.get("Check") {
        if let Some(c) = check_definition(&Fields::new("Check.".into(), v)?)? {
            checks.push(c);
        }
    }
    match f.get("Checks") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, v) in items.iter().enumerate() {
                if let Some(c) = check_definition(&Fields::new(format!("Checks[{i}]."), v)?)? {
                    checks.push(c);
                }
            }
        }
        Some(other) => {
            return Err(err(
                "Checks",
                format!("expected a list of checks, got {}", kind_of(other)),
            ))
        }
    }
    Ok(ServiceDefinition {
        id,
        name,
        tags: f.strings("Tags")?,
        address: f.string("Address")?.unwrap_or_default(),
        port,
        meta: f.string_map("Meta")?,
        weights,
        checks,
        enable_tag_override: f.boolean("EnableTagOverride")?.unwrap_or(false),
    })
}

/// The body of `PUT /v1/agent/check/register`: the check (its id defaults to its name) and the
/// `ServiceID` it belongs to.
pub fn check_registration(body: &[u8]) -> Result<(CheckDefinition, String), DecodeError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| err("body", e.to_string()))?;
    let f = Fields::new(String::new(), &value)?;
    let name = f.string("Name")?.unwrap_or_default();
    if name.is_empty() {
        return Err(err("Name", "Missing check name"));
    }
    let service = f.string("ServiceID")?.unwrap_or_default();
    if service.is_empty() {
        return Err(err(
            "ServiceID",
            "switchyard keeps the checks of services only: ServiceID is required",
        ));
    }
    let mut check = check_definition(&f)?.ok_or_else(|| err("body", "an empty check"))?;
    check.id.get_or_insert(name);
    Ok((check, service))
}

/// The body of `PUT /v1/agent/check/update/<id>`: `{"Status": "...", "Output": "..."}`.
pub fn check_update(body: &[u8]) -> Result<(Status, String), DecodeError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| err("body", e.to_string()))?;
    let f = Fields::new(String::new(), &value)?;
    let status = f.string("Status")?.unwrap_or_default();
    let status = Status::parse(&status)
        .ok_or_else(|| err("Status", format!("Invalid check status: '{status}'")))?;
    Ok((status, f.string("Output")?.unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_and_print() {
        let cases = [
            ("10s", 10_000),
            ("1m30s", 90_000),
            ("500ms", 500),
            ("1.5h", 5_400_000),
            ("0", 0),
            ("2h45m", 9_900_000),
            ("1500us", 1),
        ];
        for (text, ms) in cases {
            assert_eq!(
                parse_go_duration(text).map(|d| d.as_millis() as u64),
                Ok(ms),
                "{text}"
            );
        }
        for bad in ["", "10", "-1s", "1d", "s", "1.2.3s", "abc"] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} must be rejected");
        }
        assert_eq!(go_duration(Duration::from_secs(10)), "10s");
        assert_eq!(go_duration(Duration::from_millis(90_500)), "1m30.5s");
        assert_eq!(go_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(go_duration(Duration::from_secs(3600)), "1h0m0s");
    }

    #[test]
    fn keys_match_in_any_case_and_snake_case() {
        let body = br#"{"name":"web","ID":"web-1","port":8080,"tags":["a","b"],
            "meta":{"Zone":"z1"},"weights":{"passing":3,"WARNING":1},
            "check":{"http":"http://127.0.0.1:8080/health","interval":"10s","timeout":"3s",
                     "deregister_critical_service_after":"1m"},
            "Checks":[{"TTL":"15s","check_id":"custom"}]}"#;
        let d = service_definition(body).unwrap();
        assert_eq!(
            (d.id.as_str(), d.name.as_str(), d.port),
            ("web-1", "web", 8080)
        );
        assert_eq!(d.tags, ["a", "b"]);
        assert_eq!(d.meta["Zone"], "z1", "meta keys keep their case");
        assert_eq!(
            d.weights,
            Weights {
                passing: 3,
                warning: 1
            }
        );
        assert_eq!(d.checks.len(), 2);
        assert_eq!(
            d.checks[0].kind,
            CheckKind::Http {
                url: "http://127.0.0.1:8080/health".into()
            }
        );
        assert_eq!(d.checks[0].interval, Some(Duration::from_secs(10)));
        assert_eq!(d.checks[0].deregister_after, Some(Duration::from_secs(60)));
        assert_eq!(
            d.checks[1].kind,
            CheckKind::Ttl {
                ttl: Duration::from_secs(15)
            }
        );
        assert_eq!(d.checks[1].id.as_deref(), Some("custom"));
        // ID defaults to the name; an empty check object is no check
        let d = service_definition(br#"{"Name":"db","Port":5432,"Checks":[{}]}"#).unwrap();
        assert_eq!(d.id, "db");
        assert!(d.checks.is_empty());
        // Go's client sends the fields of other check kinds empty
        let d = service_definition(
            br#"{"Name":"db","Port":5432,"Check":{"TTL":"5s","Args":[],"DockerContainerID":"","Header":{},"TLSSkipVerify":false}}"#,
        )
        .unwrap();
        assert_eq!(d.checks.len(), 1);
    }

    #[test]
    fn bodies_as_go_and_java_clients_send_them_decode() {
        // Go's api.AgentServiceRegistration with an HTTP check: every field, most of them empty
        let go = br#"{"Kind":"","ID":"web-1","Name":"web","Tags":["a"],"Port":8080,
            "Address":"127.0.0.1","TaggedAddresses":null,"EnableTagOverride":false,
            "Meta":{"k":"v"},"Weights":null,"Check":{"CheckID":"","Name":"","Args":null,
            "DockerContainerID":"","Shell":"","Interval":"10s","Timeout":"3s","TTL":"",
            "HTTP":"http://127.0.0.1:8080/health","Header":null,"Method":"","TCP":"",
            "Status":"","Notes":"","TLSSkipVerify":false,"GRPC":"","GRPCUseTLS":false,
            "AliasNode":"","AliasService":"","DeregisterCriticalServiceAfter":"1m0s"},
            "Checks":null,"Proxy":null,"Connect":null,"Namespace":"","Partition":""}"#;
        let d = service_definition(go).unwrap();
        assert_eq!((d.id.as_str(), d.port, d.checks.len()), ("web-1", 8080, 1));
        assert_eq!(d.checks[0].timeout, Some(Duration::from_secs(3)));
        assert_eq!(d.checks[0].deregister_after, Some(Duration::from_secs(60)));
        // Spring Cloud Consul's heartbeat registration: a TTL check, snake-less camel case
        let spring =
            br#"{"id":"app-8080","name":"app","tags":["secure=false"],"address":"10.0.0.7",
            "meta":{},"port":8080,"check":{"ttl":"30s","deregisterCriticalServiceAfter":"90m"}}"#;
        let d = service_definition(spring).unwrap();
        assert_eq!(
            d.checks[0].kind,
            CheckKind::Ttl {
                ttl: Duration::from_secs(30)
            }
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&[u8], &str)] = &[
            (b"{not json", "body"),
            (b"[]", "expected an object"),
            (br#"{"Port":80}"#, "Missing service name"),
            (br#"{"Name":"a","Port":"80"}"#, "Port"),
            (br#"{"Name":"a","Port":70000}"#, "Port"),
            (br#"{"Name":"a","Tags":"x"}"#, "Tags"),
            (br#"{"Name":"a","Tags":[1]}"#, "Tags[0]"),
            (br#"{"Name":"a","Meta":{"k":1}}"#, "Meta[\"k\"]"),
            (
                br#"{"Name":"a","Weights":{"Passing":0}}"#,
                "Weights.Passing",
            ),
            (
                br#"{"Name":"a","Check":{"HTTP":"http://x/","Interval":"soon"}}"#,
                "Check.Interval",
            ),
            (
                br#"{"Name":"a","Check":{"HTTP":"http://x/"}}"#,
                "Check.Interval",
            ),
            (
                br#"{"Name":"a","Checks":[{"TTL":"1s"},{"Args":["sh"]}]}"#,
                "Checks[1].Args",
            ),
            (
                br#"{"Name":"a","Check":{"TTL":"1s","Status":"ok"}}"#,
                "Check.Status",
            ),
            (br#"{"Name":"a","Check":{"Notes":"x"}}"#, "Check"),
        ];
        for (body, field) in cases {
            let e = service_definition(body).expect_err(&String::from_utf8_lossy(body));
            assert!(
                e.to_string().contains(field),
                "{}: {e} should name {field}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(
            check_update(br#"{"Status":"passing","Output":"ok"}"#),
            Ok((Status::Passing, "ok".into()))
        );
        assert!(check_update(br#"{"Status":"fine"}"#)
            .unwrap_err()
            .to_string()
            .contains("Invalid check status"));
    }
}

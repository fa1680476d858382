//! Registration codecs: etcd key and value → [`Registration`].
//!
//! A key is `<prefix><service>/<instance-id>`; a value is one of
//! 1. plain `host:port` (`10.0.0.7:50051`, `[::1]:8080`, `backend.internal:80`);
//! 2. JSON `{"addr":"10.0.0.7:50051","weight":3,"metadata":{"zone":"a"}}` (weight defaults to 1,
//!    0 means draining);
//! 3. etcd's gRPC naming format `{"Op":0,"Addr":"10.0.0.7:50051","Metadata":null}`.
//!
//! Decoding never panics and never resolves DNS: it only checks shape. Every error names what was
//! wrong so the registry can log it next to the key.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Largest weight accepted; larger values are clamped so weight sums cannot overflow.
pub const MAX_WEIGHT: u32 = 10_000;

/// Why a key or value was rejected. Messages are lower-case and carry the offending value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("key is not utf-8")]
    KeyNotUtf8,
    #[error("key {0:?} is outside the prefix")]
    OutsidePrefix(String),
    #[error("key {0:?} has no instance part (expected <prefix><service>/<instance-id>)")]
    NoInstance(String),
    #[error("invalid service name {0:?} (allowed: A-Z a-z 0-9 . _ -, not \".\" or \"..\")")]
    BadServiceName(String),
    #[error("value is not utf-8")]
    ValueNotUtf8,
    #[error("value is empty")]
    EmptyValue,
    #[error("value is not valid json: {0}")]
    BadJson(String),
    #[error("json value has no address (expected \"addr\" or \"Addr\")")]
    NoAddr,
    #[error("naming op {0} is not an add (only Op 0 registers an instance)")]
    NotAdd(i64),
    #[error("address {0:?} has no port")]
    NoPort(String),
    #[error("address {addr:?} has an invalid port: {reason}")]
    BadPort { addr: String, reason: String },
    #[error("address {0:?} has an empty or invalid host")]
    BadHost(String),
    #[error("weight {0} is negative")]
    NegativeWeight(i64),
}

pub use crate::routing::HostPort;

/// A decoded registration value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub addr: HostPort,
    /// Relative weight; 0 = draining (registered, no new requests).
    pub weight: u32,
    pub metadata: BTreeMap<String, String>,
}

/// Service and instance id taken from a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyParts<'a> {
    pub service: &'a str,
    pub instance: &'a str,
}

/// Is `name` a valid service name (`[A-Za-z0-9._-]+`, but not `.` or `..`, which a path would
/// resolve as directories)?
pub fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Splits `key` (which must start with `prefix`) into service and instance id.
pub fn decode_key<'a>(prefix: &str, key: &'a [u8]) -> Result<KeyParts<'a>, DecodeError> {
    let key = std::str::from_utf8(key).map_err(|_| DecodeError::KeyNotUtf8)?;
    let rest = key
        .strip_prefix(prefix)
        .ok_or_else(|| DecodeError::OutsidePrefix(key.to_string()))?;
    let (service, instance) = rest
        .split_once('/')
        .ok_or_else(|| DecodeError::NoInstance(key.to_string()))?;
    if instance.is_empty() {
        return Err(DecodeError::NoInstance(key.to_string()));
    }
    if !valid_service_name(service) {
        return Err(DecodeError::BadServiceName(service.to_string()));
    }
    Ok(KeyParts { service, instance })
}

/// Service name of a key, if the key has one; used to attribute a bad registration to a service.
pub fn service_of_key<'a>(prefix: &str, key: &'a [u8]) -> Option<&'a str> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
    let service = rest.split('/').next()?;
    valid_service_name(service).then_some(service)
}

/// Parses `host:port`, `[v6]:port`.
pub fn parse_host_port(s: &str) -> Result<HostPort, DecodeError> {
    let s = s.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| DecodeError::BadHost(s.to_string()))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| DecodeError::NoPort(s.to_string()))?;
        (host, port)
    } else {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| DecodeError::NoPort(s.to_string()))?;
        if host.contains(':') {
            // a bare IPv6 literal without brackets is ambiguous: "::1:80"
            return Err(DecodeError::BadHost(s.to_string()));
        }
        (host, port)
    };
    if host.is_empty() || !valid_host(host) {
        return Err(DecodeError::BadHost(s.to_string()));
    }
    if port.is_empty() {
        return Err(DecodeError::NoPort(s.to_string()));
    }
    let port: u64 = port.parse().map_err(|_| DecodeError::BadPort {
        addr: s.to_string(),
        reason: format!("{port:?} is not a number"),
    })?;
    if port == 0 || port > u16::MAX as u64 {
        return Err(DecodeError::BadPort {
            addr: s.to_string(),
            reason: format!("{port} is outside 1-65535"),
        });
    }
    Ok(HostPort {
        host: host.to_string(),
        port: port as u16,
    })
}

fn valid_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    // DNS name: labels of letters, digits, '-' and '_' separated by dots.
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[derive(Deserialize)]
struct JsonValue {
    #[serde(alias = "Addr", alias = "address")]
    addr: Option<String>,
    #[serde(alias = "Weight")]
    weight: Option<serde_json::Value>,
    #[serde(default, alias = "Metadata", alias = "meta")]
    metadata: Option<serde_json::Value>,
    #[serde(rename = "Op")]
    op: Option<i64>,
}

/// Decodes a registration value in any of the three accepted formats.
pub fn decode_value(value: &[u8]) -> Result<Registration, DecodeError> {
    let text = std::str::from_utf8(value).map_err(|_| DecodeError::ValueNotUtf8)?;
    let text = text.trim();
    if text.is_empty() {
        return Err(DecodeError::EmptyValue);
    }
    if !text.starts_with('{') {
        return Ok(Registration {
            addr: parse_host_port(text)?,
            weight: 1,
            metadata: BTreeMap::new(),
        });
    }
    let json: JsonValue =
        serde_json::from_str(text).map_err(|e| DecodeError::BadJson(e.to_string()))?;
    if let Some(op) = json.op {
        if op != 0 {
            return Err(DecodeError::NotAdd(op));
        }
    }
    let addr = json.addr.ok_or(DecodeError::NoAddr)?;
    let weight = match json.weight {
        None | Some(serde_json::Value::Null) => 1,
        Some(serde_json::Value::Number(n)) => match n.as_i64() {
            Some(w) if w < 0 => return Err(DecodeError::NegativeWeight(w)),
            Some(w) => w.min(MAX_WEIGHT as i64) as u32,
            None => {
                return Err(DecodeError::BadJson(format!(
                    "weight {n} is not an integer"
                )))
            }
        },
        Some(other) => {
            return Err(DecodeError::BadJson(format!(
                "weight {other} is not an integer"
            )))
        }
    };
    let metadata = match json.metadata {
        None | Some(serde_json::Value::Null) => BTreeMap::new(),
        Some(serde_json::Value::Object(map)) => map
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, v)
            })
            .collect(),
        Some(other) => {
            return Err(DecodeError::BadJson(format!(
                "metadata {other} is not an object"
            )))
        }
    };
    Ok(Registration {
        addr: parse_host_port(&addr)?,
        weight,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_value_decodes() {
        let r = decode_value(b"10.0.0.7:50051").unwrap();
        assert_eq!(r.addr.host, "10.0.0.7");
        assert_eq!(r.addr.port, 50051);
        assert_eq!(r.weight, 1);
        let r = decode_value(b" backend.internal:80\n").unwrap();
        assert_eq!(r.addr.to_string(), "backend.internal:80");
        let r = decode_value(b"[::1]:8080").unwrap();
        assert_eq!(r.addr.host, "::1");
        assert_eq!(r.addr.to_string(), "[::1]:8080");
    }

    #[test]
    fn json_value_decodes_with_defaults() {
        let r = decode_value(br#"{"addr":"10.0.0.7:1","weight":3,"metadata":{"zone":"a","n":2}}"#)
            .unwrap();
        assert_eq!(r.weight, 3);
        assert_eq!(r.metadata["zone"], "a");
        assert_eq!(r.metadata["n"], "2");
        let r = decode_value(br#"{"addr":"h:1"}"#).unwrap();
        assert_eq!(r.weight, 1);
        let r = decode_value(br#"{"addr":"h:1","weight":0}"#).unwrap();
        assert_eq!(r.weight, 0);
        let r = decode_value(br#"{"addr":"h:1","weight":99999999}"#).unwrap();
        assert_eq!(r.weight, MAX_WEIGHT);
    }

    #[test]
    fn naming_value_decodes() {
        let r = decode_value(br#"{"Op":0,"Addr":"10.0.0.7:50051","Metadata":null}"#).unwrap();
        assert_eq!(r.addr.to_string(), "10.0.0.7:50051");
        assert_eq!(
            decode_value(br#"{"Op":1,"Addr":"10.0.0.7:50051"}"#),
            Err(DecodeError::NotAdd(1))
        );
    }

    #[test]
    fn invalid_values_are_rejected_with_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"   ", "empty"),
            (b"\xff\xfe", "utf-8"),
            (b"10.0.0.7", "no port"),
            (b"10.0.0.7:", "no port"),
            (b"10.0.0.7:0", "outside"),
            (b"10.0.0.7:65536", "outside"),
            (b"10.0.0.7:99999999999", "outside"),
            (b"10.0.0.7:http", "not a number"),
            (b":80", "host"),
            (b"bad host:80", "host"),
            (b"::1:80", "host"),
            (b"{not json", "json"),
            (br#"{"weight":1}"#, "no address"),
            (br#"{"addr":"h:1","weight":-1}"#, "negative"),
            (br#"{"addr":"h:1","weight":"x"}"#, "integer"),
            (br#"{"addr":"h:1","metadata":[1]}"#, "object"),
            (b"[", "host"),
        ];
        for (value, reason) in cases {
            let err = decode_value(value).expect_err(&format!("{value:?} must be rejected"));
            assert!(
                err.to_string().contains(reason),
                "{value:?}: error {err} should mention {reason}"
            );
        }
    }

    #[test]
    fn keys_split_into_service_and_instance() {
        let k = decode_key("/services/", b"/services/user-service/10.0.0.7:50051").unwrap();
        assert_eq!(k.service, "user-service");
        assert_eq!(k.instance, "10.0.0.7:50051");
        // instance ids may contain slashes
        let k = decode_key("/services/", b"/services/a/b/c").unwrap();
        assert_eq!(k.instance, "b/c");
        assert!(matches!(
            decode_key("/services/", b"/services/a"),
            Err(DecodeError::NoInstance(_))
        ));
        assert!(matches!(
            decode_key("/services/", b"/services/a/"),
            Err(DecodeError::NoInstance(_))
        ));
        assert!(matches!(
            decode_key("/services/", b"/services/bad name/x"),
            Err(DecodeError::BadServiceName(_))
        ));
        assert!(matches!(
            decode_key("/services/", b"/services//x"),
            Err(DecodeError::BadServiceName(_))
        ));
        for dots in ["/services/./x", "/services/../x"] {
            assert!(
                matches!(
                    decode_key("/services/", dots.as_bytes()),
                    Err(DecodeError::BadServiceName(_))
                ),
                "{dots} must be refused"
            );
        }
        assert!(decode_key("/services/", b"/services/.../x").is_ok());
        assert!(decode_key("/services/", b"/services/.a/x").is_ok());
        assert!(matches!(
            decode_key("/services/", b"\xff"),
            Err(DecodeError::KeyNotUtf8)
        ));
        assert_eq!(service_of_key("/services/", b"/services/a/"), Some("a"));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // a cheap deterministic fuzz over short byte strings
        let alphabet: &[u8] = b"{}[]:\"0123456789aAzZ.-_ ,\xff\x00/";
        let mut seed: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 24) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| alphabet[((seed >> (i % 8 * 8)) as usize + i) % alphabet.len()])
                .collect();
            let _ = decode_value(&bytes);
            let _ = decode_key("/services/", &bytes);
        }
    }
}

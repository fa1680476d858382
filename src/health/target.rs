//! One instance's check target: its service's spec with the instance's metadata overrides
//! (`health_protocol`, `health_path`, `health_port`, ...) applied, and the address to probe.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{CheckSpec, Protocol, StatusSet};
use crate::routing::{HostPort, Instance};

/// What one instance's checks go to: the service's spec (shared; a copy only for an instance
/// whose metadata overrides it) and the address to probe. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub spec: Arc<CheckSpec>,
    pub addr: SocketAddr,
    /// Host header for HTTP checks when it is not `addr` itself (an instance registered by
    /// DNS name).
    pub host: Option<Box<str>>,
}

impl Target {
    /// Resolves `inst`'s target; invalid metadata values are reported and ignored.
    pub fn for_instance(inst: &Instance, base: &Arc<CheckSpec>) -> (Target, Vec<String>) {
        let mut errors = Vec::new();
        let by_protocol = by_protocol(inst, base);
        let spec = if inst.metadata.keys().any(|k| k.starts_with("health_")) {
            let mut spec = Self::override_spec(inst, base, &mut errors);
            if let (Some(p), false) = (by_protocol, inst.metadata.contains_key("health_protocol")) {
                spec.protocol = p;
            }
            Arc::new(spec)
        } else if let Some(p) = by_protocol {
            Arc::new(CheckSpec {
                protocol: p,
                ..(**base).clone()
            })
        } else {
            base.clone()
        };
        let port = spec.port.unwrap_or(inst.addr.port());
        let addr = SocketAddr::new(inst.addr.ip(), port);
        let host = HostPort {
            host: inst.registered_host().into_owned(),
            port,
        }
        .to_string();
        let target = Target {
            host: (host != addr.to_string()).then(|| host.into_boxed_str()),
            addr,
            spec,
        };
        (target, errors)
    }

    /// The Host header of HTTP checks.
    pub fn host(&self) -> std::borrow::Cow<'_, str> {
        match &self.host {
            Some(h) => std::borrow::Cow::Borrowed(h),
            None => std::borrow::Cow::Owned(self.addr.to_string()),
        }
    }

    fn override_spec(inst: &Instance, base: &CheckSpec, errors: &mut Vec<String>) -> CheckSpec {
        let mut spec = base.clone();
        let meta = |k: &str| inst.metadata.get(k).map(|v| v.trim());
        if let Some(v) = meta("health_protocol") {
            match v.parse() {
                Ok(p) => spec.protocol = p,
                Err(e) => errors.push(format!("health_protocol: {e}")),
            }
        }
        if let Some(v) = meta("health_path") {
            if v.starts_with('/') && !v.contains([' ', '\r', '\n']) {
                spec.path = v.to_string();
            } else {
                errors.push(format!("health_path: {v:?} must start with '/'"));
            }
        }
        if let Some(v) = meta("health_port") {
            match v.parse::<u16>() {
                Ok(p) if p > 0 => spec.port = Some(p),
                _ => errors.push(format!("health_port: {v:?} is not a port")),
            }
        }
        if let Some(v) = meta("health_grpc_service") {
            spec.grpc_service = v.to_string();
        }
        if let Some(v) = meta("health_expected_statuses") {
            match StatusSet::parse(v) {
                Ok(s) => spec.expected = s,
                Err(e) => errors.push(format!("health_expected_statuses: {e}")),
            }
        }
        let ms = |k: &str, errors: &mut Vec<String>| -> Option<Duration> {
            let v = meta(k)?;
            match v.parse::<u64>() {
                Ok(n) if (1..=3_600_000).contains(&n) => Some(Duration::from_millis(n)),
                _ => {
                    errors.push(format!("{k}: {v:?} is not 1-3600000"));
                    None
                }
            }
        };
        if let Some(d) = ms("health_interval_ms", errors) {
            spec.interval = d;
            spec.jitter = spec.jitter.min(d / 2);
        }
        if let Some(d) = ms("health_timeout_ms", errors) {
            spec.timeout = d;
        }
        for (k, threshold) in [
            ("health_healthy_threshold", &mut spec.healthy_threshold),
            ("health_unhealthy_threshold", &mut spec.unhealthy_threshold),
        ] {
            if let Some(v) = meta(k) {
                match v.parse::<u32>() {
                    Ok(n) if (1..=100).contains(&n) => *threshold = n,
                    _ => errors.push(format!("{k}: {v:?} is not 1-100")),
                }
            }
        }
        spec
    }
}

/// The check an instance's registered `protocol` calls for when the service's check is the
/// default HTTP one: gRPC health for `grpc` (a gRPC server answers no HTTP/1.1 check), the HTTP
/// check over TLS for `https`/`h2`.
fn by_protocol(inst: &Instance, base: &CheckSpec) -> Option<Protocol> {
    if base.protocol != Protocol::Http {
        return None;
    }
    match crate::upstream::registered_protocol(inst)? {
        crate::upstream::Protocol::Grpc => Some(Protocol::Grpc),
        crate::upstream::Protocol::Https | crate::upstream::Protocol::H2 => Some(Protocol::Https),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::fixtures::{inst, spec};
    use crate::routing::{Health, InstanceState};

    #[test]
    fn metadata_overrides_the_service_spec() {
        let addr: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let i = inst(
            "/s/a/1",
            addr,
            &[
                ("health_protocol", "http"),
                ("health_path", "/ready"),
                ("health_port", "9000"),
                ("health_interval_ms", "50"),
                ("health_timeout_ms", "nope"),
            ],
        );
        let mut base = spec();
        base.jitter = Duration::from_millis(100);
        let base = Arc::new(base);
        let (t, errors) = Target::for_instance(&i, &base);
        assert_eq!(t.spec.protocol, Protocol::Http);
        assert_eq!(t.spec.path, "/ready");
        assert_eq!(t.addr.to_string(), "127.0.0.1:9000");
        assert_eq!(t.host(), "127.0.0.1:9000");
        assert_eq!(t.host, None, "an IP registration needs no Host of its own");
        assert_eq!(t.spec.interval, Duration::from_millis(50));
        assert!(t.spec.jitter <= Duration::from_millis(25));
        assert_eq!(t.spec.timeout, base.timeout);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("health_timeout_ms"));
        let named = Instance::new(
            "/s/a/2".into(),
            "2",
            &HostPort {
                host: "localhost".into(),
                port: 8000,
            },
            addr,
            1,
            Default::default(),
            Arc::new(InstanceState::new(Health::Pending)),
        );
        let (t, _) = Target::for_instance(&named, &base);
        assert_eq!(t.host(), "localhost:8000");
    }

    #[test]
    fn instances_without_health_metadata_share_the_service_spec() {
        let addr: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let base = Arc::new(spec());
        let (plain, _) = Target::for_instance(&inst("/s/a/1", addr, &[("zone", "b")]), &base);
        assert!(Arc::ptr_eq(&plain.spec, &base), "no copy per instance");
        let (own, _) =
            Target::for_instance(&inst("/s/a/2", addr, &[("health_path", "/ready")]), &base);
        assert!(!Arc::ptr_eq(&own.spec, &base));
    }
}

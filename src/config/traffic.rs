//! `[traffic]`: the traffic policies of every service (balancing policy, outlier detection,
//! retry budget and `retry_on`, slow start, panic threshold, hashing, zone preference), each key
//! set again per service in `[services.<name>]`. Defaults are listed on [`TrafficKeys`].

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{in_range, invalid, millis, ConfigError};
use crate::routing::budget::{RetryOn, RetrySettings};
use crate::routing::hash::HashOn;
use crate::routing::outlier::OutlierSettings;
use crate::routing::{Policy, TrafficSettings};

/// Calls `$then! { $($args)* ; <the shared keys> }`: the one list of the keys `[traffic]` and
/// `[services.<name>]` share, each with its doc (defaults listed) and its type (every key is
/// optional: an unset one inherits).
macro_rules! with_traffic_keys {
    ($then:ident ! { $($args:tt)* }) => {
        $then! { $($args)* ;
            /// `round_robin` (default), `random`, `least_request`, `p2c_ewma`, `hash`.
            policy: Policy,
            /// 5xx answers in a row that eject an instance (default 5; 0: off).
            outlier_consecutive_5xx: u32,
            /// 502/503/504 answers (or failures after sending) in a row that eject (default 5; 0: off).
            outlier_consecutive_gateway_errors: u32,
            /// The first ejection's length; the n-th lasts n times as long (default 30000).
            outlier_base_ejection_ms: u64,
            /// The longest ejection (default 300000).
            outlier_max_ejection_ms: u64,
            /// Share of the non-draining instances out at once, at least one of two or more (default 50).
            outlier_max_ejection_percent: u32,
            /// Requests an instance needs in an interval for its success rate to count (default 20).
            outlier_success_rate_min_requests: u64,
            /// Points below the others' median success rate that eject (default 20; 0: off).
            outlier_success_rate_gap_percent: u32,
            /// A passing active check ends an ejection early (default true).
            outlier_uneject_on_check: bool,
            /// Retries as a share of the service's requests (default 20).
            retry_budget_percent: u32,
            /// Retries per second allowed whatever the requests (default 10).
            retry_budget_min_per_sec: u32,
            /// What is retried besides connect failures: any of "5xx", "gateway-error", "reset"
            /// (default ["reset"]).
            retry_on: Vec<String>,
            /// A new instance's share ramps up over this long (default 0: off).
            slow_start_ms: u64,
            /// Below this share of usable instances (and one at least), all admitted ones take
            /// requests (default 50; 0: off).
            panic_threshold_percent: u32,
            /// The `hash` policy's key: `header:<name>`, `cookie:<name>` or `client_ip` (no default).
            hash_on: String,
            /// Same-zone instances are preferred while this share of them is usable (default 70).
            zone_min_usable_percent: u32,
        }
    };
}

/// Declares a config section struct with its own fields followed by the shared traffic keys, and
/// its `traffic_keys()`. Used through [`with_traffic_keys`].
macro_rules! section_with_traffic_keys {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident { $( $(#[$fmeta:meta])* $fvis:vis $field:ident : $fty:ty, )* }
        ;
        $( $(#[$doc:meta])* $key:ident : $ty:ty, )*
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $( $(#[$fmeta])* $fvis $field: $fty, )*
            $( $(#[$doc])* pub $key: Option<$ty>, )*
        }

        impl $name {
            /// Its `[traffic]` keys.
            pub(super) fn traffic_keys(&self) -> TrafficKeys {
                TrafficKeys { $( $key: self.$key.clone(), )* }
            }
        }
    };
}
pub(super) use {section_with_traffic_keys, with_traffic_keys};

/// The keys `[traffic]` and `[services.<name>]` share, from [`with_traffic_keys`]; `over` is
/// how a service's keys inherit from `[traffic]`'s.
macro_rules! traffic_keys_struct {
    ( ; $( $(#[$doc:meta])* $key:ident : $ty:ty, )* ) => {
        /// The keys `[traffic]` and `[services.<name>]` share; unset ones inherit (a service from
        /// `[traffic]`, `[traffic]` from the defaults in each key's doc).
        #[derive(Debug, Clone, Default, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct TrafficKeys {
            $( $(#[$doc])* pub $key: Option<$ty>, )*
        }

        impl TrafficKeys {
            /// `self` over `base`: each key set here wins.
            pub(super) fn over(&self, base: &TrafficKeys) -> TrafficKeys {
                TrafficKeys { $( $key: self.$key.clone().or_else(|| base.$key.clone()), )* }
            }
        }
    };
}
with_traffic_keys!(traffic_keys_struct! {});

with_traffic_keys!(section_with_traffic_keys! {
    /// `[traffic]` as written: the shared keys plus the ones that only exist once.
    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct TrafficSection {
        /// How often success rates are computed and ended ejections noticed (default 10000).
        pub outlier_interval_ms: Option<u64>,
    }
});

impl TrafficSection {
    /// `outlier_interval_ms` (default 10000), validated.
    pub(super) fn interval(&self) -> Result<Duration, ConfigError> {
        let ms = self.outlier_interval_ms.unwrap_or(10_000);
        in_range("traffic.outlier_interval_ms", ms, 10, 3_600_000)?;
        millis("traffic.outlier_interval_ms", ms)
    }
}

impl TrafficKeys {
    /// Validates the keys (`section` names them in errors) into the policy and its settings.
    pub(super) fn validate(
        &self,
        section: &str,
        zone: Option<&Arc<str>>,
    ) -> Result<(Policy, TrafficSettings), ConfigError> {
        let key = |k: &str| format!("{section}.{k}");
        let d = TrafficSettings::default();
        let o = &d.outlier;
        let percent = |k: &str, v: Option<u32>, default: u32| -> Result<u32, ConfigError> {
            Ok(in_range(key(k), v.unwrap_or(default) as u64, 0, 100)? as u32)
        };
        let count = |k: &str, v: Option<u32>, default: u32| -> Result<u32, ConfigError> {
            Ok(in_range(key(k), v.unwrap_or(default) as u64, 0, 1_000_000)? as u32)
        };
        let base_ms = self
            .outlier_base_ejection_ms
            .unwrap_or(o.base_ejection.as_millis() as u64);
        let base = millis(&key("outlier_base_ejection_ms"), base_ms)?;
        let max_ms = self
            .outlier_max_ejection_ms
            .unwrap_or(o.max_ejection.as_millis() as u64);
        let max = millis(&key("outlier_max_ejection_ms"), max_ms)?;
        if max < base {
            return Err(invalid(
                key("outlier_max_ejection_ms"),
                format!("{max_ms} is shorter than outlier_base_ejection_ms ({base_ms})"),
            ));
        }
        let outlier = OutlierSettings {
            consecutive_5xx: count(
                "outlier_consecutive_5xx",
                self.outlier_consecutive_5xx,
                o.consecutive_5xx,
            )?,
            consecutive_gateway_errors: count(
                "outlier_consecutive_gateway_errors",
                self.outlier_consecutive_gateway_errors,
                o.consecutive_gateway_errors,
            )?,
            base_ejection: base,
            max_ejection: max,
            max_ejection_percent: percent(
                "outlier_max_ejection_percent",
                self.outlier_max_ejection_percent,
                o.max_ejection_percent,
            )?,
            success_rate_min_requests: self
                .outlier_success_rate_min_requests
                .unwrap_or(o.success_rate_min_requests),
            success_rate_gap_percent: percent(
                "outlier_success_rate_gap_percent",
                self.outlier_success_rate_gap_percent,
                o.success_rate_gap_percent,
            )?,
            uneject_on_check: self.outlier_uneject_on_check.unwrap_or(o.uneject_on_check),
        };
        let on = match &self.retry_on {
            Some(list) => RetryOn::parse(list).map_err(|m| invalid(key("retry_on"), m))?,
            None => d.retry.on,
        };
        let retry = RetrySettings {
            budget_percent: in_range(
                key("retry_budget_percent"),
                self.retry_budget_percent.unwrap_or(d.retry.budget_percent) as u64,
                0,
                1000,
            )? as u32,
            min_per_sec: count(
                "retry_budget_min_per_sec",
                self.retry_budget_min_per_sec,
                d.retry.min_per_sec,
            )?,
            on,
        };
        let hash_on = match &self.hash_on {
            Some(text) => Some(HashOn::parse(text).map_err(|m| invalid(key("hash_on"), m))?),
            None => None,
        };
        let policy = self.policy.unwrap_or_default();
        if policy == Policy::Hash && hash_on.is_none() {
            return Err(invalid(
                key("policy"),
                "\"hash\" needs hash_on (\"header:<name>\", \"cookie:<name>\" or \"client_ip\")",
            ));
        }
        let slow_start_ms = in_range(
            key("slow_start_ms"),
            self.slow_start_ms.unwrap_or(0),
            0,
            3_600_000,
        )?;
        Ok((
            policy,
            TrafficSettings {
                outlier,
                retry,
                slow_start: Duration::from_millis(slow_start_ms),
                panic_threshold_percent: percent(
                    "panic_threshold_percent",
                    self.panic_threshold_percent,
                    d.panic_threshold_percent,
                )?,
                hash_on,
                zone: zone.cloned(),
                zone_min_usable_percent: percent(
                    "zone_min_usable_percent",
                    self.zone_min_usable_percent,
                    d.zone_min_usable_percent,
                )?,
            },
        ))
    }
}

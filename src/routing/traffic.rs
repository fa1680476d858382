//! A service's traffic policy settings, validated: outlier detection, retries, slow start,
//! panic threshold, hashing and zone preference (`[traffic]` for every service, overridden per
//! service in `[services.<name>]`; see the README's configuration section).

use std::sync::Arc;
use std::time::Duration;

use super::budget::RetrySettings;
use super::hash::HashOn;
use super::outlier::OutlierSettings;

/// Everything but the policy's name that decides where a service's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficSettings {
    pub outlier: OutlierSettings,
    pub retry: RetrySettings,
    /// A newly usable instance's share ramps up from 10 % to 100 % over this long (default 0:
    /// off), for every policy (the `hash` policy passes it over for a share of its keys).
    pub slow_start: Duration,
    /// With at least one usable instance but fewer than this share of the non-draining,
    /// admitted ones, requests go to all of those (default 50; 0: off).
    pub panic_threshold_percent: u32,
    /// What the `hash` policy hashes (required by it).
    pub hash_on: Option<HashOn>,
    /// The proxy's own zone (`proxy.zone`): instances whose `zone` metadata equals it are
    /// preferred.
    pub zone: Option<Arc<str>>,
    /// Same-zone instances are preferred while at least this share of them is usable (default
    /// 70); below it, every zone takes requests.
    pub zone_min_usable_percent: u32,
}

impl Default for TrafficSettings {
    fn default() -> Self {
        TrafficSettings {
            outlier: OutlierSettings::default(),
            retry: RetrySettings::default(),
            slow_start: Duration::ZERO,
            panic_threshold_percent: 50,
            hash_on: None,
            zone: None,
            zone_min_usable_percent: 70,
        }
    }
}

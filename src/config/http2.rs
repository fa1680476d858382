//! `[http2]`: HTTP/2 limits, both sides (the gateway's server and its clients to instances).

use std::time::Duration;

use serde::Deserialize;

use super::{in_range, ConfigError};
use crate::gateway::Http2Config;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http2Section {
    pub max_concurrent_streams: u32,
    pub max_header_list_size: u32,
    pub max_pending_accept_reset_streams: usize,
    pub max_local_error_reset_streams: usize,
    pub keepalive_interval_ms: u64,
    pub keepalive_timeout_ms: u64,
    pub upstream_max_streams_per_connection: usize,
}

impl Default for Http2Section {
    fn default() -> Self {
        let d = Http2Config::default();
        Http2Section {
            max_concurrent_streams: d.max_concurrent_streams,
            max_header_list_size: d.max_header_list_size,
            max_pending_accept_reset_streams: d.max_pending_accept_reset_streams,
            max_local_error_reset_streams: d.max_local_error_reset_streams,
            keepalive_interval_ms: d.keepalive_interval.map_or(0, |i| i.as_millis() as u64),
            keepalive_timeout_ms: d.keepalive_timeout.as_millis() as u64,
            upstream_max_streams_per_connection: d.upstream_max_streams_per_connection,
        }
    }
}

impl Http2Section {
    /// Each value within the range HTTP/2 (and sense) allows.
    pub(super) fn validate(&self) -> Result<Http2Config, ConfigError> {
        let h = self;
        let range =
            |key: &str, v: u64, lo: u64, hi: u64| in_range(format!("http2.{key}"), v, lo, hi);
        range(
            "max_concurrent_streams",
            h.max_concurrent_streams.into(),
            1,
            65_536,
        )?;
        range(
            "max_header_list_size",
            h.max_header_list_size.into(),
            1024,
            16 << 20,
        )?;
        range(
            "max_pending_accept_reset_streams",
            h.max_pending_accept_reset_streams as u64,
            1,
            100_000,
        )?;
        range(
            "max_local_error_reset_streams",
            h.max_local_error_reset_streams as u64,
            1,
            100_000,
        )?;
        range(
            "keepalive_interval_ms",
            h.keepalive_interval_ms,
            0,
            3_600_000,
        )?;
        range("keepalive_timeout_ms", h.keepalive_timeout_ms, 1, 3_600_000)?;
        range(
            "upstream_max_streams_per_connection",
            h.upstream_max_streams_per_connection as u64,
            1,
            65_536,
        )?;
        Ok(Http2Config {
            max_concurrent_streams: h.max_concurrent_streams,
            max_header_list_size: h.max_header_list_size,
            max_pending_accept_reset_streams: h.max_pending_accept_reset_streams,
            max_local_error_reset_streams: h.max_local_error_reset_streams,
            keepalive_interval: (h.keepalive_interval_ms > 0)
                .then(|| Duration::from_millis(h.keepalive_interval_ms)),
            keepalive_timeout: Duration::from_millis(h.keepalive_timeout_ms),
            upstream_max_streams_per_connection: h.upstream_max_streams_per_connection,
        })
    }
}

//! Health: active probes, passive detection, and the scheduler that flips instance health.
//!
//! ```text
//! registry ──generation──▶ HealthChecker::reconcile (changed services only)
//!                              │ one compact entry per instance key (same key + state + target: kept)
//!                              ▼
//!                          Schedule: new entries ──▶ urgent queue (first checks, newest batch first)
//!                                    checked ones ──▶ deadline heap (start + interval - jitter)
//!                              │ one task: at most max_concurrent checks running, the last
//!                              │ max_concurrent/8 slots only for first checks
//!                              ├──▶ first checks: the admission thread (own runtime; a pass with
//!                              │    healthy_threshold 1 admits there), connection handed back
//!                              ▼
//!                          probe::check (HTTP keeps its connection) ──▶ Tracker (thresholds)
//!                              ──▶ InstanceState::transition (atomic)
//! request paths (engine, gateway): connect failures, timeouts
//!                          ──▶ passive_failure ──────────────▶ InstanceState::transition
//! a passing real check of an instance ejected as an outlier ──▶ routing::outlier::end_on_check
//! ```
//!
//! Files: `spec.rs` (what a check is: protocol, statuses, thresholds),
//! `target.rs` (one instance's spec with its metadata overrides, and its address), `checker.rs`
//! (the scheduler task), `schedule.rs` (its queues), `admission.rs` (first checks on their own
//! thread), `probe.rs` and `https.rs` (one check of each protocol), `transition.rs` (thresholds and
//! reporting a flip), `passive.rs` (detection from the request paths).
//!
//! Health lives in the instance's [`InstanceState`] (atomics shared with the request path), so
//! nothing here takes a lock the proxy also takes. A deregistered key's entry is dropped on the
//! next registry generation, with its kept connection; a check of it still running is ignored
//! when it ends. Nothing exists per instance but its entry: no task, no timer, and one shared
//! [`CheckSpec`] per service.
//!
//! Per-instance overrides come from registration metadata: `health_protocol` (`http`, `https`,
//! `tcp`, `grpc`, `none`), `health_path`, `health_port`, `health_grpc_service`,
//! `health_expected_statuses`, `health_interval_ms`, `health_timeout_ms`,
//! `health_healthy_threshold`, `health_unhealthy_threshold`.

mod admission;
mod checker;
#[cfg(test)]
mod fixtures;
pub mod https;
mod passive;
pub mod probe;
pub mod schedule;
mod spec;
mod target;
mod transition;

pub use checker::HealthChecker;
pub use passive::{passive_failure, passive_success};
pub use probe::{Conn, ProbeError};
pub use spec::{CheckSpec, HealthConfig, Protocol, StatusSet, TlsSettings};
pub use target::Target;
pub use transition::{report_transition, subscribe_transitions, Tracker};

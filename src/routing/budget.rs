//! Retry budget: retries limited to a share of a service's requests, so that during an outage
//! they cannot multiply the load on what is left (linkerd's and Finagle's retry budget).
//!
//! Every retry (after a connect failure, an idempotent replay after a reset or a timeout, or an
//! answer listed in `retry_on`) is withdrawn from the service's budget: it is allowed while the
//! retries over the last second or two stay below `retry_budget_percent` of the requests answered
//! over the same time, plus `retry_budget_min_per_sec` per second (so that a quiet service can
//! still retry). A refused retry is counted in `switchyard_retry_budget_exhausted_total` and the
//! request ends with what the last try gave.
//!
//! The request path pays nothing for it: requests are the service's request counters, retries
//! its retry counter; the window (a lock) is only touched when a request would retry.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use super::Service;
use crate::clock::clock_ms;
use crate::metrics::{Counter, ServiceMetrics};
use crate::sync::lock;

/// What, besides a connect failure, is tried again on another instance (`retry_on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryOn {
    /// `"5xx"`: any 5xx answer of an idempotent request without a streamed body.
    pub status_5xx: bool,
    /// `"gateway-error"`: a 502, 503 or 504 answer of such a request.
    pub gateway_error: bool,
    /// `"reset"` (default): an idempotent request whose connection closed, broke or stayed
    /// silent before any response byte (the replays switchyard always did).
    pub reset: bool,
}

impl Default for RetryOn {
    fn default() -> Self {
        RetryOn {
            status_5xx: false,
            gateway_error: false,
            reset: true,
        }
    }
}

impl RetryOn {
    /// From the config list; the error names the value that is not one of the conditions.
    pub fn parse<S: AsRef<str>>(list: &[S]) -> Result<RetryOn, String> {
        let mut on = RetryOn {
            status_5xx: false,
            gateway_error: false,
            reset: false,
        };
        for item in list {
            match item.as_ref() {
                "5xx" => on.status_5xx = true,
                "gateway-error" => on.gateway_error = true,
                "reset" => on.reset = true,
                other => {
                    return Err(format!(
                        "{other:?} is not one of \"5xx\", \"gateway-error\", \"reset\""
                    ))
                }
            }
        }
        Ok(on)
    }

    /// Is an answer with this status tried again?
    #[inline]
    pub fn status(self, status: u16) -> bool {
        (self.status_5xx && (500..=599).contains(&status))
            || (self.gateway_error && matches!(status, 502..=504))
    }
}

/// Validated retry settings of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySettings {
    /// Retries allowed as a share of requests (default 20; 0: only the floor).
    pub budget_percent: u32,
    /// Retries allowed per second whatever the requests (default 10).
    pub min_per_sec: u32,
    pub on: RetryOn,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            budget_percent: 20,
            min_per_sec: 10,
            on: RetryOn::default(),
        }
    }
}

/// A service's budget window: kept per service name for the life of the process ([`of`]), so
/// snapshot rebuilds do not refill it.
#[derive(Debug, Default)]
pub struct BudgetWindow(Mutex<Window>);

/// Every service's window, by name (made on a service's first retry).
static WINDOWS: LazyLock<Mutex<HashMap<Arc<str>, Arc<BudgetWindow>>>> =
    LazyLock::new(Default::default);

/// The budget window of `service`, made on first use.
pub fn of(service: &Arc<str>) -> Arc<BudgetWindow> {
    let mut all = lock(&WINDOWS);
    all.entry(service.clone()).or_default().clone()
}

#[derive(Debug, Default)]
struct Window {
    /// When the current window began ([`clock_ms`]; 0, the process's start, at first: the first
    /// retry ever weighs the requests since then).
    start_ms: u64,
    /// Requests and retries counted when it began.
    requests0: u64,
    retries0: u64,
    /// The window before, per second.
    prev_requests: f64,
    prev_retries: f64,
}

impl BudgetWindow {
    /// Withdraws one retry if the budget allows it: `requests` is the service's total so far,
    /// `retries` its retry counter, which counts the retry (under the lock) when it is allowed.
    fn withdraw(&self, s: &RetrySettings, requests: u64, retries: &Counter, now: u64) -> bool {
        let mut w = lock(&self.0);
        let retried = retries.get();
        let age = now.saturating_sub(w.start_ms);
        if age >= 1000 {
            // the window that ends becomes the one before, as a rate per second (a long one
            // without retries is averaged over its length)
            let secs = age as f64 / 1000.0;
            w.prev_requests = requests.saturating_sub(w.requests0) as f64 / secs;
            w.prev_retries = retried.saturating_sub(w.retries0) as f64 / secs;
            w.start_ms = now;
            w.requests0 = requests;
            w.retries0 = retried;
        }
        let span = 1.0 + now.saturating_sub(w.start_ms) as f64 / 1000.0;
        let asked = w.prev_requests + requests.saturating_sub(w.requests0) as f64;
        let spent = w.prev_retries + retried.saturating_sub(w.retries0) as f64;
        let allowed = asked * s.budget_percent as f64 / 100.0 + s.min_per_sec as f64 * span;
        let ok = spent + 1.0 <= allowed;
        if ok {
            retries.inc();
        }
        ok
    }
}

/// May a request to `svc` be tried once more? Takes the retry from the budget (and counts it in
/// `switchyard_retries_total`) if so; counts the refusal otherwise.
pub fn try_retry(svc: &Service) -> bool {
    let m: &ServiceMetrics = svc.metrics();
    let ok = svc
        .budget()
        .withdraw(&svc.traffic.retry, m.answered(), &m.retries, clock_ms());
    if !ok {
        m.budget_exhausted.inc();
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_on_parses_the_three_conditions_and_names_a_wrong_one() {
        let on = RetryOn::parse(&["5xx", "reset"]).unwrap();
        assert!(on.status_5xx && on.reset && !on.gateway_error);
        assert!(on.status(500) && on.status(503) && !on.status(404));
        let gw = RetryOn::parse(&["gateway-error"]).unwrap();
        assert!(gw.status(502) && gw.status(504) && !gw.status(500) && !gw.reset);
        let err = RetryOn::parse(&["5xx", "timeout"]).unwrap_err();
        assert!(err.contains("\"timeout\""), "{err}");
        assert!(!RetryOn::parse::<&str>(&[]).unwrap().reset);
    }

    #[test]
    fn the_budget_allows_its_share_of_requests_plus_the_floor() {
        let s = RetrySettings {
            budget_percent: 20,
            min_per_sec: 2,
            on: RetryOn::default(),
        };
        let w = BudgetWindow::default();
        let retries = Counter::default();
        // 100 requests over the second before: 20 % + 2 = 22 retries, not one more
        let granted = (0..100)
            .filter(|_| w.withdraw(&s, 100, &retries, 1000))
            .count();
        assert_eq!(granted, 22);
        assert_eq!(retries.get(), 22);
        // half a second on, 100 more requests: 20 % of 200 + 2 x 1.5, minus the 22 spent
        let granted = (0..100)
            .filter(|_| w.withdraw(&s, 200, &retries, 1500))
            .count();
        assert_eq!(granted, 40 + 3 - 22);
        // a quiet service gets the floor only
        let quiet = BudgetWindow::default();
        let r = Counter::default();
        let granted = (0..10).filter(|_| quiet.withdraw(&s, 0, &r, 1000)).count();
        assert_eq!(granted, 2);
    }
}

//! Admission of new instances: their first checks run ahead of the steady ones, on a thread of
//! their own, with a share of the concurrency kept for them.

/// Share of `max_concurrent` kept for first checks: steady checks never take the last
/// `max_concurrent / 8` (at most 64) slots, so a new instance's check starts at once even when
/// thousands of others are overdue.
pub(super) fn admission_reserve(max_concurrent: usize) -> usize {
    (max_concurrent / 8).min(64)
}

/// The thread that runs the first checks of new instances, on a runtime of its own: there they
/// wait only for their own I/O, not for the scheduler's turns over thousands of steady checks
/// (at 100,000 instances one turn takes milliseconds, and a check needs several). A passing
/// first check admits its instance right there; the scheduler learns the result as from any
/// check, keeps the (parked) connection the check kept, and logs the change. Stops when dropped.
pub(super) struct Admission {
    pub(super) handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Admission {
    pub(super) fn start() -> std::io::Result<Admission> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("health-admission".into())
            .spawn(move || {
                // a dropped sender ends it: the runtime and any check still running go with it
                let _ = rt.block_on(stopped);
            })?;
        Ok(Admission {
            handle,
            _stop: stop,
        })
    }
}

//! One way to take a `std::sync::Mutex`: [`lock`].
//!
//! A mutex is poisoned when a thread panicked while holding it. Every critical section in
//! switchyard is short and leaves its data consistent after each step (an insert, a push, an
//! assignment), so what a panicking holder left behind is still valid: [`lock`] takes the guard
//! anyway. The other two ways make one panic worse: `unwrap()` panics in every later holder (one
//! bug spreads to every thread that shares the lock), and skipping the section on `Err` silently
//! loses status updates or pooled connections from then on.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, taking the guard of a poisoned mutex too (see the module comment).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

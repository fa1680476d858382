//! Giving memory back to the system after a burst of allocations.
//!
//! mimalloc, the binary's allocator, keeps the pages a thread freed for that thread's next
//! allocations and returns them to the system later, when that thread allocates again. A burst on
//! a thread that then goes quiet stays resident: the registry's initial list of 100,000 keys (the
//! decoded pages, gone once the catalog is built), or a `/metrics` scrape or `/api/services` call
//! at that size on the admin thread (a body of tens of MB, freed once written). [`release`] hands
//! back what the calling thread freed and purges the freed memory of every arena at once.

use std::time::Duration;

// linked for `mi_collect` also where mimalloc is not the global allocator (tests, benches)
use mimalloc as _;

extern "C" {
    /// mimalloc: frees the calling thread's empty pages; `force` also purges every arena now.
    fn mi_collect(force: bool);
}

/// Response bodies at least this large schedule a [`release`] (see [`release_after`]).
pub const LARGE_BODY: usize = 1 << 20;

/// Returns memory this thread freed (and freed memory waiting in mimalloc's arenas) to the
/// system. Costs a walk over the thread's pages: for after a burst, not per request.
#[allow(unsafe_code)] // a call into mimalloc
pub fn release() {
    // SAFETY: mi_collect takes no pointers and may be called from any thread at any time.
    unsafe { mi_collect(true) }
}

/// [`release`] on this thread after `delay`, from a task on the current tokio runtime: for memory
/// that is freed after the caller returns (a response body, once written).
pub fn release_after(delay: Duration) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            tokio::time::sleep(delay).await;
            release();
        });
    }
}

//! The engine's time limits: a timer wheel per proxy thread.
//!
//! Every read and write of a request has a time limit, and almost every one finishes long before
//! it. pingora's fast timeouts (used before, and still used with `proxy.work_stealing = true`)
//! cost, per call, a clock read to check pingora's clock thread, and per armed limit another clock
//! read, a lookup in a lock-guarded map, a boxed future and a registration with a `Notify`; the
//! clock thread takes each proxy thread's lock every 10 ms. Waiting for the next request also
//! registered with the shutdown watch (a mutex-guarded waiter list) every time. Together about 5 %
//! of the proxy core, measured; the wheel took 4-7 % off the CPU time per request.
//!
//! Here a connection's task never leaves its thread (the no-steal runtime), so each proxy thread
//! keeps its limits in a thread-local hashed wheel of 10 ms slots: arming is a slab insert and a
//! `Vec` push, disarming a swap-remove, and a deadline comes from the coarse monotonic clock (a
//! memory read in the vDSO). Nothing is armed when the operation is ready at once. A driver task
//! per thread advances the wheel every 10 ms while it holds limits and parks when it holds none.
//! The driver also watches the shutdown signal: a wait for the next request is armed as *idle*,
//! and shutdown ends every idle wait on the thread at once.
//!
//! (A tokio timer per read or write was tried before pingora's: each one that became the earliest
//! pending deadline woke the runtime through its eventfd, up to one `write` system call per
//! request. The driver's one tokio sleep per 10 ms costs at most 100 of those a second.)

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io;
use std::pin::pin;
use std::task::{Poll, Waker};
use std::time::Duration;

use pingora::server::ShutdownWatch;

/// Width of a slot, and so the granularity of a deadline.
const SLOT_MS: u64 = 10;
/// Slots in the wheel (5.12 s); a longer limit stays in its slot and is passed over until due.
const SLOTS: u64 = 512;

/// Why a wait on the wheel ended before its operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    TimedOut,
    /// The server is shutting down (idle waits only).
    Shutdown,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Free,
    Armed,
    Ended(Ended),
}

struct Entry {
    /// Bumped on every reuse of the slot, so a stale handle cannot touch a newer limit.
    gen: u32,
    /// Index in its slot's list while armed.
    pos: u32,
    /// Tick at which the limit is reached.
    due: u64,
    state: State,
    idle: bool,
    waker: Option<Waker>,
}

#[derive(Default)]
struct Wheel {
    entries: Vec<Entry>,
    free: Vec<u32>,
    /// Armed entries by `due % SLOTS`.
    slots: Vec<Vec<u32>>,
    armed: usize,
    /// The last tick the driver has processed.
    now: u64,
    shutdown: bool,
    /// The driver's waker while it is parked (nothing armed).
    parked: Option<Waker>,
}

/// A handle to an armed entry.
struct Armed {
    key: u32,
    gen: u32,
}

impl Wheel {
    /// Arms a limit at tick `due`. Returns the handle, and the driver's waker if it was parked.
    fn arm(
        &mut self,
        now: u64,
        due: u64,
        idle: bool,
        waker: &Waker,
    ) -> Result<(Armed, Option<Waker>), Ended> {
        if idle && self.shutdown {
            return Err(Ended::Shutdown);
        }
        if self.slots.is_empty() {
            self.slots = (0..SLOTS).map(|_| Vec::new()).collect();
        }
        let mut wake = None;
        if self.armed == 0 {
            // the driver was parked: nothing armed was missed, start counting from now
            self.now = self.now.max(now.saturating_sub(1));
            wake = self.parked.take();
        }
        // never into a slot the driver has already passed
        let due = due.max(self.now + 1);
        let key = match self.free.pop() {
            Some(k) => k,
            None => {
                self.entries.push(Entry {
                    gen: 0,
                    pos: 0,
                    due: 0,
                    state: State::Free,
                    idle: false,
                    waker: None,
                });
                (self.entries.len() - 1) as u32
            }
        };
        let list = &mut self.slots[(due % SLOTS) as usize];
        let e = &mut self.entries[key as usize];
        e.gen = e.gen.wrapping_add(1);
        e.pos = list.len() as u32;
        e.due = due;
        e.state = State::Armed;
        e.idle = idle;
        e.waker = Some(waker.clone());
        list.push(key);
        self.armed += 1;
        Ok((Armed { key, gen: e.gen }, wake))
    }

    /// The state of an armed handle, updating its waker while it waits.
    fn poll(&mut self, a: &Armed, waker: &Waker) -> Poll<Ended> {
        let e = &mut self.entries[a.key as usize];
        debug_assert_eq!(e.gen, a.gen);
        match e.state {
            State::Ended(why) => Poll::Ready(why),
            _ => {
                if !e.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    e.waker = Some(waker.clone());
                }
                Poll::Pending
            }
        }
    }

    /// Takes an entry out of its slot's list.
    fn unlink(&mut self, key: u32) {
        let (slot, pos) = {
            let e = &self.entries[key as usize];
            ((e.due % SLOTS) as usize, e.pos as usize)
        };
        let list = &mut self.slots[slot];
        list.swap_remove(pos);
        if let Some(&moved) = list.get(pos) {
            self.entries[moved as usize].pos = pos as u32;
        }
        self.armed -= 1;
    }

    /// Frees a handle's entry. Returns its waker, to be dropped outside the borrow.
    fn disarm(&mut self, a: &Armed) -> Option<Waker> {
        let e = &self.entries[a.key as usize];
        if e.gen != a.gen || e.state == State::Free {
            return None;
        }
        if e.state == State::Armed {
            self.unlink(a.key);
        }
        let e = &mut self.entries[a.key as usize];
        e.state = State::Free;
        self.free.push(a.key);
        e.waker.take()
    }

    /// Ends every limit due by tick `to`; their wakers go to `fired`.
    fn advance(&mut self, to: u64, fired: &mut Vec<Waker>) {
        if to <= self.now {
            return;
        }
        let steps = (to - self.now).min(SLOTS);
        for t in self.now + 1..=self.now + steps {
            let slot = (t % SLOTS) as usize;
            let mut i = 0;
            while i < self.slots.get(slot).map_or(0, Vec::len) {
                let key = self.slots[slot][i];
                if self.entries[key as usize].due <= to {
                    self.unlink(key);
                    let e = &mut self.entries[key as usize];
                    e.state = State::Ended(Ended::TimedOut);
                    fired.extend(e.waker.take());
                } else {
                    i += 1;
                }
            }
        }
        self.now = to;
    }

    /// Ends every idle wait; from now on an idle wait ends as soon as it is armed.
    fn shut_down(&mut self, fired: &mut Vec<Waker>) {
        self.shutdown = true;
        for key in 0..self.entries.len() as u32 {
            let e = &self.entries[key as usize];
            if e.state == State::Armed && e.idle {
                self.unlink(key);
                let e = &mut self.entries[key as usize];
                e.state = State::Ended(Ended::Shutdown);
                fired.extend(e.waker.take());
            }
        }
    }
}

thread_local! {
    static WHEEL: RefCell<Wheel> = RefCell::new(Wheel::default());
    /// A driver task runs for this thread's wheel.
    static DRIVEN: Cell<bool> = const { Cell::new(false) };
}

/// Milliseconds on the coarse monotonic clock (updated every scheduler tick; a read of the vDSO's
/// data page, no TSC read).
#[allow(unsafe_code)] // clock_gettime(2)
pub fn now_ms() -> u64 {
    #[cfg(target_os = "linux")]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid clock id and a pointer to a timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
        ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
    }
    #[cfg(not(target_os = "linux"))]
    {
        static ZERO: std::sync::LazyLock<std::time::Instant> =
            std::sync::LazyLock::new(std::time::Instant::now);
        ZERO.elapsed().as_millis() as u64
    }
}

fn tick_now() -> u64 {
    now_ms() / SLOT_MS
}

/// Starts this thread's wheel driver if it is not running. Call on a proxy thread of a no-steal
/// runtime, from the connection's task: the limits of tasks on this thread then use the wheel.
pub fn drive_this_thread(shutdown: &ShutdownWatch) {
    if DRIVEN.with(Cell::get) {
        return;
    }
    DRIVEN.with(|d| d.set(true));
    tokio::spawn(drive(shutdown.clone()));
}

/// Clears [`DRIVEN`] when the driver task ends (its runtime shutting down), so a later runtime on
/// the same thread starts its own.
struct Driving;

impl Drop for Driving {
    fn drop(&mut self) {
        let _ = DRIVEN.try_with(|d| d.set(false));
    }
}

async fn drive(mut shutdown: ShutdownWatch) {
    let _driving = Driving;
    let mut fired = Vec::new();
    let mut watching = true;
    if *shutdown.borrow() {
        WHEEL.with(|w| w.borrow_mut().shut_down(&mut fired));
        watching = false;
    }
    loop {
        for w in fired.drain(..) {
            w.wake();
        }
        let parked = poll_fn(|cx| {
            WHEEL.with(|w| {
                let mut w = w.borrow_mut();
                if w.armed > 0 {
                    Poll::Ready(())
                } else {
                    w.parked = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
        });
        // parked until something is armed, then one slot at a time
        let wait = async {
            parked.await;
            tokio::time::sleep(Duration::from_millis(SLOT_MS)).await;
        };
        tokio::select! {
            _ = wait => {}
            changed = shutdown.changed(), if watching => {
                watching = false;
                // a dropped sender means the server is gone: end the idle waits too
                if changed.is_err() || *shutdown.borrow() {
                    WHEEL.with(|w| w.borrow_mut().shut_down(&mut fired));
                } else {
                    watching = true;
                }
                continue;
            }
        }
        WHEEL.with(|w| w.borrow_mut().advance(tick_now(), &mut fired));
    }
}

/// `f` with a time limit on this thread's wheel; `idle` waits also end on shutdown.
async fn on_wheel<T>(limit: Duration, idle: bool, f: impl Future<Output = T>) -> Result<T, Ended> {
    let mut f = pin!(f);
    let mut armed: Option<Armed> = None;
    let out = poll_fn(|cx| {
        if let Poll::Ready(v) = f.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        let (ready, wake) = WHEEL.with(|w| {
            let mut w = w.borrow_mut();
            match &armed {
                Some(a) => (w.poll(a, cx.waker()), None),
                None => {
                    let now = now_ms();
                    // rounded up, and one slot more for the coarse clock's lag
                    let due = (now + limit.as_millis() as u64).div_ceil(SLOT_MS) + 1;
                    match w.arm(now / SLOT_MS, due, idle, cx.waker()) {
                        Ok((a, wake)) => {
                            armed = Some(a);
                            (Poll::Pending, wake)
                        }
                        Err(why) => (Poll::Ready(why), None),
                    }
                }
            }
        });
        if let Some(w) = wake {
            w.wake();
        }
        ready.map(Err)
    })
    .await;
    if let Some(a) = armed {
        let waker = WHEEL.try_with(|w| w.try_borrow_mut().ok().and_then(|mut w| w.disarm(&a)));
        drop(waker);
    }
    out
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "timed out")
}

/// `f` with a time limit: this thread's wheel when it has a driver, else pingora's fast timeouts
/// (work-stealing runtime, where a task may move between threads).
pub async fn timed<T>(limit: Duration, f: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    if DRIVEN.with(Cell::get) {
        match on_wheel(limit, false, f).await {
            Ok(r) => r,
            Err(_) => Err(timed_out()),
        }
    } else {
        // boxed: inline, this rarer path's state would size every caller's future
        match Box::pin(pingora::time::fast_timeout::fast_timeout(limit, f)).await {
            Ok(r) => r,
            Err(_) => Err(timed_out()),
        }
    }
}

/// Whether the server is shutting down, as this thread's driver last saw it (the watch itself
/// where there is no driver). Cheaper than reading the watch: no shared lock per request.
pub fn shutting_down(shutdown: &ShutdownWatch) -> bool {
    if DRIVEN.with(Cell::get) {
        WHEEL.with(|w| w.borrow().shutdown)
    } else {
        *shutdown.borrow()
    }
}

/// `f` (a wait for the next request) with a time limit, ended early by shutdown: `None` then.
pub async fn idle<T>(
    limit: Duration,
    f: impl Future<Output = io::Result<T>>,
    shutdown: &mut ShutdownWatch,
) -> Option<io::Result<T>> {
    if DRIVEN.with(Cell::get) {
        // no read of the watch (a lock shared by every thread): once the driver has seen the
        // shutdown, arming refuses idle waits, and the ones armed before it are ended by it
        match on_wheel(limit, true, f).await {
            Ok(r) => Some(r),
            Err(Ended::TimedOut) => Some(Err(timed_out())),
            Err(Ended::Shutdown) => None,
        }
    } else {
        if *shutdown.borrow() {
            return None;
        }
        // boxed, as in `timed`: an idle connection's task holds only the wheel path's state
        Box::pin(async move {
            tokio::select! {
                r = timed(limit, f) => Some(r),
                _ = shutdown.changed() => None,
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Count(AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    #[test]
    fn limits_end_at_their_tick_and_disarmed_ones_never() {
        let mut w = Wheel::default();
        let (count, wk) = waker();
        let (a, _) = w.arm(100, 103, false, &wk).unwrap();
        let (b, _) = w.arm(100, 105, false, &wk).unwrap();
        let (c, _) = w.arm(100, 104, false, &wk).unwrap();
        assert_eq!(w.armed, 3);
        assert!(w.disarm(&c).is_some());
        let mut fired = Vec::new();
        w.advance(102, &mut fired);
        assert!(fired.is_empty());
        assert_eq!(w.poll(&a, &wk), Poll::Pending);
        w.advance(104, &mut fired);
        assert_eq!(fired.len(), 1);
        assert_eq!(w.poll(&a, &wk), Poll::Ready(Ended::TimedOut));
        assert_eq!(w.poll(&b, &wk), Poll::Pending);
        fired.drain(..).for_each(Waker::wake);
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        w.advance(200, &mut fired);
        assert_eq!(w.poll(&b, &wk), Poll::Ready(Ended::TimedOut));
        assert_eq!(w.armed, 0);
        // freed entries are reused under a new generation; a stale handle does nothing
        w.disarm(&a);
        w.disarm(&b);
        let (d, _) = w.arm(200, 210, false, &wk).unwrap();
        assert_eq!(d.key, b.key);
        assert!(w.disarm(&b).is_none());
        assert_eq!(w.armed, 1);
        assert_eq!(w.poll(&d, &wk), Poll::Pending);
    }

    #[test]
    fn a_limit_beyond_the_wheel_waits_for_its_own_tick() {
        let mut w = Wheel::default();
        let (_, wk) = waker();
        let (a, _) = w.arm(0, SLOTS * 2 + 5, false, &wk).unwrap();
        let mut fired = Vec::new();
        for t in (1..SLOTS * 2 + 5).step_by(7) {
            w.advance(t, &mut fired);
            assert_eq!(w.poll(&a, &wk), Poll::Pending, "tick {t}");
        }
        w.advance(SLOTS * 2 + 5, &mut fired);
        assert_eq!(w.poll(&a, &wk), Poll::Ready(Ended::TimedOut));
    }

    #[test]
    fn shutdown_ends_idle_waits_only_and_refuses_new_ones() {
        let mut w = Wheel::default();
        let (_, wk) = waker();
        let (idle, _) = w.arm(0, 50, true, &wk).unwrap();
        let (busy, _) = w.arm(0, 50, false, &wk).unwrap();
        let mut fired = Vec::new();
        w.shut_down(&mut fired);
        assert_eq!(fired.len(), 1);
        assert_eq!(w.poll(&idle, &wk), Poll::Ready(Ended::Shutdown));
        assert_eq!(w.poll(&busy, &wk), Poll::Pending);
        assert!(matches!(w.arm(0, 60, true, &wk), Err(Ended::Shutdown)));
        assert!(w.arm(0, 60, false, &wk).is_ok());
    }

    #[test]
    fn arming_an_empty_wheel_wakes_the_parked_driver() {
        let mut w = Wheel::default();
        let (driver, dk) = waker();
        w.parked = Some(dk);
        let (_, wk) = waker();
        let (_, wake) = w.arm(1000, 1010, false, &wk).unwrap();
        wake.expect("driver waker").wake();
        assert_eq!(driver.0.load(Ordering::Relaxed), 1);
        // a stale `now` does not put the limit into a slot already passed
        assert!(w.now >= 999);
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn timed_on_the_wheel_times_out_and_lets_ready_work_through() {
        rt().block_on(async {
            let (_tx, rx) = tokio::sync::watch::channel(false);
            drive_this_thread(&rx);
            let slow = timed(Duration::from_millis(30), async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(())
            });
            let t0 = std::time::Instant::now();
            let e = slow.await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut);
            let took = t0.elapsed();
            assert!(took >= Duration::from_millis(30), "{took:?}");
            assert!(took < Duration::from_secs(2), "{took:?}");
            let quick = timed(Duration::from_millis(30), async {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok(7)
            });
            assert_eq!(quick.await.unwrap(), 7);
            assert_eq!(WHEEL.with(|w| w.borrow().armed), 0);
        });
    }

    #[test]
    fn idle_waits_end_on_shutdown() {
        rt().block_on(async {
            let (tx, mut rx) = tokio::sync::watch::channel(false);
            drive_this_thread(&rx);
            let waiting = tokio::spawn({
                let mut rx = rx.clone();
                async move {
                    idle(
                        Duration::from_secs(30),
                        std::future::pending::<io::Result<()>>(),
                        &mut rx,
                    )
                    .await
                }
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(true).unwrap();
            let got = tokio::time::timeout(Duration::from_secs(5), waiting)
                .await
                .expect("idle wait ended by shutdown")
                .unwrap();
            assert!(got.is_none());
            // after shutdown, an idle wait ends at once
            let again = idle(
                Duration::from_secs(30),
                std::future::pending::<io::Result<()>>(),
                &mut rx,
            );
            assert!(again.await.is_none());
        });
    }
}

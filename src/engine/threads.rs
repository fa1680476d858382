//! Which proxy thread serves a client connection.
//!
//! pingora's accept loop runs on one thread of the proxy's no-steal runtime (one single-threaded
//! tokio runtime per thread) and spawns each accepted connection on a *random* thread. Two costs
//! follow, both measured:
//!
//! - the accepted socket stays registered with the accepting thread's epoll, so every read or
//!   write readiness of a connection served elsewhere wakes the accepting thread first, which
//!   then wakes the serving thread: two wake-ups and extra system calls per event;
//! - random placement leaves threads unevenly loaded (50 connections over 2 threads are often
//!   split 29/21), so one thread queues while the other idles.
//!
//! So the engine takes the socket out of pingora's stream (a duplicate descriptor; pingora's
//! copy is closed), picks the thread with the fewest open client connections (the current one on a
//! tie) and registers the socket with *that* thread's runtime: from then on the connection's
//! events arrive at the thread that serves it. Threads join the table the first time pingora
//! hands them a connection.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::IntGauge;
use tokio::runtime::Handle;

use crate::metrics::METRICS;
use crate::sync::lock;

/// One proxy thread: its runtime and its open client connections.
pub struct Worker {
    handle: Handle,
    conns: AtomicUsize,
    /// `switchyard_client_connections{thread}`: the same count, for the scrape.
    gauge: IntGauge,
}

impl Worker {
    /// The runtime to spawn this thread's connection tasks on.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Open client connections served by this thread.
    pub fn connections(&self) -> usize {
        self.conns.load(Ordering::Relaxed)
    }
}

/// Counts one client connection on a worker while it lives.
pub struct Serving(Arc<Worker>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.conns.fetch_sub(1, Ordering::Relaxed);
        self.0.gauge.dec();
    }
}

/// The proxy threads seen so far.
#[derive(Default)]
pub struct Workers {
    all: Mutex<Vec<Arc<Worker>>>,
}

thread_local! {
    /// This thread's entry, with the address of the table it belongs to.
    static LOCAL: RefCell<Option<(usize, Arc<Worker>)>> = const { RefCell::new(None) };
}

impl Workers {
    /// The calling thread's worker, added to the table on first use. Must be called on a proxy
    /// thread (inside its runtime).
    pub fn local(&self) -> Arc<Worker> {
        let me = self as *const Workers as usize;
        LOCAL.with(|l| {
            let mut l = l.borrow_mut();
            match &*l {
                Some((table, w)) if *table == me => w.clone(),
                _ => {
                    let mut all = lock(&self.all);
                    let w = Arc::new(Worker {
                        handle: Handle::current(),
                        conns: AtomicUsize::new(0),
                        gauge: METRICS
                            .client_connections
                            .with_label_values(&[&all.len().to_string()]),
                    });
                    all.push(w.clone());
                    *l = Some((me, w.clone()));
                    w
                }
            }
        })
    }

    /// The worker for a new connection: the least loaded one, `here` unless another has fewer
    /// connections. The connection is counted on it until the returned guard drops. `None` when
    /// `max` connections are open already.
    pub fn place(&self, here: Arc<Worker>, max: usize) -> Option<(Arc<Worker>, Serving)> {
        let mut best = here;
        let mut open = 0;
        for w in lock(&self.all).iter() {
            let n = w.connections();
            open += n;
            if n < best.connections() {
                best = w.clone();
            }
        }
        if open >= max {
            return None;
        }
        best.conns.fetch_add(1, Ordering::Relaxed);
        best.gauge.inc();
        Some((best.clone(), Serving(best)))
    }

    /// Open client connections per known thread, in the order the threads joined.
    #[cfg(test)]
    pub fn connections(&self) -> Vec<usize> {
        lock(&self.all).iter().map(|w| w.connections()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_go_to_the_least_loaded_thread_and_are_uncounted_on_drop() {
        let workers = Arc::new(Workers::default());
        let rt = |w: Arc<Workers>| {
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                rt.block_on(async move { w.local() })
            })
            .join()
            .unwrap()
        };
        let a = rt(workers.clone());
        let b = rt(workers.clone());
        assert_eq!(workers.connections(), vec![0, 0]);

        // a tie stays where it is
        let (first, g1) = workers.place(a.clone(), 3).unwrap();
        assert!(Arc::ptr_eq(&first, &a));
        // a has one, b none: the next goes to b even when it was accepted on a
        let (second, g2) = workers.place(a.clone(), 3).unwrap();
        assert!(Arc::ptr_eq(&second, &b));
        let (third, g3) = workers.place(b.clone(), 3).unwrap();
        assert!(Arc::ptr_eq(&third, &b));
        assert_eq!(workers.connections(), vec![1, 2]);
        // at the bound, none more
        assert!(workers.place(a.clone(), 3).is_none());
        assert_eq!(workers.connections(), vec![1, 2]);
        drop((g2, g3));
        assert_eq!(workers.connections(), vec![1, 0]);
        drop(g1);
        assert_eq!(workers.connections(), vec![0, 0]);
    }

    #[test]
    fn a_thread_joins_once_per_table() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (one, two) = (Workers::default(), Workers::default());
        rt.block_on(async {
            let w = one.local();
            assert!(Arc::ptr_eq(&w, &one.local()));
            two.local();
        });
        assert_eq!(one.connections().len(), 1);
        assert_eq!(two.connections().len(), 1);
    }
}

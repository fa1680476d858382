//! Idle upstream keep-alive connections, one pool per proxy thread.
//!
//! With `proxy.work_stealing = false` (the default) every connection task stays on the thread that
//! accepted it, so a thread-local pool needs no lock: checkout and checkin are a `Vec` pop and push.
//! A connection is reused most-recently-first (warm, least likely to have been closed by the
//! instance's idle timer). Before reuse it is checked without a system call: tokio records
//! readiness from epoll, so an instance that closed the connection while it sat idle shows up as
//! read-ready and the connection is dropped instead of reused. Connections idle longer than
//! `proxy.idle_timeout_ms` are dropped at checkout and by a sweep every few hundred checkins.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpStream;

use super::timer::now_ms;

struct Idle {
    stream: TcpStream,
    /// When it was checked in, on the coarse clock (ms): idleness needs no finer time.
    since: u64,
}

impl Idle {
    fn fresh(&self, now: u64, idle_timeout: Duration) -> bool {
        now.saturating_sub(self.since) < idle_timeout.as_millis() as u64
    }
}

#[derive(Default)]
struct ThreadPool {
    by_addr: HashMap<SocketAddr, Vec<Idle>>,
    count: usize,
    checkins: u32,
}

thread_local! {
    static POOL: RefCell<ThreadPool> = RefCell::new(ThreadPool::default());
}

/// Whether an idle connection is still usable: nothing to read and not closed by the peer.
pub fn still_open(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        // readable while idle: closed (EOF), reset, or unexpected bytes; confirm with one read
        Poll::Ready(Ok(())) => {
            let mut probe = [0u8; 1];
            matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
        Poll::Ready(Err(_)) => false,
    }
}

/// An idle connection to `addr` from this thread's pool, if one is usable.
pub fn checkout(addr: SocketAddr, idle_timeout: Duration) -> Option<TcpStream> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let p = &mut *p;
        let list = p.by_addr.get_mut(&addr)?;
        let now = now_ms();
        while let Some(idle) = list.pop() {
            p.count -= 1;
            if idle.fresh(now, idle_timeout) && still_open(&idle.stream) {
                return Some(idle.stream);
            }
        }
        None
    })
}

/// Returns a connection whose last response was read completely. `capacity`: most idle
/// connections this thread keeps; above it the connection is closed.
pub fn checkin(addr: SocketAddr, stream: TcpStream, capacity: usize, idle_timeout: Duration) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.checkins = p.checkins.wrapping_add(1);
        if p.checkins % 512 == 0 {
            sweep(&mut p, idle_timeout);
        }
        if p.count >= capacity {
            return;
        }
        p.count += 1;
        p.by_addr.entry(addr).or_default().push(Idle {
            stream,
            since: now_ms(),
        });
    })
}

fn sweep(p: &mut ThreadPool, idle_timeout: Duration) {
    let mut dropped = 0;
    let now = now_ms();
    p.by_addr.retain(|_, list| {
        let before = list.len();
        list.retain(|i| i.fresh(now, idle_timeout) && still_open(&i.stream));
        dropped += before - list.len();
        !list.is_empty()
    });
    p.count -= dropped;
}

/// Idle connections held by the calling thread (for tests).
#[cfg(test)]
pub fn idle_here() -> usize {
    POOL.with(|p| p.borrow().count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn reuses_open_connections_and_drops_closed_ones() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let t = Duration::from_secs(60);
        let client = TcpStream::connect(addr).await.unwrap();
        let (mut server_side, _) = listener.accept().await.unwrap();
        checkin(addr, client, 8, t);
        assert_eq!(idle_here(), 1);
        let client = checkout(addr, t).expect("open connection is reused");
        assert_eq!(idle_here(), 0);
        checkin(addr, client, 8, t);
        // the instance closes it while idle: not handed out again
        server_side.shutdown().await.unwrap();
        drop(server_side);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(checkout(addr, t).is_none());
        assert_eq!(idle_here(), 0);
        // capacity and idle timeout
        let a = TcpStream::connect(addr).await.unwrap();
        let b = TcpStream::connect(addr).await.unwrap();
        checkin(addr, a, 1, t);
        checkin(addr, b, 1, t);
        assert_eq!(idle_here(), 1);
        assert!(checkout(addr, Duration::ZERO).is_none());
        assert_eq!(idle_here(), 0);
    }
}

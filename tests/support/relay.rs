//! A TCP relay between switchyard and a server (etcd), for network faults the server itself
//! cannot make: the connection frozen with both sockets open, every connection closed at once,
//! or every new one closed as it arrives.
//!
//! ```text
//! switchyard ──▶ Relay (127.0.0.1:ephemeral) ──▶ target
//!                 │ Forward: bytes pass both ways
//!                 │ Pause:   nothing passes, sockets stay open, new connections are held
//!                 │ Refuse:  open connections are closed, every new one at once (counted all the same)
//!                 └ drop_connections(): closes every open connection, both sides
//! ```
//!
//! Runs on the test's tokio runtime; stopped on drop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

/// What the relay does with bytes and new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Forward,
    Pause,
    Refuse,
}

struct Shared {
    mode: watch::Sender<Mode>,
    accepted: AtomicU64,
    /// The tasks of open connections, each aborted (its sockets closed) by `drop_connections`.
    open: Mutex<Vec<AbortHandle>>,
}

pub struct Relay {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: JoinHandle<()>,
}

impl Relay {
    /// A relay to `target`, forwarding.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the relay on 127.0.0.1");
        let addr = listener.local_addr().expect("relay address");
        let (mode, _) = watch::channel(Mode::Forward);
        let shared = Arc::new(Shared {
            mode,
            accepted: AtomicU64::new(0),
            open: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let acceptor = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                s.accepted.fetch_add(1, Ordering::SeqCst);
                if *s.mode.borrow() == Mode::Refuse {
                    drop(client);
                    continue;
                }
                let task = tokio::spawn(relay_one(client, target, s.mode.subscribe()));
                let mut open = s.open.lock().expect("relay connection list");
                open.retain(|h| !h.is_finished());
                open.push(task.abort_handle());
            }
        });
        Relay {
            addr,
            shared,
            acceptor,
        }
    }

    /// `http://<relay>` for switchyard's `etcd.endpoints`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set(&self, mode: Mode) {
        self.shared.mode.send_replace(mode);
    }

    /// Stops forwarding in both directions; connections stay open, new ones are held.
    pub fn pause(&self) {
        self.set(Mode::Pause);
    }

    /// Forwards again (held bytes and connections go through).
    pub fn resume(&self) {
        self.set(Mode::Forward);
    }

    /// Closes the open connections and every new one as soon as it is accepted, until `resume`.
    pub fn refuse(&self) {
        self.set(Mode::Refuse);
    }

    /// Closes every open connection (both its sockets); the mode stays as it is.
    pub fn drop_connections(&self) {
        let open = std::mem::take(&mut *self.shared.open.lock().expect("relay connection list"));
        for h in open {
            h.abort();
        }
    }

    /// Connections accepted since the start (refused ones included).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        let mut open = self.shared.open.lock().expect("relay connection list");
        open.retain(|h| !h.is_finished());
        open.len()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.drop_connections();
    }
}

/// Waits until the mode is `Forward`; `false` when it became `Refuse` or the relay is gone.
async fn until_forwarding(mode: &mut watch::Receiver<Mode>) -> bool {
    matches!(
        mode.wait_for(|m| *m != Mode::Pause).await.map(|m| *m),
        Ok(Mode::Forward)
    )
}

async fn relay_one(client: TcpStream, target: SocketAddr, mut mode: watch::Receiver<Mode>) {
    // a connection that arrives while paused is held before it reaches the target
    if !until_forwarding(&mut mode).await {
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, mode.clone());
    let down = pump(sr, cw, mode);
    // either direction ending ends the connection (both sockets closed when this returns)
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Copies `from` to `to`, holding each chunk while the relay is paused.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !until_forwarding(&mut mode).await {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // paused while waiting to read: stop reading (the bytes stay in the kernel)
            _ = mode.wait_for(|m| *m != Mode::Forward) => continue,
        };
        if !until_forwarding(&mut mode).await {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

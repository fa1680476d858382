//! A raw HTTP/1.1 instance for the hostile-message tests. It keeps every byte it receives and
//! every request it reads, framed strictly and independently of switchyard's code (a length, or
//! chunked with CRLF line ends only): what a strict instance behind the proxy would see. Anything
//! it cannot read one way is recorded as a framing error. It answers by path (a leading `/raw`,
//! the service's name, is ignored):
//! - `/script/<name>`: the bytes registered with [`RawBackend::script`], then keeps the connection
//!   or closes it as the script says;
//! - `/drop-second`: the first request on a connection is answered (keep-alive); a later one is
//!   read and the connection closed without an answer;
//! - `/early`: after the head only: `413` with `Connection: close`, then the rest is read and
//!   dropped until the peer closes (a lingering close, as real servers do);
//! - `/duplex`: a chunked answer that echoes each piece of the request body as it arrives;
//! - anything else: `200` with the body `seen <n>` (keep-alive).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as the instance read it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub conn: usize,
    pub method: String,
    pub target: String,
    pub version: u8,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Read as chunked (else by length or empty).
    pub chunked: bool,
    pub trailers: Vec<(String, String)>,
}

impl Seen {
    /// Values of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum After {
    KeepOpen,
    Close,
}

#[derive(Default)]
struct State {
    seen: Vec<Seen>,
    /// Bytes received, per connection.
    raw: Vec<Vec<u8>>,
    framing_errors: Vec<String>,
    scripts: HashMap<String, (Vec<u8>, After)>,
}

pub struct RawBackend {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawBackend {
    pub async fn start() -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw backend");
        let addr = listener.local_addr().expect("raw backend address");
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let conn = {
                    let mut st = shared.lock().unwrap();
                    st.raw.push(Vec::new());
                    st.raw.len() - 1
                };
                tokio::spawn(serve(s, conn, shared.clone()));
            }
        });
        RawBackend { addr, state, task }
    }

    /// What `/script/<name>` answers.
    pub fn script(&self, name: &str, bytes: &[u8], after: After) {
        self.state
            .lock()
            .unwrap()
            .scripts
            .insert(name.to_string(), (bytes.to_vec(), after));
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Requests read whose target starts with `prefix` (after `/raw`, if any).
    pub fn seen_at(&self, prefix: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| {
                s.target
                    .strip_prefix("/raw")
                    .unwrap_or(&s.target)
                    .starts_with(prefix)
            })
            .collect()
    }

    pub fn connections(&self) -> usize {
        self.state.lock().unwrap().raw.len()
    }

    /// Every byte received, all connections, in order of connection.
    pub fn raw(&self) -> Vec<u8> {
        self.state.lock().unwrap().raw.concat()
    }

    pub fn framing_errors(&self) -> Vec<String> {
        self.state.lock().unwrap().framing_errors.clone()
    }
}

struct Reader {
    s: TcpStream,
    buf: Vec<u8>,
    conn: usize,
    state: Arc<Mutex<State>>,
}

impl Reader {
    /// Reads more bytes; false at the end of the stream.
    async fn more(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match self.s.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                self.state.lock().unwrap().raw[self.conn].extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    async fn line(&mut self) -> Result<Vec<u8>, String> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                if i == 0 || self.buf[i - 1] != b'\r' {
                    return Err("bare LF".into());
                }
                let line = self.buf[..i - 1].to_vec();
                if line.contains(&b'\r') {
                    return Err("bare CR".into());
                }
                self.buf.drain(..=i);
                return Ok(line);
            }
            if !self.more().await {
                return Err("closed inside a line".into());
            }
        }
    }

    async fn exact(&mut self, n: usize) -> Result<Vec<u8>, String> {
        while self.buf.len() < n {
            if !self.more().await {
                return Err("closed inside the body".into());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads one request head: None at a clean end of stream.
    async fn head(&mut self) -> Result<Option<Seen>, String> {
        loop {
            let mut fields = [httparse::EMPTY_HEADER; 128];
            let mut req = httparse::Request::new(&mut fields);
            match req.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let head = &self.buf[..n];
                    if head.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r') {
                        return Err("bare LF in the head".into());
                    }
                    let seen = Seen {
                        conn: self.conn,
                        method: req.method.unwrap_or("").to_string(),
                        target: req.path.unwrap_or("").to_string(),
                        version: req.version.unwrap_or(9),
                        headers: req
                            .headers
                            .iter()
                            .map(|h| {
                                (
                                    h.name.to_string(),
                                    String::from_utf8_lossy(h.value).into_owned(),
                                )
                            })
                            .collect(),
                        body: Vec::new(),
                        chunked: false,
                        trailers: Vec::new(),
                    };
                    self.buf.drain(..n);
                    return Ok(Some(seen));
                }
                Ok(httparse::Status::Partial) => {
                    if !self.more().await {
                        return if self.buf.is_empty() {
                            Ok(None)
                        } else {
                            Err("closed inside a head".into())
                        };
                    }
                }
                Err(e) => return Err(format!("head: {e}")),
            }
        }
    }

    /// Reads the body the head declares, strictly.
    async fn body(&mut self, seen: &mut Seen) -> Result<(), String> {
        let te = seen.header("transfer-encoding").join(",");
        let cl = seen.header("content-length");
        if !te.is_empty() {
            if !cl.is_empty() {
                return Err("both Transfer-Encoding and Content-Length".into());
            }
            if te != "chunked" {
                return Err(format!("transfer-encoding {te:?}"));
            }
            seen.chunked = true;
            loop {
                let line = self.line().await?;
                let text = String::from_utf8_lossy(&line).into_owned();
                if text.is_empty() || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!("chunk size line {text:?} (extensions or junk)"));
                }
                let size = usize::from_str_radix(&text, 16).map_err(|e| e.to_string())?;
                if size == 0 {
                    break;
                }
                let data = self.exact(size).await?;
                seen.body.extend_from_slice(&data);
                if self.exact(2).await? != b"\r\n" {
                    return Err("chunk data not followed by CRLF".into());
                }
            }
            loop {
                let line = self.line().await?;
                if line.is_empty() {
                    return Ok(());
                }
                let text = String::from_utf8_lossy(&line).into_owned();
                let (n, v) = text.split_once(':').ok_or("trailer without colon")?;
                seen.trailers.push((n.to_string(), v.trim().to_string()));
            }
        }
        match cl.as_slice() {
            [] => Ok(()),
            [one] => {
                let n: usize = one.parse().map_err(|_| format!("content-length {one:?}"))?;
                seen.body = self.exact(n).await?;
                Ok(())
            }
            more => Err(format!("{} content-length fields", more.len())),
        }
    }
}

async fn serve(s: TcpStream, conn: usize, state: Arc<Mutex<State>>) {
    let mut r = Reader {
        s,
        buf: Vec::new(),
        conn,
        state: state.clone(),
    };
    let mut on_conn = 0usize;
    loop {
        let mut seen = match r.head().await {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                state.lock().unwrap().framing_errors.push(e);
                return;
            }
        };
        on_conn += 1;
        // routed by Host the path keeps the service's name, routed by path it loses it
        let target = seen.target.clone();
        let target = target.strip_prefix("/raw").unwrap_or(&target).to_string();
        if target.starts_with("/early") {
            state.lock().unwrap().seen.push(seen);
            let _ = r
                .s
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large")
                .await;
            let _ = r.s.shutdown().await;
            let _ = tokio::time::timeout(Duration::from_secs(10), async {
                let mut sink = vec![0u8; 64 * 1024];
                while let Ok(n) = r.s.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
            return;
        }
        if target.starts_with("/duplex") {
            if duplex(&mut r, &seen).await.is_err() {
                return;
            }
            state.lock().unwrap().seen.push(seen);
            continue;
        }
        if let Err(e) = r.body(&mut seen).await {
            state.lock().unwrap().framing_errors.push(e);
            return;
        }
        let n = {
            let mut st = state.lock().unwrap();
            st.seen.push(seen);
            st.seen.len()
        };
        if target.starts_with("/drop-second") && on_conn > 1 {
            return;
        }
        if let Some(name) = target.strip_prefix("/script/") {
            let script = state.lock().unwrap().scripts.get(name).cloned();
            let Some((bytes, after)) = script else {
                return;
            };
            if r.s.write_all(&bytes).await.is_err() || after == After::Close {
                return;
            }
            continue;
        }
        let body = format!("seen {n}");
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if r.s.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Echoes a Content-Length body as chunks while it arrives.
async fn duplex(r: &mut Reader, seen: &Seen) -> Result<(), ()> {
    let n: usize = seen
        .header("content-length")
        .first()
        .and_then(|v| v.parse().ok())
        .ok_or(())?;
    r.s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .map_err(drop)?;
    let mut left = n;
    while left > 0 {
        if r.buf.is_empty() && !r.more().await {
            return Err(());
        }
        let take = left.min(r.buf.len());
        let piece: Vec<u8> = r.buf.drain(..take).collect();
        left -= take;
        let chunk = [
            format!("{:x}\r\n", piece.len()).into_bytes(),
            piece,
            b"\r\n".to_vec(),
        ]
        .concat();
        r.s.write_all(&chunk).await.map_err(drop)?;
    }
    r.s.write_all(b"0\r\n\r\n").await.map_err(drop)
}

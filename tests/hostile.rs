//! Hostile messages on both sides of the proxy (issue 14): raw bytes from a client against the
//! real binary, and a raw instance ([`support::raw::RawBackend`]) that records exactly what reached
//! it (how many requests, which fields, which framing, read strictly and independently of
//! switchyard's code) or answers with hostile responses. Every case states the answer the client
//! must get and what the instance must (not) have seen. The rules are those of `src/http1/mod.rs`
//! (RFC 9112 §3, §6, §7; RFC 9110 §9.2.2), with cases from HAProxy's reg-tests
//! `http_transfer_encoding.vtc` and `h1_request_target_validation.vtc` and nginx-tests'
//! `http_host.t`.

mod support;

use std::time::{Duration, Instant};

use support::raw::{After, RawBackend};
use support::{EtcdServer, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A proxy with one raw instance as service `raw` (active checks off: it answers only what the
/// tests send).
async fn setup(proxy_section: &str) -> (EtcdServer, Proxy, RawBackend) {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config(&format!(
            "[proxy]\nconnect_timeout_ms = 500\nread_timeout_ms = 3000\n{proxy_section}\n[health]\nenabled = false\n"
        ))
        .start()
        .await;
    let backend = RawBackend::start().await;
    etcd.put("/services/raw/1", backend.addr.to_string()).await;
    proxy.wait_usable("raw", 1).await;
    (etcd, proxy, backend)
}

/// One response read from a client connection, framed strictly.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
    /// The proxy closed the connection after it.
    closed: bool,
}

impl Answer {
    fn header(&self, name: &str) -> Vec<String> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }
}

struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(port: u16) -> Client {
        Client {
            s: TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect to the proxy"),
            buf: Vec::new(),
        }
    }

    async fn more(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(elapsed) => panic!(
                "no answer within 10 s ({elapsed}); have {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// Sends `bytes` and reads one answer.
    async fn send(&mut self, bytes: &[u8]) -> Answer {
        self.s.write_all(bytes).await.expect("write to the proxy");
        self.answer().await
    }

    async fn answer(&mut self) -> Answer {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(
                self.more().await,
                "connection closed before a response head: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end);
        let status: u16 = head[9..12].parse().expect("status code");
        let mut a = Answer {
            status,
            head,
            body: Vec::new(),
            closed: false,
        };
        let te = a.header("transfer-encoding");
        let cl = a.header("content-length");
        assert!(
            te.is_empty() || cl.is_empty(),
            "a response with both framings: {}",
            a.head
        );
        if (100..200).contains(&status) || status == 204 || status == 304 {
        } else if !te.is_empty() {
            assert_eq!(te, ["chunked"], "{}", a.head);
            loop {
                let line = self.line().await;
                let size = usize::from_str_radix(&line, 16)
                    .unwrap_or_else(|_| panic!("chunk size line {line:?}"));
                if size == 0 {
                    while !self.line().await.is_empty() {}
                    break;
                }
                while self.buf.len() < size + 2 {
                    assert!(self.more().await, "closed inside a chunk");
                }
                a.body.extend(self.buf.drain(..size));
                assert_eq!(self.buf.drain(..2).collect::<Vec<_>>(), b"\r\n");
            }
        } else if let Some(n) = cl.first() {
            let n: usize = n.parse().expect("content-length");
            while self.buf.len() < n {
                assert!(self.more().await, "closed inside the body");
            }
            a.body = self.buf.drain(..n).collect();
        } else {
            while self.more().await {}
            a.body = std::mem::take(&mut self.buf);
            a.closed = true;
        }
        if a.header("connection").iter().any(|v| v == "close") {
            a.closed = !self.more().await && self.buf.is_empty();
            assert!(
                a.closed,
                "Connection: close, then more bytes: {:?}",
                self.buf
            );
        }
        a
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return line;
            }
            assert!(self.more().await, "closed inside a line");
        }
    }

    /// Reads until the proxy closes (bounded).
    async fn rest(&mut self) -> String {
        while self.more().await {}
        String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned()
    }
}

async fn once(port: u16, bytes: &[u8]) -> Answer {
    Client::connect(port).await.send(bytes).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_framing_is_the_proxys_own() {
    let (_etcd, proxy, b) = setup("").await;
    let port = proxy.port;

    // finding 1: a length nominated by Connection still frames the body
    let smuggled = "GET /admin-smuggled HTTP/1.1\r\nHost: raw\r\n\r\n";
    let req = format!(
        "POST /raw/conn-cl HTTP/1.1\r\nHost: x\r\nConnection: content-length\r\nContent-Length: {}\r\n\r\n{smuggled}",
        smuggled.len()
    );
    let a = once(port, req.as_bytes()).await;
    assert_eq!(a.status, 200, "{a:?}");
    let seen = b.seen_at("/conn-cl");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, smuggled.as_bytes());
    assert_eq!(
        seen[0].header("content-length"),
        [smuggled.len().to_string()]
    );
    // the same with a chunked body
    let a = once(
        port,
        b"POST /raw/conn-te HTTP/1.1\r\nHost: x\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let seen = b.seen_at("/conn-te");
    assert_eq!((seen.len(), seen[0].chunked), (1, true));
    assert_eq!(seen[0].body, b"hello");

    // both framings (HAProxy http_transfer_encoding.vtc c1): chunked wins, the length goes, and
    // the client connection closes after the answer, so what follows is never a request
    let mut c = Client::connect(port).await;
    let a = c
        .send(b"POST /raw/cl-te HTTP/1.1\r\nHost: raw\r\nTransfer-Encoding: chunked\r\nContent-Length: 31\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n")
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.closed, "connection kept after CL+TE: {a:?}");
    let seen = b.seen_at("/cl-te");
    assert_eq!(seen[0].header("content-length"), Vec::<&str>::new());
    assert_eq!(seen[0].header("transfer-encoding"), ["chunked"]);

    // equal duplicate lengths go on as one
    once(port, b"POST /raw/dup-cl HTTP/1.1\r\nHost: raw\r\nContent-Length: 3\r\nContent-Length: 3, 3\r\n\r\nabc").await;
    assert_eq!(b.seen_at("/dup-cl")[0].header("content-length"), ["3"]);

    // chunk extensions are dropped, forbidden trailers filtered, the body re-encoded
    let a = once(
        port,
        b"POST /raw/ext HTTP/1.1\r\nHost: raw\r\nTransfer-Encoding: chunked\r\n\r\n3;name=\"v\"\r\nabc\r\n0\r\nContent-Length: 99\r\nHost: evil\r\nX-Checksum: 7\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let seen = &b.seen_at("/ext")[0];
    assert_eq!(seen.body, b"abc");
    assert_eq!(seen.trailers, [("X-Checksum".to_string(), "7".to_string())]);

    // finding 4: absolute-form routes by its authority and sends it as Host
    once(
        port,
        b"GET http://raw/abs?q=1 HTTP/1.1\r\nHost: other\r\n\r\n",
    )
    .await;
    let seen = &b.seen_at("/abs")[0];
    assert_eq!(seen.header("host"), ["raw"]);
    assert_eq!(seen.target, "/abs?q=1");

    // HTTP/1.0 without Host: forwarded as HTTP/1.1 with the service's name
    once(port, b"GET /raw/old HTTP/1.0\r\n\r\n").await;
    let seen = &b.seen_at("/old")[0];
    assert_eq!((seen.version, seen.header("host")), (1, vec!["raw"]));

    // refused before any instance sees them (findings 2, 3 and the list)
    let before = b.seen().len();
    let refused: [(&[u8], u16); 17] = [
        (b"GET /x HTTP/1.1\r\nHost: raw\r\nHost: other\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: raw\r\nHost: raw\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: raw/x\r\n\r\n", 400),
        (b"POST /x HTTP/1.0\r\nHost: raw\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST /x HTTP/1.1\r\nHost: raw\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
        (b"POST /x HTTP/1.1\r\nHost: raw\r\nContent-Length: 9999999999999999999\r\n\r\n", 400),
        (b"POST /x HTTP/1.1\r\nHost: raw\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST /x HTTP/1.1\r\nHost: raw\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n", 400),
        (b"POST /x HTTP/1.1\r\nHost: raw\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\n0\r\n\r\n", 400),
        (b"POST /x HTTP/1.1\r\nHost: raw\r\nTransfer-Encoding: chunked\r\n\r\n3\rabc\r\n0\r\n\r\n", 400),
        (b"POST /x HTTP/1.1\r\nHost: raw\r\nTransfer-Encoding: chunked\r\n\r\n0000000000000000003\r\nabc\r\n0\r\n\r\n", 400),
        (b"POST /x HTTP/1.1\r\nHost: raw\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX: y\nGET /s HTTP/1.1\r\n\r\n", 400),
        (b"GET * HTTP/1.1\r\nHost: raw\r\n\r\n", 400),
        (b"GET /x#f HTTP/1.1\r\nHost: raw\r\n\r\n", 400),
        (b"GET raw:80 HTTP/1.1\r\nHost: raw\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: raw\r\nX: a\r\n b\r\n\r\n", 400),
        (b"POST /x HTTP/1.1\r\nHost: raw\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    ];
    for (req, status) in refused {
        let shown = String::from_utf8_lossy(req);
        let a = once(port, req).await;
        assert_eq!(a.status, status, "{shown:?}: {a:?}");
        assert!(
            a.closed,
            "{shown:?}: connection kept after a refused request"
        );
    }
    let ext = format!(
        "POST /x HTTP/1.1\r\nHost: raw\r\nTransfer-Encoding: chunked\r\n\r\n1;{}\r\na\r\n0\r\n\r\n",
        "e".repeat(2000)
    );
    assert_eq!(once(port, ext.as_bytes()).await.status, 400);
    assert_eq!(
        b.seen().len(),
        before,
        "a refused request reached the instance"
    );

    // nothing the instance read was ambiguous, and no smuggled request ever reached it
    assert_eq!(b.framing_errors(), Vec::<String>::new());
    assert!(b.seen().iter().all(|s| !s.target.contains("smuggled")));
    // and the proxy still serves
    assert_eq!(
        once(port, b"GET /raw/after HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_error_in_a_streamed_body_is_answered_400() {
    let (_etcd, proxy, b) = setup("").await;
    let mut c = Client::connect(proxy.port).await;
    c.s.write_all(b"POST /raw/stream-bad HTTP/1.1\r\nHost: raw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await
        .unwrap();
    // the head and the first chunk went on; then a bare LF after a size
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a = c.send(b"3\nabc\r\n0\r\n\r\n").await;
    assert_eq!(a.status, 400, "{a:?}");
    assert!(String::from_utf8_lossy(&a.body).contains("chunk"), "{a:?}");
    assert!(
        b.seen_at("/stream-bad").is_empty(),
        "the instance read a whole request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_framing_is_the_proxys_own() {
    let (_etcd, proxy, b) = setup("").await;
    let port = proxy.port;
    let get = |name: &str| format!("GET /raw/script/{name} HTTP/1.1\r\nHost: raw\r\n\r\n");

    // finding 1, response side: the length survives Connection: content-length
    b.script(
        "conn-cl",
        b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello",
        After::KeepOpen,
    );
    let mut c = Client::connect(port).await;
    let a = c.send(get("conn-cl").as_bytes()).await;
    assert_eq!((a.status, &a.body[..]), (200, &b"hello"[..]), "{a:?}");
    assert_eq!(a.header("content-length"), ["5"]);
    assert!(!a.closed);
    let a = c.send(b"GET /raw/next HTTP/1.1\r\nHost: raw\r\n\r\n").await;
    assert_eq!(a.status, 200, "keep-alive after it: {a:?}");

    // both framings with response splitting behind (vtc s1 #4): chunked wins, the rest is dropped
    // with the instance's connection
    b.script(
        "cl-te",
        b"HTTP/1.1 200 Ok\r\nTransfer-Encoding: chunked\r\nContent-Length: 30\r\n\r\n0\r\n\r\nResponse splitting attach",
        After::KeepOpen,
    );
    let mut c = Client::connect(port).await;
    let a = c.send(get("cl-te").as_bytes()).await;
    assert_eq!((a.status, a.body.len()), (200, 0), "{a:?}");
    assert!(a.header("content-length").is_empty(), "{a:?}");
    let conns = b.connections();
    let a = c
        .send(b"GET /raw/after-split HTTP/1.1\r\nHost: raw\r\n\r\n")
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(!String::from_utf8_lossy(&a.body).contains("splitting"));
    assert_eq!(
        b.connections(),
        conns + 1,
        "the split connection was reused"
    );

    // bad responses: 502
    let bad: [(&str, &[u8]); 7] = [
        (
            "te-10",
            b"HTTP/1.0 200 Ok\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "te-gzip",
            b"HTTP/1.1 200 Ok\r\nTransfer-Encoding: gzip\r\n\r\nxx",
        ),
        (
            "te-twice",
            b"HTTP/1.1 200 Ok\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "cl-huge",
            b"HTTP/1.1 200 Ok\r\nContent-Length: 10000000000000000000\r\n\r\n",
        ),
        (
            "cl-two",
            b"HTTP/1.1 200 Ok\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        ),
        (
            "bad-chunk",
            b"HTTP/1.1 200 Ok\r\nTransfer-Encoding: chunked\r\n\r\n2\nab\r\n0\r\n\r\n",
        ),
        (
            "obs-fold",
            b"HTTP/1.1 200 Ok\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
        ),
    ];
    for (name, script) in bad {
        b.script(name, script, After::KeepOpen);
        let a = once(port, get(name).as_bytes()).await;
        assert_eq!(a.status, 502, "{name}: {a:?}");
    }

    // finding 5: a 101 to a request that did not ask to upgrade is a 502, and neither connection
    // carries the instance's post-switch bytes to anyone
    b.script(
        "switch",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nPOST-SWITCH-BYTES",
        After::KeepOpen,
    );
    let mut c = Client::connect(port).await;
    let a = c.send(get("switch").as_bytes()).await;
    assert_eq!(a.status, 502, "{a:?}");
    assert!(a.closed, "client connection kept after a stray 101");
    for i in 0..4 {
        let a = once(
            port,
            format!("GET /raw/clean-{i} HTTP/1.1\r\nHost: raw\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(a.status, 200);
        assert!(
            !String::from_utf8_lossy(&a.body).contains("POST-SWITCH"),
            "{a:?}"
        );
    }

    // interim answers are skipped, and bounded
    let few = [
        &b"HTTP/1.1 100 Continue\r\n\r\n".repeat(3)[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ]
    .concat();
    b.script("few-1xx", &few, After::KeepOpen);
    assert_eq!(once(port, get("few-1xx").as_bytes()).await.status, 200);
    let many = [
        &b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n".repeat(40)[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ]
    .concat();
    b.script("many-1xx", &many, After::KeepOpen);
    assert_eq!(once(port, get("many-1xx").as_bytes()).await.status, 502);

    // response trailers are filtered like request trailers
    b.script(
        "trailers",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x=1\r\nok\r\n0\r\nSet-Cookie: s=1\r\nServer-Timing: db;dur=5\r\nContent-Length: 5\r\n\r\n",
        After::KeepOpen,
    );
    let mut c = Client::connect(port).await;
    c.s.write_all(get("trailers").as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    while !raw.ends_with(b"\r\n\r\n") || raw.windows(3).filter(|w| w == b"0\r\n").count() == 0 {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), c.s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.ends_with("\r\n\r\n2\r\nok\r\n0\r\nServer-Timing: db;dur=5\r\n\r\n"),
        "{text:?}"
    );

    // a body delimited by the instance's close is chunked for an HTTP/1.1 client, whose
    // connection stays open
    b.script(
        "until-close",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it",
        After::Close,
    );
    let mut c = Client::connect(port).await;
    let a = c.send(get("until-close").as_bytes()).await;
    assert_eq!((a.status, &a.body[..]), (200, &b"all of it"[..]), "{a:?}");
    assert_eq!(a.header("transfer-encoding"), ["chunked"]);
    assert!(!a.closed);
    assert_eq!(
        c.send(b"GET /raw/x HTTP/1.1\r\nHost: raw\r\n\r\n")
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_may_have_reached_an_instance_is_sent_again_only_when_idempotent() {
    let (_etcd, proxy, b) = setup("").await;
    // finding 6: /drop-second answers the first request on a connection, then reads the next
    // one and closes without answering. One client connection, so both go through one proxy
    // thread and the second finds the first's pooled connection.
    let mut c = Client::connect(proxy.port).await;
    assert_eq!(
        c.send(b"GET /raw/drop-second/warm HTTP/1.1\r\nHost: raw\r\n\r\n")
            .await
            .status,
        200
    );
    let a = c
        .send(b"POST /raw/drop-second/post HTTP/1.1\r\nHost: raw\r\nContent-Length: 4\r\n\r\nonce")
        .await;
    assert_eq!(a.status, 502, "{a:?}");
    assert_eq!(
        b.seen_at("/drop-second/post").len(),
        1,
        "the POST was sent twice"
    );

    let mut c = Client::connect(proxy.port).await;
    assert_eq!(
        c.send(b"GET /raw/drop-second/warm2 HTTP/1.1\r\nHost: raw\r\n\r\n")
            .await
            .status,
        200
    );
    let a = c
        .send(b"GET /raw/drop-second/get HTTP/1.1\r\nHost: raw\r\n\r\n")
        .await;
    assert_eq!(a.status, 200, "an idempotent request is sent again: {a:?}");
    assert_eq!(b.seen_at("/drop-second/get").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_answers_reach_the_client_during_an_upload() {
    let (_etcd, proxy, b) = setup("").await;
    // finding 8: the instance answers 413 after the head and closes; the client is still sending
    for size in [1usize << 20, 50 << 20] {
        let c = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        let (mut rd, mut wr) = c.into_split();
        let head =
            format!("POST /raw/early HTTP/1.1\r\nHost: raw\r\nContent-Length: {size}\r\n\r\n");
        let writer = tokio::spawn(async move {
            wr.write_all(head.as_bytes()).await.ok();
            let piece = vec![b'x'; 64 * 1024];
            let mut sent = 0;
            while sent < size {
                let n = piece.len().min(size - sent);
                if wr.write_all(&piece[..n]).await.is_err() {
                    break;
                }
                sent += n;
            }
        });
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match rd.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        writer.abort();
        let text = String::from_utf8_lossy(&got);
        assert!(
            read.is_ok(),
            "{size}: connection not closed after the early answer: {text:?}"
        );
        assert!(text.starts_with("HTTP/1.1 413 "), "{size}: {text:?}");
        assert!(text.ends_with("too large"), "{size}: {text:?}");
    }

    // full duplex: the instance echoes each piece of the body while it still reads the rest
    let mut c = Client::connect(proxy.port).await;
    c.s.write_all(b"POST /raw/duplex HTTP/1.1\r\nHost: raw\r\nContent-Length: 3000\r\n\r\n")
        .await
        .unwrap();
    let mut echoed = 0;
    for piece in 0..3u8 {
        c.s.write_all(&[b'a' + piece; 1000]).await.unwrap();
        let want = (piece as usize + 1) * 1000;
        let started = Instant::now();
        while echoed < want {
            assert!(c.more().await, "closed during the exchange");
            echoed = c.buf.iter().filter(|b| (b'a'..=b'c').contains(b)).count();
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "piece {piece} not echoed"
            );
        }
    }
    let a = c.answer().await;
    assert_eq!((a.status, a.body.len()), (200, 3000), "{:?}", a.head);
    assert_eq!(b.seen_at("/duplex").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_have_a_total_deadline_and_tunnels_an_idle_one() {
    let (_etcd, proxy, b) =
        setup("request_header_timeout_ms = 1000\ntunnel_idle_timeout_ms = 500\n").await;
    // finding 7: a head dripped a field at a time, each well within the per-read timeout
    let mut c = Client::connect(proxy.port).await;
    let started = Instant::now();
    c.s.write_all(b"GET /raw/slow HTTP/1.1\r\nHost: raw\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    for i in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if c.s
            .write_all(format!("X-{i}: v\r\n").as_bytes())
            .await
            .is_err()
        {
            break;
        }
        let mut chunk = [0u8; 1024];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(1), c.s.read(&mut chunk)).await
        {
            answer.push_str(&String::from_utf8_lossy(&chunk[..n]));
            break;
        }
    }
    answer.push_str(&c.rest().await);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "408 after {:?}",
        started.elapsed()
    );
    assert!(b.seen_at("/slow").is_empty());

    // an upgraded connection with no traffic is closed after tunnel_idle_timeout_ms
    b.script(
        "ws",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        After::KeepOpen,
    );
    let mut c = Client::connect(proxy.port).await;
    let a = c
        .send(b"GET /raw/script/ws HTTP/1.1\r\nHost: raw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await;
    assert_eq!(a.status, 101, "{a:?}");
    let started = Instant::now();
    let rest = c.rest().await;
    assert!(rest.is_empty(), "{rest:?}");
    let idle = started.elapsed();
    assert!(
        idle >= Duration::from_millis(400) && idle < Duration::from_secs(5),
        "tunnel closed after {idle:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_comes_back_through_another_proxy_is_a_loop() {
    let (etcd, proxy, b) = setup("").await;
    // an instance that is another proxy in front of this one: a plain TCP relay
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let port = proxy.port;
    let relayed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = relayed.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = relay.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                if let Ok(mut out) = TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    etcd.put("/services/loop/1", relay_addr.to_string()).await;
    proxy.wait_usable("loop", 1).await;
    let a = once(port, b"GET /x HTTP/1.1\r\nHost: loop\r\n\r\n").await;
    assert_eq!(a.status, 508, "{a:?}");
    assert!(String::from_utf8_lossy(&a.body).contains("loop"), "{a:?}");
    assert_eq!(
        relayed.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the request went round more than once"
    );
    // the instance saw this proxy's name in Via, once
    let a = once(
        port,
        b"GET /raw/via HTTP/1.1\r\nHost: x\r\nVia: 1.0 edge\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 200);
    let seen = &b.seen_at("/via")[0];
    let via = seen.header("via");
    assert_eq!(via.len(), 2, "{via:?}");
    assert_eq!(via[0], "1.0 edge");
    assert!(via[1].starts_with("1.1 switchyard-"), "{via:?}");
}

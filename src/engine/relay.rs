//! Relaying an instance's response to the client: its head (interim answers skipped and bounded,
//! a 101 only for an upgrade request), then its body re-framed by the proxy, and the byte tunnel
//! after an upgrade.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::atomic::{AtomicBool, AtomicU16};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::exchange::{read_first, UpstreamError};
use super::request::Head;
use super::{read_more, send, timer, ClientIo, Conn, UPSTREAM_BUF};
use crate::config::ProxyConfig;
use crate::http1::{
    self, BodyOut, ClientConnection, Framing, HeadError, OutFraming, Reframe, MAX_HEAD,
    MAX_HEADERS, MAX_INTERIM,
};
use crate::routing::outlier::{self, Answer};
use crate::routing::{Instance, Service};
use timer::timed;

/// What one response needs to know of its request and of the exchange so far.
pub(super) struct Relay<'a> {
    pub cfg: &'a ProxyConfig,
    pub head: &'a Head,
    pub service: &'a Service,
    pub inst: &'a Instance,
    /// When the request was sent (upstream latency).
    pub started: Instant,
    pub shutting_down: bool,
    /// The status whose head went to the client, once it did (0 before). Atomics only because
    /// the connection's future must be `Send`: one task reads and writes them.
    pub sent: &'a AtomicU16,
    /// The whole request body reached the instance.
    pub body_sent: &'a AtomicBool,
    /// The request may go to another instance if the answer's status is one `retry_on` lists.
    pub retry: Option<&'a super::exchange::Attempt>,
}

/// How a relayed response ended.
pub(super) struct Relayed {
    pub status: u16,
    /// The client connection can carry another request (as far as the response goes).
    pub client_keep: bool,
    /// The instance's connection can carry another request.
    pub upstream_reusable: bool,
    /// 101 to an upgrade request: the tunnel's first bytes from the instance are
    /// `rbuf[from..to]`.
    pub upgrade: Option<(usize, usize)>,
}

/// What the response head decided, kept after its borrow of the read buffer ends.
struct RespFacts {
    status: u16,
    framing: Framing,
    body_out: BodyOut,
    /// The instance allows another request on this connection.
    upstream_keep: bool,
    mode: ClientConnection,
    /// Offset of the body in the upstream read buffer.
    body_start: usize,
}

impl Relay<'_> {
    /// Reads the response from `up` (`have`: bytes of it already in `rbuf`, else its first read is
    /// bounded by the read timeout) and writes it to `client`.
    pub async fn run<R, W>(
        &self,
        up: &mut R,
        client: &mut W,
        rbuf: &mut Vec<u8>,
        out: &mut Vec<u8>,
        have: Option<usize>,
    ) -> Result<Relayed, UpstreamError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let cfg = self.cfg;
        if have.is_none() {
            read_first(up, rbuf, cfg.read_timeout, None).await?;
        }
        let facts = self.read_head(up, rbuf, out).await?;
        crate::health::passive_success(self.service, self.inst);
        let first_byte = self.started.elapsed();
        self.inst.state.observe_latency(first_byte);
        self.service
            .metrics()
            .upstream
            .observe(first_byte.as_secs_f64());
        let status = facts.status;

        // the body: whatever is buffered goes out in the same write as the head
        let mut body = Reframe::new(facts.framing, facts.body_out);
        out.reserve(rbuf.len() - facts.body_start);
        let used = body
            .feed(&rbuf[facts.body_start..], out)
            .map_err(UpstreamError::BadResponseBody)?;
        // bytes after the end of the response mean the instance broke framing: never reused
        let mut extra = facts.body_start + used < rbuf.len();
        self.sent.store(status, Ordering::Relaxed);
        timed(cfg.write_timeout, send(client, out))
            .await
            .map_err(UpstreamError::Client)?;
        if facts.mode == ClientConnection::Upgrade {
            return Ok(Relayed {
                status,
                client_keep: false,
                upstream_reusable: false,
                upgrade: Some((facts.body_start, rbuf.len())),
            });
        }
        while !body.done() && !extra {
            rbuf.clear();
            out.clear();
            let n = match timed(cfg.read_timeout, up.read_buf(rbuf)).await {
                Ok(0) => {
                    body.eof(out).map_err(|_| {
                        let e =
                            io::Error::new(io::ErrorKind::UnexpectedEof, "response body cut short");
                        UpstreamError::Broken(e)
                    })?;
                    0
                }
                Ok(n) => n,
                Err(e) => return Err(UpstreamError::Broken(e)),
            };
            if n > 0 {
                let used = body
                    .feed(&rbuf[..n], out)
                    .map_err(UpstreamError::BadResponseBody)?;
                extra = used < n;
            }
            if !out.is_empty() {
                timed(cfg.write_timeout, send(client, out))
                    .await
                    .map_err(UpstreamError::Client)?;
            }
        }
        let complete = body.done();
        Ok(Relayed {
            status,
            client_keep: complete && mode_keeps(facts.mode),
            upstream_reusable: facts.upstream_keep && complete && !extra && !body.until_close(),
            upgrade: None,
        })
    }

    /// Reads and checks the final response head (interim answers are not relayed) and writes the
    /// client's head into `out`.
    async fn read_head<R: AsyncRead + Unpin>(
        &self,
        up: &mut R,
        rbuf: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<RespFacts, UpstreamError> {
        let head = self.head;
        let mut start_at = 0;
        let mut interim = 0;
        loop {
            {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let parsed =
                    http1::parse_response(&rbuf[start_at..], &mut headers, head.head_request);
                match parsed {
                    Ok(Some(r)) if (100..200).contains(&r.status) && r.status != 101 => {
                        interim += 1;
                        if interim > MAX_INTERIM {
                            let e = HeadError::Invalid("too many interim (1xx) responses");
                            return Err(UpstreamError::BadResponse(e));
                        }
                        start_at += r.head_len;
                        if start_at < rbuf.len() {
                            continue;
                        }
                    }
                    Ok(Some(r)) if r.status == 101 && !head.upgrade => {
                        // the instance switched protocols on a connection we would pool or the
                        // client would reuse: neither is (RFC 9110 §15.2.2)
                        let e = HeadError::Invalid("101 to a request that did not ask to upgrade");
                        return Err(UpstreamError::BadResponse(e));
                    }
                    Ok(Some(r)) => {
                        outlier::observe(self.service, self.inst, Answer::Status(r.status));
                        // checked before the client's head is written over the request in `out`
                        if let Some(attempt) = self.retry {
                            if self.service.traffic.retry.on.status(r.status)
                                && attempt.can_retry(self.service, self.cfg.max_tries)
                            {
                                return Err(UpstreamError::Answered(r.status));
                            }
                        }
                        let body_pending = !self.body_sent.load(Ordering::Relaxed);
                        let facts = client_head(out, self.shutting_down || body_pending, head, &r);
                        return Ok(RespFacts {
                            body_start: start_at + r.head_len,
                            ..facts
                        });
                    }
                    Ok(None) => {}
                    Err(e) => return Err(UpstreamError::BadResponse(e)),
                }
            }
            // more bytes needed for the head
            rbuf.drain(..start_at);
            start_at = 0;
            let more = read_more(up, rbuf, UPSTREAM_BUF, MAX_HEAD);
            match timed(self.cfg.read_timeout, more).await {
                Ok(Some(0)) => {
                    let e = HeadError::Invalid("connection closed inside the response head");
                    return Err(UpstreamError::BadResponse(e));
                }
                Ok(Some(_)) => {}
                // MAX_HEAD bytes and no end of the head
                Ok(None) => return Err(UpstreamError::BadResponse(HeadError::TooLarge)),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Err(UpstreamError::Timeout)
                }
                Err(e) => return Err(UpstreamError::NoResponse(e)),
            }
        }
    }
}

/// Decides how the response goes to the client (`close`: it must end the connection) and writes
/// its head into `out`.
fn client_head(out: &mut Vec<u8>, close: bool, head: &Head, r: &http1::Response<'_>) -> RespFacts {
    let (framing_out, body_out) = http1::response_out(r.framing, head.http10);
    let mode = if r.status == 101 && head.upgrade {
        ClientConnection::Upgrade
    } else if !head.keep_alive || close || framing_out == OutFraming::Close {
        ClientConnection::Close
    } else if head.http10 {
        ClientConnection::KeepAlive10
    } else {
        ClientConnection::KeepAlive11
    };
    r.write_client_head(out, mode, framing_out);
    RespFacts {
        status: r.status,
        framing: r.framing,
        body_out,
        upstream_keep: r.keep_alive,
        mode,
        body_start: r.head_len,
    }
}

fn mode_keeps(mode: ClientConnection) -> bool {
    matches!(
        mode,
        ClientConnection::KeepAlive10 | ClientConnection::KeepAlive11
    )
}

/// After 101 Switching Protocols: bytes both ways until both sides closed, or neither sent
/// anything for `idle`.
pub(super) async fn tunnel<S: ClientIo>(
    conn: &mut Conn<S>,
    mut up: TcpStream,
    from: usize,
    to: usize,
    idle: Duration,
) {
    if to > from
        && send(&mut conn.client.io, &conn.rbuf[from..to])
            .await
            .is_err()
    {
        return;
    }
    if conn.client.len() > 0 {
        let pending = std::mem::take(&mut conn.client.buf);
        if up.write_all(&pending).await.is_err() {
            return;
        }
    }
    let (mut cr, mut cw) = ClientIo::split(&mut conn.client.io);
    let (mut ur, mut uw) = up.split();
    let mut to_up = vec![0u8; 16 * 1024];
    let mut to_client = vec![0u8; 16 * 1024];
    let (mut client_open, mut up_open) = (true, true);
    while client_open || up_open {
        let step = timed(idle, async {
            tokio::select! {
                r = cr.read(&mut to_up), if client_open => r.map(|n| (true, n)),
                r = ur.read(&mut to_client), if up_open => r.map(|n| (false, n)),
            }
        })
        .await;
        let written = match step {
            Err(_) => return,
            Ok((true, 0)) => {
                client_open = false;
                uw.shutdown().await
            }
            Ok((false, 0)) => {
                up_open = false;
                cw.shutdown().await
            }
            Ok((true, n)) => timed(idle, uw.write_all(&to_up[..n])).await,
            Ok((false, n)) => timed(idle, cw.write_all(&to_client[..n])).await,
        };
        if written.is_err() {
            return;
        }
    }
}

//! HTTP/1.x message heads and body framing for the native engine.
//!
//! Heads are parsed with `httparse` straight out of the connection's read buffer (no per-header
//! allocation) and re-serialised into a reusable output buffer with the proxy's header rules:
//! hop-by-hop headers and those named in `Connection` are dropped, `X-Forwarded-*` are set, and
//! the message is framed by exactly one of `Content-Length` or `Transfer-Encoding: chunked`
//! (RFC 9112 §6: a message with both is framed by chunked and the length is dropped; differing
//! lengths or an unknown transfer coding are refused, so a request cannot be read two ways).

use std::fmt;

/// Largest request or response head accepted (request line/status line and all headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one head.
pub const MAX_HEADERS: usize = 128;

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (a request without length, HEAD answers, 1xx/204/304).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Response body delimited by the upstream closing the connection.
    UntilClose,
}

impl Framing {
    pub fn is_empty(self) -> bool {
        matches!(self, Framing::Empty | Framing::Length(0))
    }
}

/// Why a head was refused; each maps to a status for the client (requests) or 502 (responses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// Syntax error from the parser, or a value we cannot honour.
    Invalid(&'static str),
    /// More than [`MAX_HEAD`] bytes or [`MAX_HEADERS`] fields.
    TooLarge,
    /// A transfer coding other than chunked.
    UnsupportedCoding,
}

impl HeadError {
    /// Status answered to a client whose request head has this problem.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::Invalid(_) => 400,
            HeadError::TooLarge => 431,
            HeadError::UnsupportedCoding => 501,
        }
    }
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::Invalid(why) => write!(f, "malformed message head: {why}"),
            HeadError::TooLarge => write!(
                f,
                "message head larger than {MAX_HEAD} bytes or {MAX_HEADERS} fields"
            ),
            HeadError::UnsupportedCoding => write!(f, "transfer coding other than chunked"),
        }
    }
}

impl From<httparse::Error> for HeadError {
    fn from(e: httparse::Error) -> HeadError {
        match e {
            httparse::Error::TooManyHeaders => HeadError::TooLarge,
            httparse::Error::HeaderName => HeadError::Invalid("invalid header name"),
            httparse::Error::HeaderValue => HeadError::Invalid("invalid header value"),
            httparse::Error::NewLine => HeadError::Invalid("invalid line ending"),
            httparse::Error::Status => HeadError::Invalid("invalid status"),
            httparse::Error::Token => HeadError::Invalid("invalid token"),
            httparse::Error::Version => HeadError::Invalid("invalid HTTP version"),
        }
    }
}

/// Header names that describe one hop and never pass through (RFC 9110 §7.6.1), besides those a
/// message names in `Connection`. `Upgrade` is re-added for an upgrade request.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// What the connection header and framing headers of one message say.
#[derive(Debug, Default)]
struct ConnectionInfo<'a> {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    /// Header names nominated by `Connection` (other than the tokens above).
    nominated: smallvec::SmallVec<[&'a [u8]; 4]>,
    length: Option<u64>,
    chunked: bool,
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end]
}

fn parse_length(v: &[u8]) -> Option<u64> {
    let v = trim(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn connection_info<'a>(headers: &[httparse::Header<'a>]) -> Result<ConnectionInfo<'a>, HeadError> {
    let mut info = ConnectionInfo::default();
    for h in headers {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"connection") {
            for token in h.value.split(|b| *b == b',').map(trim) {
                if token.eq_ignore_ascii_case(b"close") {
                    info.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    info.keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    info.upgrade = true;
                } else if !token.is_empty() {
                    info.nominated.push(token);
                }
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            // a list of identical values is allowed (RFC 9110 §8.6); different ones are not
            for value in h.value.split(|b| *b == b',') {
                let n = parse_length(value).ok_or(HeadError::Invalid("invalid content-length"))?;
                if info.length.is_some_and(|prev| prev != n) {
                    return Err(HeadError::Invalid("conflicting content-length"));
                }
                info.length = Some(n);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let codings: smallvec::SmallVec<[&[u8]; 2]> = h
                .value
                .split(|b| *b == b',')
                .map(trim)
                .filter(|c| !c.is_empty())
                .collect();
            match codings.as_slice() {
                [only] if only.eq_ignore_ascii_case(b"chunked") && !info.chunked => {
                    info.chunked = true
                }
                _ => return Err(HeadError::UnsupportedCoding),
            }
        }
    }
    Ok(info)
}

/// Whether a header must not be forwarded as-is.
fn is_hop(name: &[u8], info: &ConnectionInfo<'_>) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
        || info.nominated.iter().any(|n| name.eq_ignore_ascii_case(n))
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A parsed request head: the facts the proxy needs, borrowed from the read buffer.
#[derive(Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// Origin-form target (`/path?query`); an absolute-form target is reduced to it.
    pub target: &'a str,
    /// `Host` header, or the authority of an absolute-form target.
    pub host: Option<&'a str>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub framing: Framing,
    /// The client wants the connection kept after this request.
    pub keep_alive: bool,
    /// `Connection: upgrade` with an `Upgrade` header (e.g. WebSocket).
    pub upgrade: Option<&'a [u8]>,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// Bytes of the head in the buffer.
    pub head_len: usize,
    headers: &'a [httparse::Header<'a>],
    info: ConnectionInfo<'a>,
}

/// Parses a request head at the start of `buf`. `Ok(None)`: incomplete, read more.
pub fn parse_request<'h, 'b: 'h>(
    buf: &'b [u8],
    headers: &'h mut [httparse::Header<'b>; MAX_HEADERS],
) -> Result<Option<Request<'h>>, HeadError> {
    let mut req = httparse::Request::new(headers);
    let head_len = match req.parse(buf)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
        httparse::Status::Partial => return Ok(None),
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Invalid("incomplete request line"));
    };
    let headers: &'h [httparse::Header<'b>] = req.headers;
    let info = connection_info(headers)?;
    let mut host = headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("host"))
        .and_then(|h| std::str::from_utf8(trim(h.value)).ok());
    let mut target = path;
    if let Some(rest) = path
        .strip_prefix("http://")
        .or_else(|| path.strip_prefix("https://"))
    {
        let (authority, origin) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
        host = Some(authority);
        target = origin;
    } else if !path.starts_with('/') && path != "*" && method != "CONNECT" {
        return Err(HeadError::Invalid("request target is not a path"));
    }
    if version == 1 && host.is_none() {
        return Err(HeadError::Invalid("HTTP/1.1 request without Host"));
    }
    let framing = if info.chunked {
        Framing::Chunked
    } else {
        info.length.map_or(Framing::Empty, Framing::Length)
    };
    let keep_alive = if version == 1 {
        !info.close
    } else {
        info.keep_alive && !info.close
    };
    let upgrade = if info.upgrade {
        headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("upgrade"))
            .map(|h| h.value)
    } else {
        None
    };
    let expect_continue = headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("expect") && trim(h.value).eq_ignore_ascii_case(b"100-continue")
    });
    Ok(Some(Request {
        method,
        target,
        host,
        version,
        framing,
        keep_alive,
        upgrade,
        expect_continue,
        head_len,
        headers,
        info,
    }))
}

impl Request<'_> {
    pub fn is_idempotent(&self) -> bool {
        matches!(
            self.method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        )
    }

    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }

    /// Writes the head to send upstream into `out` (cleared first): the request line with `target`
    /// (possibly rewritten), the end-to-end headers, and X-Forwarded-For/-Proto/-Host.
    pub fn write_upstream_head(&self, out: &mut Vec<u8>, target: &str, client_ip: &str) {
        out.clear();
        out.reserve(self.head_len + 192);
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let mut xff: Option<&[u8]> = None;
        let mut host_seen = false;
        for h in self.headers {
            let name = h.name.as_bytes();
            if is_hop(name, &self.info)
                || name.eq_ignore_ascii_case(b"expect")
                || name.eq_ignore_ascii_case(b"x-forwarded-proto")
                || name.eq_ignore_ascii_case(b"x-forwarded-host")
                || (self.info.chunked
                    && (name.eq_ignore_ascii_case(b"content-length")
                        || name.eq_ignore_ascii_case(b"transfer-encoding")))
            {
                continue;
            }
            if name.eq_ignore_ascii_case(b"x-forwarded-for") {
                let v = trim(h.value);
                if !v.is_empty() {
                    xff = Some(v);
                }
                continue;
            }
            host_seen |= name.eq_ignore_ascii_case(b"host");
            push_header(out, name, h.value);
        }
        if !host_seen {
            if let Some(host) = self.host {
                push_header(out, b"Host", host.as_bytes());
            }
        }
        if self.info.chunked {
            push_header(out, b"Transfer-Encoding", b"chunked");
        }
        if let Some(proto) = self.upgrade {
            push_header(out, b"Connection", b"upgrade");
            push_header(out, b"Upgrade", proto);
        }
        out.extend_from_slice(b"X-Forwarded-For: ");
        if let Some(prev) = xff {
            out.extend_from_slice(prev);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(client_ip.as_bytes());
        out.extend_from_slice(b"\r\nX-Forwarded-Proto: http\r\n");
        if let Some(host) = self.host {
            push_header(out, b"X-Forwarded-Host", host.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// A parsed response head, borrowed from the upstream read buffer.
#[derive(Debug)]
pub struct Response<'a> {
    pub status: u16,
    pub reason: &'a str,
    pub version: u8,
    /// Body framing given the request method.
    pub framing: Framing,
    /// The upstream allows reusing this connection after the body.
    pub keep_alive: bool,
    pub head_len: usize,
    headers: &'a [httparse::Header<'a>],
    info: ConnectionInfo<'a>,
}

/// Parses a response head at the start of `buf`. `head_request`: the request was HEAD, so the
/// response has no body whatever its headers say.
pub fn parse_response<'h, 'b: 'h>(
    buf: &'b [u8],
    headers: &'h mut [httparse::Header<'b>; MAX_HEADERS],
    head_request: bool,
) -> Result<Option<Response<'h>>, HeadError> {
    let mut resp = httparse::Response::new(headers);
    let head_len = match resp.parse(buf)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
        httparse::Status::Partial => return Ok(None),
    };
    let (Some(status), Some(version)) = (resp.code, resp.version) else {
        return Err(HeadError::Invalid("incomplete status line"));
    };
    let headers: &'h [httparse::Header<'b>] = resp.headers;
    let info = connection_info(headers)?;
    let framing = if head_request || status < 200 || status == 204 || status == 304 {
        Framing::Empty
    } else if info.chunked {
        Framing::Chunked
    } else {
        info.length.map_or(Framing::UntilClose, Framing::Length)
    };
    let keep_alive = framing != Framing::UntilClose
        && if version == 1 {
            !info.close
        } else {
            info.keep_alive && !info.close
        };
    Ok(Some(Response {
        status,
        reason: resp.reason.unwrap_or(""),
        version,
        framing,
        keep_alive,
        head_len,
        headers,
        info,
    }))
}

/// How the response goes out to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientConnection {
    /// HTTP/1.1 client, connection stays open: no header needed.
    KeepAlive11,
    /// HTTP/1.0 client that asked for keep-alive: `Connection: keep-alive`.
    KeepAlive10,
    /// `Connection: close`, then close.
    Close,
    /// 101 Switching Protocols: `Connection: upgrade` and the `Upgrade` header pass through.
    Upgrade,
}

impl Response<'_> {
    /// Writes the head for the client into `out` (cleared first). `dechunk`: the body will be
    /// sent de-chunked and close-delimited (an HTTP/1.0 client cannot read chunked).
    pub fn write_client_head(&self, out: &mut Vec<u8>, conn: ClientConnection, dechunk: bool) {
        out.clear();
        out.reserve(self.head_len + 32);
        out.extend_from_slice(b"HTTP/1.1 ");
        let s = self.status;
        out.extend_from_slice(&[
            b'0' + (s / 100 % 10) as u8,
            b'0' + (s / 10 % 10) as u8,
            b'0' + (s % 10) as u8,
        ]);
        out.push(b' ');
        out.extend_from_slice(self.reason.as_bytes());
        out.extend_from_slice(b"\r\n");
        for h in self.headers {
            let name = h.name.as_bytes();
            let keep_upgrade =
                conn == ClientConnection::Upgrade && name.eq_ignore_ascii_case(b"upgrade");
            if (is_hop(name, &self.info) && !keep_upgrade)
                || (dechunk && name.eq_ignore_ascii_case(b"transfer-encoding"))
                || (self.info.chunked && name.eq_ignore_ascii_case(b"content-length"))
            {
                continue;
            }
            push_header(out, name, h.value);
        }
        match conn {
            ClientConnection::KeepAlive11 => {}
            ClientConnection::KeepAlive10 => push_header(out, b"Connection", b"keep-alive"),
            ClientConnection::Close => push_header(out, b"Connection", b"close"),
            ClientConnection::Upgrade => push_header(out, b"Connection", b"upgrade"),
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Incremental `Transfer-Encoding: chunked` framing: finds where a chunked body ends in a byte
/// stream, optionally decoding the data. Chunk extensions and trailers are passed over.
#[derive(Debug, Clone, Default)]
pub struct Chunked {
    state: ChunkState,
    size: u64,
    digits: u8,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// After `;` or whitespace on the size line: skip to LF.
    SizeRest,
    Data,
    DataCr,
    DataLf,
    /// Start of a trailer line (or of the final empty line).
    TrailerStart,
    /// Inside a trailer field: skip to LF.
    TrailerLine,
    /// Saw CR of the final empty line.
    FinalLf,
    Done,
}

impl Chunked {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Bytes of the current chunk still to come (0 outside chunk data).
    pub fn chunk_left(&self) -> u64 {
        if self.state == ChunkState::Data {
            self.size
        } else {
            0
        }
    }

    /// Consumes framing from `input`, stopping at the end of the body. Returns how many bytes of
    /// `input` belong to the body; with `decoded`, the chunk data is appended to it.
    pub fn feed(
        &mut self,
        input: &[u8],
        mut decoded: Option<&mut Vec<u8>>,
    ) -> Result<usize, HeadError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                ChunkState::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        self.digits += 1;
                        if self.digits > 15 {
                            return Err(HeadError::Invalid("chunk size too large"));
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                        self.size = self.size * 16 + d;
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => self.state = ChunkState::SizeRest,
                    b'\r' if self.digits > 0 => self.state = ChunkState::SizeRest,
                    b'\n' if self.digits > 0 => self.end_size_line(),
                    _ => return Err(HeadError::Invalid("invalid chunk size")),
                },
                ChunkState::SizeRest => {
                    if b == b'\n' {
                        self.end_size_line();
                    }
                }
                ChunkState::Data => {
                    let n = (self.size.min((input.len() - i) as u64)) as usize;
                    if let Some(out) = decoded.as_deref_mut() {
                        out.extend_from_slice(&input[i..i + n]);
                    }
                    self.size -= n as u64;
                    i += n;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    continue;
                }
                ChunkState::DataCr => match b {
                    b'\r' => self.state = ChunkState::DataLf,
                    b'\n' => self.state = ChunkState::Size,
                    _ => return Err(HeadError::Invalid("chunk data longer than its size")),
                },
                ChunkState::DataLf => match b {
                    b'\n' => self.state = ChunkState::Size,
                    _ => return Err(HeadError::Invalid("chunk data longer than its size")),
                },
                ChunkState::TrailerStart => match b {
                    b'\r' => self.state = ChunkState::FinalLf,
                    b'\n' => {
                        self.state = ChunkState::Done;
                        return Ok(i + 1);
                    }
                    _ => self.state = ChunkState::TrailerLine,
                },
                ChunkState::TrailerLine => {
                    if b == b'\n' {
                        self.state = ChunkState::TrailerStart;
                    }
                }
                ChunkState::FinalLf => match b {
                    b'\n' => {
                        self.state = ChunkState::Done;
                        return Ok(i + 1);
                    }
                    _ => return Err(HeadError::Invalid("invalid chunked trailer")),
                },
                ChunkState::Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }

    fn end_size_line(&mut self) {
        self.digits = 0;
        if self.size == 0 {
            self.state = ChunkState::TrailerStart;
        } else {
            self.state = ChunkState::Data;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> Result<Option<(Framing, bool, String)>, HeadError> {
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let parsed = parse_request(text.as_bytes(), &mut hs)?.map(|r| {
            let mut out = Vec::new();
            r.write_upstream_head(&mut out, r.target, "10.0.0.1");
            (r.framing, r.keep_alive, String::from_utf8(out).unwrap())
        });
        Ok(parsed)
    }

    #[test]
    fn request_heads_are_rewritten_for_the_upstream() {
        let (framing, keep, head) = req("GET /a?b HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nX-Forwarded-For: 1.2.3.4\r\nAccept: */*\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(framing, Framing::Empty);
        assert!(keep);
        assert_eq!(
            head,
            "GET /a?b HTTP/1.1\r\nHost: svc\r\nAccept: */*\r\nX-Forwarded-For: 1.2.3.4, 10.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: svc\r\n\r\n"
        );
    }

    #[test]
    fn framing_rules() {
        let f = |t: &str| req(t).map(|r| r.map(|(f, k, _)| (f, k)));
        assert_eq!(
            f("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"),
            Ok(Some((Framing::Length(5), true)))
        );
        assert_eq!(
            f("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n"),
            Ok(Some((Framing::Length(5), true)))
        );
        assert_eq!(
            f("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            Err(HeadError::Invalid("conflicting content-length"))
        );
        assert_eq!(
            f("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n"),
            Err(HeadError::Invalid("invalid content-length"))
        );
        assert_eq!(
            f("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Err(HeadError::UnsupportedCoding)
        );
        assert_eq!(
            f("GET / HTTP/1.0\r\n\r\n"),
            Ok(Some((Framing::Empty, false)))
        );
        assert_eq!(
            f("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
            Ok(Some((Framing::Empty, true)))
        );
        assert_eq!(f("GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        assert_eq!(
            f("GET / HTTP/1.1\r\n\r\n"),
            Err(HeadError::Invalid("HTTP/1.1 request without Host"))
        );
        assert!(f("GE\x01T / HTTP/1.1\r\n\r\n").is_err());
        // chunked wins over a length, which is not forwarded
        let (framing, _, head) = req(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(framing, Framing::Chunked);
        assert!(
            !head.to_ascii_lowercase().contains("content-length"),
            "{head}"
        );
        assert!(head.contains("Transfer-Encoding: chunked\r\n"), "{head}");
    }

    #[test]
    fn absolute_targets_become_origin_form() {
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let text = b"GET http://svc.example:8080/x?y HTTP/1.1\r\nHost: other\r\n\r\n";
        let r = parse_request(text, &mut hs).unwrap().unwrap();
        assert_eq!(r.target, "/x?y");
        assert_eq!(r.host, Some("svc.example:8080"));
    }

    #[test]
    fn oversized_heads_are_refused() {
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut text = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
        text.resize(MAX_HEAD + 10, b'a');
        assert_eq!(
            parse_request(&text, &mut hs).unwrap_err(),
            HeadError::TooLarge
        );
    }

    #[test]
    fn response_framing_and_client_head() {
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let text = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-A: b\r\n\r\nhi";
        let r = parse_response(text, &mut hs, false).unwrap().unwrap();
        assert_eq!(
            (r.status, r.framing, r.keep_alive),
            (200, Framing::Length(2), true)
        );
        let mut out = Vec::new();
        r.write_client_head(&mut out, ClientConnection::KeepAlive11, false);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\n"
        );
        r.write_client_head(&mut out, ClientConnection::Close, false);
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with("Connection: close\r\n\r\n"));

        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let r = parse_response(b"HTTP/1.0 200 OK\r\n\r\n", &mut hs, false)
            .unwrap()
            .unwrap();
        assert_eq!((r.framing, r.keep_alive), (Framing::UntilClose, false));
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
            &mut hs,
            true,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.framing, Framing::Empty);
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let r = parse_response(b"HTTP/1.1 304 Not Modified\r\n\r\n", &mut hs, false)
            .unwrap()
            .unwrap();
        assert_eq!((r.framing, r.keep_alive), (Framing::Empty, true));
    }

    #[test]
    fn chunked_bodies_end_where_the_framing_says() {
        let body = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        // whole, and split at every position, raw and decoded
        for split in 0..body.len() {
            let mut c = Chunked::default();
            let mut out = Vec::new();
            let a = c.feed(&body[..split], Some(&mut out)).unwrap();
            assert_eq!(a, split.min(body.len() - 4));
            let b = c.feed(&body[a..], Some(&mut out)).unwrap();
            assert!(c.is_done(), "split {split}");
            assert_eq!(a + b, body.len() - 4, "split {split}");
            assert_eq!(out, b"Wikipedia");
        }
        let mut c = Chunked::default();
        assert!(c.feed(b"zz\r\n", None).is_err());
        let mut c = Chunked::default();
        assert!(c.feed(b"2\r\nabc\r\n", None).is_err());
        let mut c = Chunked::default();
        assert!(c.feed(b"ffffffffffffffffff\r\n", None).is_err());
    }
}

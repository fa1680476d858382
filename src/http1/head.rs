//! Request and response heads: parsed with `httparse` straight out of a read buffer (no
//! per-header allocation), checked against the rules in [`super`], and written again with the
//! proxy's own framing headers.

use std::borrow::Cow;
use std::fmt;

use super::{
    is_framing, is_hop_by_hop, trim, Framing, MAX_FIELDS, MAX_HEAD, MAX_HEADERS, MAX_LENGTH,
};

/// Why a head was refused; each maps to a status for the client (requests) or 502 (responses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// Syntax error from the parser, or a value that cannot be honoured or read one way only.
    Invalid(&'static str),
    /// More than [`MAX_HEAD`] bytes or [`MAX_FIELDS`] fields.
    TooLarge,
    /// A transfer coding other than chunked before the final chunked (RFC 9112 §6.1: 501).
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
                "message head larger than {MAX_HEAD} bytes or {MAX_FIELDS} fields"
            ),
            HeadError::UnsupportedCoding => write!(f, "transfer coding other than chunked"),
        }
    }
}

impl std::error::Error for HeadError {}

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

/// What the `Connection` and framing header fields of one message say.
#[derive(Debug, Default)]
struct FieldInfo<'a> {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    /// Header names nominated by `Connection` (other than the tokens above).
    nominated: smallvec::SmallVec<[&'a [u8]; 4]>,
    length: Option<u64>,
    /// `Transfer-Encoding` present (it then ends in chunked, else the head was refused).
    chunked: bool,
    hosts: u8,
    host: Option<&'a [u8]>,
    /// `TE` lists `trailers` (the client accepts trailer fields).
    te_trailers: bool,
}

/// Parses a `Content-Length` list element: digits only, at most [`MAX_LENGTH`].
fn parse_length(v: &[u8]) -> Option<u64> {
    let v = trim(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(v).ok()?.parse().ok()?;
    (n <= MAX_LENGTH).then_some(n)
}

/// The length of a complete head within the limits; `None` while it is incomplete.
fn head_length(
    status: httparse::Status<usize>,
    buffered: usize,
) -> Result<Option<usize>, HeadError> {
    match status {
        httparse::Status::Complete(n) if n <= MAX_HEAD => Ok(Some(n)),
        httparse::Status::Partial if buffered < MAX_HEAD => Ok(None),
        _ => Err(HeadError::TooLarge),
    }
}

fn field_info<'a>(headers: &[httparse::Header<'a>]) -> Result<FieldInfo<'a>, HeadError> {
    if headers.len() > MAX_FIELDS {
        return Err(HeadError::TooLarge);
    }
    let mut info = FieldInfo::default();
    // transfer codings over every Transfer-Encoding line, in order (RFC 9110 §5.3: one list)
    let mut codings = 0usize;
    let mut chunked_at = None;
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
            // RFC 9110 §8.6: a list of identical values may be read as one; anything else is an
            // unrecoverable framing error (RFC 9112 §6.3 item 5)
            let mut any = false;
            for value in h.value.split(|b| *b == b',') {
                let n = parse_length(value).ok_or(HeadError::Invalid("invalid content-length"))?;
                if info.length.is_some_and(|prev| prev != n) {
                    return Err(HeadError::Invalid("conflicting content-length"));
                }
                info.length = Some(n);
                any = true;
            }
            if !any {
                return Err(HeadError::Invalid("invalid content-length"));
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let mut empty = true;
            for coding in h.value.split(|b| *b == b',').map(trim) {
                if coding.is_empty() {
                    continue;
                }
                empty = false;
                if coding.eq_ignore_ascii_case(b"chunked") {
                    // RFC 9112 §6.1: chunked at most once
                    if chunked_at.is_some() {
                        return Err(HeadError::Invalid("chunked applied more than once"));
                    }
                    chunked_at = Some(codings);
                } else if !coding.iter().all(|b| is_tchar(*b)) {
                    return Err(HeadError::Invalid("invalid transfer coding"));
                }
                codings += 1;
            }
            if empty {
                return Err(HeadError::Invalid("empty transfer-encoding"));
            }
            info.chunked = true;
        } else if name.eq_ignore_ascii_case(b"host") {
            info.hosts = info.hosts.saturating_add(1);
            info.host = Some(trim(h.value));
        } else if name.eq_ignore_ascii_case(b"te") {
            info.te_trailers |= h
                .value
                .split(|b| *b == b',')
                .map(trim)
                .any(|t| t.eq_ignore_ascii_case(b"trailers"));
        }
    }
    if info.chunked {
        // RFC 9112 §6.1: chunked must be the final coding, else the length cannot be determined
        // (400); a coding before it that we cannot decode is 501
        match chunked_at {
            Some(at) if at + 1 == codings && codings == 1 => {}
            Some(at) if at + 1 == codings => return Err(HeadError::UnsupportedCoding),
            _ => {
                return Err(HeadError::Invalid(
                    "transfer coding does not end in chunked",
                ))
            }
        }
    }
    Ok(info)
}

/// RFC 9110 §5.6.2 `tchar`.
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether `v` is `uri-host [ ":" port ]` (RFC 9110 §7.2, RFC 3986 §3.2.2-3.2.3): an IP literal, or
/// a reg-name of unreserved, percent-encoded and sub-delim characters without `..`, and a port of
/// at most 5 digits. Refuses what could name a path or a second authority (`/`, `\`, `@`, `..`).
pub fn valid_authority(v: &[u8]) -> bool {
    let (host, port) = if let Some(rest) = v.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|b| *b == b']') else {
            return false;
        };
        let literal = &rest[..end];
        let ok = if let Some(future) = literal.strip_prefix(b"v").or(literal.strip_prefix(b"V")) {
            // IPvFuture = "v" 1*HEXDIG "." 1*( unreserved / sub-delims / ":" )
            let dot = future.iter().position(|b| *b == b'.');
            matches!(dot, Some(d) if d > 0
                && future[..d].iter().all(u8::is_ascii_hexdigit)
                && future.len() > d + 1
                && future[d + 1..].iter().all(|b| is_unreserved(*b) || is_sub_delim(*b) || *b == b':'))
        } else {
            !literal.is_empty()
                && literal
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.')
                && std::str::from_utf8(literal)
                    .ok()
                    .and_then(|s| s.parse::<std::net::Ipv6Addr>().ok())
                    .is_some()
        };
        if !ok {
            return false;
        }
        match &rest[end + 1..] {
            [] => return true,
            [b':', port @ ..] => (&v[..end + 2], port),
            _ => return false,
        }
    } else {
        match v.iter().position(|b| *b == b':') {
            Some(i) => (&v[..i], &v[i + 1..]),
            None => (v, &b""[..]),
        }
    };
    if !host.starts_with(b"[") {
        if host.is_empty() || host.windows(2).any(|w| w == b"..") {
            return false;
        }
        let mut i = 0;
        while i < host.len() {
            let b = host[i];
            if b == b'%' {
                if !(host.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && host.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
                {
                    return false;
                }
                i += 3;
                continue;
            }
            if !(is_unreserved(b) || is_sub_delim(b)) {
                return false;
            }
            i += 1;
        }
    }
    port.len() <= 5 && port.iter().all(u8::is_ascii_digit)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_sub_delim(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
    )
}

/// Whether a field must not be copied into the forwarded head: hop-by-hop fields (and those the
/// message nominates in `Connection`), and the framing fields, which the proxy writes itself.
fn dropped(name: &[u8], info: &FieldInfo<'_>) -> bool {
    is_hop_by_hop(name)
        || is_framing(name)
        || info.nominated.iter().any(|n| name.eq_ignore_ascii_case(n))
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes `Content-Length: n`.
pub fn push_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"Content-Length: ");
    out.extend_from_slice(&itoa_buf(n));
    out.extend_from_slice(b"\r\n");
}

fn itoa_buf(mut n: u64) -> smallvec::SmallVec<[u8; 20]> {
    let mut d = smallvec::SmallVec::<[u8; 20]>::new();
    loop {
        d.push(b'0' + (n % 10) as u8);
        n /= 10;
        if n == 0 {
            break;
        }
    }
    d.reverse();
    d
}

/// This hop, as a forwarded request names it.
#[derive(Debug, Clone, Copy)]
pub struct Hop<'a> {
    /// The client's address, appended to `X-Forwarded-For`.
    pub client_ip: &'a str,
    /// This proxy's name in `Via` (unique per process: a request that comes back is a loop).
    pub via: &'a str,
    /// The client connection is TLS: `X-Forwarded-Proto: https`.
    pub tls: bool,
}

/// A parsed request head: the facts the proxy needs, borrowed from the read buffer.
#[derive(Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// Target to forward: origin-form (`/path?query`; an absolute-form target is reduced to it),
    /// `*` (OPTIONS) or `host:port` (CONNECT).
    pub target: Cow<'a, str>,
    /// The authority the request is for: from an absolute-form target (RFC 9112 §3.2.2: it wins
    /// over `Host`), else the `Host` field. Validated.
    pub host: Option<&'a str>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub framing: Framing,
    /// The client wants the connection kept after this request, and its framing allows it
    /// (not after a request with both Content-Length and Transfer-Encoding, RFC 9112 §6.1).
    pub keep_alive: bool,
    /// `Connection: upgrade` with one `Upgrade` field (e.g. WebSocket).
    pub upgrade: Option<&'a [u8]>,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// Bytes of the head in the buffer.
    pub head_len: usize,
    headers: &'a [httparse::Header<'a>],
    info: FieldInfo<'a>,
}

/// Parses a request head at the start of `buf`. `Ok(None)`: incomplete, read more.
pub fn parse_request<'h, 'b: 'h>(
    buf: &'b [u8],
    headers: &'h mut [httparse::Header<'b>; MAX_HEADERS],
) -> Result<Option<Request<'h>>, HeadError> {
    let mut req = httparse::Request::new(headers);
    let Some(head_len) = head_length(req.parse(buf)?, buf.len())? else {
        return Ok(None);
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Invalid("incomplete request line"));
    };
    let headers: &'h [httparse::Header<'b>] = req.headers;
    let info = field_info(headers)?;
    // RFC 9112 §3.2: more than one Host, or an invalid one: 400
    if info.hosts > 1 {
        return Err(HeadError::Invalid("more than one Host header"));
    }
    if info.host.is_some_and(|h| !valid_authority(h)) {
        return Err(HeadError::Invalid("invalid Host header"));
    }
    // RFC 9112 §3.1: no fragment in a request target
    if path.contains('#') {
        return Err(HeadError::Invalid("fragment in the request target"));
    }
    let mut host = info.host.and_then(|h| std::str::from_utf8(h).ok());
    // RFC 9112 §3.2: the four forms of request-target
    let target: Cow<'h, str> = if method == "CONNECT" {
        // §3.2.3: authority-form, host and port, and only for CONNECT
        let b = path.as_bytes();
        let port = b.iter().rposition(|c| *c == b':').map(|i| &b[i + 1..]);
        if b.starts_with(b"/") || !valid_authority(b) || port.is_none_or(|p| p.is_empty()) {
            return Err(HeadError::Invalid("CONNECT target is not host:port"));
        }
        Cow::Borrowed(path)
    } else if path.starts_with('/') {
        Cow::Borrowed(path)
    } else if path == "*" {
        // §3.2.4: asterisk-form is only for OPTIONS
        if method != "OPTIONS" {
            return Err(HeadError::Invalid(
                "asterisk-form target for a method other than OPTIONS",
            ));
        }
        Cow::Borrowed(path)
    } else if let Some((authority, origin)) = absolute_form(path)? {
        // §3.2.2: the target's authority replaces Host
        host = Some(authority);
        origin
    } else {
        return Err(HeadError::Invalid("request target is not a path"));
    };
    // §3.2: an HTTP/1.1 request without Host is refused
    if version == 1 && info.hosts == 0 {
        return Err(HeadError::Invalid("HTTP/1.1 request without Host"));
    }
    if info.chunked && version == 0 {
        // RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing
        return Err(HeadError::Invalid(
            "transfer-encoding in an HTTP/1.0 request",
        ));
    }
    let framing = if info.chunked {
        Framing::Chunked
    } else {
        info.length.map_or(Framing::Empty, Framing::Length)
    };
    // RFC 9112 §6.1: after a request with both Content-Length and Transfer-Encoding the server
    // closes the connection, so nothing it could have misread follows on it
    let ambiguous = info.chunked && info.length.is_some();
    let keep_alive = !ambiguous
        && if version == 1 {
            !info.close
        } else {
            info.keep_alive && !info.close
        };
    let upgrade = if info.upgrade {
        let mut fields = headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("upgrade"));
        match (fields.next(), fields.next()) {
            (Some(h), None) if !trim(h.value).is_empty() => Some(trim(h.value)),
            (None, _) => None,
            _ => return Err(HeadError::Invalid("invalid Upgrade header")),
        }
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

/// Splits an absolute-form target (`http://authority/path?query`, RFC 9112 §3.2.2) into its
/// authority and the origin-form target to forward. `Ok(None)`: not absolute-form.
fn absolute_form(path: &str) -> Result<Option<(&str, Cow<'_, str>)>, HeadError> {
    let Some(colon) = path.find("://") else {
        return Ok(None);
    };
    let scheme = &path[..colon];
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(HeadError::Invalid(
            "request target scheme is not http or https",
        ));
    }
    let rest = &path[colon + 3..];
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    // RFC 9110 §4.2.4: userinfo in an http(s) URI is an error
    if authority.contains('@') || !valid_authority(authority.as_bytes()) {
        return Err(HeadError::Invalid(
            "invalid authority in the request target",
        ));
    }
    // an empty path is "/" (RFC 9112 §3.2.1)
    let origin = match &rest[end..] {
        "" => Cow::Borrowed("/"),
        query if query.starts_with('?') => Cow::Owned(format!("/{query}")),
        path => Cow::Borrowed(path),
    };
    Ok(Some((authority, origin)))
}

impl<'a> Request<'a> {
    /// RFC 9110 §9.2.2.
    pub fn is_idempotent(&self) -> bool {
        matches!(
            self.method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        )
    }

    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }

    /// The values of every field named `name` (any case), in order.
    pub fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'a [u8]> + 's {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    /// Whether a `Via` field lists `id` as a recipient (RFC 9110 §7.6.3): the request has already
    /// passed through this proxy, so forwarding it again would be a loop.
    pub fn via_has(&self, id: &str) -> bool {
        self.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("via"))
            .flat_map(|h| h.value.split(|b| *b == b','))
            .filter_map(|entry| {
                // received-protocol SP received-by [ SP comment ]
                let mut words = trim(entry).split(|b| *b == b' ' || *b == b'\t');
                words.next();
                words.find(|w| !w.is_empty())
            })
            .any(|by| by == id.as_bytes())
    }

    /// Writes the head to send upstream into `out` (cleared first): the request line with `target`
    /// (possibly rewritten), `Host: host`, the end-to-end fields, the proxy's own framing field
    /// for `self.framing`, `Via` with this hop, and X-Forwarded-For/-Proto/-Host.
    pub fn write_upstream_head(&self, out: &mut Vec<u8>, target: &str, host: &str, hop: &Hop<'_>) {
        out.clear();
        out.reserve(self.head_len + 192);
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
        let mut xff: Option<&[u8]> = None;
        for h in self.headers {
            let name = h.name.as_bytes();
            if dropped(name, &self.info)
                || name.eq_ignore_ascii_case(b"host")
                || name.eq_ignore_ascii_case(b"expect")
                || name.eq_ignore_ascii_case(b"x-forwarded-proto")
                || name.eq_ignore_ascii_case(b"x-forwarded-host")
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
            push_header(out, name, h.value);
        }
        match self.framing {
            Framing::Length(n) => push_length(out, n),
            Framing::Chunked => push_header(out, b"Transfer-Encoding", b"chunked"),
            Framing::Empty | Framing::UntilClose => {}
        }
        if self.info.te_trailers {
            push_header(out, b"TE", b"trailers");
        }
        if let Some(proto) = self.upgrade {
            push_header(out, b"Connection", b"upgrade");
            push_header(out, b"Upgrade", proto);
        }
        // RFC 9110 §7.6.3: a proxy adds itself to Via (earlier Via fields were copied above)
        out.extend_from_slice(b"Via: 1.1 ");
        out.extend_from_slice(hop.via.as_bytes());
        out.extend_from_slice(b"\r\nX-Forwarded-For: ");
        if let Some(prev) = xff {
            out.extend_from_slice(prev);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(hop.client_ip.as_bytes());
        out.extend_from_slice(if hop.tls {
            b"\r\nX-Forwarded-Proto: https\r\n"
        } else {
            b"\r\nX-Forwarded-Proto: http\r\n"
        });
        if let Some(host) = self.host {
            push_header(out, b"X-Forwarded-Host", host.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// A parsed response head, borrowed from the read buffer.
#[derive(Debug)]
pub struct Response<'a> {
    pub status: u16,
    pub reason: &'a str,
    pub version: u8,
    /// Body framing given the request method.
    pub framing: Framing,
    /// The upstream allows reusing this connection after the body (and its framing was not
    /// ambiguous).
    pub keep_alive: bool,
    pub head_len: usize,
    headers: &'a [httparse::Header<'a>],
    info: FieldInfo<'a>,
}

/// Parses a response head at the start of `buf`. `head_request`: the request was HEAD, so the
/// response has no body whatever its headers say (RFC 9112 §6.3 item 1).
pub fn parse_response<'h, 'b: 'h>(
    buf: &'b [u8],
    headers: &'h mut [httparse::Header<'b>; MAX_HEADERS],
    head_request: bool,
) -> Result<Option<Response<'h>>, HeadError> {
    let mut resp = httparse::Response::new(headers);
    let Some(head_len) = head_length(resp.parse(buf)?, buf.len())? else {
        return Ok(None);
    };
    let (Some(status), Some(version)) = (resp.code, resp.version) else {
        return Err(HeadError::Invalid("incomplete status line"));
    };
    if !(100..=999).contains(&status) {
        return Err(HeadError::Invalid("invalid status"));
    }
    let headers: &'h [httparse::Header<'b>] = resp.headers;
    let info = field_info(headers)?;
    if info.chunked && version == 0 {
        // RFC 9112 §6.1: faulty framing
        return Err(HeadError::Invalid(
            "transfer-encoding in an HTTP/1.0 response",
        ));
    }
    let framing = if head_request || status < 200 || status == 204 || status == 304 {
        Framing::Empty
    } else if info.chunked {
        Framing::Chunked
    } else {
        info.length.map_or(Framing::UntilClose, Framing::Length)
    };
    let ambiguous = info.chunked && info.length.is_some();
    let keep_alive = framing != Framing::UntilClose
        && !ambiguous
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

/// How the proxy frames the body it sends to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutFraming {
    /// No body; the head still says what the instance declared (HEAD and 304 answers, RFC 9110
    /// §8.6 and §15.4.5), nothing for 1xx and 204.
    None,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`, re-encoded by the proxy.
    Chunked,
    /// Delimited by closing the connection (HTTP/1.0 clients).
    Close,
}

impl Response<'_> {
    /// Writes the head for the client into `out` (cleared first), framed by `body`.
    pub fn write_client_head(&self, out: &mut Vec<u8>, conn: ClientConnection, body: OutFraming) {
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
            if dropped(name, &self.info) && !keep_upgrade {
                continue;
            }
            push_header(out, name, h.value);
        }
        match body {
            OutFraming::Length(n) => push_length(out, n),
            OutFraming::Chunked => push_header(out, b"Transfer-Encoding", b"chunked"),
            OutFraming::Close => {}
            OutFraming::None => {
                // metadata only: what a GET would have carried (HEAD) or the selected
                // representation's length (304); never on 1xx or 204 (RFC 9110 §8.6)
                if self.status >= 200 && self.status != 204 {
                    if self.info.chunked {
                        push_header(out, b"Transfer-Encoding", b"chunked");
                    } else if let Some(n) = self.info.length {
                        push_length(out, n);
                    }
                }
            }
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

/// Parses a status line (`HTTP/1.x NNN reason`, RFC 9112 §4) into (minor version, status). For
/// probes, which judge an instance by its status line alone.
pub fn parse_status_line(line: &[u8]) -> Result<(u8, u16), HeadError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"HTTP/1.").ok_or(HeadError::Invalid(
        "status line does not start with HTTP/1.",
    ))?;
    let (minor, rest) = match rest {
        [m @ (b'0' | b'1'), b' ', rest @ ..] => (m - b'0', rest),
        _ => return Err(HeadError::Invalid("invalid HTTP version")),
    };
    let code = match rest {
        [a, b, c] | [a, b, c, b' ', ..]
            if a.is_ascii_digit() && b.is_ascii_digit() && c.is_ascii_digit() =>
        {
            u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
        }
        _ => return Err(HeadError::Invalid("invalid status")),
    };
    if code < 100 {
        return Err(HeadError::Invalid("invalid status"));
    }
    Ok((minor, code))
}

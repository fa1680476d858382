//! The oracle of the property tests and fuzz targets: an independent, deliberately plain reader of
//! one message as the proxy writes it. It shares no code with the parser ([`super::head`]) or the
//! chunked decoder ([`super::chunked`]) and accepts only the canonical form the proxy promises:
//! CRLF line ends and no other CR or LF, field names that are tokens directly followed by a colon,
//! exactly one framing (one `Content-Length` of digits, or `Transfer-Encoding: chunked` alone),
//! chunk sizes in hex with no extension, CRLF after each chunk's data, trailer fields, and the
//! final CRLF. What it reads can only be read one way.

/// One message read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub start_line: String,
    pub fields: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, Vec<u8>)>,
}

impl Message {
    /// Values of a field (case-insensitive name).
    pub fn field(&self, name: &str) -> Vec<&[u8]> {
        self.fields
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    }
}

/// What kind of message is read, which decides its body when the head does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A request: no framing field means no body.
    Request,
    /// A response: no framing field means the body runs to the end (the close).
    Response,
    /// A response that has no body (to HEAD, 1xx, 204, 304): framing fields are only metadata.
    Bodyless,
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty()
        && s.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
}

fn line(bytes: &[u8], at: &mut usize) -> Result<Vec<u8>, String> {
    let rest = &bytes[*at..];
    let end = rest
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or("no CRLF")?;
    let l = &rest[..end];
    if l.iter().any(|b| *b == b'\r' || *b == b'\n') {
        return Err(format!("bare CR or LF in {:?}", String::from_utf8_lossy(l)));
    }
    *at += end + 2;
    Ok(l.to_vec())
}

fn field_line(l: &[u8]) -> Result<(String, Vec<u8>), String> {
    let colon = l
        .iter()
        .position(|b| *b == b':')
        .ok_or("field without colon")?;
    let name = &l[..colon];
    if !is_token(name) {
        return Err(format!("field name {:?}", String::from_utf8_lossy(name)));
    }
    let value = &l[colon + 1..];
    let value = value.strip_prefix(b" ").unwrap_or(value);
    if value.iter().any(|b| *b < 0x20 && *b != b'\t' || *b == 0x7f) {
        return Err("control character in a field value".into());
    }
    Ok((String::from_utf8_lossy(name).into_owned(), value.to_vec()))
}

/// Reads one message from the start of `bytes`; returns it and the bytes it took.
pub fn read(bytes: &[u8], kind: Kind) -> Result<(Message, usize), String> {
    let mut at = 0;
    let start = line(bytes, &mut at)?;
    let start_line = String::from_utf8(start).map_err(|_| "start line is not UTF-8")?;
    let mut fields = Vec::new();
    loop {
        let l = line(bytes, &mut at)?;
        if l.is_empty() {
            break;
        }
        fields.push(field_line(&l)?);
    }
    let mut msg = Message {
        start_line,
        fields,
        body: Vec::new(),
        trailers: Vec::new(),
    };
    let lengths = msg.field("content-length");
    let codings = msg.field("transfer-encoding");
    if kind == Kind::Bodyless {
        if lengths.len() > 1 || codings.len() > 1 || (!lengths.is_empty() && !codings.is_empty()) {
            return Err("not at most one framing".into());
        }
        return Ok((msg, at));
    }
    match (lengths.as_slice(), codings.as_slice()) {
        ([], []) => {
            if kind == Kind::Response {
                msg.body = bytes[at..].to_vec();
                at = bytes.len();
            }
        }
        ([n], []) => {
            if n.is_empty() || !n.iter().all(u8::is_ascii_digit) || n.len() > 19 {
                return Err(format!("content-length {:?}", String::from_utf8_lossy(n)));
            }
            let n: usize = std::str::from_utf8(n)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or("content-length out of range")?;
            let body = bytes
                .get(at..at + n)
                .ok_or("body shorter than its length")?;
            msg.body = body.to_vec();
            at += n;
        }
        ([], [b"chunked"]) => {
            loop {
                let size = line(bytes, &mut at)?;
                if size.is_empty() || size.len() > 16 || !size.iter().all(u8::is_ascii_hexdigit) {
                    return Err(format!("chunk size {:?}", String::from_utf8_lossy(&size)));
                }
                let n = usize::from_str_radix(std::str::from_utf8(&size).unwrap_or("x"), 16)
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                let data = bytes.get(at..at + n).ok_or("chunk cut short")?;
                msg.body.extend_from_slice(data);
                at += n;
                if bytes.get(at..at + 2) != Some(b"\r\n") {
                    return Err("chunk data not followed by CRLF".into());
                }
                at += 2;
            }
            loop {
                let l = line(bytes, &mut at)?;
                if l.is_empty() {
                    break;
                }
                msg.trailers.push(field_line(&l)?);
            }
        }
        _ => return Err("not exactly one framing".into()),
    }
    Ok((msg, at))
}

use super::{
    parse_request, parse_response, response_out, BodyOut, ClientConnection, HeadError, Reframe,
    MAX_HEADERS,
};

/// What the proxy sends on for `input` as a request (head rewritten as the engine does, body
/// re-framed, read `piece` bytes at a time): `Ok(None)` while incomplete, `Err` when the sender
/// gets an error. Returns the bytes sent and how many of `input` the message took.
pub fn forward_request(input: &[u8], piece: usize) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Some(req) = parse_request(input, &mut fields).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    let hop = super::Hop {
        client_ip: "192.0.2.1",
        via: "switchyard-test",
        tls: false,
    };
    req.write_upstream_head(&mut out, &req.target, req.host.unwrap_or("svc"), &hop);
    let mut body = Reframe::new(req.framing, BodyOut::Chunked);
    let at = feed(&mut body, input, req.head_len, piece, &mut out)?;
    Ok(body.done().then_some((out, at)))
}

/// What the proxy sends to a client for `input` as a response to a request that was HEAD or not,
/// from an HTTP/1.1 or HTTP/1.0 client; a body delimited by the close ends with `input`.
pub fn forward_response(
    input: &[u8],
    head_request: bool,
    http10_client: bool,
    piece: usize,
) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Some(resp) = parse_response(input, &mut fields, head_request).map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let (framing_out, body_out) = response_out(resp.framing, http10_client);
    let conn = if framing_out == super::OutFraming::Close {
        ClientConnection::Close
    } else {
        ClientConnection::KeepAlive11
    };
    let mut out = Vec::new();
    resp.write_client_head(&mut out, conn, framing_out);
    let mut body = Reframe::new(resp.framing, body_out);
    let at = feed(&mut body, input, resp.head_len, piece, &mut out)?;
    if body.until_close() {
        body.eof(&mut out).map_err(|e| e.to_string())?;
    }
    Ok(body.done().then_some((out, at)))
}

fn feed(
    body: &mut Reframe,
    input: &[u8],
    mut at: usize,
    piece: usize,
    out: &mut Vec<u8>,
) -> Result<usize, String> {
    while !body.done() && at < input.len() {
        let end = at.saturating_add(piece.max(1)).min(input.len());
        let used = body.feed(&input[at..end], out).map_err(|e| e.to_string())?;
        at += used;
        if at < end {
            break;
        }
    }
    Ok(at)
}

fn without(fields: &[(String, Vec<u8>)], names: &[&str]) -> Vec<(String, Vec<u8>)> {
    fields
        .iter()
        .filter(|(n, _)| !names.iter().any(|x| n.eq_ignore_ascii_case(x)))
        .cloned()
        .collect()
}

/// The invariant for any bytes sent as a request: the proxy either refuses them, waits for more,
/// or sends exactly one canonical message ([`read`] takes all of it), whichever way the input is
/// split, and that message means the same when forwarded again (a fixpoint, one hop later).
pub fn request_invariant(input: &[u8]) -> Result<(), String> {
    let whole = forward_request(input, usize::MAX);
    for piece in [1, 3, 64] {
        let split = forward_request(input, piece);
        same_meaning(&split, &whole, Kind::Request)
            .map_err(|e| format!("read in pieces of {piece}: {e}"))?;
    }
    let Ok(Some((out, _))) = whole else {
        return Ok(());
    };
    let (msg, used) = read(&out, Kind::Request)?;
    if used != out.len() {
        return Err(format!("{} bytes after the message", out.len() - used));
    }
    // a head near the field limit may pass it with the fields the proxy adds: the next hop of the
    // same kind answers 431, which is no second reading of the message
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    if matches!(parse_request(&out, &mut fields), Err(HeadError::TooLarge)) {
        return Ok(());
    }
    let again = forward_request(&out, usize::MAX)
        .map_err(|e| format!("own output refused: {e}"))?
        .ok_or("own output incomplete")?;
    if again.1 != out.len() {
        return Err("own output read as another length".into());
    }
    let (msg2, _) = read(&again.0, Kind::Request)?;
    // what the proxy adds for a hop: one more address, and X-Forwarded-Host once a Host is known
    let hop = ["x-forwarded-for", "x-forwarded-host", "via"];
    if msg.start_line != msg2.start_line
        || without(&msg.fields, &hop) != without(&msg2.fields, &hop)
        || msg.body != msg2.body
        || msg.trailers != msg2.trailers
    {
        return Err(format!("not a fixpoint: {msg:?} then {msg2:?}"));
    }
    Ok(())
}

/// The same invariant for bytes an instance sends as a response.
pub fn response_invariant(
    input: &[u8],
    head_request: bool,
    http10_client: bool,
) -> Result<(), String> {
    let whole = forward_response(input, head_request, http10_client, usize::MAX);
    let Ok(Some((out, _))) = &whole else {
        for piece in [1, 3, 64] {
            let split = forward_response(input, head_request, http10_client, piece);
            if split.is_err() != whole.is_err() || matches!(split, Ok(Some(_))) {
                return Err(format!("read in pieces of {piece}: {split:?} != {whole:?}"));
            }
        }
        return Ok(());
    };
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let bodyless = match parse_response(out, &mut fields, head_request) {
        Ok(Some(r)) => r.framing == super::Framing::Empty,
        // past the field limit with the proxy's own fields (see request_invariant)
        Err(HeadError::TooLarge) => return Ok(()),
        other => return Err(format!("own output does not parse: {other:?}")),
    };
    let mode = if bodyless {
        Kind::Bodyless
    } else {
        Kind::Response
    };
    for piece in [1, 3, 64] {
        let split = forward_response(input, head_request, http10_client, piece);
        same_meaning(&split, &whole, mode)
            .map_err(|e| format!("read in pieces of {piece}: {e}"))?;
    }
    let (msg, used) = read(out, mode)?;
    if used != out.len() {
        return Err(format!("{} bytes after the message", out.len() - used));
    }
    let again = forward_response(out, head_request, http10_client, usize::MAX)
        .map_err(|e| format!("own output refused: {e}"))?
        .ok_or("own output incomplete")?;
    let (msg2, _) = read(&again.0, mode)?;
    if msg != msg2 {
        return Err(format!("not a fixpoint: {msg:?} then {msg2:?}"));
    }
    Ok(())
}

type Forwarded = Result<Option<(Vec<u8>, usize)>, String>;

/// Whether two forwarding results mean the same: both refused, both incomplete, or the same
/// message read back (a body may be cut into other chunks) taking the same input.
fn same_meaning(a: &Forwarded, b: &Forwarded, kind: Kind) -> Result<(), String> {
    match (a, b) {
        (Err(_), Err(_)) | (Ok(None), Ok(None)) => Ok(()),
        (Ok(Some((x, xn))), Ok(Some((y, yn)))) if xn == yn => {
            if read(x, kind)?.0 == read(y, kind)?.0 {
                Ok(())
            } else {
                Err(format!(
                    "{:?} != {:?}",
                    String::from_utf8_lossy(x),
                    String::from_utf8_lossy(y)
                ))
            }
        }
        _ => Err(format!("{a:?} != {b:?}")),
    }
}

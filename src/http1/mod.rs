//! HTTP/1.x messages: heads ([`head`]), the chunked coding ([`chunked`]) and bodies on their way
//! through ([`body`]). Used by the request path ([`crate::engine`]), the HTTP health probe and the
//! registrar's `--check`; nothing here knows of routing or sockets.
//!
//! # Policy: one meaning per message
//!
//! A proxy in front of other HTTP implementations must never let a message be read two ways (by
//! the proxy and by an instance, or by an instance and a client): that is request smuggling and
//! response splitting (RFC 9112 §11.2, §11.1). The rules, each with the section it follows:
//!
//! - **The proxy frames what it forwards.** A message goes on with the proxy's own
//!   `Content-Length` (the length it parsed) or `Transfer-Encoding: chunked` (re-encoded by the
//!   proxy), never with the sender's framing fields or raw chunk framing (RFC 9112 §6, §7).
//!   Headers named in `Connection` are removed (RFC 9110 §7.6.1), but framing is not theirs to
//!   remove: it is written anew from what was parsed.
//! - **Lengths** (RFC 9110 §8.6, RFC 9112 §6.3): digits only, at most [`MAX_LENGTH`]; a list of
//!   equal values is one length; different values are an error (request 400, response 502).
//! - **Transfer codings** (RFC 9112 §6.1): chunked at most once and last, else 400; another
//!   coding before it is 501 (we do not decode it); in an HTTP/1.0 message it is faulty framing
//!   (400 / 502). With both `Transfer-Encoding` and `Content-Length`, chunked wins, the length
//!   is dropped, and neither connection is reused afterwards.
//! - **Chunked bodies** are decoded strictly ([`chunked`]): CRLF only, bounded size digits,
//!   bounded and well-formed extensions (dropped), bounded trailers that are parsed as fields and
//!   filtered (RFC 9110 §6.5.1); any error ends the exchange (400 to a client whose request body
//!   was bad, 502 or a cut connection for a bad response body) and the connection is not reused.
//! - **Host** (RFC 9112 §3.2): exactly one on HTTP/1.1, a valid `uri-host [":" port]`; two Host
//!   fields (equal or not) are 400. An absolute-form target's authority wins over `Host` and is
//!   sent as `Host` (§3.2.2). Asterisk-form is for OPTIONS only, authority-form for CONNECT only
//!   (§3.2.3-3.2.4); a fragment is not part of a target (§3.1).
//! - **Responses**: a status of three digits from 100; a `101` only for a request that asked to
//!   upgrade; at most [`MAX_INTERIM`] interim (1xx) answers; no body for HEAD, 1xx, 204, 304
//!   (RFC 9112 §6.3 item 1); a body delimited by the close is re-chunked for HTTP/1.1 clients.
//! - **Heads** are at most [`MAX_HEAD`] bytes and [`MAX_FIELDS`] fields (431 / 502); `httparse`
//!   refuses obsolete line folding, whitespace before a colon and control characters.

pub mod body;
pub mod chunked;
pub mod head;
#[doc(hidden)]
pub mod verify;

pub use body::{BodyError, BodyOut, Reframe};
pub use chunked::{ChunkError, Chunked};
pub use head::{
    parse_request, parse_response, parse_status_line, ClientConnection, HeadError, Hop, OutFraming,
    Request, Response,
};

/// Largest request or response head accepted (request line/status line and all headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one head.
pub const MAX_FIELDS: usize = 120;
/// Room for a head's fields when parsing: [`MAX_FIELDS`] and the few the proxy adds (framing,
/// `Host`, `X-Forwarded-*`, `Upgrade`), so what it writes can always be read by another hop.
pub const MAX_HEADERS: usize = 128;
/// Largest `Content-Length` accepted (what fits a signed 64-bit offset, as nginx and HAProxy).
pub const MAX_LENGTH: u64 = i64::MAX as u64;
/// Most interim (1xx) responses read before the final one.
pub const MAX_INTERIM: usize = 16;

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

/// How the proxy frames a response body of `framing` for its client: a length as it is; chunked
/// or close-delimited re-encoded as chunked for an HTTP/1.1 client (who can then keep its
/// connection), the bare data delimited by the close for an HTTP/1.0 client (who cannot read
/// chunked, RFC 9112 §7).
pub fn response_out(framing: Framing, http10_client: bool) -> (OutFraming, BodyOut) {
    match framing {
        Framing::Empty => (OutFraming::None, BodyOut::Raw),
        Framing::Length(n) => (OutFraming::Length(n), BodyOut::Raw),
        Framing::Chunked | Framing::UntilClose if http10_client => {
            (OutFraming::Close, BodyOut::Raw)
        }
        Framing::Chunked | Framing::UntilClose => (OutFraming::Chunked, BodyOut::Chunked),
    }
}

/// Header names that describe one hop and never pass through (RFC 9110 §7.6.1), besides those a
/// message names in `Connection`. `Upgrade` is re-added for an upgrade; `TE: trailers` is re-added
/// when the client sent it.
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

pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// The framing fields, which only the proxy writes on what it forwards.
pub(crate) fn is_framing(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"transfer-encoding")
}

pub(crate) fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(start, |e| e + 1);
    &v[start..end]
}

#[cfg(test)]
mod tests;

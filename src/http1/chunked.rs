//! The chunked transfer coding (RFC 9112 §7.1), decoded strictly and re-encoded by the proxy.
//!
//! ```text
//! chunked-body   = *chunk last-chunk trailer-section CRLF
//! chunk          = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
//! chunk-size     = 1*HEXDIG
//! last-chunk     = 1*("0") [ chunk-ext ] CRLF
//! chunk-ext      = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
//! trailer-section = *( field-line CRLF )
//! ```
//!
//! Strict where peers are known to disagree (the request smuggling of CVE-2025-22871 and its
//! kin): every line ends in CRLF (a bare LF or a lone CR is an error, not a line end), a chunk's
//! data is followed by exactly CRLF, the size has at most [`MAX_SIZE_DIGITS`] hex digits,
//! extensions are checked against the grammar and bounded by [`MAX_EXTENSION`], and the trailer
//! section is bounded by [`MAX_TRAILERS`] bytes and parsed as header fields. Extensions are
//! dropped (RFC 9112 §7.1.1: unrecognised ones are ignored) and trailer fields that must not be
//! trailers (RFC 9110 §6.5.1: framing, routing, authentication, controls) are removed, so what
//! goes out is the proxy's own encoding of the same data.

use super::head::is_tchar;
use super::{is_framing, is_hop_by_hop, MAX_HEADERS};

/// Most hex digits in a chunk size (leading zeros included): 15 digits keep a size under 2^60.
pub const MAX_SIZE_DIGITS: u8 = 15;
/// Most bytes of chunk extensions on one size line.
pub const MAX_EXTENSION: u16 = 1024;
/// Most bytes of a trailer section (the field lines, without the final CRLF).
pub const MAX_TRAILERS: usize = 16 * 1024;

/// Why a chunked body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunk size")]
    Size,
    #[error("chunk size with more than {MAX_SIZE_DIGITS} digits")]
    SizeTooLong,
    #[error("invalid chunk extension")]
    Extension,
    #[error("chunk extensions longer than {MAX_EXTENSION} bytes")]
    ExtensionTooLong,
    #[error("chunk line not ended by CRLF")]
    LineEnd,
    #[error("chunk data longer than its size")]
    DataEnd,
    #[error("invalid trailer section")]
    Trailers,
    #[error("trailer section larger than {MAX_TRAILERS} bytes")]
    TrailersTooLarge,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size.
    #[default]
    Size,
    /// After the digits: BWS, then `;` or CR.
    AfterSize,
    /// Inside the extensions, outside a quoted string.
    Ext,
    /// Inside a quoted extension value; `escaped` after a backslash.
    ExtQuoted {
        escaped: bool,
    },
    /// Saw the CR ending the size line.
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final CRLF).
    TrailerStart,
    /// Inside a trailer field line.
    TrailerLine,
    /// Saw CR inside a trailer line.
    TrailerLf,
    /// Saw the CR of the final empty line.
    FinalLf,
    Done,
}

/// What the decoder makes of the body it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Only find where the body ends.
    Nothing,
    /// The chunk data, decoded (trailers dropped).
    Decoded,
    /// The proxy's own chunked encoding of the same data and the allowed trailer fields.
    Chunked,
}

/// Incremental strict decoder of a chunked body.
#[derive(Debug, Clone, Default)]
pub struct Chunked {
    state: State,
    size: u64,
    digits: u8,
    ext: u16,
    /// The trailer section as received (allocated only when there is one).
    trailers: Vec<u8>,
}

impl Chunked {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes of the current chunk still to come (0 outside chunk data).
    pub fn chunk_left(&self) -> u64 {
        if self.state == State::Data {
            self.size
        } else {
            0
        }
    }

    /// Consumes `input` up to the end of the body and appends what `output` asks for to `out`.
    /// Returns how many bytes of `input` belong to the body.
    pub fn feed(
        &mut self,
        input: &[u8],
        output: Output,
        out: &mut Vec<u8>,
    ) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        self.digits += 1;
                        if self.digits > MAX_SIZE_DIGITS {
                            return Err(ChunkError::SizeTooLong);
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                        self.size = self.size * 16 + d;
                    }
                    _ if self.digits == 0 => return Err(ChunkError::Size),
                    b' ' | b'\t' => self.state = State::AfterSize,
                    b';' => self.state = State::Ext,
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err(ChunkError::LineEnd),
                    _ => return Err(ChunkError::Size),
                },
                State::AfterSize => match b {
                    b' ' | b'\t' => self.count_ext()?,
                    b';' => {
                        self.count_ext()?;
                        self.state = State::Ext;
                    }
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err(ChunkError::LineEnd),
                    _ => return Err(ChunkError::Size),
                },
                State::Ext => {
                    self.count_ext()?;
                    match b {
                        b'\r' => self.state = State::SizeLf,
                        b'"' => self.state = State::ExtQuoted { escaped: false },
                        b';' | b'=' | b' ' | b'\t' => {}
                        _ if is_tchar(b) => {}
                        _ => return Err(ChunkError::Extension),
                    }
                }
                State::ExtQuoted { escaped } => {
                    self.count_ext()?;
                    // qdtext / quoted-pair (RFC 9110 §5.6.4)
                    let text = b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80;
                    if !text {
                        return Err(ChunkError::Extension);
                    }
                    self.state = if escaped {
                        State::ExtQuoted { escaped: false }
                    } else if b == b'\\' {
                        State::ExtQuoted { escaped: true }
                    } else if b == b'"' {
                        State::Ext
                    } else {
                        State::ExtQuoted { escaped: false }
                    };
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError::LineEnd);
                    }
                    self.digits = 0;
                    self.ext = 0;
                    if self.size == 0 {
                        self.state = State::TrailerStart;
                    } else {
                        if output == Output::Chunked {
                            push_size(out, self.size);
                        }
                        self.state = State::Data;
                    }
                }
                State::Data => {
                    let n = (self.size.min((input.len() - i) as u64)) as usize;
                    if output != Output::Nothing {
                        out.extend_from_slice(&input[i..i + n]);
                    }
                    self.size -= n as u64;
                    i += n;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::DataCr => match b {
                    b'\r' => self.state = State::DataLf,
                    _ => return Err(ChunkError::DataEnd),
                },
                State::DataLf => match b {
                    b'\n' => {
                        if output == Output::Chunked {
                            out.extend_from_slice(b"\r\n");
                        }
                        self.state = State::Size;
                    }
                    _ => return Err(ChunkError::DataEnd),
                },
                State::TrailerStart => match b {
                    b'\r' => self.state = State::FinalLf,
                    b'\n' => return Err(ChunkError::LineEnd),
                    _ => {
                        self.trailer_byte(b)?;
                        self.state = State::TrailerLine;
                    }
                },
                State::TrailerLine => match b {
                    b'\r' => {
                        self.trailer_byte(b)?;
                        self.state = State::TrailerLf;
                    }
                    b'\n' => return Err(ChunkError::LineEnd),
                    _ => self.trailer_byte(b)?,
                },
                State::TrailerLf => match b {
                    b'\n' => {
                        self.trailer_byte(b)?;
                        self.state = State::TrailerStart;
                    }
                    _ => return Err(ChunkError::LineEnd),
                },
                State::FinalLf => {
                    if b != b'\n' {
                        return Err(ChunkError::LineEnd);
                    }
                    self.finish(output, out)?;
                    self.state = State::Done;
                    return Ok(i + 1);
                }
                State::Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }

    fn count_ext(&mut self) -> Result<(), ChunkError> {
        self.ext += 1;
        if self.ext > MAX_EXTENSION {
            return Err(ChunkError::ExtensionTooLong);
        }
        Ok(())
    }

    fn trailer_byte(&mut self, b: u8) -> Result<(), ChunkError> {
        if self.trailers.len() >= MAX_TRAILERS {
            return Err(ChunkError::TrailersTooLarge);
        }
        self.trailers.push(b);
        Ok(())
    }

    /// At the end of the body: checks the trailer section and writes the last chunk.
    fn finish(&mut self, output: Output, out: &mut Vec<u8>) -> Result<(), ChunkError> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let trailers = std::mem::take(&mut self.trailers);
        let mut section = trailers;
        section.extend_from_slice(b"\r\n");
        let parsed = match httparse::parse_headers(&section, &mut fields) {
            Ok(httparse::Status::Complete((n, fields))) if n == section.len() => fields,
            _ => return Err(ChunkError::Trailers),
        };
        if output == Output::Chunked {
            out.extend_from_slice(b"0\r\n");
            for f in parsed.iter().filter(|f| trailer_allowed(f.name.as_bytes())) {
                out.extend_from_slice(f.name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(f.value);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n");
        }
        Ok(())
    }
}

/// Fields that must not be sent as trailers (RFC 9110 §6.5.1) besides framing and hop-by-hop
/// ones: routing, request modifiers, authentication, response control and content handling.
const NOT_TRAILERS: [&str; 30] = [
    "host",
    "cache-control",
    "expect",
    "max-forwards",
    "pragma",
    "range",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "if-range",
    "authorization",
    "authentication-info",
    "proxy-authentication-info",
    "www-authenticate",
    "cookie",
    "set-cookie",
    "age",
    "expires",
    "date",
    "location",
    "retry-after",
    "vary",
    "warning",
    "content-encoding",
    "content-type",
    "content-range",
    "content-location",
    "x-forwarded-for",
    "forwarded",
];

/// Whether a trailer field passes through the proxy.
pub fn trailer_allowed(name: &[u8]) -> bool {
    !(is_framing(name)
        || is_hop_by_hop(name)
        || NOT_TRAILERS
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n.as_bytes())))
}

/// Writes a chunk-size line for `n` bytes of data.
pub fn push_size(out: &mut Vec<u8>, n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut v = n;
    loop {
        at -= 1;
        digits[at] = HEX[(v & 15) as usize];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// Appends `data` as one chunk (nothing for empty data: an empty chunk would end the body).
pub fn push_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if !data.is_empty() {
        push_size(out, data.len() as u64);
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
}

/// The last chunk of a body without trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(input: &[u8], output: Output) -> Result<(usize, Vec<u8>), ChunkError> {
        let mut c = Chunked::default();
        let mut out = Vec::new();
        let n = c.feed(input, output, &mut out)?;
        assert!(
            c.is_done(),
            "not done after {:?}",
            String::from_utf8_lossy(input)
        );
        Ok((n, out))
    }

    #[test]
    fn chunked_bodies_end_where_the_framing_says() {
        let body =
            b"4;ext=1;q=\"a b\\\"\"\r\nWiki\r\n5\r\npedia\r\n0\r\nServer-Timing: x\r\n\r\nNEXT";
        // whole, and split at every position, decoded and re-encoded
        for split in 0..body.len() {
            for (output, want) in [
                (Output::Decoded, &b"Wikipedia"[..]),
                (
                    Output::Chunked,
                    &b"4\r\nWiki\r\n5\r\npedia\r\n0\r\nServer-Timing: x\r\n\r\n"[..],
                ),
            ] {
                let mut c = Chunked::default();
                let mut out = Vec::new();
                let a = c.feed(&body[..split], output, &mut out).unwrap();
                assert_eq!(a, split.min(body.len() - 4));
                let b = c.feed(&body[a..], output, &mut out).unwrap();
                assert!(c.is_done(), "split {split}");
                assert_eq!(a + b, body.len() - 4, "split {split}");
                assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(want));
            }
        }
    }

    #[test]
    fn lenient_framing_is_refused() {
        let cases: [(&[u8], ChunkError); 14] = [
            (b"zz\r\n", ChunkError::Size),
            (b"\r\n", ChunkError::Size),
            (b"2\r\nabc\r\n", ChunkError::DataEnd),
            (b"2\r\nab\n0\r\n\r\n", ChunkError::DataEnd),
            (b"2\nab\r\n0\r\n\r\n", ChunkError::LineEnd),
            (b"2\rab\r\n", ChunkError::LineEnd),
            (b"0\r\n\n", ChunkError::LineEnd),
            (b"0\r\nX: y\n\r\n", ChunkError::LineEnd),
            (b"0\r\nX: y\rz\r\n\r\n", ChunkError::LineEnd),
            (b"1000000000000000\r\n", ChunkError::SizeTooLong),
            (b"2 x\r\n", ChunkError::Size),
            (b"2;a\x01\r\n", ChunkError::Extension),
            (b"2;a=\"\x7f\"\r\n", ChunkError::Extension),
            (b"0\r\nno colon\r\n\r\n", ChunkError::Trailers),
        ];
        for (input, want) in cases {
            let mut c = Chunked::default();
            let got = c.feed(input, Output::Chunked, &mut Vec::new());
            assert_eq!(got, Err(want), "{:?}", String::from_utf8_lossy(input));
        }
        let long_ext = format!("1;{}\r\n", "a".repeat(MAX_EXTENSION as usize + 1));
        let mut c = Chunked::default();
        assert_eq!(
            c.feed(long_ext.as_bytes(), Output::Nothing, &mut Vec::new()),
            Err(ChunkError::ExtensionTooLong)
        );
        let long_trailer = format!("0\r\nX: {}\r\n\r\n", "a".repeat(MAX_TRAILERS));
        let mut c = Chunked::default();
        assert_eq!(
            c.feed(long_trailer.as_bytes(), Output::Nothing, &mut Vec::new()),
            Err(ChunkError::TrailersTooLarge)
        );
    }

    #[test]
    fn trailers_that_would_change_the_message_are_removed() {
        let body = b"1\r\na\r\n0\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nHost: evil\r\nGrpc-Status: 0\r\nConnection: close\r\n\r\n";
        let (n, out) = decode(body, Output::Chunked).unwrap();
        assert_eq!(n, body.len());
        assert_eq!(out, b"1\r\na\r\n0\r\nGrpc-Status: 0\r\n\r\n");
    }

    #[test]
    fn sizes_are_re_encoded_without_leading_zeros_or_extensions() {
        let (_, out) =
            decode(b"000A ; x = y\r\n0123456789\r\n00\r\n\r\n", Output::Chunked).unwrap();
        assert_eq!(out, b"a\r\n0123456789\r\n0\r\n\r\n");
        let mut out = Vec::new();
        push_chunk(&mut out, &[b'x'; 300]);
        assert!(out.starts_with(b"12c\r\n"));
    }
}

//! A message body on its way through the proxy: read with the framing the sender declared,
//! written with the framing the proxy chose ([`Reframe`]).

use super::chunked::{self, ChunkError, Chunked, Output};
use super::Framing;

/// How the proxy sends a body on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyOut {
    /// The same bytes (a length-delimited body keeps its length; data up to the close).
    Raw,
    /// Re-encoded as chunked (a chunked body, or one delimited by the sender's close, to an
    /// HTTP/1.1 peer).
    Chunked,
}

/// Why a body could not be relayed as one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error("connection closed inside the body")]
    Truncated,
    /// The reader left a whole read buffer (`{0}` bytes) unused. None does: each uses what it is
    /// given (the chunked decoder keeps partial lines and trailers itself) or fails, so this marks
    /// a broken invariant rather than a client's fault; typed instead of assumed.
    #[error("body framing left {0} buffered bytes unused")]
    Held(usize),
}

#[derive(Debug)]
enum Reader {
    Empty,
    Length(u64),
    Chunked(Box<Chunked>),
    UntilClose,
}

/// Progress through one body: what came in, what goes out.
#[derive(Debug)]
pub struct Reframe {
    reader: Reader,
    out: BodyOut,
    /// The closing bytes were written (the last chunk of a re-encoded close-delimited body).
    ended: bool,
}

impl Reframe {
    /// A body framed by `framing`, sent on as `out`. A length-delimited body is always sent raw
    /// (its length goes in the head); a chunked body sent `Raw` is decoded (for an HTTP/1.0 peer,
    /// delimited by the close).
    pub fn new(framing: Framing, out: BodyOut) -> Reframe {
        let reader = match framing {
            Framing::Empty | Framing::Length(0) => Reader::Empty,
            Framing::Length(n) => Reader::Length(n),
            Framing::Chunked => Reader::Chunked(Box::default()),
            Framing::UntilClose => Reader::UntilClose,
        };
        Reframe {
            reader,
            out,
            ended: false,
        }
    }

    /// Takes body bytes from `input`, appending what goes out to `out`; returns how many bytes of
    /// `input` belong to the body (the rest is not part of this message).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, BodyError> {
        match &mut self.reader {
            Reader::Empty => Ok(0),
            Reader::Length(left) => {
                let n = (*left).min(input.len() as u64) as usize;
                out.extend_from_slice(&input[..n]);
                *left -= n as u64;
                Ok(n)
            }
            Reader::Chunked(c) => {
                let output = match self.out {
                    BodyOut::Raw => Output::Decoded,
                    BodyOut::Chunked => Output::Chunked,
                };
                Ok(c.feed(input, output, out)?)
            }
            Reader::UntilClose => {
                match self.out {
                    BodyOut::Raw => out.extend_from_slice(input),
                    BodyOut::Chunked => chunked::push_chunk(out, input),
                }
                Ok(input.len())
            }
        }
    }

    /// The sender closed its side: fine for a close-delimited body (its last chunk is written
    /// when it is re-encoded), an error for any other that is not complete.
    pub fn eof(&mut self, out: &mut Vec<u8>) -> Result<(), BodyError> {
        match self.reader {
            Reader::UntilClose => {
                if self.out == BodyOut::Chunked && !self.ended {
                    out.extend_from_slice(chunked::LAST_CHUNK);
                }
                self.ended = true;
                Ok(())
            }
            _ if self.done() => Ok(()),
            _ => Err(BodyError::Truncated),
        }
    }

    /// The whole body was read.
    pub fn done(&self) -> bool {
        match &self.reader {
            Reader::Empty => true,
            Reader::Length(left) => *left == 0,
            Reader::Chunked(c) => c.is_done(),
            Reader::UntilClose => self.ended,
        }
    }

    /// Delimited by the sender's close.
    pub fn until_close(&self) -> bool {
        matches!(self.reader, Reader::UntilClose)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_delimited_bodies_are_chunked_for_http11_peers() {
        let mut r = Reframe::new(Framing::UntilClose, BodyOut::Chunked);
        let mut out = Vec::new();
        assert_eq!(r.feed(b"hello", &mut out).unwrap(), 5);
        assert_eq!(r.feed(b"", &mut out).unwrap(), 0);
        assert!(!r.done());
        r.eof(&mut out).unwrap();
        assert!(r.done());
        assert_eq!(out, b"5\r\nhello\r\n0\r\n\r\n");
    }

    #[test]
    fn lengths_stop_at_the_end_and_a_short_body_is_an_error() {
        let mut r = Reframe::new(Framing::Length(3), BodyOut::Raw);
        let mut out = Vec::new();
        assert_eq!(r.feed(b"abcGET /", &mut out).unwrap(), 3);
        assert!(r.done());
        assert_eq!(out, b"abc");
        let mut r = Reframe::new(Framing::Length(3), BodyOut::Raw);
        r.feed(b"ab", &mut out).unwrap();
        assert_eq!(r.eof(&mut out), Err(BodyError::Truncated));
        let mut r = Reframe::new(Framing::Chunked, BodyOut::Raw);
        let mut out = Vec::new();
        assert_eq!(r.feed(b"3\r\nabc\r\n0\r\n\r\nX", &mut out).unwrap(), 13);
        assert_eq!(out, b"abc");
    }
}

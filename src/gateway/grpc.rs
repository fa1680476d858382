//! gRPC on the request path: recognising a gRPC request, its deadline, and switchyard's own
//! answers as gRPC statuses (a trailers-only response: HTTP 200 with `grpc-status` and
//! `grpc-message` in the headers), which gRPC clients understand where an HTTP error body would
//! become an opaque `UNKNOWN`/`INTERNAL`.

use std::time::Duration;

use http::{HeaderMap, HeaderValue};

/// gRPC status codes switchyard answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    DeadlineExceeded = 4,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
}

/// The gRPC status for one of our own HTTP answers (gRPC's HTTP-to-status mapping, with a timeout
/// that ended the client's deadline reported as DEADLINE_EXCEEDED).
pub fn code_for(status: u16, deadline_passed: bool) -> Code {
    match status {
        404 | 405 => Code::Unimplemented,
        504 if deadline_passed => Code::DeadlineExceeded,
        502..=504 | 429 => Code::Unavailable,
        _ => Code::Internal,
    }
}

/// `content-type: application/grpc` or `application/grpc+proto` etc.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.strip_prefix("application/grpc")
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
        })
}

/// The client's deadline from `grpc-timeout` (`1-8 digits` + `H M S m u n`).
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `grpc-message` is percent-encoded: bytes outside printable ASCII, and `%`.
pub fn encode_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.trim_end().bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Adds `grpc-status` and `grpc-message` to `headers` (a response's headers or trailers).
pub fn put_status(headers: &mut HeaderMap, code: Code, message: &str) {
    headers.insert("grpc-status", HeaderValue::from(code as u16));
    if let Ok(v) = HeaderValue::from_str(&encode_message(message)) {
        headers.insert("grpc-message", v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_requests_and_deadlines_are_recognised() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        assert!(is_grpc(&h));
        h.insert(
            "content-type",
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&h));
        h.insert(
            "content-type",
            HeaderValue::from_static("application/grpc-web"),
        );
        assert!(!is_grpc(&h), "grpc-web is not gRPC over HTTP/2");
        h.insert("grpc-timeout", HeaderValue::from_static("250m"));
        assert_eq!(timeout(&h), Some(Duration::from_millis(250)));
        h.insert("grpc-timeout", HeaderValue::from_static("3S"));
        assert_eq!(timeout(&h), Some(Duration::from_secs(3)));
        h.insert("grpc-timeout", HeaderValue::from_static("123456789S"));
        assert_eq!(timeout(&h), None, "at most 8 digits");
    }

    #[test]
    fn own_answers_map_to_grpc_codes_and_messages_are_encoded() {
        assert_eq!(code_for(404, false), Code::Unimplemented);
        assert_eq!(code_for(503, false), Code::Unavailable);
        assert_eq!(code_for(502, false), Code::Unavailable);
        assert_eq!(code_for(504, false), Code::Unavailable);
        assert_eq!(code_for(504, true), Code::DeadlineExceeded);
        assert_eq!(encode_message("a 100% é\n"), "a 100%25 %C3%A9");
    }
}

//! Property tests of the HTTP/1 rules (issue 14), bounded so they run in the normal test command:
//! "what goes out is exactly one message whose meaning equals what came in, or the sender gets an
//! error". Generated requests and responses (any framing, chunk splits, extensions, trailers,
//! hop-by-hop and Connection-nominated fields, any split of the bytes as they arrive) must come
//! out with the same method, target, host, end-to-end fields, body and allowed trailers, read back
//! by an independent strict reader (`switchyard::http1::verify`). Mutated bytes must either be
//! refused or come out as one canonical message that is a fixpoint of the proxy. The same
//! invariants are the `cargo fuzz` targets in `fuzz/` (see the README).

use proptest::prelude::*;
use switchyard::http1::chunked::trailer_allowed;
use switchyard::http1::verify::{self, Kind};

const CASES: u32 = 400;

#[derive(Debug, Clone)]
struct Body {
    data: Vec<u8>,
    chunked: Option<Chunking>,
}

#[derive(Debug, Clone)]
struct Chunking {
    /// Sizes of the chunks (the data is cut into these, the rest in one last chunk).
    cuts: Vec<usize>,
    extension: Option<String>,
    trailers: Vec<(String, String)>,
}

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z][A-Za-z0-9-]{0,12}"
}

fn value() -> impl Strategy<Value = String> {
    "[!-~]([ -~]{0,20}[!-~])?"
}

/// End-to-end fields (names chosen to avoid every field with a meaning to the proxy).
fn end_to_end() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec((token(), value()), 0..6).prop_map(|v| {
        v.into_iter()
            .map(|(n, v)| (format!("X-E-{n}"), v))
            .collect()
    })
}

fn body() -> impl Strategy<Value = Body> {
    let chunking = (
        prop::collection::vec(1usize..40, 0..6),
        prop::option::of("[a-z]{1,5}(=[a-z0-9]{1,5})?"),
        prop::collection::vec(
            (
                prop::sample::select(vec![
                    "X-Checksum",
                    "Server-Timing",
                    "Content-Length",
                    "Host",
                    "Set-Cookie",
                    "Transfer-Encoding",
                    "Grpc-Status",
                ]),
                "[a-z0-9]{1,8}",
            ),
            0..4,
        ),
    )
        .prop_map(|(cuts, extension, trailers)| Chunking {
            cuts,
            extension,
            trailers: trailers
                .into_iter()
                .map(|(n, v)| (n.to_string(), v))
                .collect(),
        });
    (
        prop::collection::vec(any::<u8>(), 0..300),
        prop::option::of(chunking),
    )
        .prop_map(|(data, chunked)| Body { data, chunked })
}

/// The body bytes as sent, and the framing field for the head.
fn encode(b: &Body) -> (String, Vec<u8>) {
    match &b.chunked {
        None => (
            format!("Content-Length: {}\r\n", b.data.len()),
            b.data.clone(),
        ),
        Some(c) => {
            let mut out = Vec::new();
            let mut rest = &b.data[..];
            let mut cuts = c.cuts.iter();
            while !rest.is_empty() {
                let n = cuts.next().copied().unwrap_or(rest.len()).min(rest.len());
                out.extend_from_slice(format!("{n:X}").as_bytes());
                if let Some(e) = &c.extension {
                    out.extend_from_slice(format!(" ;{e}").as_bytes());
                }
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&rest[..n]);
                out.extend_from_slice(b"\r\n");
                rest = &rest[n..];
            }
            out.extend_from_slice(b"0\r\n");
            for (n, v) in &c.trailers {
                out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            ("Transfer-Encoding: chunked\r\n".to_string(), out)
        }
    }
}

#[derive(Debug, Clone)]
struct Req {
    method: &'static str,
    path: String,
    host: String,
    absolute: bool,
    fields: Vec<(String, String)>,
    /// Tokens for a Connection field, with a field of each nominated name.
    nominate: Vec<&'static str>,
    body: Body,
}

fn request() -> impl Strategy<Value = Req> {
    (
        prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
        "/[a-z0-9/._-]{0,16}(\\?[a-z]=[a-z0-9]{0,6})?",
        "[a-z]{1,8}(\\.[a-z]{1,4})?(:[0-9]{1,5})?",
        any::<bool>(),
        end_to_end(),
        prop::collection::vec(
            prop::sample::select(vec![
                "content-length",
                "transfer-encoding",
                "host",
                "x-hop",
                "keep-alive",
                "close",
            ]),
            0..3,
        ),
        body(),
    )
        .prop_map(
            |(method, path, host, absolute, fields, nominate, body)| Req {
                method,
                path,
                host,
                absolute,
                fields,
                nominate,
                body,
            },
        )
}

fn request_bytes(r: &Req) -> Vec<u8> {
    let target = if r.absolute {
        format!("http://{}{}", r.host, r.path)
    } else {
        r.path.clone()
    };
    let mut head = format!("{} {target} HTTP/1.1\r\n", r.method);
    // with absolute-form, Host says something else: the target's authority wins
    let host = if r.absolute { "elsewhere" } else { &r.host };
    head.push_str(&format!("Host: {host}\r\n"));
    if !r.nominate.is_empty() {
        head.push_str(&format!("Connection: {}\r\n", r.nominate.join(", ")));
        if r.nominate.contains(&"x-hop") {
            head.push_str("X-Hop: dropped\r\n");
        }
    }
    head.push_str("Keep-Alive: timeout=5\r\n");
    for (n, v) in &r.fields {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    let (framing, body) = encode(&r.body);
    head.push_str(&framing);
    head.push_str("\r\n");
    [head.into_bytes(), body].concat()
}

fn allowed_trailers(b: &Body) -> Vec<(String, Vec<u8>)> {
    b.chunked
        .as_ref()
        .map(|c| {
            c.trailers
                .iter()
                .filter(|(n, _)| trailer_allowed(n.as_bytes()))
                .map(|(n, v)| (n.clone(), v.clone().into_bytes()))
                .collect()
        })
        .unwrap_or_default()
}

fn mutate(bytes: &mut Vec<u8>, edits: &[(usize, u8, u8)]) {
    const BYTES: &[u8] = b"\r\n \t:;,0aF\"\\\x00\x7f\xff";
    for &(at, op, b) in edits {
        if bytes.is_empty() {
            return;
        }
        let at = at % bytes.len();
        let b = BYTES[b as usize % BYTES.len()];
        match op % 3 {
            0 => bytes[at] = b,
            1 => bytes.insert(at, b),
            _ => {
                bytes.remove(at);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn a_request_comes_out_as_one_message_with_the_same_meaning(r in request(), piece in 1usize..64) {
        let input = request_bytes(&r);
        let (out, used) = verify::forward_request(&input, piece)
            .map_err(|e| TestCaseError::fail(format!("refused: {e}")))?
            .ok_or_else(|| TestCaseError::fail("incomplete"))?;
        prop_assert_eq!(used, input.len());
        let (msg, took) = verify::read(&out, Kind::Request).map_err(TestCaseError::fail)?;
        prop_assert_eq!(took, out.len(), "one message, nothing after it");
        prop_assert_eq!(&msg.start_line, &format!("{} {} HTTP/1.1", r.method, r.path));
        prop_assert_eq!(msg.field("host"), vec![r.host.as_bytes()]);
        let e2e: Vec<(String, Vec<u8>)> = msg
            .fields
            .iter()
            .filter(|(n, _)| n.starts_with("X-E-"))
            .cloned()
            .collect();
        let want: Vec<(String, Vec<u8>)> = r
            .fields
            .iter()
            .map(|(n, v)| (n.clone(), v.clone().into_bytes()))
            .collect();
        prop_assert_eq!(e2e, want);
        prop_assert!(msg.field("x-hop").is_empty() && msg.field("keep-alive").is_empty());
        prop_assert_eq!(&msg.body, &r.body.data);
        prop_assert_eq!(msg.trailers, allowed_trailers(&r.body));
        prop_assert!(verify::request_invariant(&input).is_ok());
    }

    #[test]
    fn mutated_requests_are_refused_or_come_out_canonical(
        r in request(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4),
    ) {
        let mut input = request_bytes(&r);
        mutate(&mut input, &edits);
        if let Err(e) = verify::request_invariant(&input) {
            return Err(TestCaseError::fail(format!("{e}\ninput: {:?}", String::from_utf8_lossy(&input))));
        }
    }

    #[test]
    fn a_response_comes_out_as_one_message_with_the_same_body(
        b in body(),
        fields in end_to_end(),
        until_close in any::<bool>(),
        http10_client in any::<bool>(),
        nominate in any::<bool>(),
        piece in 1usize..64,
    ) {
        let (framing, body) = if until_close {
            (String::new(), b.data.clone())
        } else {
            encode(&b)
        };
        let mut head = String::from("HTTP/1.1 200 OK\r\n");
        if nominate {
            head.push_str("Connection: content-length, transfer-encoding\r\n");
        }
        for (n, v) in &fields {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        head.push_str(&framing);
        head.push_str("\r\n");
        let input = [head.into_bytes(), body].concat();
        let (out, used) = verify::forward_response(&input, false, http10_client, piece)
            .map_err(|e| TestCaseError::fail(format!("refused: {e}")))?
            .ok_or_else(|| TestCaseError::fail("incomplete"))?;
        prop_assert_eq!(used, input.len());
        let (msg, took) = verify::read(&out, Kind::Response).map_err(TestCaseError::fail)?;
        prop_assert_eq!(took, out.len());
        prop_assert_eq!(&msg.body, &b.data);
        let e2e: Vec<(String, Vec<u8>)> = msg.fields.iter().filter(|(n, _)| n.starts_with("X-E-")).cloned().collect();
        let want: Vec<(String, Vec<u8>)> = fields.iter().map(|(n, v)| (n.clone(), v.clone().into_bytes())).collect();
        prop_assert_eq!(e2e, want);
        if !http10_client && !until_close {
            prop_assert_eq!(msg.trailers, allowed_trailers(&b));
        }
        prop_assert!(verify::response_invariant(&input, false, http10_client).is_ok());
    }

    #[test]
    fn mutated_responses_are_refused_or_come_out_canonical(
        b in body(),
        head_request in any::<bool>(),
        http10_client in any::<bool>(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4),
    ) {
        let (framing, body) = encode(&b);
        let mut input = format!("HTTP/1.1 200 OK\r\nX-A: b\r\n{framing}\r\n").into_bytes();
        input.extend_from_slice(&body);
        mutate(&mut input, &edits);
        if let Err(e) = verify::response_invariant(&input, head_request, http10_client) {
            return Err(TestCaseError::fail(format!("{e}\ninput: {:?}", String::from_utf8_lossy(&input))));
        }
    }
}

/// Inputs the fuzz targets found, kept as regression cases: an HTTP/1.0 request without Host (the
/// fixpoint then gains X-Forwarded-Host), responses and requests with so many fields that the
/// proxy's own output had more than a head may carry (heads over `MAX_FIELDS` are refused; one
/// just under it may pass it with the proxy's own fields, which the next hop refuses with 431).
#[test]
fn inputs_found_by_fuzzing_hold_the_invariants() {
    verify::request_invariant(
        b"POST /x HTTP/1.0\r\n!s:Hxot  x\r\nConnection: content-lth\r\nContt: 1\r\n\r\nhello",
    )
    .unwrap();
    let response: &[u8] = b"\x00HTTP/1.1 200 Oogthennii:\non:\r\nn:ett\xff\xff\xffgth:n oeic:ength\r\ntei:\ncn:\ncnnn:\ncn:\r\nCo.nection:e:ntent-Lelgthength\r\nten:\ncnnn:\ncnnii:\non:\r\nCo.nection:e:ntent-Lelgthength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:\r\nCo.nection:e:ntent-Lelgthength\r\ntei:\ncn:\ncnnn:\ncnnii:\ncnnteic:ength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:\r\nCo.nection:entent-Lelgthength\r\ntei:\ncn:\ncnnn:\ncnnii:\ncnnteic:ength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:\r\nCo.nnii:\non:\r\nCo.nectiCo.nection:e:c:ength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:\r\nCo.nection:e:ntent-Lelgthength\r\ntei:\ncn:\ncnnn:\ncnnii:\ncnnteic:ength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:\r\nCo.nection:e: 1\r\nCo.nection:ett\xff\xff\xffgth:n oeic:ength\r\ntei:\ncn:\ncnnn:\ncn:\r\nCo.nection:e:ntent-Lelgthength\r\nten:\ncnnn:\ncnnii:\non:\r\nCo.nection:e:ntent-Lelgthength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:\r\nCo.nection:e:ntent-Lelgthength\r\ntei:\ncn:\ncnnn:\ncnnii:\ncnnteic:ength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:\r\nCo.nection:entent-Lelgthength\r\ntei:\ncn:\ncnnn:\ncnnii:\ncnnteic:ength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:\r\nCo.nnii:\non:\r\nCo.nection:e:ntent-Lelgthength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:\r\nCo.nection:e:ntent-Lelgthength\r\ntei:\ncn:\ncnnn:\ncnnii:\ncnnteic:ength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:\r\nCo.nection:entent-Lelgthength\r\ntei:\ncn:\ncnnn:\ncnnii:\ncnnteic:ength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:\r\nCo.nection:e: ectitt\r\n\r\nhi";
    verify::response_invariant(&response[1..], response[0] & 1 == 1, response[0] & 2 == 2).unwrap();
    verify::request_invariant(b"GET /a?b HTTP/1.1\r\nHoX-HHos%t: sc\xff: \nX--HHos%t: sc\xff\xce \nX-HHost: svc\r\n`ost: sHTTP/1.1\r\nHost: svc\r\n`onnection: \nX-Hsnnection: \nX-Hs%t: sc\xff: \nX-HHost: svc\r\n`o`onnectign%t: sc\xff: \nX-HHost: svc\r\n`o`onnectign: \nX-HHosost%t: sc\xff: \nX-HHost: svc\r\n`o`onnectign: \nX-HHosost: svgc\r\n`: \nXst: svc\r\n`o`onnectign%t: sc\xff: \nX-HHost: svc\r\n`o`onnectign: \nX-HHosost%t: sc\xff: \nX-HHost: svc\r\n`o`onnectign: \nX-HHosost: svgc\r\n`: \nX-HHosost: svc: \nX-HHosost: svc\r\n`: \nX-HHosost: svc\xf3\xf5\x9f\xd2\xb7\xb7\x90\x8ct: \nX-HHosost: svion: \nX-Hodonnegn: \nX-HHosost: svc\r\n`: \nX-HHosost: svc\r\n`o`onnection: \nX-Ho`onnecHHost: svc\r\nX-HHost: svc\r\n`o`onnectign: \nXHHosost: svc\r\n`: \nX-HHoso: svc\r\n`: \nX-HHosost: svc\r\n`o`onnection: \nX-Ho`onnecHHost: svc\r\nX-HHost: svc\r\n`o`onnectign: \n0X-HHosost: svc\r\n`: \nX-HHososost: svc\r\n`onnection: \nXH-snnecti: oXn\n-Hs%t: sc\xff: \nX-HHost: svc\r\n`o`onnectign%t: sc\xff: \nX-HHost: svc\r\n`o`onnectign: \nX-HHosost: svgc\r\n`: \nX-HHosost: svc: \nX-HHosost: svc\r\n`: \nX-HHosost: svc\xf3\xf5\x9f\xd2t: \nX-HHosost: svion: \nX-Hodonnegn: \nX-HHosost: svc\r\n`: \nX-HHosost: svc\r\n`o`onnectiHosost: svc\xf3\xf5\x9f\xd2\xb7\xb7\x90\x8ct: \nX-HHosost: svion: \nX-Hodonnegn: \nX-HHosost: svc\r\n`: \nX-HHosost: svc\r\n`o`onnection: \nX-Ho`onnecHHost: svc\r\nX-HHost: svc\r\n`o`onnectign: \nXHHosost: svc\r\n`: \nX-HHoso: svc\r\n`: \nX-HHosost: svc\r\n`o`onnection: \nX-Ho`onnecHHost: svc\r\nX-HHost: svc\r\n`o`onnectign: \n2X-HHosost: svc\r\n`: \nX-HHososost: svc\r\n`onnection: \nXH-snnecti: oXn\n-Hs%t: sc\xff: \nX-HHost: svc\r\n`o`onnectign%t: sc\xff: \nX-HHost: svc\r\n`o`onnectign: \nX-HHosost: svgc\r\n`: \nX-HHosost: svc: \nX-HHosost: svc\r\n`: \nX-HHosost: svc\xf3\xf5\x9f\xd2t: \nX-HHosost: svion: \nX-Hodonnegn: \nX-HHosost: svc\r\n`: \nX-HHosost: svc\r\n`o`onnection: \nX-Ho`onnecHHost: svc\r\nX-HHost: svc\r\n`o`onnectign: \nX-HHosost: svc\r\n`: \nX-HHososost: svc\r\n`onnection: \nXH-snnecti: oXn\n-Hs%ction: \nX-HHost: sc\xff:1\r\n\r\n").unwrap();
    let response: &[u8] = b"\x00HTTP/1.1 200 Oogthennii:\non:\r\nCo.nection:e:c:ength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:nn:\ncnnii:\non:\r\nCo.nection:e:ntent-Lelgthength\r\ntei:\ncn:\ncnnn:\ncnnii:\ncnnteic:ength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:\r\nCo.nection:entent-Lelgthength\r\ntei:\ncn:\ncnnn:\ncnnii:\ncnnteic:ength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:\r\nCo.nni.nection:e:c:ength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:nn:\ncnnii:\non:\r\nCo.nection:e:ntent-Lelgthength\r\ntei:\ncn:\ncnnn:\ncnnii:\ncnnteic:ength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:\r\nCo.nection:entent-Lelgthength\r\ntei:\ncn:\ncnnn:\ncnnii:\ncnnteic:ength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:\r\nCo.nnii:\non:\r\nion:e:ntent-Lelgthength\r\ntei:\ncn:\ncnnn:\ncnnii:\ncnnteic:ength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:\r\nCo.nection:entent-Lelgth\ntei:\ncn:\ncnnn:\ncnnii:\non:\r\nCo.nection:entent-Lelgthength\r\ntei:\ncn:\ncnnn::\ncnnn:\ncnnii:\non:nn:\ncnnii:\non:\r\nCo.nection:e:ntent-Lelgthength\r\ntei:\ncn:\ncnnn:\ncnnii:\ncnnteic:ength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:\r\nCo.nection:entent-Lelgthengt\ncnnii:\ncnnteic:ength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:\r\nCo.nection:\ncnnii:\ncnnteic:ength\r\ntei:\ncn:\ncnnn:\ncnnii:\non:\r\nCo.nni.nection:e:c:ength\r\ntei:\ncn:\nc:e: ectitt\r\n\r\nhi";
    verify::response_invariant(&response[1..], response[0] & 1 == 1, response[0] & 2 == 2).unwrap();
}

//! Unit tests of the head rules; the property tests of the whole message are in `props.rs`.

use super::head::valid_authority;
use super::*;

type Parsed = (Framing, bool, Option<String>, String);

fn req(text: &str) -> Result<Option<Parsed>, HeadError> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let parsed = parse_request(text.as_bytes(), &mut hs)?.map(|r| {
        let mut out = Vec::new();
        let hop = Hop {
            client_ip: "10.0.0.1",
            via: "sy-1",
            tls: false,
        };
        r.write_upstream_head(&mut out, &r.target, r.host.unwrap_or("svc"), &hop);
        (
            r.framing,
            r.keep_alive,
            r.host.map(str::to_string),
            String::from_utf8(out).unwrap(),
        )
    });
    Ok(parsed)
}

fn status(text: &str) -> u16 {
    match req(text) {
        Ok(Some(_)) => 200,
        Ok(None) => 0,
        Err(e) => e.status(),
    }
}

#[test]
fn request_heads_are_rewritten_for_the_upstream() {
    let (framing, keep, _, head) = req("GET /a?b HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nX-Forwarded-For: 1.2.3.4\r\nAccept: */*\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(framing, Framing::Empty);
    assert!(keep);
    assert_eq!(
        head,
        "GET /a?b HTTP/1.1\r\nHost: svc\r\nAccept: */*\r\nVia: 1.1 sy-1\r\nX-Forwarded-For: 1.2.3.4, 10.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: svc\r\n\r\n"
    );
}

#[test]
fn framing_fields_are_the_proxys_own_whatever_connection_names() {
    // finding 1: Connection: content-length must not take the length away from the body
    let (framing, _, _, head) = req(
        "POST /x HTTP/1.1\r\nHost: svc\r\nConnection: content-length, transfer-encoding, host\r\nContent-Length: 005\r\n\r\n",
    )
    .unwrap()
    .unwrap();
    assert_eq!(framing, Framing::Length(5));
    assert!(head.contains("\r\nContent-Length: 5\r\n"), "{head}");
    assert!(
        head.starts_with("POST /x HTTP/1.1\r\nHost: svc\r\n"),
        "{head}"
    );
    // equal duplicate lengths become one field
    let (_, _, _, head) =
        req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
    assert_eq!(head.matches("Content-Length").count(), 1, "{head}");
}

#[test]
fn framing_rules() {
    let f = |t: &str| req(t).map(|r| r.map(|(f, k, _, _)| (f, k)));
    assert_eq!(
        f("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"),
        Ok(Some((Framing::Length(5), true)))
    );
    assert_eq!(
        f("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
        Err(HeadError::Invalid("conflicting content-length"))
    );
    for bad in [
        "-1",
        "+5",
        "5 5",
        "0x5",
        "",
        "9223372036854775808",
        "99999999999999999999",
    ] {
        let t = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {bad}\r\n\r\n");
        assert_eq!(
            f(&t),
            Err(HeadError::Invalid("invalid content-length")),
            "{bad:?}"
        );
    }
    assert_eq!(
        f("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9223372036854775807\r\n\r\n"),
        Ok(Some((Framing::Length(9223372036854775807), true)))
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
    assert!(f("GE\x01T / HTTP/1.1\r\n\r\n").is_err());
    // chunked wins over a length, which is not forwarded, and the connection closes after
    let (framing, keep, _, head) = req(
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .unwrap()
    .unwrap();
    assert_eq!((framing, keep), (Framing::Chunked, false));
    assert!(
        !head.to_ascii_lowercase().contains("content-length"),
        "{head}"
    );
    assert!(head.contains("Transfer-Encoding: chunked\r\n"), "{head}");
}

#[test]
fn transfer_codings_follow_rfc9112_section_6_1() {
    // the cases of HAProxy's http_transfer_encoding.vtc, and a split list
    let te = |v: &str| {
        status(&format!(
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {v}\r\n\r\n"
        ))
    };
    assert_eq!(te("chunked"), 200);
    assert_eq!(te("Chunked"), 200);
    assert_eq!(te("chunked, chunked"), 400);
    assert_eq!(te("chunked, gzip, chunked"), 400);
    assert_eq!(te("chunked, gzip"), 400);
    assert_eq!(te("gzip"), 400);
    assert_eq!(te("gzip, chunked"), 501);
    assert_eq!(te(""), 400);
    assert_eq!(te("chunked;q=1"), 400);
    assert_eq!(te("\"chunked\""), 400);
    assert_eq!(
        status("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
        400
    );
    assert_eq!(
        status("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"),
        501
    );
    // HTTP/1.0 with a transfer coding: faulty framing
    assert_eq!(
        status("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
        400
    );
    // TE: trailers is kept as the only TE value; other TE values are dropped
    let (_, _, _, head) = req(
        "POST / HTTP/1.1\r\nHost: a\r\nTE: trailers, gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .unwrap()
    .unwrap();
    assert!(head.contains("\r\nTE: trailers\r\n"), "{head}");
    let (_, _, _, head) = req("GET / HTTP/1.1\r\nHost: a\r\nTE: gzip\r\n\r\n")
        .unwrap()
        .unwrap();
    assert!(!head.contains("TE:"), "{head}");
}

#[test]
fn host_follows_rfc9112_section_3_2() {
    // duplicate Host, equal or not (finding 3)
    assert_eq!(status("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), 400);
    assert_eq!(status("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"), 400);
    assert_eq!(status("GET / HTTP/1.1\r\n\r\n"), 400);
    assert_eq!(status("GET / HTTP/1.1\r\nHost:\r\n\r\n"), 400);
    // HTTP/1.0 may go without
    assert_eq!(status("GET /svc/ HTTP/1.0\r\n\r\n"), 200);
    // nginx-tests http_host.t
    for good in [
        "www.abcd-ef.g02.xyz",
        "abcd-ef.g02.xyz:8080",
        "www.abcd-ef.g02.xyz.",
        "123.40.56.78:987",
        "[abcd::ef98:0:7654:321]",
        "[abcd::ef98:0:7654:321]:80",
        "[::ffff:12.30.67.89]",
        "[v0123456789aBcDeF.!$&'()*+,;=-._~AbCdEfGhIjKlMnOpQrStUvWxYz0123456789:]",
        "a%2Db",
        "svc:",
    ] {
        assert!(valid_authority(good.as_bytes()), "{good}");
        assert_eq!(
            status(&format!("GET / HTTP/1.1\r\nHost: {good}\r\n\r\n")),
            200,
            "{good}"
        );
    }
    for bad in [
        "example.com/\\:552",
        "..examp-LE.com",
        "com.exa-m.45..:",
        "[abcd::e\\f98:0/:7654:321]",
        "[abcd::ef98:0:7654:321]..:98",
        "[ab..cd::ef98:0:7654:321]",
        "123.40.56.78:9000:80",
        "a b",
        "user@host",
        "host:8x",
        "host:123456",
        "[::1",
        "%zz",
        "localhost\x02",
    ] {
        assert!(!valid_authority(bad.as_bytes()), "{bad:?}");
    }
    assert_eq!(status("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"), 400);
}

#[test]
fn request_targets_follow_rfc9112_section_3_2() {
    // the cases of HAProxy's h1_request_target_validation.vtc
    let t = |m: &str, u: &str| status(&format!("{m} {u} HTTP/1.1\r\nHost: haproxy.org\r\n\r\n"));
    assert_eq!(t("OPTIONS", "*"), 200);
    assert_eq!(t("OPTIONS", "/"), 200);
    assert_eq!(t("OPTIONS", "http://haproxy.org"), 200);
    assert_eq!(t("OPTIONS", "*/test"), 400);
    assert_eq!(t("GET", "*"), 400);
    assert_eq!(t("CONNECT", "haproxy.org:80"), 200);
    assert_eq!(t("CONNECT", "haproxy.org"), 400);
    assert_eq!(t("CONNECT", "/"), 400);
    assert_eq!(t("CONNECT", "http://haproxy.org:80"), 400);
    assert_eq!(t("GET", "/"), 200);
    assert_eq!(t("GET", "haproxy.org:80"), 400);
    assert_eq!(t("GET", "admin"), 400);
    assert_eq!(t("GET", "admin/a/b"), 400);
    assert_eq!(t("GET", "/a#frag"), 400);
    assert_eq!(t("GET", "ftp://haproxy.org/"), 400);
    assert_eq!(t("GET", "http://user@haproxy.org/"), 400);
    assert_eq!(t("GET", "http:///x"), 400);
    assert_eq!(t("GET", "http://a/b\\c"), 200);
}

#[test]
fn absolute_targets_become_origin_form_and_their_authority_the_host() {
    // finding 4
    let (_, _, host, head) = req("GET http://svc.example:8080/x?y HTTP/1.1\r\nHost: other\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(host.as_deref(), Some("svc.example:8080"));
    assert!(
        head.starts_with("GET /x?y HTTP/1.1\r\nHost: svc.example:8080\r\n"),
        "{head}"
    );
    assert!(!head.contains("other"), "{head}");
    let (_, _, host, head) = req("GET HTTP://svc?q HTTP/1.1\r\nHost: svc\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(host.as_deref(), Some("svc"));
    assert!(head.starts_with("GET /?q HTTP/1.1\r\n"), "{head}");
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
    let many: String = (0..MAX_FIELDS).map(|i| format!("X-{i}: v\r\n")).collect();
    assert_eq!(
        status(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")),
        431
    );
}

#[test]
fn obsolete_and_ambiguous_syntax_is_refused() {
    for bad in [
        "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
        "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
        "GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: a\r\nUpgrade: b\r\nConnection: upgrade\r\n\r\n",
    ] {
        assert_eq!(status(bad), 400, "{bad:?}");
    }
}

fn resp(text: &[u8], head_request: bool) -> Result<(Framing, bool, String), HeadError> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let r = parse_response(text, &mut hs, head_request)?.expect("complete");
    let out_framing = match r.framing {
        Framing::Empty => OutFraming::None,
        Framing::Length(n) => OutFraming::Length(n),
        Framing::Chunked | Framing::UntilClose => OutFraming::Chunked,
    };
    let mut out = Vec::new();
    r.write_client_head(&mut out, ClientConnection::KeepAlive11, out_framing);
    Ok((r.framing, r.keep_alive, String::from_utf8(out).unwrap()))
}

#[test]
fn response_framing_and_client_head() {
    let (framing, keep, head) = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-A: b\r\n\r\nhi", false).unwrap();
    assert_eq!((framing, keep), (Framing::Length(2), true));
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\nX-A: b\r\nContent-Length: 2\r\n\r\n"
    );
    let (framing, keep, _) = resp(b"HTTP/1.0 200 OK\r\n\r\n", false).unwrap();
    assert_eq!((framing, keep), (Framing::UntilClose, false));
    // a HEAD answer keeps its declared length as metadata, a 204 loses it
    let (framing, _, head) = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true).unwrap();
    assert_eq!(framing, Framing::Empty);
    assert!(head.contains("Content-Length: 9\r\n"), "{head}");
    let (framing, _, head) = resp(
        b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n",
        false,
    )
    .unwrap();
    assert_eq!(framing, Framing::Empty);
    assert!(!head.contains("Content-Length"), "{head}");
    let (framing, keep, _) = resp(b"HTTP/1.1 304 Not Modified\r\n\r\n", false).unwrap();
    assert_eq!((framing, keep), (Framing::Empty, true));
    // Connection: content-length from an instance (finding 1, response side)
    let (framing, _, head) = resp(
        b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 3\r\n\r\n",
        false,
    )
    .unwrap();
    assert_eq!(framing, Framing::Length(3));
    assert!(head.contains("Content-Length: 3\r\n"), "{head}");
    // TE and CL: chunked wins, the length goes, the connection is not reused
    let (framing, keep, head) = resp(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 30\r\n\r\n",
        false,
    )
    .unwrap();
    assert_eq!((framing, keep), (Framing::Chunked, false));
    assert!(!head.contains("Content-Length"), "{head}");
}

#[test]
fn malformed_responses_are_refused() {
    for bad in [
        &b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000000000000\r\n\r\n",
        b"HTTP/1.1 099 Low\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
    ] {
        assert!(
            resp(bad, false).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn status_lines_parse() {
    assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content"), Ok((1, 204)));
    assert_eq!(parse_status_line(b"HTTP/1.0 503\r"), Ok((0, 503)));
    assert!(parse_status_line(b"SSH-2.0-OpenSSH").is_err());
    assert!(parse_status_line(b"HTTP/1.1 20x ok").is_err());
    assert!(parse_status_line(b"HTTP/1.1 2000 x").is_err());
    assert!(parse_status_line(b"HTTP/1.1 099 x").is_err());
    assert!(parse_status_line(b"HTTP/2 200").is_err());
}

#[test]
fn via_names_each_proxy_a_request_passed() {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let text = b"GET / HTTP/1.1\r\nHost: a\r\nVia: 1.0 fred, 1.1 sy-1 (switchyard)\r\nVia: HTTP/1.1 edge\r\n\r\n";
    let r = parse_request(text, &mut hs).unwrap().unwrap();
    assert!(r.via_has("sy-1") && r.via_has("edge") && r.via_has("fred"));
    assert!(!r.via_has("sy") && !r.via_has("1.1"));
    let mut out = Vec::new();
    r.write_upstream_head(
        &mut out,
        "/",
        "a",
        &Hop {
            client_ip: "10.0.0.1",
            via: "sy-2",
            tls: true,
        },
    );
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains(
            "Via: 1.0 fred, 1.1 sy-1 (switchyard)\r\nVia: HTTP/1.1 edge\r\nVia: 1.1 sy-2\r\n"
        ),
        "{out}"
    );
    assert!(
        out.contains("\r\nX-Forwarded-Proto: https\r\n") && !out.contains("Proto: http\r\n"),
        "a TLS client's request is forwarded with X-Forwarded-Proto: https: {out}"
    );
}

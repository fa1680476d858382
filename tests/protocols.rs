//! HTTP/2 and TLS through the real binary: curl with prior knowledge and over TLS (a test CA made
//! here), SNI, certificate reload on SIGHUP, start-up errors naming files, and instances that
//! speak h2c, https and h2.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use support::backend::Mode;
use support::certs::TestCa;
use support::{eventually, free_port, Backend, EtcdServer, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// curl with `args`; returns (exit code, stdout).
async fn curl(args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "--max-time", "10"])
        .args(args)
        .output()
        .await
        .expect("running curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Splits curl's output of `-w '\n%{http_code} %{http_version}'` into (body, code, version).
fn split(out: &str) -> (String, String, String) {
    let (body, tail) = out.rsplit_once('\n').unwrap_or(("", out));
    let mut t = tail.split(' ');
    (
        body.to_string(),
        t.next().unwrap_or("").to_string(),
        t.next().unwrap_or("").to_string(),
    )
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

const W: &str = "\n%{http_code} %{http_version}";

#[tokio::test]
async fn h2c_prior_knowledge_and_http1_share_the_proxy_port() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config("[log]\naccess_log = true\n")
        .start()
        .await;
    let old = Backend::start("h1").await;
    let new = Backend::start_mode("h2c", Mode::H2cOrHttp1).await;
    etcd.put("/services/echo/1", old.addr_string()).await;
    let meta = format!(
        r#"{{"addr":"{}","metadata":{{"protocol":"h2c"}}}}"#,
        new.addr
    );
    etcd.put("/services/modern/1", meta).await;
    proxy.wait_usable("echo", 1).await;
    proxy.wait_usable("modern", 1).await;
    let url = proxy.url("/hello?x=1");

    // an HTTP/2 client reaches an HTTP/1.1 instance, routed by :authority
    let (code, out) = curl(&["--http2-prior-knowledge", "-H", "Host: echo", "-w", W, &url]).await;
    assert_eq!(code, 0, "curl --http2-prior-knowledge failed: {out}");
    let (body, status, version) = split(&out);
    assert_eq!((status.as_str(), version.as_str()), ("200", "2"), "{out}");
    let echo = json(&body);
    assert_eq!(echo["backend"], "h1");
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["uri"], "/hello?x=1");
    assert_eq!(echo["headers"]["host"][0], "echo");
    assert_eq!(echo["headers"]["x-forwarded-for"][0], "127.0.0.1");

    // routed by path (no service named by :authority), the prefix stripped
    let by_path = proxy.url("/echo/deeper/path?q=2");
    let (_, out) = curl(&["--http2-prior-knowledge", "-w", W, &by_path]).await;
    let (body, status, _) = split(&out);
    assert_eq!(status, "200", "{out}");
    assert_eq!(json(&body)["uri"], "/deeper/path?q=2", "{body}");

    // HTTP/1.1 on the same port still goes the native way
    let (status, body) = proxy.get_service("echo", "/hello").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["version"], "HTTP/1.1");

    // HTTP/2 to an h2c instance, and an HTTP/1.1 client to it too
    let (_, out) = curl(&[
        "--http2-prior-knowledge",
        "-H",
        "Host: modern",
        "-w",
        W,
        &url,
    ])
    .await;
    let (body, status, _) = split(&out);
    assert_eq!(status, "200", "{out}");
    assert_eq!(json(&body)["version"], "HTTP/2.0", "{body}");
    let (status, body) = proxy.get_service("modern", "/hello").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["version"], "HTTP/2.0", "{body}");
    assert_eq!(json(&body)["backend"], "h2c");

    // a request body streamed through HTTP/2 (1 MiB)
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("upload.bin");
    std::fs::write(&file, vec![7u8; 1 << 20]).unwrap();
    let data = format!("@{}", file.display());
    let upload = proxy.url("/upload");
    let (_, out) = curl(&[
        "--http2-prior-knowledge",
        "-H",
        "Host: echo",
        "--data-binary",
        &data,
        "-w",
        W,
        &upload,
    ])
    .await;
    let (body, status, _) = split(&out);
    assert_eq!(status, "200", "{out}");
    assert_eq!(json(&body)["len"], 1 << 20, "{body}");

    // our own answers over HTTP/2
    let (_, out) = curl(&[
        "--http2-prior-knowledge",
        "-H",
        "Host: nosuch",
        "-w",
        W,
        &url,
    ])
    .await;
    let (body, status, _) = split(&out);
    assert_eq!(status, "404", "{out}");
    // (no service "nosuch": the path is tried next)
    assert!(body.contains("unknown service \"hello\""), "{body}");

    // HTTP/2 requests are in the access log like HTTP/1.1 ones
    let log = plain(&proxy.log());
    assert!(
        log.lines().any(|l| l.contains("switchyard::access")
            && l.contains("service=modern")
            && l.contains("method=GET")
            && l.contains("path=/hello")
            && l.contains("status=200")),
        "no access line for the HTTP/2 request to modern:\n{log}"
    );
}

/// Log text without terminal colour codes.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `[tls]` listening on 127.0.0.1 at `ports` with `certs`.
fn tls_config(ports: &[u16], certs: &[(&Path, &Path)]) -> String {
    let listen: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let mut text = format!("[tls]\nlisten = [{}]\n", listen.join(", "));
    for (cert, key) in certs {
        text.push_str(&format!(
            "[[tls.certificates]]\ncert_file = {:?}\nkey_file = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ));
    }
    text
}

async fn wait_listening(port: u16) {
    eventually(Duration::from_secs(10), "the TLS listener", || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await;
}

/// A TLS client connection trusting `ca_pem`, to `name` on 127.0.0.1:`port` (HTTP/1.1 by ALPN).
async fn tls_client(
    ca_pem: &str,
    name: &str,
    port: u16,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from(name.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}

/// One keep-alive GET on an open connection; returns the response head and body as text.
async fn get_on<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    host: &str,
) -> String {
    let req = format!("GET /again HTTP/1.1\r\nHost: {host}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("a response on the open connection")
            .expect("reading the open connection");
        assert!(n > 0, "the open connection was closed");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
    }
}

#[tokio::test]
async fn tls_terminates_with_sni_certificates_and_reloads_them_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("switchyard test CA");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let (a_cert, a_key) = ca.leaf(&["a.test"]).write(dir.path(), "a");
    let (b_cert, b_key) = ca.leaf(&["b.test", "*.b.test"]).write(dir.path(), "b");
    let port = free_port();
    let etcd = EtcdServer::start();
    let config = tls_config(&[port], &[(&a_cert, &a_key), (&b_cert, &b_key)]);
    let proxy = Proxy::builder(&etcd).config(&config).start().await;
    let backend = Backend::start("tls-echo").await;
    etcd.put("/services/echo/1", backend.addr_string()).await;
    proxy.wait_usable("echo", 1).await;
    wait_listening(port).await;

    let ca_path = ca_file.display().to_string();
    let https = |name: &str| format!("https://{name}:{port}/x");
    let resolve = |name: &str| format!("{name}:{port}:127.0.0.1");
    let call = |name: &'static str, extra: Vec<&'static str>| {
        let (url, resolve, ca) = (https(name), resolve(name), ca_path.clone());
        async move {
            let mut args = vec![
                "--cacert",
                &ca,
                "--resolve",
                &resolve,
                "-H",
                "Host: echo",
                "-w",
                W,
            ];
            args.extend(extra);
            args.push(&url);
            curl(&args).await
        }
    };

    // ALPN h2, SNI a.test: the first certificate
    let (code, out) = call("a.test", vec!["--http2"]).await;
    assert_eq!(code, 0, "https to a.test failed (curl exit {code}): {out}");
    let (body, status, version) = split(&out);
    assert_eq!((status.as_str(), version.as_str()), ("200", "2"), "{out}");
    assert_eq!(json(&body)["headers"]["x-forwarded-proto"][0], "https");

    // SNI picks the second certificate (a wildcard name too); HTTP/1.1 by ALPN; TLS 1.2
    let (code, out) = call("b.test", vec!["--http1.1"]).await;
    assert_eq!(code, 0, "https to b.test failed (curl exit {code}): {out}");
    let (body, _, version) = split(&out);
    assert_eq!(version, "1.1", "{out}");
    assert_eq!(json(&body)["headers"]["x-forwarded-proto"][0], "https");
    // a 3 MiB upload over HTTP/1.1 + TLS: streamed to the instance while its answer is read
    let upload = dir.path().join("upload.bin");
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    let sum: u64 = data.iter().map(|&b| u64::from(b)).sum();
    std::fs::write(&upload, &data).unwrap();
    let (url, res) = (format!("https://b.test:{port}/upload"), resolve("b.test"));
    let at_file = format!("@{}", upload.display());
    let (code, out) = curl(&[
        "--http1.1",
        "--cacert",
        &ca_path,
        "--resolve",
        &res,
        "-H",
        "Host: echo",
        "--data-binary",
        &at_file,
        "-w",
        W,
        &url,
    ])
    .await;
    assert_eq!(code, 0, "upload over TLS failed (curl exit {code}): {out}");
    let (body, status, _) = split(&out);
    assert_eq!(status, "200", "{out}");
    assert_eq!(
        (json(&body)["len"].as_u64(), json(&body)["sum"].as_u64()),
        (Some(data.len() as u64), Some(sum)),
        "the instance got the whole upload: {body}"
    );
    let (code, out) = call("x.b.test", vec!["--tlsv1.2", "--tls-max", "1.2"]).await;
    assert_eq!(
        code, 0,
        "TLS 1.2 to x.b.test failed (curl exit {code}): {out}"
    );

    // a name no certificate has gets the default one, which fails verification (curl 60)
    let (code, out) = call("c.test", vec![]).await;
    assert_eq!(
        code, 60,
        "c.test should fail certificate verification: {out}"
    );
    eventually(
        Duration::from_secs(5),
        "the failed handshake counted",
        || async {
            let m = proxy.metrics().await;
            match support::metric_value(&m, "switchyard_tls_handshake_failures_total") {
                Some(n) if n >= 1.0 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // an open connection, then a new certificate for a.test from another CA, then SIGHUP
    let mut open = tls_client(&ca.pem, "a.test", port).await;
    let first = get_on(&mut open, "echo").await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let ca2 = TestCa::new("switchyard second CA");
    let ca2_path = ca2.write(dir.path(), "ca2.pem").display().to_string();
    ca2.leaf(&["a.test"]).write(dir.path(), "a");
    let pid = proxy.pid().expect("proxy pid").to_string();
    let hup = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    assert!(hup.success());
    let (url, res) = (https("a.test"), resolve("a.test"));
    eventually(Duration::from_secs(10), "the reloaded certificate", || {
        let (url, res, ca2) = (url.clone(), res.clone(), ca2_path.clone());
        async move {
            let (code, out) = curl(&[
                "--cacert",
                &ca2,
                "--resolve",
                &res,
                "-H",
                "Host: echo",
                &url,
            ])
            .await;
            if code == 0 {
                Ok(())
            } else {
                Err(format!("curl exit {code}: {out}"))
            }
        }
    })
    .await;
    let (code, _) = call("a.test", vec![]).await;
    assert_eq!(
        code, 60,
        "the old CA no longer verifies a.test after the reload"
    );
    // the connection made before the reload still works
    let again = get_on(&mut open, "echo").await;
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    assert!(proxy.log().contains("TLS certificates reloaded"));
}

#[tokio::test]
async fn startup_errors_name_the_missing_or_mismatched_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("ca");
    let (a_cert, a_key) = ca.leaf(&["a.test"]).write(dir.path(), "a");
    let (_, b_key) = ca.leaf(&["b.test"]).write(dir.path(), "b");
    let missing = dir.path().join("missing.key");
    let bin = env!("CARGO_BIN_EXE_switchyard");
    let run = |cert: &Path, key: &Path| {
        Command::new(bin)
            .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--tls-listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .output()
            .expect("running switchyard")
    };
    let out = run(&a_cert, &missing);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a missing key file must stop the start"
    );
    assert!(err.contains(&missing.display().to_string()), "{err}");

    let out = run(&a_cert, &b_key);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a key of another certificate must stop the start"
    );
    assert!(
        err.contains("does not match") && err.contains(&b_key.display().to_string()),
        "{err}"
    );
    let garbage = dir.path().join("garbage.crt");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let out = run(&garbage, &a_key);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&garbage.display().to_string()), "{err}");
}

#[tokio::test]
async fn https_and_h2_instances_are_verified_against_the_upstream_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("upstream CA");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let other = TestCa::new("unrelated CA").write(dir.path(), "other.pem");
    let leaf = ca.leaf(&["127.0.0.1"]);
    let secure = Backend::start_mode("secure", Mode::Tls(leaf.server_config())).await;
    let mutual = Backend::start_mode("mutual", Mode::Tls(leaf.server_config_mtls(&ca))).await;
    let (client_cert, client_key) = ca.leaf(&["switchyard.test"]).write(dir.path(), "client");
    let etcd = EtcdServer::start();
    let config = format!(
        "[upstream_tls]\nca_file = {:?}\n[services.strict.tls]\nca_file = {:?}\n\
         [services.mtls]\nprotocol = \"h2\"\n[services.mtls.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        ca_file.display().to_string(),
        other.display().to_string(),
        client_cert.display().to_string(),
        client_key.display().to_string(),
    );
    let proxy = Proxy::builder(&etcd).config(&config).start().await;
    for (service, protocol, backend) in [
        ("https", "https", &secure),
        ("h2", "h2", &secure),
        ("strict", "https", &secure),
        ("nocert", "https", &mutual),
    ] {
        let value = format!(
            r#"{{"addr":"{}","metadata":{{"protocol":"{protocol}"}}}}"#,
            backend.addr
        );
        etcd.put(&format!("/services/{service}/1"), value).await;
    }
    // checked over TLS as the proxy reaches them: healthy when the certificate verifies (and,
    // with mutual TLS, ours is accepted), unhealthy otherwise
    proxy.wait_usable("https", 1).await;
    proxy.wait_usable("h2", 1).await;
    for bad in ["strict", "nocert"] {
        let key = format!("/services/{bad}/1");
        eventually(Duration::from_secs(10), &format!("{bad} unhealthy"), || {
            let key = key.clone();
            let proxy = &proxy;
            async move {
                let v = proxy.admin_json(&format!("/api/services/{bad}")).await;
                let i = &v["instances"][0];
                match (i["key"].as_str(), i["health"].as_str()) {
                    (Some(k), Some("unhealthy")) if k == key => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        })
        .await;
    }
    let (status, body) = proxy.get_service("https", "/over-tls").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["version"], "HTTP/1.1", "{body}");
    let (status, body) = proxy.get_service("h2", "/over-tls").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        json(&body)["version"],
        "HTTP/2.0",
        "ALPN h2 to an h2 instance: {body}"
    );
    // HTTP/2 from the client too
    let url = proxy.url("/both");
    let (_, out) = curl(&["--http2-prior-knowledge", "-H", "Host: h2", "-w", W, &url]).await;
    let (body, status, _) = split(&out);
    assert_eq!(status, "200", "{out}");
    assert_eq!(json(&body)["version"], "HTTP/2.0", "{body}");
    // the service's own CA does not know the instance's certificate: 502 naming the service
    let (status, body) = proxy.get_service("strict", "/x").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"strict\""), "{body}");
    let checked = proxy.admin_json("/api/services/strict").await;
    let detail = checked["instances"][0].to_string();
    assert!(detail.contains("TLS"), "the check says why: {detail}");

    // mutual TLS: the service's client certificate (its CA from [upstream_tls]); protocol from
    // [services.mtls], the registration is a plain host:port
    etcd.put("/services/mtls/1", mutual.addr_string()).await;
    proxy.wait_usable("mtls", 1).await;
    let (status, body) = proxy.get_service("mtls", "/mutual").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["backend"], "mutual", "{body}");
    assert_eq!(json(&body)["version"], "HTTP/2.0", "{body}");
    let (status, body) = proxy.get_service("nocert", "/x").await;
    assert_eq!(status, 503, "no client certificate, no answer: {body}");
}

#[tokio::test]
async fn shutdown_sends_goaway_and_open_http2_streams_finish() {
    use http_body_util::{BodyExt, Empty};
    let etcd = EtcdServer::start();
    let mut proxy = Proxy::builder(&etcd).start().await;
    let backend = Backend::start("slow").await;
    etcd.put("/services/echo/1", backend.addr_string()).await;
    proxy.wait_usable("echo", 1).await;

    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("HTTP/2 handshake with the proxy");
    tokio::spawn(conn);
    let req = |path: &str| {
        hyper::Request::get(format!("http://echo{path}"))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let slow = tokio::spawn(send.send_request(req("/slow?ms=1500")));
    eventually(
        Duration::from_secs(5),
        "the slow request to reach the instance",
        || {
            let hits = backend.hits();
            async move {
                if hits > 0 {
                    Ok(())
                } else {
                    Err("not yet".to_string())
                }
            }
        },
    )
    .await;
    let m = proxy.metrics().await;
    assert_eq!(
        support::metric_value(&m, "switchyard_gateway_connections{protocol=\"h2c\"}"),
        Some(1.0),
        "the open HTTP/2 connection is counted"
    );
    let pid = proxy.pid().expect("proxy pid").to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());

    // the stream that was open when the drain began is answered in full
    let resp = slow.await.unwrap().expect("the open stream is answered");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"slow slow 1500\n");
    // GOAWAY: no new stream on this connection
    eventually(
        Duration::from_secs(5),
        "GOAWAY to refuse new streams",
        || {
            let fut = send.send_request(req("/after"));
            async move {
                match fut.await {
                    Err(_) => Ok(()),
                    Ok(r) => Err(format!("a new stream was answered {}", r.status())),
                }
            }
        },
    )
    .await;
    let status = proxy.terminate(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
}

#[tokio::test]
async fn http2_limits_refuse_oversized_headers_and_a_silent_instance_is_retried() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd)
        .config("[proxy]\nconnect_timeout_ms = 500\nread_timeout_ms = 700\n[http2]\nmax_header_list_size = 16384\n")
        .start()
        .await;
    let good = Backend::start("good").await;
    let silent = Backend::start("silent").await;
    etcd.put("/services/echo/1", good.addr_string()).await;
    etcd.put("/services/echo/2", silent.addr_string()).await;
    proxy.wait_usable("echo", 2).await;
    let url = proxy.url("/x");

    let big = format!("x-big: {}", "x".repeat(20_000));
    let (code, out) = curl(&[
        "--http2-prior-knowledge",
        "-H",
        "Host: echo",
        "-H",
        &big,
        "-w",
        W,
        &url,
    ])
    .await;
    let (_, status, _) = split(&out);
    assert!(
        code != 0 || status == "431",
        "a 20 KB header over a 16 KB limit must be refused (curl exit {code}): {out}"
    );
    // the connection limit leaves ordinary requests alone
    let (_, out) = curl(&["--http2-prior-knowledge", "-H", "Host: echo", "-w", W, &url]).await;
    assert_eq!(split(&out).1, "200", "{out}");

    // one instance stops answering: bodiless GETs over HTTP/2 go to the other one after
    // read_timeout_ms instead of failing
    silent.set_hang(true);
    let mut gets = Vec::new();
    for _ in 0..2 {
        let url = url.clone();
        gets.push(tokio::spawn(async move {
            curl(&["--http2-prior-knowledge", "-H", "Host: echo", "-w", W, &url]).await
        }));
    }
    for g in gets {
        let (_, out) = g.await.unwrap();
        let (body, status, _) = split(&out);
        assert_eq!(status, "200", "{out}");
        assert_eq!(json(&body)["backend"], "good", "{body}");
    }
}

/// Rapid reset (CVE-2023-44487): a client that opens streams and resets them at once gets GOAWAY,
/// and what it started upstream is released.
#[tokio::test]
async fn rapid_reset_ends_the_connection_and_releases_its_streams() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let backend = Backend::start("b").await;
    etcd.put("/services/echo/1", backend.addr_string()).await;
    proxy.wait_usable("echo", 1).await;

    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let mut sent = 0;
    let mut client = client;
    for _ in 0..5_000 {
        let req = http::Request::get("http://echo/slow?ms=3000")
            .body(())
            .unwrap();
        let Ok(ready) = client.ready().await else {
            break;
        };
        client = ready;
        match client.send_request(req, true) {
            Ok((_, mut stream)) => {
                stream.send_reset(h2::Reason::CANCEL);
                sent += 1;
            }
            Err(_) => break,
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the connection should end after the reset flood");
    let err = ended
        .unwrap()
        .expect_err("the connection ends with an error (GOAWAY)");
    // the proxy ended it (the client may see the closed socket before it reads the GOAWAY)
    assert!(
        err.is_go_away() || err.is_io(),
        "expected GOAWAY after {sent} reset streams, got {err:?}"
    );
    // the client can see the GOAWAY before the proxy has logged why it sent it
    eventually(
        Duration::from_secs(10),
        "the proxy to log that it ended the connection with ENHANCE_YOUR_CALM",
        || async {
            let log = proxy.log();
            log.lines()
                .any(|l| l.contains("client connection ended") && l.contains("ENHANCE_YOUR_CALM"))
                .then_some(())
                .ok_or_else(|| "not in the log yet".to_string())
        },
    )
    .await;

    // the proxy still serves, and the streams it forwarded are released
    let (status, _) = proxy.get_service("echo", "/x").await;
    assert_eq!(status, 200);
    eventually(
        Duration::from_secs(10),
        "in-flight requests back to 0",
        || async {
            let v = proxy.admin_json("/api/services/echo").await;
            match v["instances"][0]["inflight"].as_u64() {
                Some(0) => Ok(()),
                other => Err(format!("inflight = {other:?}")),
            }
        },
    )
    .await;
}

/// An instance that answers `Upgrade: echo` with 101 and then echoes bytes.
async fn upgrade_echo() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if !text.contains("upgrade: echo") {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    return;
                }
                let switching =
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n";
                if s.write_all(switching).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A WebSocket-style upgrade over the TLS listener (the second of two addresses) becomes a
/// tunnel to the instance.
#[tokio::test]
async fn upgrades_over_tls_become_a_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("ws CA");
    let (cert, key) = ca.leaf(&["ws.test"]).write(dir.path(), "ws");
    let (first, port) = (free_port(), free_port());
    let etcd = EtcdServer::start();
    let config = tls_config(&[first, port], &[(&cert, &key)]);
    let proxy = Proxy::builder(&etcd).config(&config).start().await;
    let addr = upgrade_echo().await;
    etcd.put("/services/ws/1", addr.to_string()).await;
    proxy.wait_usable("ws", 1).await;
    wait_listening(port).await;

    let mut s = tls_client(&ca.pem, "ws.test", port).await;
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("101 in time")
            .unwrap();
        assert!(n > 0, "closed before the 101");
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for msg in [&b"ping"[..], b"bytes \x00\x01\x02 through TLS"] {
        s.write_all(msg).await.unwrap();
        let mut echoed = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echoed))
            .await
            .expect("echo through the tunnel")
            .unwrap();
        assert_eq!(echoed, msg);
    }
}

/// A CONTINUATION flood (one header block in endless CONTINUATION frames) ends the connection
/// with GOAWAY (ENHANCE_YOUR_CALM) instead of being buffered.
#[tokio::test]
async fn a_continuation_flood_ends_the_connection_with_goaway() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let backend = Backend::start("b").await;
    etcd.put("/services/echo/1", backend.addr_string()).await;
    proxy.wait_usable("echo", 1).await;

    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    // one literal header field (HPACK, not indexed, new name): x-a: 100 bytes
    let mut field = vec![0x00, 3];
    field.extend_from_slice(b"x-a");
    field.push(100);
    field.extend_from_slice(&[b'v'; 100]);
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    // HEADERS without END_HEADERS: GET http / (static table entries), then the flood
    let mut first = vec![0x82, 0x86, 0x84];
    first.extend_from_slice(&field);
    out.extend(frame(0x1, 0, 1, &first));
    for _ in 0..2_000 {
        out.extend(frame(0x9, 0, 1, &field));
    }
    // the proxy may close while we still write: only what it answers matters
    let _ = s.write_all(&out).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(elapsed) => {
                panic!("the connection stayed open through a CONTINUATION flood ({elapsed})")
            }
        }
    }
    // find GOAWAY among the frames the proxy sent
    let mut at = 0;
    let mut goaway = None;
    while at + 9 <= got.len() {
        let len = ((got[at] as usize) << 16) | ((got[at + 1] as usize) << 8) | got[at + 2] as usize;
        if got[at + 3] == 0x7 && at + 9 + 8 <= got.len() {
            let code = &got[at + 13..at + 17];
            goaway = Some(u32::from_be_bytes([code[0], code[1], code[2], code[3]]));
        }
        at += 9 + len;
    }
    assert_eq!(goaway, Some(0xb), "GOAWAY with ENHANCE_YOUR_CALM (0xb)");
    let (status, _) = proxy.get_service("echo", "/x").await;
    assert_eq!(status, 200, "the proxy still serves");
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/pid/status")
}

/// PING and SETTINGS floods from a client that never reads the acknowledgements: h2 keeps at
/// most one acknowledgement pending and reads no further frame until it is written, so the flood
/// is held back by TCP instead of buffered; the proxy's memory stays flat and it keeps serving.
#[tokio::test]
async fn ping_and_settings_floods_are_held_back_not_buffered() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let backend = Backend::start("b").await;
    etcd.put("/services/echo/1", backend.addr_string()).await;
    proxy.wait_usable("echo", 1).await;
    let pid = proxy.pid().expect("proxy pid");
    let before = rss_kib(pid);

    // 64 MiB of frames: 9-byte header + 8-byte PING payload, or an empty SETTINGS frame
    let ping: [u8; 17] = [0, 0, 8, 0x6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    let settings: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];
    let mut floods = Vec::new();
    for frame in [&ping[..], &settings[..]] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
            .await
            .unwrap();
        let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        start.extend_from_slice(&settings); // the client's SETTINGS
        s.write_all(&start).await.unwrap();
        let chunk: Vec<u8> = frame
            .iter()
            .copied()
            .cycle()
            .take(frame.len() * 4096)
            .collect();
        floods.push(tokio::spawn(async move {
            let mut written = 0usize;
            // the proxy stops reading once its acknowledgements fill the socket: writes block
            let _ = tokio::time::timeout(Duration::from_secs(3), async {
                while written < 64 << 20 {
                    if s.write_all(&chunk).await.is_err() {
                        break;
                    }
                    written += chunk.len();
                }
            })
            .await;
            (written, s)
        }));
    }
    let mut held = Vec::new();
    for f in floods {
        let (written, s) = f.await.unwrap();
        assert!(
            written < 64 << 20,
            "a client that reads nothing was let to write all 64 MiB of PING/SETTINGS frames"
        );
        held.push(s);
    }
    // while the floods are held open, the proxy serves others and has not buffered them
    let (status, _) = proxy.get_service("echo", "/x").await;
    assert_eq!(status, 200, "the proxy still serves during the floods");
    let after = rss_kib(pid);
    assert!(
        after < before + 32 * 1024,
        "resident memory grew from {before} KiB to {after} KiB during the floods"
    );
    drop(held);
}

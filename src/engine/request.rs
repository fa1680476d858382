//! One request on a client connection: its head (read within the header deadline, parsed and
//! checked by [`crate::http1`]), its route, our own answers, and what the exchange with an
//! instance ends in.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use tracing::debug;

use super::exchange::{Attempt, UpstreamError};
use super::{timer, write_own, ClientIo, Conn, Engine, Step};
use crate::http1::{self, Framing, HeadError, Hop, MAX_HEAD, MAX_HEADERS};
use crate::proxy::{finish_request, Finished, InFlight, Outcome};
use crate::routing::{Instance, Service};
use timer::timed;

/// What the request head said, kept after the head's borrow of the read buffer ends.
pub(super) struct Head {
    pub head_len: usize,
    pub framing: Framing,
    pub keep_alive: bool,
    pub idempotent: bool,
    pub head_request: bool,
    pub upgrade: bool,
    pub expect_continue: bool,
    pub http10: bool,
    /// Method and path, only when the access log is on.
    pub log: Option<(String, String)>,
    /// The request's key for a `hash` service.
    pub hash_key: Option<u64>,
}

pub(super) enum Route {
    Service(Arc<Service>),
    /// Answered by the proxy: status, body, and the labels to count it under.
    Own(u16, String, Option<Arc<str>>, Option<Arc<Service>>),
}

impl Engine {
    /// Reads, routes and proxies one request whose first bytes are buffered. `Step::Close` ends
    /// the connection.
    pub(super) async fn one_request<S: ClientIo>(&self, conn: &mut Conn<S>) -> Step {
        // 1. the request head, within the header deadline in all (however the bytes are spread)
        // (bytes are always buffered here: serve waited for the first ones, and every read below
        // that returns adds some)
        let mut deadline = None;
        let (head, route) = loop {
            match self.parse_head(conn) {
                Ok(Some(parsed)) => break parsed,
                Ok(None) => {}
                Err(e) => {
                    self.reject_head(conn, e).await;
                    return Step::Close;
                }
            }
            // the rest of the head: the clock is read only for a head that spans reads
            let until =
                *deadline.get_or_insert_with(|| Instant::now() + self.cfg.request_header_timeout);
            let left = until.saturating_duration_since(Instant::now());
            let limit = left.min(self.cfg.downstream_read_timeout);
            let read = if left.is_zero() {
                Err(io::Error::from(io::ErrorKind::TimedOut))
            } else {
                timed(limit, conn.client.fill(MAX_HEAD)).await
            };
            match read {
                Ok(Some(0)) => return Step::Close,
                Ok(Some(_)) => {}
                // MAX_HEAD bytes and no end of the head
                Ok(None) => {
                    self.reject_head(conn, HeadError::TooLarge).await;
                    return Step::Close;
                }
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    self.own_answer(conn, 408, "request head not received in time".into())
                        .await;
                    return Step::Close;
                }
                Err(_) => return Step::Close,
            }
        };
        let start = Instant::now();
        let _in_flight = InFlight::new();
        match route {
            Route::Own(status, body, label, service) => {
                // an unread request body stays on the connection: close it after answering
                let keep = head.keep_alive
                    && head.framing.is_empty()
                    && !timer::shutting_down(&conn.shutdown);
                conn.client.consume(head.head_len.min(conn.client.len()));
                let written = write_own(
                    conn,
                    status,
                    &body,
                    keep,
                    Some(&head),
                    self.cfg.write_timeout,
                )
                .await;
                self.finish(
                    head.log.as_ref(),
                    service.as_ref(),
                    label.as_deref(),
                    None,
                    status,
                    start,
                    0,
                    None,
                );
                if keep && written {
                    Step::Next
                } else if written && !head.framing.is_empty() {
                    Step::Linger
                } else {
                    Step::Close
                }
            }
            // a service whose instances speak something else than HTTP/1.1: the gateway serves
            // this request and the rest of the connection
            Route::Service(service) if service.gateway => Step::Gateway { h2: false },
            Route::Service(service) => self.proxy(conn, head, service, start).await,
        }
    }

    /// Parses the buffered head and routes it; the upstream head is written into `conn.out`.
    fn parse_head<S: ClientIo>(
        &self,
        conn: &mut Conn<S>,
    ) -> Result<Option<(Head, Route)>, HeadError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let Some(req) = http1::parse_request(&conn.client.buf[..], &mut headers)? else {
            return Ok(None);
        };
        let mut head = Head {
            hash_key: None,
            head_len: req.head_len,
            framing: req.framing,
            keep_alive: req.keep_alive,
            idempotent: req.is_idempotent(),
            head_request: req.is_head(),
            upgrade: req.upgrade.is_some(),
            expect_continue: req.expect_continue,
            http10: req.version == 0,
            log: self.access_log.then(|| {
                (
                    req.method.to_string(),
                    req.target.split('?').next().unwrap_or("").to_string(),
                )
            }),
        };
        if req.method == "CONNECT" {
            // whatever follows on the connection is not HTTP: answer and close
            let head = Head {
                keep_alive: false,
                ..head
            };
            return Ok(Some((
                head,
                Route::Own(
                    405,
                    "switchyard: CONNECT is not supported (not a forward proxy)\n".into(),
                    None,
                    None,
                ),
            )));
        }
        if req.via_has(&self.via) {
            // RFC 9110 §7.6.3 / RFC 5842 §7.2: this request has been here before (an instance
            // that is, or leads back to, this proxy); forwarding it again would recurse
            let head = Head {
                keep_alive: false,
                ..head
            };
            let why =
                "switchyard: request loop: this request already passed through this proxy (Via)\n";
            return Ok(Some((head, Route::Own(508, why.into(), None, None))));
        }
        let table = self.table.load();
        let outcome = crate::proxy::route_request(&self.router, &table, req.host, &req.target);
        let route = match outcome {
            Outcome::Proxy { service, rewrite } => {
                let target = rewrite.as_deref().unwrap_or(&req.target);
                // an HTTP/1.0 request may come without Host; the instance gets HTTP/1.1, which
                // needs one: the service's name (as nginx sends its upstream's name)
                let host = req.host.unwrap_or(&service.name);
                let hop = Hop {
                    client_ip: &conn.ip,
                    via: &self.via,
                    tls: S::TLS,
                };
                req.write_upstream_head(&mut conn.out, target, host, &hop);
                head.hash_key =
                    service.hash_key(|name| req.header_values(name).collect(), &conn.ip);
                Route::Service(service)
            }
            Outcome::Answer {
                status,
                body,
                label,
                service,
            } => Route::Own(status, body, label, service),
        };
        Ok(Some((head, route)))
    }

    async fn reject_head<S: ClientIo>(&self, conn: &mut Conn<S>, e: HeadError) {
        debug!(error = %e, client = %conn.ip, "refused request head");
        let status = e.status();
        self.own_answer(conn, status, format!("{e}")).await;
    }

    /// Answers without a routed request (bad head, read timeout) and closes.
    async fn own_answer<S: ClientIo>(&self, conn: &mut Conn<S>, status: u16, why: String) {
        let start = Instant::now();
        let body = format!("switchyard: {why}\n");
        write_own(conn, status, &body, false, None, self.cfg.write_timeout).await;
        self.finish(None, None, None, None, status, start, 0, None);
    }

    async fn proxy<S: ClientIo>(
        &self,
        conn: &mut Conn<S>,
        head: Head,
        service: Arc<Service>,
        start: Instant,
    ) -> Step {
        let mut attempt = Attempt::default();
        attempt.key = head.hash_key;
        // A body that came with the head goes out in the same write and can be replayed: a length
        // as it is, a chunked body decoded and re-encoded (refused here, before any instance sees
        // the request, when it breaks the framing).
        let body = &conn.client.buf[head.head_len..];
        let inline = match head.framing {
            Framing::Empty => true,
            Framing::Length(n) => n as usize <= super::INLINE_BODY && (n as usize) <= body.len(),
            Framing::Chunked => {
                let mark = conn.out.len();
                let mut chunked = http1::Chunked::default();
                match chunked.feed(body, http1::chunked::Output::Chunked, &mut conn.out) {
                    Ok(used)
                        if chunked.is_done() && conn.out.len() - mark <= super::INLINE_BODY =>
                    {
                        conn.client.consume(head.head_len + used);
                        true
                    }
                    Ok(_) => {
                        conn.out.truncate(mark);
                        false
                    }
                    Err(e) => {
                        let why = format!("invalid request body: {e}");
                        conn.client.consume(head.head_len);
                        let limit = self.cfg.write_timeout;
                        let body = format!("switchyard: service {:?}: {why}\n", service.name);
                        write_own(conn, 400, &body, false, Some(&head), limit).await;
                        self.finish(
                            head.log.as_ref(),
                            Some(&service),
                            None,
                            None,
                            400,
                            start,
                            0,
                            Some("downstream"),
                        );
                        return Step::Linger;
                    }
                }
            }
            Framing::UntilClose => false,
        };
        match (inline, head.framing) {
            (true, Framing::Length(n)) => {
                let n = n as usize;
                conn.out
                    .extend_from_slice(&conn.client.buf[head.head_len..head.head_len + n]);
                conn.client.consume(head.head_len + n);
            }
            (true, Framing::Chunked) => {}
            _ => conn.client.consume(head.head_len),
        }

        let result = self
            .exchange(conn, &head, &service, inline, &mut attempt)
            .await;
        let (status, keep, error, body_read) = match result {
            Ok((status, keep, body_done)) => (status, keep, None, body_done),
            Err((e, sent)) => {
                let (mut status, reason) = error_status(&e, &attempt);
                if status == 504 {
                    if let Some(inst) = &attempt.instance {
                        crate::health::passive_failure(&service, inst, &"upstream read timed out");
                    }
                }
                if status >= 500 {
                    crate::events::RECENT.record(
                        "upstream",
                        format!(
                            "service {:?}: {status} {reason} (last instance {})",
                            service.name,
                            attempt
                                .instance
                                .as_ref()
                                .map_or("none".to_string(), |i| i.addr.to_string())
                        ),
                    );
                }
                match sent {
                    // the response had started: the client sees it cut short; count what it got
                    Some(s) => status = s,
                    None if status > 0 => {
                        let body = format!("switchyard: service {:?}: {reason}\n", service.name);
                        let limit = self.cfg.write_timeout;
                        write_own(conn, status, &body, false, Some(&head), limit).await;
                    }
                    None => {}
                }
                // the client may still be sending a body nobody reads
                let body_read = head.framing.is_empty() || matches!(e, UpstreamError::Client(_));
                let error = match &e {
                    UpstreamError::Client(_)
                    | UpstreamError::ClientBody(_)
                    | UpstreamError::SlowClient => "downstream",
                    UpstreamError::Timeout => "timeout",
                    _ => "upstream",
                };
                (status, false, Some(error), body_read)
            }
        };
        let tries = attempt.tried.len();
        let instance = attempt.instance.as_deref();
        self.finish(
            head.log.as_ref(),
            Some(&service),
            None,
            instance,
            status,
            start,
            tries,
            error,
        );
        if keep {
            Step::Next
        } else if body_read {
            Step::Close
        } else {
            Step::Linger
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish(
        &self,
        log: Option<&(String, String)>,
        service: Option<&Arc<Service>>,
        label: Option<&str>,
        instance: Option<&Instance>,
        status: u16,
        start: Instant,
        tries: usize,
        error: Option<&str>,
    ) {
        finish_request(&Finished {
            service,
            label,
            instance,
            log,
            status,
            elapsed: start.elapsed(),
            tries,
            error: error.unwrap_or(""),
        });
    }
}

/// The status and one-line reason we answer for a failed exchange (0: the client is gone).
fn error_status(e: &UpstreamError, attempt: &Attempt) -> (u16, String) {
    let tries = attempt.tried.len();
    match e {
        UpstreamError::Timeout => (504, "upstream timed out".into()),
        UpstreamError::Local(err) => (
            503,
            format!("the proxy is short of resources ({err}); no instance was tried"),
        ),
        UpstreamError::Ejected => (
            502,
            format!("the instance was ejected while the request waited, after {tries} tries"),
        ),
        UpstreamError::SlowClient => (408, "request body sent too slowly".into()),
        UpstreamError::NoInstance => (
            if tries == 0 { 503 } else { 502 },
            format!("no usable instance left after {tries} tries"),
        ),
        UpstreamError::Connect(err) if err.kind() == io::ErrorKind::TimedOut => (
            502,
            format!("connecting to the upstream timed out after {tries} tries"),
        ),
        UpstreamError::Connect(err) => (
            502,
            format!("upstream error after {tries} tries: connect: {err}"),
        ),
        UpstreamError::NoResponse(err) => (
            502,
            format!("upstream error after {tries} tries: connection closed before response: {err}"),
        ),
        UpstreamError::BadResponse(err) => {
            (502, format!("upstream sent an invalid response: {err}"))
        }
        UpstreamError::BadResponseBody(err) => (
            502,
            format!("upstream sent an invalid response body: {err}"),
        ),
        UpstreamError::Broken(e) => (
            502,
            format!("upstream connection broke during the response: {e}"),
        ),
        UpstreamError::ClientBody(err) => (400, format!("invalid request body: {err}")),
        // retried by the exchange, never returned; should one be, it is the instance's answer
        UpstreamError::Answered(status) => (
            502,
            format!("the instance answered {status} and no retry was made after {tries} tries"),
        ),
        UpstreamError::Client(e) => (0, format!("client went away: {e}")),
    }
}

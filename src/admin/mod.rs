//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/api/services[/<name>]` and a status
//! page at `/`. Kept off the proxy port (default `127.0.0.1:9090`).

mod page;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};

use crate::metrics::gather_text;
use crate::registry::RegistryStatus;
use crate::routing::{unix_ms, Instance, Service, SharedTable};

pub struct AdminApp {
    pub table: SharedTable,
    pub status: Arc<RegistryStatus>,
    pub started: Instant,
    pub etcd_endpoints: Vec<String>,
    pub prefix: String,
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    let len = resp.body().len();
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    resp
}

fn json_reply(status: u16, v: &Value) -> Response<Vec<u8>> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    reply(status, "application/json", body)
}

pub fn instance_json(i: &Instance) -> Value {
    let state = i.state_label();
    json!({
        "key": &*i.key,
        "id": &*i.id,
        "addr": i.addr.to_string(),
        "registered_addr": i.registered.to_string(),
        "weight": i.weight,
        "metadata": i.metadata,
        "health": i.state.health().as_str(),
        "state": state,
        "inflight": i.state.inflight.load(std::sync::atomic::Ordering::Relaxed),
        "requests": i.state.requests.load(std::sync::atomic::Ordering::Relaxed),
        "connect_failures": i.state.connect_failures.load(std::sync::atomic::Ordering::Relaxed),
        "last_check": i.state.last_check().map(|c| json!({
            "ok": c.ok,
            "detail": c.detail,
            "at_unix_ms": unix_ms(c.at),
            "took_ms": c.took.as_secs_f64() * 1000.0,
        })),
    })
}

pub fn service_json(s: &Service) -> Value {
    json!({
        "name": &*s.name,
        "usable": s.usable_count(),
        "invalid_registrations": s.invalid,
        "instances": s.instances.iter().map(|i| instance_json(i)).collect::<Vec<_>>(),
    })
}

impl AdminApp {
    pub fn registry_json(&self) -> Value {
        json!({
            "ready": self.status.ready(),
            "connected": self.status.connected(),
            "revision": self.status.revision(),
            "endpoints": self.etcd_endpoints,
            "prefix": self.prefix,
            "last_error": self.status.last_error(),
            "last_update_unix": self.status.last_update().map(|t| unix_ms(t) / 1000),
            "relists": self.status.relists.load(std::sync::atomic::Ordering::Relaxed),
            "reconnects": self.status.reconnects.load(std::sync::atomic::Ordering::Relaxed),
            "invalid_registrations": self.status.invalid_entries().into_iter()
                .map(|(key, reason)| json!({"key": key, "reason": reason}))
                .collect::<Vec<_>>(),
        })
    }

    pub fn services_json(&self) -> Value {
        let table = self.table.load();
        let mut services: Vec<&Arc<Service>> = table.services.values().collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        json!({
            "registry": self.registry_json(),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "services": services.iter().map(|s| service_json(s)).collect::<Vec<_>>(),
        })
    }

    fn route(&self, path: &str) -> Response<Vec<u8>> {
        match path {
            "/healthz" => reply(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                if self.status.ready() {
                    reply(200, "text/plain", b"ready\n".to_vec())
                } else {
                    let why = match self.status.last_error() {
                        Some(e) => format!("not ready: no complete etcd list yet ({e})\n"),
                        None => "not ready: no complete etcd list yet\n".to_string(),
                    };
                    reply(503, "text/plain", why.into_bytes())
                }
            }
            "/metrics" => reply(
                200,
                "text/plain; version=0.0.4",
                gather_text(&self.table.load()),
            ),
            "/api/services" => json_reply(200, &self.services_json()),
            "/api/registry" => json_reply(200, &self.registry_json()),
            "/api/events" => json_reply(200, &json!(crate::events::RECENT.snapshot())),
            "/" | "/index.html" => reply(
                200,
                "text/html; charset=utf-8",
                page::render(self).into_bytes(),
            ),
            p => {
                if let Some(name) = p.strip_prefix("/api/services/") {
                    let table = self.table.load();
                    return match table.service(name) {
                        Some(s) => json_reply(200, &service_json(s)),
                        None => {
                            json_reply(404, &json!({"error": format!("unknown service {name:?}")}))
                        }
                    };
                }
                reply(404, "text/plain", b"not found\n".to_vec())
            }
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        if session.req_header().method != http::Method::GET
            && session.req_header().method != http::Method::HEAD
        {
            return reply(405, "text/plain", b"method not allowed\n".to_vec());
        }
        self.route(&path)
    }
}

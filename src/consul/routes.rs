//! The endpoints: which request goes where, with its blocking query and its answer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use hyper::body::Incoming;
use rand::Rng;
use serde_json::Value;

use super::decode::{check_update, Status};
use super::http::{health_code, read_body, render, Held, Reply};
use super::query::{decode_segment, Query};
use super::view::View;
use super::{ApiError, ConsulApi};

impl ConsulApi {
    /// An answer that is not cached.
    fn json(query: &Query, body: Value, index: Option<u64>) -> Reply {
        Reply::rendered(render(&body, query.get("pretty").is_some()), index)
    }

    /// A read at `index`, rendered once per index (see [`super::http::Rendered`]).
    fn read(
        &self,
        query: &Query,
        key: String,
        index: u64,
        make: impl FnOnce(&crate::routing::RoutingTable, &View<'_>) -> Value,
    ) -> Bytes {
        let pretty = query.get("pretty").is_some();
        let key = format!("{key} {pretty}");
        self.rendered.get_or_render(key, index, || {
            let table = self.table.load();
            render(&make(&table, &self.view()), pretty)
        })
    }

    fn view(&self) -> View<'_> {
        View {
            node: &self.node,
            datacenter: super::DATACENTER,
        }
    }

    /// Waits as a blocking query asks: until `index_of()` passes the client's index, or `wait`
    /// (plus up to 1/16 of it, as Consul, so clients do not come back all at once) is over.
    /// An index ahead of ours (from before a restart) is answered at once. Returns the index
    /// to answer with.
    async fn block(
        &self,
        query: &Query,
        index_of: impl Fn() -> (u64, u64),
    ) -> Result<u64, ApiError> {
        let Some((min, wait)) = query.blocking()? else {
            return Ok(index_of().1);
        };
        let jitter = wait.as_millis() as u64 / 16;
        let wait = wait + Duration::from_millis(rand::thread_rng().gen_range(0..=jitter));
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = self.dir.subscribe();
        let _held = Held::new();
        loop {
            let (wake, answer) = index_of();
            if wake > min || min > self.dir.index() {
                return Ok(answer);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Ok(index_of().1);
            }
        }
    }

    /// The whole view's index, to wake on and to answer with.
    fn global_index(&self) -> (u64, u64) {
        let i = self.dir.index();
        (i, i)
    }

    /// `(index that wakes a blocking query on the service, index to answer with)`.
    fn service_index(&self, name: &str) -> (u64, u64) {
        match self.dir.service_index(name) {
            Some(i) => (i, i),
            // a service never seen: only its appearance is a change for it
            None => (0, self.dir.index()),
        }
    }

    fn datacenter(query: &Query) -> Result<(), ApiError> {
        match query.get("dc") {
            None | Some("") => Ok(()),
            Some(dc) if dc == super::DATACENTER => Ok(()),
            Some(_) => Err(ApiError::Internal("No path to datacenter".into())),
        }
    }

    pub(super) async fn route(
        &self,
        peer: SocketAddr,
        method: &Method,
        body: Incoming,
        path: &str,
        query: &Query,
    ) -> Result<Reply, ApiError> {
        let get = method == Method::GET || method == Method::HEAD;
        let put = method == Method::PUT;
        // only PUTs have a body to read; otherwise dropped now, not held while a query blocks
        let body = put.then_some(body);
        let allowed = |ok: bool| match ok {
            true => Ok(()),
            false => Err(ApiError::MethodNotAllowed(format!(
                "method {method} not allowed"
            ))),
        };
        let tail = |prefix: &str| path.strip_prefix(prefix).map(decode_segment);
        Self::datacenter(query)?;

        if let Some(name) = tail("/v1/health/service/") {
            allowed(get)?;
            let passing = query.flag("passing")?;
            let tags = query.all("tag");
            let index = self.block(query, || self.service_index(&name)).await?;
            let key = format!("health/service {name} {passing} {tags:?}");
            let body = self.read(query, key, index, |table, view| {
                view.health_service(table, &name, passing, &tags, index)
            });
            return Ok(Reply::rendered(body, Some(index)));
        }
        if let Some(name) = tail("/v1/health/checks/") {
            allowed(get)?;
            let index = self.block(query, || self.service_index(&name)).await?;
            let body = self.read(query, format!("health/checks {name}"), index, |t, v| {
                v.health_checks(t, &name, index)
            });
            return Ok(Reply::rendered(body, Some(index)));
        }
        if let Some(name) = tail("/v1/catalog/service/") {
            allowed(get)?;
            let tags = query.all("tag");
            let index = self.block(query, || self.service_index(&name)).await?;
            let key = format!("catalog/service {name} {tags:?}");
            let body = self.read(query, key, index, |t, v| {
                v.catalog_service(t, &name, &tags, index)
            });
            return Ok(Reply::rendered(body, Some(index)));
        }
        if path == "/v1/catalog/services" {
            allowed(get)?;
            let index = self.block(query, || self.global_index()).await?;
            let body = self.read(query, "catalog/services".into(), index, |t, v| {
                v.catalog_services(t)
            });
            return Ok(Reply::rendered(body, Some(index)));
        }
        if let Some(state) = tail("/v1/health/state/") {
            allowed(get)?;
            let state =
                match state.as_str() {
                    "any" => None,
                    s => Some(Status::parse(s).ok_or_else(|| {
                        ApiError::BadRequest(format!("Invalid check state: {s:?}"))
                    })?),
                };
            let index = self.block(query, || self.global_index()).await?;
            let key = format!("health/state {state:?}");
            let body = self.read(query, key, index, |t, v| v.health_state(t, state, index));
            return Ok(Reply::rendered(body, Some(index)));
        }
        if path == "/v1/catalog/datacenters" {
            allowed(get)?;
            return Ok(Self::json(
                query,
                serde_json::json!([super::DATACENTER]),
                None,
            ));
        }
        if path == "/v1/catalog/nodes" {
            allowed(get)?;
            let index = self.dir.index();
            let address = self.listen.ip().to_string();
            let body = self.view().catalog_nodes(&address, index);
            return Ok(Self::json(query, body, Some(index)));
        }
        if path == "/v1/agent/services" {
            allowed(get)?;
            let table = self.table.load();
            return Ok(Self::json(query, self.view().agent_services(&table), None));
        }
        for (prefix, by_id) in [
            ("/v1/agent/health/service/id/", true),
            ("/v1/agent/health/service/name/", false),
        ] {
            let Some(wanted) = tail(prefix) else {
                continue;
            };
            allowed(get)?;
            let table = self.table.load();
            let (worst, entries) =
                self.view()
                    .agent_health(&table, by_id, &wanted, self.dir.index());
            let Some(worst) = worst else {
                let what = if by_id { "ServiceId" } else { "ServiceName" };
                return Err(ApiError::NotFound(format!("{what} {wanted} not found")));
            };
            let pretty = query.get("pretty").is_some();
            let (content_type, body) = match (query.get("format"), by_id) {
                (Some("text"), _) => ("text/plain; charset=utf-8", Bytes::from(worst.as_str())),
                (_, true) => {
                    let one = entries.into_iter().next().unwrap_or_default();
                    ("application/json", render(&one, pretty))
                }
                (_, false) => ("application/json", render(&Value::Array(entries), pretty)),
            };
            return Ok(Reply {
                status: health_code(worst),
                content_type,
                body: Some(body),
                index: None,
            });
        }
        if path == "/v1/agent/checks" {
            allowed(get)?;
            let table = self.table.load();
            let index = self.dir.index();
            return Ok(Self::json(
                query,
                self.view().agent_checks(&table, index),
                None,
            ));
        }
        if path == "/v1/agent/service/register" {
            allowed(put)?;
            let replace = query.flag("replace-existing-checks")?;
            let body = read_body(body).await?;
            self.agent.register(&body, replace, peer.ip()).await?;
            return Ok(Reply::empty());
        }
        if let Some(id) = tail("/v1/agent/service/deregister/") {
            allowed(put)?;
            self.agent.deregister(&id).await?;
            return Ok(Reply::empty());
        }
        if let Some(id) = tail("/v1/agent/service/maintenance/") {
            allowed(put)?;
            let enable = match query.get("enable") {
                None => return Err(ApiError::BadRequest("Missing value for enable".into())),
                Some(v) => match v {
                    "1" | "t" | "T" | "true" | "TRUE" | "True" => true,
                    "0" | "f" | "F" | "false" | "FALSE" | "False" => false,
                    other => {
                        return Err(ApiError::BadRequest(format!(
                            "Invalid value for enable: {other:?}"
                        )))
                    }
                },
            };
            let reason = query.get("reason").unwrap_or("");
            self.agent.maintenance(&id, enable, reason).await?;
            return Ok(Reply::empty());
        }
        if let Some(id) = tail("/v1/agent/service/") {
            allowed(get)?;
            let table = self.table.load();
            return match self.view().agent_service_by_id(&table, &id) {
                Some(v) => Ok(Self::json(query, v, None)),
                None => Err(ApiError::NotFound(format!("unknown service ID: {id}"))),
            };
        }
        for (verb, status) in [
            ("pass", Status::Passing),
            ("warn", Status::Warning),
            ("fail", Status::Critical),
        ] {
            if let Some(id) = tail(&format!("/v1/agent/check/{verb}/")) {
                allowed(put)?;
                let note = query.get("note").unwrap_or("");
                self.agent.update_ttl(&id, status, note).await?;
                return Ok(Reply::empty());
            }
        }
        if let Some(id) = tail("/v1/agent/check/update/") {
            allowed(put)?;
            let body = read_body(body).await?;
            let (status, output) = check_update(&body)
                .map_err(|e| ApiError::BadRequest(format!("Request decode failed: {e}")))?;
            self.agent.update_ttl(&id, status, &output).await?;
            return Ok(Reply::empty());
        }
        if path == "/v1/agent/check/register" {
            allowed(put)?;
            let body = read_body(body).await?;
            self.agent.register_check(&body).await?;
            return Ok(Reply::empty());
        }
        if let Some(id) = tail("/v1/agent/check/deregister/") {
            allowed(put)?;
            self.agent.deregister_check(&id).await?;
            return Ok(Reply::empty());
        }
        if path == "/v1/agent/self" {
            allowed(get)?;
            return Ok(Self::json(query, self.agent_self(), None));
        }
        if path == "/v1/status/leader" {
            return Ok(Self::json(query, Value::String(self.leader.clone()), None));
        }
        if path == "/v1/status/peers" {
            return Ok(Self::json(query, serde_json::json!([self.leader]), None));
        }
        let what = path
            .strip_prefix("/v1/")
            .and_then(|p| p.split('/').next())
            .unwrap_or("");
        let endpoint: String = match what {
            "agent" | "catalog" | "health" | "status" => path.to_string(),
            other => format!("/v1/{other}"),
        };
        Err(ApiError::NotImplemented(format!(
            "switchyard does not implement the Consul endpoint {endpoint} (supported: agent \
             service and check endpoints, health, catalog, status; see the README)"
        )))
    }

    fn agent_self(&self) -> Value {
        let meta: BTreeMap<String, String> = BTreeMap::new();
        serde_json::json!({
            "Config": {
                "Datacenter": super::DATACENTER,
                "NodeName": self.node,
                "NodeID": "",
                "Server": false,
                "Revision": "switchyard",
                "Version": env!("CARGO_PKG_VERSION"),
            },
            "Member": {
                "Name": self.node,
                "Addr": self.listen.ip().to_string(),
                "Port": self.listen.port(),
                "Tags": {"dc": super::DATACENTER, "role": "node"},
                "Status": 1,
            },
            "Meta": meta,
        })
    }
}

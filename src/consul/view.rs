//! The reads, answered from switchyard's own view: the routing snapshot (instances, their
//! health from switchyard's checks) and the TTL statuses kept in etcd. Every instance of every
//! service is shown, registered through the Consul API or not; the agent endpoints
//! (`/v1/agent/services`, `/v1/agent/checks`) show only those registered through it.
//!
//! Check status: a TTL check's is the one last reported to it; an HTTP, TCP or gRPC check's is
//! the instance's health (healthy: passing; not yet checked or unhealthy: critical). An instance
//! not registered through the Consul API has one check, `service:<id>`, from its health
//! (draining, weight 0: warning).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::decode::{go_duration, Status, Weights};
use super::record::{Record, StoredCheck};
use crate::routing::{Health, Instance, RoutingTable, Service};

/// One check of one instance, as answers show it.
#[derive(Debug, Clone)]
pub struct CheckState {
    pub id: String,
    pub name: String,
    pub status: Status,
    pub output: String,
    pub notes: String,
    /// `http`, `tcp`, `grpc`, `ttl`, or "" (switchyard's own check).
    pub kind: String,
    pub interval: String,
    pub timeout: String,
}

fn health_status(inst: &Instance) -> (Status, String) {
    let output = inst
        .state
        .last_check()
        .map(|c| c.detail.into_owned())
        .unwrap_or_default();
    match inst.state.health() {
        Health::Healthy => (Status::Passing, output),
        Health::Pending => (Status::Critical, "not checked yet".into()),
        Health::Unhealthy if output.is_empty() => (Status::Critical, "unhealthy".into()),
        Health::Unhealthy => (Status::Critical, output),
    }
}

/// The checks of `inst` and their status now.
pub fn instance_checks(inst: &Instance, record: Option<&Record>) -> Vec<CheckState> {
    let Some(record) = record else {
        let (mut status, mut output) = health_status(inst);
        if inst.draining() && status == Status::Passing {
            status = Status::Warning;
            output = "draining (weight 0)".into();
        }
        return vec![CheckState {
            id: format!("service:{}", inst.id()),
            name: "switchyard health check".into(),
            status,
            output,
            notes: String::new(),
            kind: String::new(),
            interval: String::new(),
            timeout: String::new(),
        }];
    };
    let probed = health_status(inst);
    let maintenance = record.maintenance.as_ref().map(|reason| CheckState {
        id: format!("_service_maintenance:{}", record.id),
        name: "Service Maintenance Mode".into(),
        status: Status::Critical,
        output: String::new(),
        notes: reason.clone(),
        kind: "maintenance".into(),
        interval: String::new(),
        timeout: String::new(),
    });
    maintenance
        .into_iter()
        .chain(record.checks.iter().map(|c: &StoredCheck| {
            let (status, output) = if c.is_ttl() {
                (c.status, c.output.clone())
            } else {
                probed.clone()
            };
            let d = |ms| StoredCheck::ms(ms).map(go_duration).unwrap_or_default();
            CheckState {
                id: c.id.clone(),
                name: c.name.clone(),
                status,
                output,
                notes: c.notes.clone(),
                kind: c.kind.clone(),
                interval: d(c.interval_ms),
                timeout: d(c.timeout_ms),
            }
        }))
        .collect()
}

/// What an instance is, as Consul would say it.
struct Entry<'a> {
    inst: &'a Instance,
    record: Option<Record>,
}

impl Entry<'_> {
    fn id(&self) -> String {
        match &self.record {
            Some(r) => r.id.clone(),
            None => self.inst.id().to_string(),
        }
    }

    fn tags(&self) -> Vec<String> {
        self.record
            .as_ref()
            .map(|r| r.tags.clone())
            .unwrap_or_default()
    }

    fn meta(&self) -> BTreeMap<String, String> {
        match &self.record {
            Some(r) => r.meta.clone(),
            None => self.inst.metadata.clone(),
        }
    }

    fn weights(&self) -> Weights {
        match &self.record {
            Some(r) => r.weights,
            None => Weights {
                passing: self.inst.weight,
                warning: self.inst.weight,
            },
        }
    }

    fn has_tags(&self, wanted: &[String]) -> bool {
        let tags = self.tags();
        wanted
            .iter()
            .all(|w| tags.iter().any(|t| t.eq_ignore_ascii_case(w)))
    }
}

fn entries<'a>(svc: &'a Service) -> impl Iterator<Item = Entry<'a>> {
    svc.instances.iter().map(|i| Entry {
        inst: i,
        record: Record::of_metadata(&i.metadata),
    })
}

/// Renders answers for one node (this switchyard) in one datacenter.
pub struct View<'a> {
    pub node: &'a str,
    pub datacenter: &'a str,
}

impl View<'_> {
    fn node(&self, e: &Entry<'_>, index: u64) -> Value {
        let host = e.inst.registered_host();
        json!({
            "ID": "",
            "Node": self.node,
            "Address": host,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": host, "wan": host},
            "Meta": {},
            "CreateIndex": index,
            "ModifyIndex": index,
        })
    }

    /// A health entry's `Service`: the agent's view of it with its indexes.
    fn service(&self, service: &str, e: &Entry<'_>, index: u64) -> Value {
        let mut v = self.agent_service(service, e);
        if let Some(m) = v.as_object_mut() {
            m.insert("CreateIndex".into(), index.into());
            m.insert("ModifyIndex".into(), index.into());
        }
        v
    }

    fn check(&self, service: &str, e: &Entry<'_>, c: &CheckState, index: u64) -> Value {
        json!({
            "Node": self.node,
            "CheckID": c.id,
            "Name": c.name,
            "Status": c.status.as_str(),
            "Notes": c.notes,
            "Output": c.output,
            "ServiceID": e.id(),
            "ServiceName": service,
            "ServiceTags": e.tags(),
            "Type": c.kind,
            "Interval": c.interval,
            "Timeout": c.timeout,
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": index,
            "ModifyIndex": index,
        })
    }

    /// The node's own check, as every Consul node has.
    fn serf_check(&self, index: u64) -> Value {
        json!({
            "Node": self.node,
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": "passing",
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": index,
            "ModifyIndex": index,
        })
    }

    /// `GET /v1/health/service/<name>`: every instance with its checks; with `passing`, only
    /// those whose checks all pass.
    pub fn health_service(
        &self,
        table: &RoutingTable,
        name: &str,
        passing: bool,
        tags: &[String],
        index: u64,
    ) -> Value {
        let Some(svc) = table.service(name) else {
            return json!([]);
        };
        let mut out = Vec::new();
        for e in entries(svc).filter(|e| e.has_tags(tags)) {
            let checks = instance_checks(e.inst, e.record.as_ref());
            if passing && checks.iter().any(|c| c.status != Status::Passing) {
                continue;
            }
            let mut all = vec![self.serf_check(index)];
            all.extend(checks.iter().map(|c| self.check(name, &e, c, index)));
            out.push(json!({
                "Node": self.node(&e, index),
                "Service": self.service(name, &e, index),
                "Checks": all,
            }));
        }
        Value::Array(out)
    }

    /// `GET /v1/health/checks/<name>`: the checks of every instance of a service.
    pub fn health_checks(&self, table: &RoutingTable, name: &str, index: u64) -> Value {
        let Some(svc) = table.service(name) else {
            return json!([]);
        };
        let mut out = Vec::new();
        self.checks_of(name, svc, None, index, &mut out);
        Value::Array(out)
    }

    fn checks_of(
        &self,
        name: &str,
        svc: &Service,
        state: Option<Status>,
        index: u64,
        out: &mut Vec<Value>,
    ) {
        for e in entries(svc) {
            for c in instance_checks(e.inst, e.record.as_ref()) {
                if state.is_none_or(|s| s == c.status) {
                    out.push(self.check(name, &e, &c, index));
                }
            }
        }
    }

    /// `GET /v1/health/state/<state>`: every check in `state` (`None`: any), the node's own
    /// (passing) included.
    pub fn health_state(&self, table: &RoutingTable, state: Option<Status>, index: u64) -> Value {
        let mut out = Vec::new();
        if state.is_none_or(|s| s == Status::Passing) {
            out.push(self.serf_check(index));
        }
        let mut names: Vec<(&Arc<str>, &Arc<Service>)> = table.services.iter().collect();
        names.sort_by(|a, b| a.0.cmp(b.0));
        for (name, svc) in names {
            self.checks_of(name, svc, state, index, &mut out);
        }
        Value::Array(out)
    }

    /// `GET /v1/catalog/nodes`: this node.
    pub fn catalog_nodes(&self, address: &str, index: u64) -> Value {
        json!([{
            "ID": "",
            "Node": self.node,
            "Address": address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": address, "wan": address},
            "Meta": {},
            "CreateIndex": index,
            "ModifyIndex": index,
        }])
    }

    /// `GET /v1/catalog/service/<name>`: every instance, health aside.
    pub fn catalog_service(
        &self,
        table: &RoutingTable,
        name: &str,
        tags: &[String],
        index: u64,
    ) -> Value {
        let Some(svc) = table.service(name) else {
            return json!([]);
        };
        let out: Vec<Value> = entries(svc)
            .filter(|e| e.has_tags(tags))
            .map(|e| {
                // the node's fields as they are, the service's prefixed with "Service"
                let node = self.node(&e, index);
                let mut m = Map::new();
                for k in ["ID", "Node", "Address", "Datacenter", "TaggedAddresses"] {
                    m.insert(k.into(), node[k].clone());
                }
                m.insert("NodeMeta".into(), node["Meta"].clone());
                m.insert("ServiceKind".into(), "".into());
                if let Value::Object(svc) = self.agent_service(name, &e) {
                    for (k, v) in svc.into_iter().filter(|(k, _)| k != "Datacenter") {
                        let k = if k == "Service" { "Name".into() } else { k };
                        m.insert(format!("Service{k}"), v);
                    }
                }
                m.insert("CreateIndex".into(), index.into());
                m.insert("ModifyIndex".into(), index.into());
                Value::Object(m)
            })
            .collect();
        Value::Array(out)
    }

    /// `GET /v1/catalog/services`: service name → the union of its instances' tags.
    pub fn catalog_services(&self, table: &RoutingTable) -> Value {
        let mut names: Vec<(&Arc<str>, &Arc<Service>)> = table
            .services
            .iter()
            .filter(|(_, s)| !s.instances.is_empty())
            .collect();
        names.sort_by(|a, b| a.0.cmp(b.0));
        let mut out = Map::new();
        for (name, svc) in names {
            let tags: BTreeSet<String> = entries(svc).flat_map(|e| e.tags()).collect();
            out.insert(name.to_string(), json!(tags));
        }
        Value::Object(out)
    }

    fn agent_service(&self, service: &str, e: &Entry<'_>) -> Value {
        let w = e.weights();
        json!({
            "ID": e.id(),
            "Service": service,
            "Tags": e.tags(),
            "Meta": e.meta(),
            "Port": e.inst.addr.port(),
            "Address": e.inst.registered_host(),
            "TaggedAddresses": {},
            "Weights": {"Passing": w.passing, "Warning": w.warning},
            "EnableTagOverride": e.record.as_ref().is_some_and(|r| r.enable_tag_override),
            "Datacenter": self.datacenter,
        })
    }

    /// The Consul-registered instances, by service name.
    fn registered<'t>(table: &'t RoutingTable) -> Vec<(&'t Arc<str>, Entry<'t>)> {
        let mut out: Vec<(&Arc<str>, Entry<'_>)> = table
            .services
            .iter()
            .flat_map(|(name, svc)| entries(svc).map(move |e| (name, e)))
            .filter(|(_, e)| e.record.is_some())
            .collect();
        out.sort_by(|a, b| a.1.inst.key.cmp(&b.1.inst.key));
        out
    }

    /// `GET /v1/agent/services`: service id → service, for the instances registered through the
    /// Consul API.
    pub fn agent_services(&self, table: &RoutingTable) -> Value {
        let mut out = Map::new();
        for (name, e) in Self::registered(table) {
            out.insert(e.id(), self.agent_service(name, &e));
        }
        Value::Object(out)
    }

    /// `GET /v1/agent/service/<id>`.
    pub fn agent_service_by_id(&self, table: &RoutingTable, id: &str) -> Option<Value> {
        Self::registered(table)
            .into_iter()
            .find(|(_, e)| e.id() == id)
            .map(|(name, e)| self.agent_service(name, &e))
    }

    /// `GET /v1/agent/health/service/id/<id>` (`by_id`) or `.../name/<name>`: each matching
    /// Consul-registered instance with its checks and their worst status (`AggregatedStatus`),
    /// and the worst of all (`None`: nothing matched).
    pub fn agent_health(
        &self,
        table: &RoutingTable,
        by_id: bool,
        wanted: &str,
        index: u64,
    ) -> (Option<Status>, Vec<Value>) {
        let mut worst: Option<Status> = None;
        let mut out = Vec::new();
        for (name, e) in Self::registered(table) {
            let hit = if by_id {
                e.id() == wanted
            } else {
                **name == *wanted
            };
            if !hit {
                continue;
            }
            let checks = instance_checks(e.inst, e.record.as_ref());
            let status = checks
                .iter()
                .fold(Status::Passing, |s, c| s.worst(c.status));
            worst = Some(worst.map_or(status, |w| w.worst(status)));
            out.push(json!({
                "AggregatedStatus": status.as_str(),
                "Service": self.agent_service(name, &e),
                "Checks": checks.iter().map(|c| self.check(name, &e, c, index)).collect::<Vec<_>>(),
            }));
        }
        (worst, out)
    }

    /// `GET /v1/agent/checks`: check id → check, for the instances registered through the
    /// Consul API.
    pub fn agent_checks(&self, table: &RoutingTable, index: u64) -> Value {
        let mut out = Map::new();
        for (name, e) in Self::registered(table) {
            for c in instance_checks(e.inst, e.record.as_ref()) {
                out.insert(c.id.clone(), self.check(name, &e, &c, index));
            }
        }
        Value::Object(out)
    }
}

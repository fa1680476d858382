//! Instances, specs and snapshots shared by the health module's unit tests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{CheckSpec, HealthConfig, Protocol, StatusSet};
use crate::routing::{
    Health, HostPort, Instance, InstanceState, RoutingTable, Service, ServiceSettings, SharedTable,
};

pub(super) fn spec() -> CheckSpec {
    CheckSpec {
        tls: None,
        protocol: Protocol::Tcp,
        path: "/health".into(),
        port: None,
        expected: StatusSet::parse("200-299").unwrap(),
        grpc_service: String::new(),
        interval: Duration::from_millis(1000),
        timeout: Duration::from_millis(1000),
        jitter: Duration::ZERO,
        healthy_threshold: 2,
        unhealthy_threshold: 3,
    }
}

pub(super) fn config(spec: CheckSpec) -> HealthConfig {
    HealthConfig {
        enabled: true,
        admit_immediately: false,
        max_concurrent: 4,
        reuse_connection: true,
        max_idle_connections: Some(16),
        default: spec,
        services: BTreeMap::new(),
    }
}

pub(super) fn inst(key: &str, addr: SocketAddr, meta: &[(&str, &str)]) -> Arc<Instance> {
    Arc::new(Instance::new(
        key.into(),
        key,
        &HostPort {
            host: addr.ip().to_string(),
            port: addr.port(),
        },
        addr,
        1,
        meta.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        Arc::new(InstanceState::new(Health::Pending)),
    ))
}

pub(super) fn publish(table: &SharedTable, services: &[(&str, Vec<Arc<Instance>>)]) {
    let mut t = RoutingTable::default();
    for (name, insts) in services {
        t.services.insert(
            Arc::from(*name),
            Arc::new(Service::new(
                Arc::from(*name),
                insts.clone(),
                0,
                &ServiceSettings::default(),
            )),
        );
    }
    table.store(Arc::new(t));
}

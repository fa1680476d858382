//! Hot-path and registry micro-benchmarks (criterion).
//!
//! - `route_lookup/<N>`: route one request (Host header) against a snapshot of N services;
//! - `select/<policy>`: pick an instance of a 10-instance service;
//! - `apply_one_change/100000`: apply one registration change to a catalog of 100,000 instances
//!   (in 1,000 services) and build the new snapshot.
//!
//! Run: `cargo bench --bench routing`. Results and how they compare: BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use switchyard::registry::catalog::{Catalog, Change, SystemResolver, Update};
use switchyard::routing::{Health, Policy, Router, RoutingTable, ServiceSettings};

fn catalog() -> Catalog {
    Catalog::new(
        "/services/".into(),
        Vec::<Arc<str>>::new(),
        Arc::new(|_: &str| ServiceSettings::default()),
        Health::Healthy,
        Box::new(SystemResolver),
    )
}

fn kvs(services: usize, per_service: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::with_capacity(services * per_service);
    for s in 0..services {
        for i in 0..per_service {
            let port = 1024 + ((s * per_service + i) % 60000);
            out.push((
                format!("/services/svc-{s}/{i}").into_bytes(),
                format!("127.0.{}.{}:{port}", (i / 250) % 250, i % 250 + 1).into_bytes(),
            ));
        }
    }
    out
}

fn table(services: usize, per_service: usize) -> (Catalog, RoutingTable) {
    let mut c = catalog();
    let (t, _) = c.apply(
        &RoutingTable::default(),
        Update::Reset {
            revision: 1,
            kvs: kvs(services, per_service),
        },
    );
    (c, t)
}

fn route_lookup(c: &mut Criterion) {
    let router = Router::new(vec![], vec!["svc.local".into()], true, true);
    let mut g = c.benchmark_group("route_lookup");
    for n in [10usize, 1_000, 100_000] {
        let (_, t) = table(n, 1);
        let hosts: Vec<String> = (0..64).map(|i| format!("svc-{}", (i * 7919) % n)).collect();
        let mut k = 0usize;
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                k = (k + 1) & 63;
                black_box(router.route(&t, Some(hosts[k].as_str()), "/some/path?q=1"))
            })
        });
    }
    g.finish();
}

fn select(c: &mut Criterion) {
    let mut g = c.benchmark_group("select");
    for policy in [Policy::RoundRobin, Policy::Random, Policy::LeastRequest] {
        let mut cat = Catalog::new(
            "/services/".into(),
            Vec::<Arc<str>>::new(),
            Arc::new(move |_: &str| ServiceSettings {
                policy,
                ..Default::default()
            }),
            Health::Healthy,
            Box::new(SystemResolver),
        );
        let (t, _) = cat.apply(
            &RoutingTable::default(),
            Update::Reset {
                revision: 1,
                kvs: kvs(1, 10),
            },
        );
        let svc = t.service("svc-0").expect("service").clone();
        g.bench_function(format!("{policy:?}"), |b| {
            b.iter(|| black_box(svc.select(&[])))
        });
    }
    g.finish();
}

fn apply_one_change(c: &mut Criterion) {
    let (mut cat, t) = table(1_000, 100);
    let mut current = Arc::new(t);
    let mut flip = false;
    c.bench_function("apply_one_change/100000", |b| {
        b.iter(|| {
            flip = !flip;
            let value = if flip {
                "127.0.0.1:7000"
            } else {
                "127.0.0.1:7001"
            };
            let (next, _) = cat.apply(
                &current,
                Update::Batch {
                    revision: 2,
                    changes: vec![Change::Put {
                        key: b"/services/svc-500/42".to_vec(),
                        value: value.as_bytes().to_vec(),
                    }],
                },
            );
            current = Arc::new(next);
        })
    });
}

criterion_group!(benches, route_lookup, select, apply_one_change);
criterion_main!(benches);

//! Hot-path and registry micro-benchmarks (criterion).
//!
//! - `route_lookup/<N>`: route one request (Host header) against a snapshot of N services;
//! - `select/<policy>`: pick an instance of a 10-instance service;
//! - `apply_one_change/<instances>x<per service>`: apply one registration change and build the new
//!   snapshot, for 100,000 instances in 1,000 services, and 10,000 and 100,000 services of one
//!   instance each;
//! - `head/request` and `head/response`: the native engine's per-request head work: parse a
//!   typical browser-sized request head and write the head sent upstream (hop-by-hop stripping,
//!   X-Forwarded-*), and parse a response head and write the one sent to the client.
//!
//! Run: `cargo bench --bench routing`. Results and how they compare: BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use switchyard::registry::catalog::{Catalog, Change, Update};
use switchyard::routing::{Health, Policy, Router, RoutingTable, ServiceSettings};

fn catalog() -> Catalog {
    Catalog::new(
        "/services/".into(),
        Vec::<Arc<str>>::new(),
        Arc::new(|_: &str| ServiceSettings::default()),
        Health::Healthy,
        switchyard::registry::dns::Requests::detached(),
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
            switchyard::registry::dns::Requests::detached(),
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
            b.iter(|| black_box(svc.select(&[], None)))
        });
    }
    g.finish();
}

fn apply_one_change(c: &mut Criterion) {
    // (services, instances per service): 100,000 instances in 1,000 services, and the shape where
    // every instance is its own service (the propagation benchmark's 10,000 filler services)
    let mut g = c.benchmark_group("apply_one_change");
    for (services, per_service) in [(1_000usize, 100usize), (10_000, 1), (100_000, 1)] {
        let (mut cat, t) = table(services, per_service);
        let mut current = Arc::new(t);
        let key = format!("/services/svc-{}/0", services / 2).into_bytes();
        let mut flip = false;
        let id = format!("{}x{per_service}", services * per_service);
        g.bench_function(BenchmarkId::from_parameter(id), |b| {
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
                            key: key.clone(),
                            value: value.as_bytes().to_vec(),
                        }],
                    },
                );
                // the old snapshot is dropped here, as in the registry
                current = Arc::new(next);
            })
        });
    }
    g.finish();
}

fn heads(c: &mut Criterion) {
    use switchyard::http1::{
        parse_request, parse_response, ClientConnection, Hop, OutFraming, MAX_HEADERS,
    };
    let request = b"GET /api/v1/items?page=2 HTTP/1.1\r\nHost: items.svc.local\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36\r\nAccept: application/json\r\nAccept-Encoding: gzip, deflate\r\nAccept-Language: en-GB,en;q=0.9\r\nCookie: session=0123456789abcdef; theme=dark\r\nConnection: keep-alive\r\nX-Request-Id: 7f9c2ba4-e88f-11ee-9d3f-0242ac120002\r\n\r\n";
    let response = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 14\r\nDate: Wed, 25 Nov 2026 12:00:00 GMT\r\nServer: backend\r\nCache-Control: no-cache\r\nConnection: keep-alive\r\n\r\n{\"items\": []}\n";
    let mut out = Vec::with_capacity(1024);
    let mut g = c.benchmark_group("head");
    g.bench_function("request", |b| {
        b.iter(|| {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let req = parse_request(black_box(request), &mut headers)
                .expect("valid")
                .expect("complete");
            let hop = Hop {
                client_ip: "10.1.2.3",
                via: "switchyard-1a2b3c4d",
                tls: false,
            };
            req.write_upstream_head(&mut out, &req.target, "items.svc.local", &hop);
            black_box(out.len())
        })
    });
    g.bench_function("response", |b| {
        b.iter(|| {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let resp = parse_response(black_box(response), &mut headers, false)
                .expect("valid")
                .expect("complete");
            resp.write_client_head(
                &mut out,
                ClientConnection::KeepAlive11,
                OutFraming::Length(14),
            );
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(benches, route_lookup, select, apply_one_change, heads);
criterion_main!(benches);

//! switchyard: a service-discovery load balancer.
//!
//! Clients point at one proxy address; switchyard routes each request by service name to a live
//! instance of that service. Instances register themselves in etcd under a lease.
//!
//! # Architecture
//!
//! ```text
//!  services ──put key + lease──▶ etcd ◀──list R, watch R+1 (prefix)── registry (one task; DNS names
//!  (or the Consul API, which writes                                     │  resolved beside it)
//!   ordinary registrations)                                             │ Update::{Reset, Batch, Resolved}
//!                                                                       ▼
//!                                                    catalog: services → instances (owned by that task)
//!                                                                       │ build; one store per change
//!                                                                       ▼
//!  client ──HTTP/1.1──▶ engine ──load()──▶ ArcSwap<RoutingTable> ──generation──▶ health checker
//!         ──h2c──────▶ engine ─▶ gateway   (immutable snapshot)       (watch)     probes every instance,
//!         ──TLS──────▶ tls ─┬─▶ engine     route: request → service               flips InstanceState
//!                           └─▶ gateway    select: service → Arc<Instance>                  │
//!                              (ALPN h2)   { addr, weight, meta, state } ◀──────────────────┘
//!                 │  both request paths: failures and answers ──▶ passive detection
//!                 │  (health::passive, routing::outlier) ──▶ InstanceState (atomics)
//!                 ▼
//!  upstream instance: HTTP/1.1 (engine, its own pool), h2c/grpc/https/h2 (gateway, upstream pool)
//!
//!  admin (/metrics, /api, status page) and the Consul API read the snapshot; nothing points back.
//! ```
//!
//! Dependencies point one way: registry → routing ← request paths (engine, gateway, proxy,
//! upstream); health → routing; admin reads. `tests/layers.rs` fails on an import against that
//! direction, and on a file under `src/` that the layout below does not name.
//!
//! # Layout
//!
//! - `main.rs`: the thin binary: command line, tracing, config, build, run.
//! - `cli.rs`: clap definitions of `serve`, `check-config`, `register`, `services`.
//! - `server.rs`: wiring of everything below into one pingora server, and the drain on shutdown.
//! - [`config`]: file → `FileConfig` → validated [`config::Config`]: `config/mod.rs` (the
//!   pipeline, errors, the embedded default) and one file per section: `config/proxy.rs`,
//!   `config/admin.rs` (with `[consul]`), `config/etcd.rs`, `config/routing.rs`,
//!   `config/health.rs`, `config/traffic.rs`, `config/services.rs` (with `[upstream_tls]`),
//!   `config/tls.rs`, `config/http2.rs`, `config/log.rs`; `config/tests.rs`.
//! - [`registry`]: `registry/mod.rs` (the task: etcd list + watch, re-lists, backoff, status),
//!   `registry/catalog.rs` (every registration by key, and the snapshot builder),
//!   `registry/codec.rs` (keys and the three value formats), `registry/dns.rs` (registered names
//!   resolved off the registry task), `registry/own.rs` (switchyard's own addresses, refused),
//!   `registry/endpoints.rs` (one etcd endpoint at a time, the next after a failure: the
//!   registry's, the registrar's and the Consul store's clients).
//! - [`routing`]: `routing/mod.rs` (the [`routing::RoutingTable`] snapshot, `Instance`,
//!   `InstanceState`, `Service`), `routing/address.rs` (`HostPort`, an address as registered),
//!   `routing/services.rs` (the service map, shared between snapshots in copy-on-write shards),
//!   `routing/route.rs` (request → service), `routing/select.rs` (balancing policies),
//!   `routing/hash.rs` (consistent hashing), `routing/traffic.rs` (a service's traffic policy
//!   settings), `routing/outlier.rs` (outlier detection on answers, and its sweeper task),
//!   `routing/budget.rs` (the retry budget).
//! - `health/`: `health/mod.rs` (the picture), `health/spec.rs` (what a check is),
//!   `health/target.rs` (one instance's check, metadata overrides applied), `health/checker.rs`
//!   (the scheduler task, woken by registry generations), `health/schedule.rs` (its queues),
//!   `health/admission.rs` (first checks on a thread of their own), `health/probe.rs` and
//!   `health/https.rs` (one check per protocol), `health/transition.rs` (thresholds, reporting a
//!   flip), `health/passive.rs` (detection from both request paths); `health/fixtures.rs` (unit
//!   test fixtures).
//! - [`http1`]: HTTP/1.x messages and the rules that keep every message readable one way only,
//!   shared by the engine, the HTTP health probe and the registrar's check: `http1/mod.rs` (the
//!   policy, one rule per RFC section), `http1/head.rs`,
//!   `http1/chunked.rs`, `http1/body.rs`; `http1/verify.rs` (the oracle of the property tests and
//!   the fuzz targets), `http1/tests.rs`.
//! - `engine/`: the native HTTP/1.1 request path, one step per file: `engine/mod.rs` (the
//!   connection loop), `engine/client.rs` (the client side: TCP or TLS), `engine/request.rs`
//!   (head, routing, our own answers), `engine/exchange.rs` (instances, retries, the request
//!   body), `engine/relay.rs` (the response), `engine/pool.rs` (per-thread upstream keep-alive),
//!   `engine/timer.rs` (per-thread timer wheel), `engine/threads.rs` (which thread serves a
//!   connection). It hands a connection to the gateway on the HTTP/2 preface, or for a service
//!   whose instances speak something else than HTTP/1.1.
//! - `gateway/`: the hyper-based request path (HTTP/2 clients, requests to h2c/grpc/https/h2
//!   instances): `gateway/mod.rs` (connections, HTTP/2 limits), `gateway/request.rs` (one
//!   request), `gateway/body.rs` (the response body and what is recorded when it ends),
//!   `gateway/grpc.rs` (gRPC deadlines and own answers).
//! - `upstream/`: talking to an instance: `upstream/mod.rs` (its protocol), `upstream/connect.rs`
//!   (TCP, then TLS), `upstream/tls.rs` (TLS towards instances), `upstream/pool.rs` (the
//!   gateway's pooled connections), `upstream/h2.rs` (HTTP/2 to instances on the `h2` crate
//!   directly), `upstream/body.rs` (bodies received either way: hyper's or h2's).
//! - `proxy.rs`: what every request path shares: the routing decision, in-flight counts,
//!   `finish_request` (metrics and access log).
//! - `tls.rs`: TLS termination: certificates by SNI, reload on SIGHUP, the TLS listener.
//! - `admin/`: `admin/mod.rs` (`/metrics`, `/healthz`, `/readyz`, `/api/...`), `admin/page.rs`
//!   (the status page).
//! - `consul/`: the Consul-compatible agent API, kept in etcd as ordinary registrations:
//!   `consul/mod.rs`, `consul/http.rs` (listener, token, headers), `consul/routes.rs`
//!   (endpoints), `consul/query.rs` and `consul/decode.rs` (reading requests),
//!   `consul/agent.rs` (writes), `consul/store.rs` (etcd side), `consul/record.rs` (a
//!   registration as kept in etcd), `consul/directory.rs` (what the API knows beyond the
//!   snapshot), `consul/view.rs` (reads).
//! - [`register`]: the registrar side: `register/mod.rs`, `register/registrar.rs` (the lease
//!   loop), `register/check.rs` (its gates), `register/child.rs` (a wrapped command),
//!   `register/services.rs` (`switchyard services`).
//! - `metrics.rs`: every Prometheus metric family (a leaf: admin hands it the snapshot's counts).
//! - `events.rs`: a small ring of recent notable events for the status page.
//! - `limits.rs`: the open-file limit, raised at start, and the client connections it carries.
//! - `memory.rs`: giving freed memory back to the system after a burst.
//! - `clock.rs`: wall and monotonic milliseconds; `sync.rs`: the one way to take a mutex.

// The docs are for switchyard's developers (`cargo doc --document-private-items`): links into
// crate-private modules are meant.
#![allow(rustdoc::private_intra_doc_links)]

mod admin;
pub mod cli;
mod clock;
pub mod config;
mod consul;
mod engine;
mod events;
mod gateway;
mod health;
pub mod http1;
mod limits;
mod memory;
mod metrics;
mod proxy;
pub mod register;
pub mod registry;
pub mod routing;
pub mod server;
mod sync;
mod tls;
mod upstream;

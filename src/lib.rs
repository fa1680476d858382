//! switchyard: a service-discovery load balancer.
//!
//! Clients point at one proxy address; switchyard routes each request by service name to a live
//! instance of that service. Instances register themselves in etcd under a lease.
//!
//! # Architecture
//!
//! ```text
//!  services ──put key + lease──▶ etcd ◀──list R, watch R+1 (prefix)── registry (one task)
//!                                                                       │ Update::{Reset, Batch, Resolved}
//!                                                                       ▼
//!                                                    catalog: services → instances (owned by that task)
//!                                                                       │ build
//!                                                                       ▼
//!  client ──HTTP/1.1──▶ engine ──load()──▶ ArcSwap<RoutingTable>  (immutable snapshot, one store per change)
//!         ──h2c──────▶ engine ─▶ gateway ─┤ route: request → service name    │
//!         ──TLS──────▶ tls ────▶ gateway ─┤ select: service → instance ◀─────┘  Arc<Instance> { addr, weight, meta, state }
//!                                          ▼                                                  ▲
//!              upstream instance: HTTP/1.1 (engine, gateway), h2c/grpc/https/h2 (gateway)      │
//!                                                        health checker ──────────────────────┘ flips InstanceState health
//! ```
//!
//! # Layout
//!
//! - [`config`]: TOML file → `FileConfig` → validated [`config::Config`]; the embedded default.
//! - [`cli`]: clap definitions of `serve`, `check-config`, `register`, `services`.
//! - [`registry`]: etcd list + watch loop, the [`registry::Catalog`], the value codecs, DNS
//!   names resolved off the registry task (`registry::dns`) and the refused own addresses
//!   (`registry::own`).
//! - [`routing`]: the [`routing::RoutingTable`] snapshot (its [`routing::ServiceMap`] is shared
//!   between snapshots in copy-on-write shards), route matching and selection policies, and the
//!   traffic policies both request paths share: outlier detection on answers (`routing::outlier`,
//!   with its sweeper task), the retry budget (`routing::budget`), consistent hashing
//!   (`routing::hash`), and their settings (`routing::traffic`: slow start, panic, zones).
//! - [`health`]: active probes (HTTP, HTTPS, TCP, gRPC), passive detection, the probe scheduler and the
//!   thread that runs new instances' first checks.
//! - [`http1`]: HTTP/1.x messages (heads, the chunked coding, bodies re-framed by the proxy) and
//!   the rules that keep every message readable one way only; used by the engine, the HTTP
//!   health probe and the registrar's check. `http1::verify` is the oracle of the property tests
//!   and the fuzz targets (`fuzz/`).
//! - [`engine`]: the HTTP/1.1 request path: a pingora `ServerApp` that parses, routes and relays
//!   requests itself (`request`, `exchange`, `relay`), with a per-thread upstream connection pool
//!   and a timer wheel. It hands a connection to the gateway when it starts with the HTTP/2
//!   preface, or when a request is for a service whose instances speak something else than
//!   HTTP/1.1.
//! - [`gateway`]: the hyper-based request path: HTTP/2 clients (h2c and over TLS), HTTP/1.1 over
//!   TLS, and requests to h2c/grpc/https/h2 instances; gRPC-aware own answers; HTTP/2 limits.
//! - [`upstream`]: the protocol of an instance (registration metadata `protocol`), TLS towards
//!   instances, and the gateway's pooled HTTP/1.1 and multiplexed HTTP/2 connections.
//! - [`tls`]: TLS termination: certificates by SNI, reload on SIGHUP, the TLS listener.
//! - [`proxy`]: what every request path shares (routing decision, in-flight count, request metrics,
//!   access log).
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/api/services`, the status page.
//! - [`metrics`]: every Prometheus metric family.
//! - [`events`]: a small ring of recent notable events for the status page.
//! - [`limits`]: the open-file limit, raised at start, and the client connections it carries.
//! - [`memory`]: giving freed memory back to the system after a burst (initial list, big scrape).
//! - [`consul`]: the Consul-compatible agent API (register, TTL checks, health and catalog
//!   reads, blocking queries), kept in etcd as ordinary registrations.
//! - [`register`]: the registrar side (`switchyard register`, `switchyard services`).
//! - [`server`]: wiring of all of the above into one pingora server.

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

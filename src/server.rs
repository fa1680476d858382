//! Wiring: builds the pingora server (proxy listener, admin listener, registry task) from a
//! validated [`Config`] and runs it until SIGTERM/SIGINT.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pingora::server::ExecutionPhase;
use tokio::sync::broadcast;

use async_trait::async_trait;
use futures::future::BoxFuture;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service as ListeningService;
use tracing::{error, info, warn};

use crate::admin::AdminApp;
use crate::config::Config;
use crate::engine::{Engine, ProxyListener};
use crate::gateway::Gateway;
use crate::health::HealthChecker;
use crate::proxy::IN_FLIGHT;
use crate::registry::{Registry, RegistryStatus};
use crate::routing::{new_shared_table, SharedTable};
use crate::tls::{reload_on_sighup, server_config as tls_server_config, TlsListener};

/// A task that consumes itself (`run(self, shutdown)`), run once inside pingora's service
/// lifecycle (the registry, the health checker).
struct RunOnce {
    name: &'static str,
    task: Mutex<Option<OnceTask>>,
}

type OnceTask = Box<dyn FnOnce(ShutdownWatch) -> BoxFuture<'static, ()> + Send>;

impl RunOnce {
    fn new(name: &'static str, task: OnceTask) -> RunOnce {
        RunOnce {
            name,
            task: Mutex::new(Some(task)),
        }
    }
}

#[async_trait]
impl BackgroundService for RunOnce {
    async fn start(&self, shutdown: ShutdownWatch) {
        let task = crate::sync::lock(&self.task).take();
        match task {
            Some(run) => run(shutdown).await,
            None => error!(service = self.name, "background service started twice"),
        }
    }
}

/// SIGTERM and SIGINT both drain gracefully (pingora's default treats SIGINT as fast shutdown).
/// After the signal, listeners keep accepting for `pre_stop` (lets a load balancer in front
/// notice) before pingora closes them.
struct GracefulSignals {
    pre_stop: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for GracefulSignals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (term, int) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => info!("SIGTERM received: draining"),
                    _ = int.recv() => info!("SIGINT received: draining"),
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                error!(error = %e, "cannot install signal handlers; waiting for ctrl-c");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        if !self.pre_stop.is_zero() {
            info!(
                seconds = self.pre_stop.as_secs(),
                "still accepting during the grace period"
            );
            tokio::time::sleep(self.pre_stop).await;
        }
        ShutdownSignal::GracefulTerminate
    }
}

/// Everything built from a config, before it runs.
pub struct Switchyard {
    server: Server,
    grace_period: Duration,
    shutdown_timeout: Duration,
    pub table: SharedTable,
    pub status: Arc<RegistryStatus>,
}

impl Switchyard {
    pub fn build(config: Config) -> Result<Switchyard, pingora::BError> {
        let conf = ServerConf {
            threads: config.proxy.threads,
            work_stealing: config.proxy.work_stealing,
            upstream_keepalive_pool_size: config.proxy.keepalive_pool_size,
            // pingora's grace period is a fixed sleep after the listeners close, at the end of
            // which in-flight requests are dropped. We make it the drain budget (plus a second);
            // the drain watcher exits the process as soon as in-flight requests reach zero.
            grace_period_seconds: Some(config.proxy.shutdown_timeout.as_secs() + 1),
            graceful_shutdown_timeout_seconds: Some(1),
            ..ServerConf::default()
        };
        let mut server = Server::new_with_opt_and_conf(None, conf);
        server.bootstrap();

        let table = new_shared_table();
        let status = Arc::new(RegistryStatus::default());
        let pinned: Vec<Arc<str>> = config.router.explicit_services().cloned().collect();
        let services = config.services.clone();
        let default_service = config.default_service.clone();
        let settings = Arc::new(move |name: &str| {
            services
                .get(name)
                .cloned()
                .unwrap_or_else(|| default_service.clone())
        });
        let registry = Registry::new(
            config.etcd.clone(),
            table.clone(),
            status.clone(),
            pinned,
            settings,
            config.health.initial_health(),
        )
        .refusing(config.own_listeners());
        // bound here, not by pingora: a port in use is an error now, naming the setting
        let consul = match &config.consul {
            None => None,
            Some(c) => {
                let listener = crate::consul::bind(c).map_err(|e| {
                    pingora::Error::explain(pingora::ErrorType::BindError, e.to_string())
                })?;
                let api = crate::consul::ConsulApi::new(c, config.etcd.clone(), table.clone());
                Some((api, listener, registry.subscribe()))
            }
        };
        // subscribed before the registry runs, so the checker sees its first snapshot
        let health = config.health.enabled.then(|| {
            HealthChecker::new(table.clone(), config.health.clone(), registry.subscribe())
        });

        let listen = config.proxy.listen.to_string();
        // HTTP/2, TLS clients and non-HTTP/1.1 instances (src/gateway)
        let gateway = Arc::new(Gateway::new(
            table.clone(),
            config.router.clone(),
            config.proxy.clone(),
            config.http2.clone(),
            config.log.access_log,
        ));
        let engine = Arc::new(Engine {
            table: table.clone(),
            router: config.router.clone(),
            cfg: config.proxy.clone(),
            access_log: config.log.access_log,
            workers: Default::default(),
            gateway: gateway.clone(),
            via: crate::engine::via_name(),
            max_clients: crate::limits::client_connection_limit(
                config.proxy.max_client_connections,
            ),
        });
        let mut service = ListeningService::new("proxy".to_string(), ProxyListener(engine.clone()));
        // The engine reads into its own buffer and writes whole heads: pingora's per-connection
        // 64 KiB read buffer would only add a copy and memory per connection.
        service.endpoints().add_listener(
            ListenerConfig::tcp(listen.as_str()).l4_buffer(L4BufferSettings::new(0, 0)),
        );
        server.add_service(service);

        if let Some(tls) = &config.tls {
            let server_config = tls_server_config(tls.resolver.clone()).map_err(|e| {
                pingora::Error::because(pingora::ErrorType::InternalError, "TLS listener", e)
            })?;
            let app = TlsListener {
                acceptor: tokio_rustls::TlsAcceptor::from(server_config),
                engine: engine.clone(),
                handshake_timeout: tls.handshake_timeout,
            };
            let mut service = ListeningService::new("tls".to_string(), app);
            for addr in &tls.listen {
                service.add_tcp(&addr.to_string());
            }
            server.add_service(service);
            let resolver = tls.resolver.clone();
            let mut reload = background_service(
                "tls-reload",
                RunOnce::new(
                    "tls-reload",
                    Box::new(move |s| Box::pin(reload_on_sighup(resolver, s))),
                ),
            );
            reload.threads = Some(1);
            server.add_service(reload);
        }

        let admin = AdminApp {
            table: table.clone(),
            status: status.clone(),
            started: Instant::now(),
            etcd_endpoints: config.etcd.endpoints.clone(),
            prefix: config.etcd.prefix.clone(),
            proxy: Some(crate::admin::ProxyListener::new(config.proxy.listen)),
        };
        let mut admin_service =
            ListeningService::new("admin".to_string(), HttpServer::new_app(admin));
        admin_service.threads = Some(1);
        admin_service.add_tcp(&config.admin_listen.to_string());

        let mut registry_service = background_service(
            "registry",
            RunOnce::new("registry", Box::new(move |s| Box::pin(registry.run(s)))),
        );
        registry_service.threads = Some(1);

        server.add_service(admin_service);
        server.add_service(registry_service);
        if let Some((api, listener, generations)) = consul {
            let mut consul_service = background_service(
                "consul",
                RunOnce::new(
                    "consul",
                    Box::new(move |s| Box::pin(api.run(listener, generations, s))),
                ),
            );
            consul_service.threads = Some(1);
            server.add_service(consul_service);
        }
        if let Some(checker) = health {
            let mut health_service = background_service(
                "health",
                RunOnce::new("health", Box::new(move |s| Box::pin(checker.run(s)))),
            );
            health_service.threads = Some(1);
            server.add_service(health_service);
        }
        // outlier detection's sweeps: success rates, ejections that ran out
        let (outlier_table, interval) = (table.clone(), config.outlier_interval);
        let mut outlier_service = background_service(
            "outlier",
            RunOnce::new(
                "outlier",
                Box::new(move |s| {
                    Box::pin(crate::routing::outlier::run(outlier_table, interval, s))
                }),
            ),
        );
        outlier_service.threads = Some(1);
        server.add_service(outlier_service);
        if let Some(tls) = &config.tls {
            let addrs: Vec<String> = tls.listen.iter().map(|a| a.to_string()).collect();
            info!(tls = %addrs.join(","), "TLS listener on {}", addrs.join(", "));
        }
        info!(
            proxy = %config.proxy.listen,
            admin = %config.admin_listen,
            etcd = %config.etcd.endpoints.join(","),
            prefix = %config.etcd.prefix,
            "switchyard starting: proxy on {}, admin on {}, watching etcd {} under {}",
            config.proxy.listen,
            config.admin_listen,
            config.etcd.endpoints.join(","),
            config.etcd.prefix
        );
        Ok(Switchyard {
            server,
            grace_period: config.proxy.grace_period,
            shutdown_timeout: config.proxy.shutdown_timeout,
            table,
            status,
        })
    }

    /// Runs until SIGTERM/SIGINT, then drains and returns.
    pub fn run(self) {
        spawn_drain_watcher(self.server.watch_execution_phase(), self.shutdown_timeout);
        self.server.run(RunArgs {
            shutdown_signal: Box::new(GracefulSignals {
                pre_stop: self.grace_period,
            }),
        });
        info!("switchyard stopped");
    }
}

/// Once pingora has closed the listeners, waits for in-flight requests to finish (at most
/// `budget`) and exits the process with status 0, instead of sitting out pingora's fixed sleep.
fn spawn_drain_watcher(mut phases: broadcast::Receiver<ExecutionPhase>, budget: Duration) {
    let spawned = std::thread::Builder::new()
        .name("drain-watcher".into())
        .spawn(move || {
            loop {
                match phases.blocking_recv() {
                    Ok(ExecutionPhase::ShutdownGracePeriod) => break,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
            let start = Instant::now();
            let waiting = IN_FLIGHT.load(Ordering::Relaxed);
            info!(
                in_flight = waiting,
                budget_seconds = budget.as_secs(),
                "draining in-flight requests"
            );
            while IN_FLIGHT.load(Ordering::Relaxed) > 0 && start.elapsed() < budget {
                std::thread::sleep(Duration::from_millis(10));
            }
            let left = IN_FLIGHT.load(Ordering::Relaxed);
            if left > 0 {
                warn!(
                    in_flight = left,
                    "drain budget exhausted; exiting with requests in flight"
                );
            } else {
                info!(
                    millis = start.elapsed().as_millis() as u64,
                    "drained; switchyard stopped"
                );
            }
            std::process::exit(0);
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the drain watcher; shutdown waits the full grace period");
    }
}

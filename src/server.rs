//! Wiring: builds the pingora server (proxy listener, admin listener, registry task) from a
//! validated [`Config`] and runs it until SIGTERM/SIGINT.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use pingora::apps::http_app::HttpServer;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service as ListeningService;
use tracing::{error, info};

use crate::admin::AdminApp;
use crate::config::Config;
use crate::proxy::SwitchyardProxy;
use crate::registry::{Registry, RegistryStatus};
use crate::routing::{new_shared_table, Health, SharedTable};

/// Runs the registry inside pingora's service lifecycle.
struct RegistryService(Mutex<Option<Registry>>);

#[async_trait]
impl BackgroundService for RegistryService {
    async fn start(&self, shutdown: ShutdownWatch) {
        let registry = self.0.lock().ok().and_then(|mut g| g.take());
        match registry {
            Some(r) => r.run(shutdown).await,
            None => error!("registry service started twice"),
        }
    }
}

/// SIGTERM and SIGINT both drain gracefully (pingora's default treats SIGINT as fast shutdown).
struct GracefulSignals;

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
        ShutdownSignal::GracefulTerminate
    }
}

/// Everything built from a config, before it runs.
pub struct Switchyard {
    server: Server,
    pub table: SharedTable,
    pub status: Arc<RegistryStatus>,
}

impl Switchyard {
    pub fn build(config: Config) -> Result<Switchyard, pingora::BError> {
        let conf = ServerConf {
            threads: config.proxy.threads,
            upstream_keepalive_pool_size: config.proxy.keepalive_pool_size,
            grace_period_seconds: Some(config.proxy.grace_period.as_secs()),
            graceful_shutdown_timeout_seconds: Some(config.proxy.shutdown_timeout.as_secs()),
            ..ServerConf::default()
        };
        let mut server = Server::new_with_opt_and_conf(None, conf);
        server.bootstrap();

        let table = new_shared_table();
        let status = Arc::new(RegistryStatus::default());
        let pinned: Vec<Arc<str>> = config.router.explicit_services().cloned().collect();
        let services = config.services.clone();
        let settings = Arc::new(move |name: &str| services.get(name).cloned().unwrap_or_default());
        let registry = Registry::new(
            config.etcd.clone(),
            table.clone(),
            status.clone(),
            pinned,
            settings,
            Health::Healthy,
        );

        let proxy = SwitchyardProxy {
            table: table.clone(),
            router: config.router.clone(),
            cfg: config.proxy.clone(),
            access_log: config.log.access_log,
        };
        let mut proxy_service =
            pingora::proxy::http_proxy_service_with_name(&server.configuration, proxy, "proxy");
        proxy_service.add_tcp(&config.proxy.listen.to_string());

        let admin = AdminApp {
            table: table.clone(),
            status: status.clone(),
            started: Instant::now(),
            etcd_endpoints: config.etcd.endpoints.clone(),
            prefix: config.etcd.prefix.clone(),
        };
        let mut admin_service =
            ListeningService::new("admin".to_string(), HttpServer::new_app(admin));
        admin_service.threads = Some(1);
        admin_service.add_tcp(&config.admin_listen.to_string());

        let mut registry_service =
            background_service("registry", RegistryService(Mutex::new(Some(registry))));
        registry_service.threads = Some(1);

        server.add_service(proxy_service);
        server.add_service(admin_service);
        server.add_service(registry_service);
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
            table,
            status,
        })
    }

    /// Runs until SIGTERM/SIGINT, then drains and returns.
    pub fn run(self) {
        self.server.run(RunArgs {
            shutdown_signal: Box::new(GracefulSignals),
        });
        info!("switchyard stopped");
    }
}

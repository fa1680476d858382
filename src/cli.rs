//! Command line: `serve` (the default), `check-config`, `register`, `services`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Service-discovery load balancer: routes HTTP by service name to live instances registered in etcd",
    long_about = "Service-discovery load balancer: routes HTTP by service name to live instances \
                  registered in etcd.\n\nWith no subcommand, runs `serve` with the embedded default config."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Validate a config file and exit: 0 when valid, 1 with the offending key when not.
    CheckConfig {
        /// The TOML config file to check.
        file: PathBuf,
    },
    /// Register an instance in etcd under a lease and keep it alive until stopped.
    Register(RegisterArgs),
    /// List the services and instances registered in etcd.
    Services(ServicesArgs),
}

#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// TOML config file (default: the embedded config/switchyard.toml).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Proxy listen address, overrides proxy.listen.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin listen address, overrides admin.listen.
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// etcd endpoint; repeat for a cluster. Overrides etcd.endpoints.
    #[arg(long = "etcd", value_name = "URL")]
    pub etcd: Vec<String>,
    /// Registration key prefix, overrides etcd.prefix.
    #[arg(long, value_name = "P")]
    pub prefix: Option<String>,
    /// TLS listen address, overrides tls.listen.
    #[arg(long, value_name = "ADDR")]
    pub tls_listen: Option<String>,
    /// TLS certificate chain (PEM) for the TLS listener; with --tls-key, replaces
    /// [[tls.certificates]].
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, Args, Clone)]
pub struct EtcdArgs {
    /// etcd endpoint; repeat for a cluster.
    #[arg(
        long = "etcd",
        value_name = "URL",
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd: Vec<String>,
    /// Registration key prefix.
    #[arg(long, value_name = "P", default_value = "/services/")]
    pub prefix: String,
}

#[derive(Debug, Args, Clone)]
pub struct RegisterArgs {
    /// Service name ([A-Za-z0-9._-]+).
    #[arg(long)]
    pub service: String,
    /// Address clients reach the instance at.
    #[arg(long, value_name = "HOST:PORT")]
    pub addr: String,
    /// Instance id, unique within the service (default: the address).
    #[arg(long)]
    pub id: Option<String>,
    /// Lease TTL in seconds.
    #[arg(long, default_value_t = 10)]
    pub ttl: i64,
    /// Weight (0 = draining).
    #[arg(long, default_value_t = 1)]
    pub weight: u32,
    /// Metadata, repeatable: --meta zone=a --meta version=2.
    #[arg(long = "meta", value_name = "K=V")]
    pub meta: Vec<String>,
    /// Keep the key only while this http:// URL answers 2xx to a GET (probed every
    /// --check-interval-ms, each probe timing out after min(interval, 2 s)); flips are logged.
    #[arg(long, value_name = "URL")]
    pub check: Option<String>,
    /// Interval of --check, in milliseconds (at least 100).
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    pub check_interval_ms: u64,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Command to run as the service (after `--`): registered once --addr accepts connections (or
    /// --check passes), SIGTERM/SIGINT forwarded, deregistered when it exits; switchyard exits
    /// with its status (128+N when killed by signal N).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args, Clone)]
pub struct ServicesArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Print JSON instead of a table (with --watch: one JSON object per line).
    #[arg(long)]
    pub json: bool,
    /// After the list, keep running and print each change on one line: `+ SERVICE ID ADDR
    /// weight=N [K=V,..]` (added), `~ ...` (changed), `- SERVICE ID` (removed). Reconnects to
    /// etcd by itself.
    #[arg(long)]
    pub watch: bool,
}

//! `controller serve`.
use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use fleetadm_common::clock::parse_duration;

use crate::daemon::{self, ServeOptions};
use serde::Deserialize;
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG: &str = "/etc/fleetadm/controller.toml";

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Controller data directory [default: from the config file, else /var/lib/fleetadm].
    #[arg(long, env = "FLEETADM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Configuration file (used when it exists); flags win over it.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Address for agents (TLS, gRPC) [default: 0.0.0.0:9443].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Name or IP agents use to reach this controller; repeatable. Added to the serving
    /// certificate, and the first one is used in printed enrollment commands.
    #[arg(long = "advertise-address")]
    pub advertise: Vec<String>,
    /// Lifetime of node client certificates; agents renew at ~70% [default: 8760h].
    #[arg(long, value_parser = parse_duration)]
    pub node_cert_validity: Option<Duration>,
    /// How often agents send a heartbeat [default: 15s].
    #[arg(long, value_parser = parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Lifetime of the controller's serving certificate; reissued while running when a third
    /// is left [default: 8760h].
    #[arg(long, value_parser = parse_duration)]
    pub server_cert_validity: Option<Duration>,
    /// Open agent connections at most (over it, new ones are closed at once) [default: 16384].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Serve Prometheus metrics (GET /metrics) on this address, e.g. 127.0.0.1:9464 [default: off].
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Agent sessions opened per second at most (bursts of as many); over it, agents are told
    /// when to come back, spread out at this rate [default: 2000].
    #[arg(long)]
    pub session_rate: Option<u32>,
}

/// `/etc/fleetadm/controller.toml`: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerFileConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    #[serde(default)]
    pub advertise_addresses: Vec<String>,
    pub node_cert_validity: Option<String>,
    pub heartbeat_interval: Option<String>,
    pub server_cert_validity: Option<String>,
    pub max_connections: Option<usize>,
    pub metrics_listen: Option<SocketAddr>,
    pub session_rate: Option<u32>,
}

fn file_duration(v: &Option<String>, key: &str, path: &Path) -> anyhow::Result<Option<Duration>> {
    v.as_deref().map(|s| parse_duration(s).map_err(|e| anyhow::anyhow!("{}: {key}: {e}", path.display()))).transpose()
}

pub async fn run(a: ServeArgs) -> anyhow::Result<()> {
    let cfg: ControllerFileConfig = fleetadm_common::config::load_optional(&a.config)?;
    let node_cert_validity = match a.node_cert_validity {
        Some(d) => d,
        None => file_duration(&cfg.node_cert_validity, "node_cert_validity", &a.config)?
            .unwrap_or(Duration::from_secs(8760 * 3600)),
    };
    if node_cert_validity < Duration::from_secs(10) {
        anyhow::bail!("--node-cert-validity must be at least 10s");
    }
    let heartbeat_interval = match a.heartbeat_interval {
        Some(d) => d,
        None => {
            file_duration(&cfg.heartbeat_interval, "heartbeat_interval", &a.config)?.unwrap_or(Duration::from_secs(15))
        }
    };
    let server_cert_validity = match a.server_cert_validity {
        Some(d) => d,
        None => file_duration(&cfg.server_cert_validity, "server_cert_validity", &a.config)?
            .unwrap_or(crate::pki::SERVER_VALIDITY),
    };
    if server_cert_validity < Duration::from_secs(30) {
        anyhow::bail!("--server-cert-validity must be at least 30s");
    }
    let mut limits = crate::listen::Limits::default();
    if let Some(n) = a.max_connections.or(cfg.max_connections) {
        if n == 0 {
            anyhow::bail!("--max-connections must be at least 1");
        }
        limits.max_connections = n;
    }
    if let Some(n) = a.session_rate.or(cfg.session_rate) {
        if n == 0 {
            anyhow::bail!("--session-rate must be at least 1");
        }
        limits.session_rate = n;
    }
    let opts = ServeOptions {
        data_dir: a.data_dir.or(cfg.data_dir).unwrap_or_else(|| PathBuf::from(super::DEFAULT_DATA_DIR)),
        listen: a.listen.or(cfg.listen).unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 9443))),
        advertise: if a.advertise.is_empty() { cfg.advertise_addresses } else { a.advertise },
        node_cert_validity,
        heartbeat_interval,
        server_cert_validity,
        limits,
        metrics_listen: a.metrics_listen.or(cfg.metrics_listen),
    };
    daemon::serve(opts, shutdown_signal()).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    tracing::info!("shutting down");
}

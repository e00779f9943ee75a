//! `controller serve`.
use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use fleetadm_common::clock::parse_duration;

use super::DataDir;
use crate::daemon::{self, ServeOptions};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub data: DataDir,
    /// Address for agents (TLS, gRPC).
    #[arg(long, default_value = "0.0.0.0:9443")]
    pub listen: SocketAddr,
    /// Name or IP agents use to reach this controller; repeatable. Added to the serving
    /// certificate, and the first one is used in printed enrollment commands.
    #[arg(long = "advertise-address")]
    pub advertise: Vec<String>,
    /// Lifetime of node client certificates (agents renew at ~70%).
    #[arg(long, default_value = "8760h", value_parser = parse_duration)]
    pub node_cert_validity: Duration,
    /// How often agents send a heartbeat.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
}

pub async fn run(a: ServeArgs) -> anyhow::Result<()> {
    if a.node_cert_validity < Duration::from_secs(10) {
        anyhow::bail!("--node-cert-validity must be at least 10s");
    }
    let opts = ServeOptions {
        data_dir: a.data.data_dir,
        listen: a.listen,
        advertise: a.advertise,
        node_cert_validity: a.node_cert_validity,
        heartbeat_interval: a.heartbeat_interval,
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

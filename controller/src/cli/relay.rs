//! `controller relay` (the relay daemon an operator runs on a bastion) and `controller relays
//! add|list|remove` (registering relays with the controller).
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use fleetadm_common::clock::rfc3339_ms;
use fleetadm_common::output::{render_structured, table};
use fleetadm_proto::{AddRelayRequest, Empty, RelayInfo, RelayRef};
use serde::Serialize;

use super::{rpc_error, DataDir, Output};
use crate::admin::client;
use crate::relay::forward::{self, RelayOptions, RelayStats};
use crate::relay::keys::SigningKey;

pub const DEFAULT_KEY_FILE: &str = "/var/lib/fleetadm-relay/relay.key";

#[derive(Debug, Args)]
pub struct RelayArgs {
    /// Address agents connect to (put it in the controller's --advertise-address too: agents
    /// check the controller's certificate against the address they dial).
    #[arg(long, env = "FLEETADM_RELAY_LISTEN", required_unless_present = "print_public_key")]
    pub listen: Option<SocketAddr>,
    /// The controller's agent port, HOST:PORT.
    #[arg(long, env = "FLEETADM_RELAY_UPSTREAM", required_unless_present = "print_public_key")]
    pub upstream: Option<String>,
    /// The name this relay is registered under (`controller relays add NAME`) [default: the
    /// host name].
    #[arg(long, env = "FLEETADM_RELAY_NAME")]
    pub name: Option<String>,
    /// The relay's Ed25519 signing key (made on first use, 0600).
    #[arg(long, env = "FLEETADM_RELAY_KEY", default_value = DEFAULT_KEY_FILE)]
    pub key_file: PathBuf,
    /// Print the public key (making the key if needed) and the command that registers it; exit.
    #[arg(long)]
    pub print_public_key: bool,
    /// Connections forwarded at once, at most (over it, new ones are closed at once).
    #[arg(long, env = "FLEETADM_RELAY_MAX_CONNECTIONS", default_value_t = 16_384)]
    pub max_connections: usize,
    /// Serve connection counts (GET /metrics, Prometheus text) on this address [default: off].
    #[arg(long, env = "FLEETADM_RELAY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

fn default_name() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "relay".into())
}

pub async fn run_relay(a: RelayArgs) -> anyhow::Result<()> {
    let name = a.name.clone().unwrap_or_else(default_name);
    let name_ok = crate::enroll::csr::validate_node_name(&name).is_ok() && name.len() <= crate::relay::header::MAX_NAME;
    let bad_name = || format!("relay name {name:?} is not valid (lowercase letters, digits, '-', '.'); set --name");
    let path = a.key_file.clone();
    if a.print_public_key {
        let (key, _) = tokio::task::spawn_blocking(move || SigningKey::load_or_create(&path)).await??;
        println!("{}", key.public());
        if name_ok {
            eprintln!(
                "register it on the controller host with:\n  controller relays add {name} --public-key {}",
                key.public()
            );
        } else {
            eprintln!("{}, then register it with `controller relays add NAME --public-key ...`", bad_name());
        }
        return Ok(());
    }
    anyhow::ensure!(name_ok, bad_name());
    let (key, created) = tokio::task::spawn_blocking(move || SigningKey::load_or_create(&path)).await??;
    let (Some(listen), Some(upstream)) = (a.listen, a.upstream) else {
        anyhow::bail!("--listen and --upstream are required");
    };
    fleetadm_common::dial::split_host_port(&upstream).with_context(|| format!("--upstream {upstream:?}"))?;
    if created {
        tracing::info!(key_file = %a.key_file.display(), "made a new relay key");
    }
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let stats = Arc::new(RelayStats::default());
    if let Some(m) = a.metrics_listen {
        let l = tokio::net::TcpListener::bind(m).await.with_context(|| format!("cannot listen for metrics on {m}"))?;
        let (s, n) = (stats.clone(), name.clone());
        tokio::spawn(crate::metrics::serve_text(l, Arc::new(move || s.render(&n))));
    }
    tracing::info!(
        relay = %name, %listen, %upstream, public_key = %key.public(),
        "relay forwarding (the controller trusts it once registered: controller relays add {name} --public-key KEY)"
    );
    tokio::spawn(forward::log_counts(name.clone(), stats.clone()));
    fleetadm_common::notify_ready();
    let opts =
        RelayOptions { upstream, name, max_connections: a.max_connections, connect_timeout: Duration::from_secs(10) };
    tokio::select! {
        _ = forward::run(listener, opts, Arc::new(key), stats) => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate() => {}
    }
    tracing::info!("relay stopping");
    Ok(())
}

async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending::<()>().await,
    }
}

#[derive(Debug, Subcommand)]
pub enum RelaysCmd {
    /// Register a relay (or give it a new key).
    Add {
        /// The relay's name (its --name, by default the bastion's host name).
        name: String,
        /// The key `controller relay --print-public-key` printed on the bastion.
        #[arg(long)]
        public_key: String,
        #[command(flatten)]
        data: DataDir,
    },
    /// List registered relays.
    List {
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        out: Output,
    },
    /// Remove a relay: connections it forwards are refused from the next one on.
    Remove {
        name: String,
        #[command(flatten)]
        data: DataDir,
    },
}

#[derive(Serialize)]
struct RelayView {
    name: String,
    public_key: String,
    added_at: String,
}

fn view(r: &RelayInfo) -> RelayView {
    RelayView { name: r.name.clone(), public_key: r.public_key.clone(), added_at: rfc3339_ms(r.added_unix_ms) }
}

pub async fn run(cmd: RelaysCmd) -> anyhow::Result<()> {
    match cmd {
        RelaysCmd::Add { name, public_key, data } => {
            let mut c = client::connect(&data.data_dir).await?;
            let r = c.add_relay(AddRelayRequest { name, public_key, ..Default::default() }).await.map_err(rpc_error)?;
            println!("relay {} registered", r.into_inner().name);
        }
        RelaysCmd::List { data, out } => {
            let mut c = client::connect(&data.data_dir).await?;
            let list = c.list_relays(Empty {}).await.map_err(rpc_error)?.into_inner();
            let views: Vec<RelayView> = list.relays.iter().map(view).collect();
            match render_structured(&views, out.output) {
                Some(s) => println!("{s}"),
                None => {
                    let rows: Vec<Vec<String>> =
                        views.iter().map(|v| vec![v.name.clone(), v.added_at.clone(), v.public_key.clone()]).collect();
                    print!("{}", table(&["NAME", "ADDED", "PUBLIC KEY"], &rows));
                }
            }
        }
        RelaysCmd::Remove { name, data } => {
            let mut c = client::connect(&data.data_dir).await?;
            let r = c.remove_relay(RelayRef { name, ..Default::default() }).await.map_err(rpc_error)?;
            println!("relay {} removed", r.into_inner().name);
        }
    }
    Ok(())
}

//! The `node-agent` command line.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fleetadm_common::clock::{now_unix_ms, parse_duration, rfc3339_ms};
use fleetadm_common::output::{render_structured, OutputFormat};
use serde::Serialize;

use crate::enroll::{self, EnrollOptions};
use crate::identity::{Identity, StateDir};
use crate::session::{self, status, RunOptions};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/node-agent";

#[derive(Debug, Parser)]
#[command(name = "node-agent", version = crate::VERSION, about = "fleetadm node agent: enrolls this host and pulls its work from the controller", propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

pub const DEFAULT_CONFIG: &str = "/etc/node-agent/config.toml";

#[derive(Debug, Clone, Args)]
pub struct State {
    /// Where the agent keeps its identity and state [default: from the config file, else /var/lib/node-agent].
    #[arg(long, env = "NODE_AGENT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Configuration file (used when it exists).
    #[arg(long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
}

impl State {
    /// The state dir: flag or environment, else the config file, else the default.
    pub fn resolve(&self) -> anyhow::Result<(StateDir, crate::config::AgentFileConfig)> {
        let cfg = crate::config::AgentFileConfig::load(&self.config)?;
        let dir = self
            .state_dir
            .clone()
            .or_else(|| cfg.state_dir.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        Ok((StateDir::new(dir), cfg))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enroll this host with a controller using a bootstrap token and the controller's CA pin.
    Enroll(EnrollArgs),
    /// Keep a session with the controller and do the work it sends (the systemd service runs this).
    Run(RunArgs),
    /// The node-local apiserver load balancer (IPVS), by hand.
    #[command(subcommand)]
    Lb(crate::lb_cli::LbCmd),
    /// Install (or with --reset undo) a bundle directory on this host without a controller, with
    /// the same code as the controller's bootstrap task (air-gapped repair; verifying a bundle).
    Bootstrap {
        #[command(flatten)]
        state: State,
        /// A bundle directory (with bundle.yaml at its root).
        #[arg(long, required_unless_present = "reset")]
        bundle_dir: Option<PathBuf>,
        /// Undo what bootstrap installed.
        #[arg(long)]
        reset: bool,
    },
    /// Write shell completions and man pages into a directory (used to build packages).
    #[command(hide = true)]
    GenerateDocs { out: PathBuf },
    /// Show enrollment, certificate and session state.
    Status {
        #[command(flatten)]
        state: State,
        /// Output format: table, json or yaml.
        #[arg(short = 'o', long = "output", default_value = "table")]
        output: OutputFormat,
    },
}

#[derive(Debug, Args)]
pub struct EnrollArgs {
    #[command(flatten)]
    state: State,
    /// Controller address, HOST:PORT.
    #[arg(long)]
    controller: String,
    /// Bootstrap token from `controller token create`.
    #[arg(long, env = "NODE_AGENT_TOKEN", hide_env_values = true)]
    token: String,
    /// Pin of the controller's CA: sha256:<hex>, printed by `controller token create`.
    #[arg(long)]
    ca_hash: String,
    /// Name of this node (default: the hostname).
    #[arg(long)]
    node_name: Option<String>,
    /// Enroll again even if this host is already enrolled.
    #[arg(long)]
    force: bool,
    /// Give up on the controller after this long.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    timeout: Duration,
    /// Do not start the node-agent service afterwards (when running `node-agent run` yourself).
    #[arg(long)]
    no_start: bool,
    /// Reach the controller through this HTTP CONNECT proxy, http://[USER:PASSWORD@]HOST:PORT
    /// (TLS stays end to end). Default: the config file's `proxy`, else HTTPS_PROXY/NO_PROXY.
    /// Recorded for `node-agent run`.
    #[arg(long)]
    proxy: Option<String>,
    /// Labels for selecting this host (`controller exec -l`, `nodes list -l`): KEY=VALUE,...
    #[arg(long, value_delimiter = ',', value_parser = parse_label)]
    labels: Vec<(String, String)>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    state: State,
    /// First reconnect delay ceiling (doubles per failure, full jitter) [default: 1s].
    #[arg(long, value_parser = parse_duration)]
    backoff_initial: Option<Duration>,
    /// Largest reconnect delay ceiling [default: 60s].
    #[arg(long, value_parser = parse_duration)]
    backoff_max: Option<Duration>,
    /// How often host facts are re-collected; changes are reported [default: 60s].
    #[arg(long, value_parser = parse_duration)]
    inventory_interval: Option<Duration>,
    /// Serve bundle blobs to peers on this address (e.g. 0.0.0.0:7451), so a bundle reaches
    /// many hosts without the controller sending it to each [default: the config's peer_listen, else off].
    #[arg(long, value_name = "ADDR")]
    peer_listen: Option<String>,
}

fn default_node_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.split('.').next().unwrap_or_default().to_ascii_lowercase())
        .unwrap_or_default()
}

#[derive(Serialize)]
struct StatusView {
    enrolled: bool,
    node_name: Option<String>,
    controller: Option<String>,
    certificate_expires: Option<String>,
    certificate_renews: Option<String>,
    session: Option<String>,
    session_since: Option<String>,
    last_error: Option<String>,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Enroll(a) => {
            let (dir, file_cfg) = a.state.resolve()?;
            let proxy = a.proxy.or(file_cfg.proxy);
            if let Some(p) = proxy.as_deref().filter(|p| !p.is_empty()) {
                fleetadm_common::proxy::Proxy::parse(p)?;
            }
            let node_name = a.node_name.unwrap_or_else(default_node_name);
            let opts = EnrollOptions {
                controller: a.controller,
                token: a.token,
                ca_hash: a.ca_hash,
                node_name,
                force: a.force,
                timeout: a.timeout,
                proxy,
                labels: a.labels.into_iter().collect(),
            };
            let cfg = enroll::enroll(&dir, &opts).await?;
            println!("enrolled as {} with controller {}", cfg.node_name, cfg.controller);
            if a.no_start {
                println!("start the agent with: node-agent run --state-dir {}", dir.root.display());
            } else {
                let d = dir.clone();
                println!("{}", tokio::task::spawn_blocking(move || crate::service::start_after_enroll(&d)).await?);
            }
            Ok(())
        }
        Command::Run(a) => {
            let (dir, cfg) = a.state.resolve()?;
            let d = RunOptions::default();
            let opts = RunOptions {
                backoff_initial: a.backoff_initial.or(cfg.backoff_initial).unwrap_or(d.backoff_initial),
                backoff_max: a.backoff_max.or(cfg.backoff_max).unwrap_or(d.backoff_max),
                inventory_interval: a.inventory_interval.or(cfg.inventory_interval).unwrap_or(d.inventory_interval),
                proxy: cfg.proxy.clone(),
                peer_listen: a.peer_listen.clone().or(cfg.peer_listen.clone()),
                ..d
            };
            if let Some(p) = opts.proxy.as_deref().filter(|p| !p.is_empty()) {
                fleetadm_common::proxy::Proxy::parse(p).context("proxy in the config file")?;
            }
            fleetadm_common::notify_ready();
            session::run(&dir, &opts, shutdown_signal()).await.context("node-agent run")?;
            Ok(())
        }
        Command::GenerateDocs { out } => {
            fleetadm_common::docs::generate(<Cli as clap::CommandFactory>::command(), &out)?;
            Ok(())
        }
        Command::Lb(cmd) => crate::lb_cli::run(cmd, shutdown_signal()).await,
        Command::Bootstrap { state, bundle_dir, reset } => {
            let (dir, _) = state.resolve()?;
            let changes = tokio::task::spawn_blocking(move || {
                crate::execute::bootstrap::local(&dir.root, bundle_dir.as_deref(), reset)
            })
            .await??;
            if changes.is_empty() {
                println!("no change");
            }
            for c in changes {
                println!("{c}");
            }
            Ok(())
        }
        Command::Status { state, output } => {
            let (dir, _) = state.resolve()?;
            let mut v = StatusView {
                enrolled: false,
                node_name: None,
                controller: None,
                certificate_expires: None,
                certificate_renews: None,
                session: None,
                session_since: None,
                last_error: None,
            };
            if dir.is_enrolled() {
                let id = Identity::load(&dir)?;
                v.enrolled = true;
                v.node_name = Some(id.config.node_name.clone());
                v.controller = Some(id.config.controller.clone());
                v.certificate_expires = Some(humantime::format_rfc3339_seconds(id.not_after).to_string());
                v.certificate_renews = Some(humantime::format_rfc3339_seconds(id.renew_at()).to_string());
                v.session = Some("not running".into());
                if let Some(st) = status::read(&dir) {
                    if status::writer_alive(&st) || st.state == status::SessionState::Stopped {
                        let mut word = serde_json::to_value(st.state)
                            .ok()
                            .and_then(|x| x.as_str().map(String::from))
                            .unwrap_or_default();
                        if st.state == status::SessionState::Backoff && st.retry_at_ms > now_unix_ms() {
                            word = format!("backoff (retry in {}s)", (st.retry_at_ms - now_unix_ms()) / 1000);
                        }
                        v.session = Some(word);
                        v.session_since = Some(rfc3339_ms(st.since_ms));
                    }
                    v.last_error = st.last_error;
                }
            }
            match render_structured(&v, output) {
                Some(s) => println!("{s}"),
                None => {
                    println!("enrolled:     {}", if v.enrolled { "yes" } else { "no" });
                    if v.enrolled {
                        println!("node name:    {}", v.node_name.unwrap_or_default());
                        println!("controller:   {}", v.controller.unwrap_or_default());
                        println!(
                            "cert expires: {} (renews at {})",
                            v.certificate_expires.unwrap_or_default(),
                            v.certificate_renews.unwrap_or_default()
                        );
                        println!(
                            "session:      {}{}",
                            v.session.unwrap_or_default(),
                            v.session_since.map(|s| format!(" since {s}")).unwrap_or_default()
                        );
                        if let Some(e) = v.last_error {
                            println!("last error:   {e}");
                        }
                    } else {
                        println!(
                            "enroll with:  node-agent enroll --controller HOST:PORT --token TOKEN --ca-hash sha256:..."
                        );
                    }
                }
            }
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else { return std::future::pending().await };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_definition_is_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}

//! `node-agent lb ...`: the load balancer by hand, mirroring `sealctl ipvs`.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use fleetadm_common::clock::parse_duration;
use fleetadm_common::output::{render_structured, table, OutputFormat};

use crate::lb::{self, guard::GuardConfig, probe, LbSpec};

#[derive(Debug, Subcommand)]
pub enum LbCmd {
    /// Create or converge the virtual server once, then exit.
    Apply(SpecArgs),
    /// Converge, then keep real servers healthy with HTTPS /readyz checks (stays running).
    Guard(GuardArgs),
    /// Show the kernel's IPVS table (and the guard's view, if one runs).
    Show {
        /// Output format: table, json or yaml.
        #[arg(short = 'o', long = "output", default_value = "table")]
        output: OutputFormat,
        /// Guard status file to include.
        #[arg(long, default_value = "/var/lib/node-agent/lb-status.json")]
        status_file: PathBuf,
    },
    /// Remove the virtual server(s) and the VIP address this tool created.
    Clean {
        /// Only this virtual server (default: every one whose VIP is on the interface).
        #[arg(long, value_parser = lb::parse_endpoint)]
        vip: Option<SocketAddr>,
        #[arg(long, default_value = lb::DEFAULT_INTERFACE)]
        interface: String,
    },
}

#[derive(Debug, Args, Clone)]
pub struct SpecArgs {
    /// Virtual IP and port.
    #[arg(long, default_value = lb::DEFAULT_VIP, value_parser = lb::parse_endpoint)]
    vip: SocketAddr,
    /// A real server, IP:PORT; repeat for each master.
    #[arg(long = "rs", required = true, value_parser = lb::parse_endpoint)]
    real_servers: Vec<SocketAddr>,
    /// Dummy interface that holds the VIP.
    #[arg(long, default_value = lb::DEFAULT_INTERFACE)]
    interface: String,
    /// IPVS scheduler.
    #[arg(long, default_value = "rr")]
    scheduler: String,
    /// Cluster CA used to verify real servers' certificates (guard only).
    #[arg(long)]
    ca: Option<PathBuf>,
}

impl SpecArgs {
    fn spec(&self) -> LbSpec {
        LbSpec {
            vip: self.vip,
            real_servers: self.real_servers.clone(),
            interface: self.interface.clone(),
            scheduler: self.scheduler.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct GuardArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// Time between probes of one real server.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    interval: Duration,
    /// Probe timeout.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    timeout: Duration,
    /// Consecutive failures before a real server leaves rotation.
    #[arg(long, default_value_t = 2)]
    fall: u32,
    /// Consecutive successes before it comes back.
    #[arg(long, default_value_t = 2)]
    rise: u32,
    /// Probe without verifying real servers' certificates (not recommended).
    #[arg(long)]
    insecure_skip_tls_verify: bool,
    /// Where to publish per-real-server status.
    #[arg(long, default_value = "/var/lib/node-agent/lb-status.json")]
    status_file: PathBuf,
}

pub async fn run(cmd: LbCmd, stop: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    match cmd {
        LbCmd::Apply(a) => {
            let spec = a.spec();
            let changes = tokio::task::spawn_blocking(move || lb::apply(&spec)).await??;
            if changes.0.is_empty() {
                println!("virtual server {} already up to date", a.vip);
            }
            for c in changes.0 {
                println!("{c}");
            }
        }
        LbCmd::Guard(g) => {
            let ca = match &g.spec.ca {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .map_err(|e| anyhow::anyhow!("cannot read CA file {}: {e}", p.display()))?,
                ),
                None => None,
            };
            let trust =
                if g.insecure_skip_tls_verify { probe::TlsTrust::InsecureSkipVerify } else { probe::TlsTrust::Verify };
            let prober = probe::Prober::new(ca.as_deref(), trust, g.timeout).map_err(|e| anyhow::anyhow!(e))?;
            let cfg = GuardConfig { interval: g.interval, timeout: g.timeout, fall: g.fall, rise: g.rise };
            fleetadm_common::notify_ready();
            lb::run_guard(g.spec.spec(), cfg, prober, g.status_file, tokio::sync::watch::channel(None).0, stop).await?;
        }
        LbCmd::Show { output, status_file } => {
            let views = tokio::task::spawn_blocking(lb::show).await??;
            let guard = lb::read_status(&status_file);
            #[derive(serde::Serialize)]
            struct Out<'a> {
                services: &'a [lb::ServiceView],
                guard: Option<lb::guard::GuardStatus>,
            }
            let out = Out { services: &views, guard: guard.clone() };
            match render_structured(&out, output) {
                Some(s) => println!("{s}"),
                None => {
                    let mut rows = Vec::new();
                    for v in &views {
                        rows.push(vec![
                            format!("TCP {}", v.vip),
                            v.scheduler.clone(),
                            String::new(),
                            String::new(),
                            String::new(),
                        ]);
                        for d in &v.real_servers {
                            let health = guard
                                .as_ref()
                                .filter(|g| g.vip == v.vip)
                                .and_then(|g| g.servers.iter().find(|s| s.address == d.addr))
                                .map(|s| {
                                    if s.healthy {
                                        "healthy".to_string()
                                    } else {
                                        format!("unhealthy: {}", s.last_probe)
                                    }
                                })
                                .unwrap_or_default();
                            rows.push(vec![
                                format!("  -> {}", d.addr),
                                "Masq".into(),
                                d.weight.to_string(),
                                format!("{}/{}", d.active_conns, d.inactive_conns),
                                health,
                            ]);
                        }
                    }
                    print!(
                        "{}",
                        table(
                            &["VIRTUAL SERVER / REAL SERVER", "FORWARD", "WEIGHT", "ACTIVE/INACTIVE", "HEALTH"],
                            &rows
                        )
                    );
                }
            }
        }
        LbCmd::Clean { vip, interface } => {
            let changes = tokio::task::spawn_blocking(move || lb::clean(vip, &interface)).await??;
            if changes.0.is_empty() {
                println!("nothing to clean");
            }
            for c in changes.0 {
                println!("{c}");
            }
        }
    }
    Ok(())
}

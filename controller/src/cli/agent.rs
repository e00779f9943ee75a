//! `controller agent upgrade`: the agents install the node-agent package carried in a bundle
//! and come back running it, in the order and waves the strategy says. `controller agent ping`:
//! the no-op task, answered by every chosen agent.
use clap::{Args, Subcommand};
use fleetadm_proto::UpgradeAgentsRequest;

use super::exec::{print_stream, FleetArgs};
use super::{rpc_error, DataDir};
use crate::admin::client;

#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// Upgrade node-agent on the chosen hosts from the package in a bundle (its `packages/`
    /// holds node-agent_VERSION_ARCH.deb and/or node-agent-VERSION.ARCH.rpm). Each agent installs
    /// the package of the manager that installed it, is restarted by the package, and reports
    /// from its new version; the identity and state are kept. Output as for `exec`.
    Upgrade(UpgradeArgs),
    /// Send the chosen agents the no-op task: each answers through the same path as every task
    /// (its session, its executor, its reports) with its version, process id and uptime, and
    /// the controller adds the round trip. Changes nothing; fails for hosts that did not answer.
    Ping(PingArgs),
}

#[derive(Debug, Args)]
pub struct PingArgs {
    #[command(flatten)]
    data: DataDir,
    #[command(flatten)]
    fleet: FleetArgs,
}

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    #[command(flatten)]
    data: DataDir,
    /// The imported bundle carrying the packages.
    #[arg(long)]
    bundle: String,
    #[command(flatten)]
    fleet: FleetArgs,
    /// Only print which hosts would be upgraded, in which order; change nothing.
    #[arg(long)]
    dry_run: bool,
}

pub async fn run(cmd: AgentCmd) -> anyhow::Result<()> {
    match cmd {
        AgentCmd::Upgrade(a) => {
            let mut c = client::connect(&a.data.data_dir).await?;
            let req =
                UpgradeAgentsRequest { hosts: Some(a.fleet.request(Vec::new())), bundle: a.bundle, dry_run: a.dry_run };
            let stream = c.upgrade_agents(req).await.map_err(rpc_error)?.into_inner();
            print_stream("agent upgrade", "the upgrade", stream).await
        }
        AgentCmd::Ping(a) => {
            let mut c = client::connect(&a.data.data_dir).await?;
            let stream = c.ping_agents(a.fleet.request(Vec::new())).await.map_err(rpc_error)?.into_inner();
            print_stream("agent ping", "the ping", stream).await
        }
    }
}

//! The `controller` command line: `serve` runs the daemon; every other subcommand is an admin
//! client that talks to the running daemon over `DATA_DIR/admin.sock`.
pub mod bundle;
pub mod cluster;
pub mod cluster_view;
pub mod events;
pub mod exec;
pub mod nodes;
pub mod relay;
pub mod serve;
pub mod token;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use fleetadm_common::output::OutputFormat;

pub const DEFAULT_DATA_DIR: &str = "/var/lib/fleetadm";

#[derive(Debug, Parser)]
#[command(name = "controller", version = crate::VERSION, about = "fleetadm controller: enrolls node agents and drives them", propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller daemon.
    Serve(serve::ServeArgs),
    /// Manage bootstrap tokens used by `node-agent enroll`.
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// Inspect and revoke enrolled nodes.
    #[command(subcommand)]
    Nodes(nodes::NodesCmd),
    /// Build, import, list and remove offline bundles.
    #[command(subcommand)]
    Bundle(bundle::BundleCmd),
    /// Plan and create clusters.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// Run a command on hosts through their agents (`--cluster NAME [--role master|node]` or
    /// `--nodes H,...`), output streamed per host; exit status 1 if any host failed.
    Exec(exec::ExecArgs),
    /// The audit log: who did what (admin operations, by the admin socket peer's uid) and every
    /// task outcome, newest last.
    Events(events::EventsArgs),
    /// Run a relay on a bastion: forward agents' connections to the controller, vouching for
    /// their source addresses with a signed header (TLS passes through untouched).
    Relay(relay::RelayArgs),
    /// Register, list and remove relays.
    #[command(subcommand)]
    Relays(relay::RelaysCmd),
    /// Write shell completions and man pages into a directory (used to build packages).
    #[command(hide = true)]
    GenerateDocs { out: PathBuf },
}

/// Where the daemon keeps its state and admin socket.
#[derive(Debug, Clone, Args)]
pub struct DataDir {
    /// Controller data directory (holds the state store, fleet CA and admin.sock).
    #[arg(long, env = "FLEETADM_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

/// Output format for admin commands.
#[derive(Debug, Clone, Args)]
pub struct Output {
    /// Output format: table, json or yaml.
    #[arg(short = 'o', long = "output", default_value = "table")]
    pub output: OutputFormat,
}

/// Turn an admin RPC failure into a one-line error.
pub fn rpc_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", fleetadm_common::dial::explain_status(&status))
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(a) => serve::run(a).await,
        Command::Token(c) => token::run(c).await,
        Command::Nodes(c) => nodes::run(c).await,
        Command::Cluster(c) => cluster::run(c).await,
        Command::Bundle(c) => bundle::run(c).await,
        Command::Events(a) => events::run(a).await,
        Command::Exec(a) => exec::run(a).await,
        Command::Relay(a) => relay::run_relay(a).await,
        Command::Relays(c) => relay::run(c).await,
        Command::GenerateDocs { out } => {
            fleetadm_common::docs::generate(<Cli as clap::CommandFactory>::command(), &out)?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_definition_is_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}

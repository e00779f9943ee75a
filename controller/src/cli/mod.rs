//! The `controller` command line: `serve` runs the daemon; every other subcommand is an admin
//! client that talks to the running daemon over `DATA_DIR/admin.sock`.
pub mod agent;
pub mod backup;
pub mod bundle;
pub mod certs;
pub mod cluster;
pub mod cluster_view;
pub mod events;
pub mod exec;
pub mod nodes;
pub mod op;
pub mod relay;
pub mod serve;
pub mod token;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use fleetadm_common::output::OutputFormat;

pub const DEFAULT_DATA_DIR: &str = "/var/lib/fleetadm";

/// The name the relay package installs this binary under: invoked as `fleetadm-relay ARGS`, it
/// runs `controller relay ARGS` (the relay package cannot ship `/usr/bin/controller`, which the
/// controller package owns).
pub const RELAY_ALIAS: &str = "fleetadm-relay";

/// The command line as clap should see it: `fleetadm-relay ARGS` becomes `fleetadm-relay relay
/// ARGS`; any other name is left alone.
pub fn expand_alias(args: impl IntoIterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut args: Vec<_> = args.into_iter().collect();
    let relay = args.first().and_then(|a0| std::path::Path::new(a0).file_name()).is_some_and(|n| n == RELAY_ALIAS);
    if relay {
        args.insert(1, "relay".into());
    }
    args
}

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
    /// Upgrade the agents from a package in a bundle, in waves (with the strategy of `exec`).
    #[command(subcommand)]
    Agent(agent::AgentCmd),
    /// Running operations: list them; pause, resume or abort an exec.
    #[command(subcommand)]
    Op(op::OpCmd),
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
        Command::Agent(c) => agent::run(c).await,
        Command::Op(c) => op::run(c).await,
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

#[cfg(test)]
mod alias_tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<std::ffi::OsString> {
        v.iter().map(|s| s.into()).collect()
    }

    #[test]
    fn the_relay_alias_runs_the_relay_subcommand() {
        assert_eq!(
            expand_alias(os(&["/usr/bin/fleetadm-relay", "--print-public-key"])),
            os(&["/usr/bin/fleetadm-relay", "relay", "--print-public-key"])
        );
        assert_eq!(expand_alias(os(&["fleetadm-relay"])), os(&["fleetadm-relay", "relay"]));
        let cli = Cli::try_parse_from(expand_alias(os(&[
            "fleetadm-relay",
            "--listen",
            "0.0.0.0:7443",
            "--upstream",
            "c:9443",
        ])));
        assert!(matches!(cli.map(|c| c.command), Ok(Command::Relay(_))));
    }

    #[test]
    fn other_names_are_left_alone() {
        assert_eq!(expand_alias(os(&["/usr/bin/controller", "serve"])), os(&["/usr/bin/controller", "serve"]));
        assert_eq!(expand_alias(os(&["fleetadm-relay-x", "serve"])), os(&["fleetadm-relay-x", "serve"]));
        assert!(expand_alias(os(&[])).is_empty());
    }
}

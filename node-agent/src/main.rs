use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    fleetadm_common::install_crypto_provider();
    let cli = fleetadm_agent::cli::Cli::parse();
    let level = if matches!(cli.command, fleetadm_agent::cli::Command::Run(_)) { "info" } else { "warn" };
    fleetadm_common::logging::init(level);
    match fleetadm_agent::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": "));
            // Exit code 3: the controller refuses this node for good (revoked, expired, unknown);
            // the systemd unit does not restart on it (RestartPreventExitStatus=3).
            let refused = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<fleetadm_agent::session::RunError>(),
                    Some(fleetadm_agent::session::RunError::Refused(_) | fleetadm_agent::session::RunError::Expired(_))
                )
            });
            std::process::ExitCode::from(if refused { 3 } else { 1 })
        }
    }
}

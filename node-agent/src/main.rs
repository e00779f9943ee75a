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
            std::process::ExitCode::FAILURE
        }
    }
}

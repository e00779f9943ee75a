use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    fleetadm_common::install_crypto_provider();
    let cli = fleetadm_controller::cli::Cli::parse();
    let level = if matches!(cli.command, fleetadm_controller::cli::Command::Serve(_)) { "info" } else { "warn" };
    fleetadm_common::logging::init(level);
    match fleetadm_controller::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// "outer: inner: cause" on one line.
fn chain(e: &anyhow::Error) -> String {
    e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
}

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    fleetadm_common::install_crypto_provider();
    let cli = fleetadm_agent::cli::Cli::parse();
    // Daemons keep SIGPIPE ignored (a peer closing a socket must not kill them).
    if !matches!(cli.command, fleetadm_agent::cli::Command::Run(_) | fleetadm_agent::cli::Command::Lb(_)) {
        restore_sigpipe();
    }
    let level = if matches!(cli.command, fleetadm_agent::cli::Command::Run(_)) { "info" } else { "warn" };
    fleetadm_common::logging::init(level, "node-agent");
    match fleetadm_agent::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": "));
            // Exit code 3: the controller revoked this node (its explicit, authenticated word; any
            // other refusal is retried); the unit does not restart on it (RestartPreventExitStatus=3).
            let refused = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<fleetadm_agent::session::RunError>(),
                    Some(fleetadm_agent::session::RunError::Revoked(_))
                )
            });
            std::process::ExitCode::from(if refused { 3 } else { 1 })
        }
    }
}

/// Rust ignores SIGPIPE, which turns `controller ... | head` into a panic on the next write. A
/// command-line tool should just stop, as other Unix tools do.
fn restore_sigpipe() {
    // SAFETY: called first thing in main, before any other thread exists; SIG_DFL is always a
    // valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    fleetadm_common::install_crypto_provider();
    let cli = fleetadm_controller::cli::Cli::parse_from(fleetadm_controller::cli::expand_alias(std::env::args_os()));
    let relay = matches!(cli.command, fleetadm_controller::cli::Command::Relay(_));
    let daemon = relay || matches!(cli.command, fleetadm_controller::cli::Command::Serve(_));
    if !daemon {
        restore_sigpipe();
    }
    let level = if daemon { "info" } else { "warn" };
    // The relay logs under its package's name (SYSLOG_IDENTIFIER=fleetadm-relay in the journal).
    fleetadm_common::logging::init(level, if relay { fleetadm_controller::cli::RELAY_ALIAS } else { "controller" });
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

/// Rust ignores SIGPIPE, which turns `controller ... | head` into a panic on the next write. A
/// command-line tool should just stop, as other Unix tools do.
fn restore_sigpipe() {
    // SAFETY: called first thing in main, before any other thread exists; SIG_DFL is always a
    // valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

//! The systemd service around `node-agent run`: after enrollment, start it if systemd manages
//! this host and the unit is installed; otherwise say how to run the agent.
use std::time::Duration;

use crate::execute::command::{run_blocking, Cancel, Cmd};

use crate::identity::StateDir;

pub const UNIT: &str = "node-agent.service";

fn systemd_running() -> bool {
    std::path::Path::new("/run/systemd/system").exists()
}

fn systemctl(args: &[&str]) -> Result<crate::execute::command::Ran, crate::execute::command::CommandError> {
    run_blocking(&Cmd::new("systemctl", args, Duration::from_secs(90)), &Cancel::none())
}

fn unit_installed() -> bool {
    systemctl(&["cat", UNIT]).map(|r| r.success).unwrap_or(false)
}

/// Start (or restart, to pick up a new identity) the service; returns a line for the operator.
pub fn start_after_enroll(dir: &StateDir) -> String {
    let manual = format!("start the agent with: node-agent run --state-dir {}", dir.root.display());
    if !systemd_running() || !unit_installed() || dir.root != std::path::Path::new(crate::cli::DEFAULT_STATE_DIR) {
        return manual;
    }
    match systemctl(&["enable", UNIT]) {
        Ok(r) if r.success => {}
        _ => return format!("could not enable {UNIT}; {manual}"),
    }
    match systemctl(&["restart", UNIT]) {
        Ok(r) if r.success => format!("started {UNIT} (see: systemctl status node-agent)"),
        Ok(r) => format!("could not start {UNIT}: {}; start it with: systemctl start node-agent", r.output.trim()),
        Err(e) => format!("could not run systemctl ({e}); start it with: systemctl start node-agent"),
    }
}

//! The systemd service around `node-agent run`: after enrollment, start it if systemd manages
//! this host and the unit is installed; otherwise say how to run the agent.
use std::process::Command;

use crate::identity::StateDir;

pub const UNIT: &str = "node-agent.service";

fn systemd_running() -> bool {
    std::path::Path::new("/run/systemd/system").exists()
}

fn unit_installed() -> bool {
    Command::new("systemctl").args(["cat", UNIT]).output().map(|o| o.status.success()).unwrap_or(false)
}

/// Start (or restart, to pick up a new identity) the service; returns a line for the operator.
pub fn start_after_enroll(dir: &StateDir) -> String {
    let manual = format!("start the agent with: node-agent run --state-dir {}", dir.root.display());
    if !systemd_running() || !unit_installed() || dir.root != std::path::Path::new(crate::cli::DEFAULT_STATE_DIR) {
        return manual;
    }
    match Command::new("systemctl").args(["enable", UNIT]).output() {
        Ok(o) if o.status.success() => {}
        _ => return format!("could not enable {UNIT}; {manual}"),
    }
    match Command::new("systemctl").args(["restart", UNIT]).output() {
        Ok(o) if o.status.success() => format!("started {UNIT} (see: systemctl status node-agent)"),
        Ok(o) => format!(
            "could not start {UNIT}: {}; start it with: systemctl start node-agent",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("could not run systemctl ({e}); start it with: systemctl start node-agent"),
    }
}

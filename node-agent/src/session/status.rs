//! The session state the running agent publishes in `STATE_DIR/session.json`, read by
//! `node-agent status`.
use serde::{Deserialize, Serialize};

use crate::identity::StateDir;
use fleetadm_common::clock::now_unix_ms;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    Connecting,
    Connected,
    Backoff,
    Stopped,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionStatus {
    pub state: SessionState,
    pub controller: String,
    pub since_ms: u64,
    #[serde(default)]
    pub session_id: String,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub retry_at_ms: u64,
    pub pid: u32,
}

impl SessionStatus {
    pub fn new(state: SessionState, controller: &str, last_error: Option<String>) -> Self {
        Self {
            state,
            controller: controller.to_string(),
            since_ms: now_unix_ms(),
            session_id: String::new(),
            last_error,
            retry_at_ms: 0,
            pid: std::process::id(),
        }
    }
}

pub fn write(dir: &StateDir, st: &SessionStatus) {
    if let Ok(json) = serde_json::to_vec_pretty(st) {
        if let Err(e) = fleetadm_common::fsutil::write_atomic(&dir.session(), &json, 0o644) {
            tracing::debug!(error = %e, "cannot write session status");
        }
    }
}

pub fn read(dir: &StateDir) -> Option<SessionStatus> {
    let bytes = std::fs::read(dir.session()).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Is the process that wrote the status still alive?
pub fn writer_alive(st: &SessionStatus) -> bool {
    std::path::Path::new(&format!("/proc/{}", st.pid)).exists()
}

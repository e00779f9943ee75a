//! The agent's task journal: one small file per task id under `STATE_DIR/tasks/`, written
//! (fsync'd) when a task starts and when it ends. A task re-sent after a reconnect or a controller
//! restart is answered from here instead of being run twice.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Started, not finished (the agent stopped in the middle if this is read back later).
    Started,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub task_id: String,
    pub attempt: u32,
    /// Digest of the task's parameters.
    pub digest: String,
    pub outcome: Outcome,
    pub changed: bool,
    pub output: String,
    pub updated_ms: u64,
}

#[derive(Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    pub fn new(state_dir: &Path) -> Self {
        Self { dir: state_dir.join("tasks") }
    }

    fn path(&self, task_id: &str) -> PathBuf {
        let h = hex::encode(&Sha256::digest(task_id.as_bytes())[..12]);
        self.dir.join(format!("{h}.json"))
    }

    pub fn get(&self, task_id: &str) -> Option<Entry> {
        let e: Entry = serde_json::from_slice(&std::fs::read(self.path(task_id)).ok()?).ok()?;
        (e.task_id == task_id).then_some(e)
    }

    pub fn put(&self, e: &Entry) -> std::io::Result<()> {
        fleetadm_common::fsutil::ensure_dir(&self.dir, 0o700)?;
        let json = serde_json::to_vec_pretty(e).map_err(std::io::Error::other)?;
        // Outputs may quote configuration: owner-only.
        fleetadm_common::fsutil::write_private(&self.path(&e.task_id), &json)
    }

    /// The recorded result of exactly this attempt with these parameters, if it finished.
    pub fn finished(&self, task_id: &str, attempt: u32, digest: &str) -> Option<Entry> {
        self.get(task_id).filter(|e| e.attempt == attempt && e.digest == digest && e.outcome != Outcome::Started)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_results_are_found_only_for_the_same_attempt_and_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        let mut e = Entry {
            task_id: "lab/init/m1/kubeadm-init".into(),
            attempt: 1,
            digest: "d1".into(),
            outcome: Outcome::Started,
            changed: false,
            output: String::new(),
            updated_ms: 1,
        };
        j.put(&e).unwrap();
        assert!(j.finished(&e.task_id, 1, "d1").is_none(), "a started task is not a result");
        e.outcome = Outcome::Succeeded;
        j.put(&e).unwrap();
        assert!(j.finished(&e.task_id, 1, "d1").is_some());
        assert!(j.finished(&e.task_id, 2, "d1").is_none());
        assert!(j.finished(&e.task_id, 1, "d2").is_none());
        let mode = std::fs::metadata(j.path(&e.task_id)).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
    }
}

//! What makes a kubeadm step safe to retry: the agent's own record of how far an attempt got,
//! and the files the controller sent, kept across the `kubeadm reset` that cleans up a failed
//! attempt.
//!
//! kubeadm writes the static pod manifests and kubeconfigs *before* it waits for the control
//! plane and creates the bootstrap token, so "the apiserver manifest exists" says nothing about
//! success. The agent writes `<step>.started` before it runs kubeadm and `<step>.done` only after
//! kubeadm exited 0; anything else found on the host is a failed or interrupted attempt.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use fleetadm_common::fsutil;

/// Where the agent keeps its kubeadm bookkeeping (removed by `reset`).
pub fn state_dir(kube_dir: &Path) -> PathBuf {
    kube_dir.join("fleetadm")
}

fn marker(kube_dir: &Path, step: &str, what: &str) -> PathBuf {
    state_dir(kube_dir).join(format!("{step}.{what}"))
}

/// Did an earlier attempt of `step` finish (kubeadm exited 0)?
pub fn finished(kube_dir: &Path, step: &str) -> bool {
    marker(kube_dir, step, "done").exists()
}

/// Is there anything of an unfinished attempt on this host: our own "started" record, or
/// kubeadm's own files (manifests, kubelet.conf) without a "done" record?
pub fn leftovers(kube_dir: &Path, step: &str) -> Option<String> {
    if marker(kube_dir, step, "started").exists() {
        return Some(format!("an earlier kubeadm {step} on this host did not finish"));
    }
    let manifests = kube_dir.join("manifests");
    let has_manifests = std::fs::read_dir(&manifests).map(|mut d| d.next().is_some()).unwrap_or(false);
    if has_manifests {
        return Some(format!("{} holds static pod manifests, but no kubeadm step finished here", manifests.display()));
    }
    let kubelet = kube_dir.join("kubelet.conf");
    if kubelet.exists() {
        return Some(format!("{} exists, but no kubeadm step finished here", kubelet.display()));
    }
    None
}

fn record(kube_dir: &Path, step: &str, what: &str) -> std::io::Result<()> {
    let dir = state_dir(kube_dir);
    fsutil::ensure_dir(&dir, 0o700)?;
    let body = format!("{}\n", fleetadm_common::clock::now_unix_ms());
    fsutil::write_atomic(&marker(kube_dir, step, what), body.as_bytes(), 0o600)
}

/// Recorded (and flushed) before kubeadm runs.
pub fn mark_started(kube_dir: &Path, step: &str) -> std::io::Result<()> {
    record(kube_dir, step, "started")
}

/// Recorded (and flushed) after kubeadm exited 0; the "started" record goes.
pub fn mark_done(kube_dir: &Path, step: &str) -> std::io::Result<()> {
    record(kube_dir, step, "done")?;
    clear_started(kube_dir, step)
}

pub fn clear_started(kube_dir: &Path, step: &str) -> std::io::Result<()> {
    match std::fs::remove_file(marker(kube_dir, step, "started")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => {
            fsutil::sync_dir(&state_dir(kube_dir));
            Ok(())
        }
    }
}

/// Does `step` run over files the controller sent (the PKI and kubeconfigs of a control-plane
/// host)? A worker's join gets none: what a failed worker join left in `pki/` (the CA from
/// discovery) is kubeadm's own and must go, or kubeadm's preflight refuses the retry.
pub fn keeps_controller_files(step: &str) -> bool {
    step != "join"
}

/// The kubeconfigs the controller may send (kubeadm uses existing ones instead of writing its own).
const SENT_KUBECONFIGS: [&str; 4] = ["admin.conf", "super-admin.conf", "controller-manager.conf", "scheduler.conf"];

/// Files to put back after `kubeadm reset` (which empties the certificates directory and removes
/// the kubeconfigs): the PKI tree and the kubeconfigs, with their modes. Held in memory only.
pub struct Kept {
    files: Vec<(PathBuf, Vec<u8>, u32)>,
}

impl Kept {
    /// Nothing to keep.
    pub fn none() -> Kept {
        Kept { files: Vec::new() }
    }

    pub fn take(kube_dir: &Path) -> std::io::Result<Kept> {
        let mut files = Vec::new();
        let mut dirs = vec![kube_dir.join("pki")];
        while let Some(d) = dirs.pop() {
            let entries = match std::fs::read_dir(&d) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for e in entries {
                let e = e?;
                let ty = e.file_type()?;
                if ty.is_dir() {
                    dirs.push(e.path());
                } else if ty.is_file() {
                    files.push(e.path());
                }
            }
        }
        files.extend(SENT_KUBECONFIGS.iter().map(|k| kube_dir.join(k)).filter(|p| p.is_file()));
        let mut kept = Vec::with_capacity(files.len());
        for p in files {
            let mode = std::fs::symlink_metadata(&p)?.permissions().mode() & 0o777;
            kept.push((p.clone(), std::fs::read(&p)?, mode));
        }
        Ok(Kept { files: kept })
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Write every kept file back (atomically, same mode).
    pub fn restore(&self) -> std::io::Result<()> {
        for (p, data, mode) in &self.files {
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d)?;
            }
            fsutil::write_atomic(p, data, *mode)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_tell_a_finished_attempt_from_an_interrupted_one() {
        let d = tempfile::tempdir().unwrap();
        let kube = d.path();
        assert!(!finished(kube, "init") && leftovers(kube, "init").is_none(), "a clean host");
        mark_started(kube, "init").unwrap();
        assert!(leftovers(kube, "init").unwrap().contains("did not finish"));
        assert!(!finished(kube, "init"));
        mark_done(kube, "init").unwrap();
        assert!(finished(kube, "init") && leftovers(kube, "init").is_none());
        assert!(!finished(kube, "join"), "markers are per step");
        let m = std::fs::metadata(state_dir(kube)).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, 0o700);
    }

    #[test]
    fn kubeadm_files_without_a_done_marker_are_leftovers() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("manifests")).unwrap();
        assert!(leftovers(d.path(), "init").is_none(), "an empty manifests dir is not");
        std::fs::write(d.path().join("manifests/kube-apiserver.yaml"), "x").unwrap();
        assert!(leftovers(d.path(), "init").unwrap().contains("static pod manifests"));
        std::fs::remove_dir_all(d.path().join("manifests")).unwrap();
        std::fs::write(d.path().join("kubelet.conf"), "x").unwrap();
        assert!(leftovers(d.path(), "join").unwrap().contains("kubelet.conf"));
    }

    #[test]
    fn only_control_plane_steps_keep_the_controllers_files() {
        assert!(keeps_controller_files("init") && keeps_controller_files("join-control-plane"));
        assert!(!keeps_controller_files("join"));
    }

    #[test]
    fn kept_files_come_back_with_their_modes() {
        let d = tempfile::tempdir().unwrap();
        let kube = d.path();
        std::fs::create_dir_all(kube.join("pki/etcd")).unwrap();
        fsutil::write_atomic(&kube.join("pki/ca.key"), b"key", 0o600).unwrap();
        fsutil::write_atomic(&kube.join("pki/etcd/ca.crt"), b"crt", 0o644).unwrap();
        fsutil::write_atomic(&kube.join("admin.conf"), b"conf", 0o600).unwrap();
        std::fs::write(kube.join("kubelet.conf"), "kubeadm's own").unwrap();
        let kept = Kept::take(kube).unwrap();
        assert_eq!(kept.len(), 3, "the PKI and the sent kubeconfigs, not kubelet.conf");
        std::fs::remove_dir_all(kube.join("pki")).unwrap();
        std::fs::remove_file(kube.join("admin.conf")).unwrap();
        kept.restore().unwrap();
        assert_eq!(std::fs::read(kube.join("pki/etcd/ca.crt")).unwrap(), b"crt");
        let mode = |p: &str| std::fs::metadata(kube.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode("pki/ca.key"), mode("pki/etcd/ca.crt"), mode("admin.conf")), (0o600, 0o644, 0o600));
    }
}

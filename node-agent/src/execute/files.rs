//! The `pki` task: install files the controller sends (certificates, keys, kubeconfigs) with
//! exact modes, atomically, only below /etc/kubernetes.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use fleetadm_proto::FileSpec;
use thiserror::Error;

/// The only tree the controller may write files into.
pub const ALLOWED_ROOT: &str = "/etc/kubernetes";

#[derive(Debug, Error)]
pub enum FilesError {
    #[error("refusing to write {0}: files may only go below {ALLOWED_ROOT}")]
    OutsideRoot(String),
    #[error("refusing mode {mode:o} for {path}")]
    BadMode { path: String, mode: u32 },
    #[error("writing {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where `spec_path` lands under `root` ("/" on a real host), after checking it stays inside
/// [`ALLOWED_ROOT`].
pub(crate) fn target(root: &Path, spec_path: &str) -> Result<PathBuf, FilesError> {
    let p = Path::new(spec_path);
    if !fleetadm_common::fsutil::is_below(Path::new(ALLOWED_ROOT), p) {
        return Err(FilesError::OutsideRoot(spec_path.to_string()));
    }
    Ok(root.join(p.strip_prefix("/").unwrap_or(p)))
}

/// Install every file; returns the paths that changed (content or mode).
pub fn install(root: &Path, files: &[FileSpec]) -> Result<Vec<String>, FilesError> {
    // Check everything before writing anything.
    let mut targets = Vec::new();
    for f in files {
        // Owner-writable, never group- or world-writable (the controller writes keys and
        // kubeconfigs here that root processes trust).
        if f.mode & !0o777 != 0 || f.mode & 0o200 == 0 || f.mode & 0o022 != 0 {
            return Err(FilesError::BadMode { path: f.path.clone(), mode: f.mode });
        }
        targets.push(target(root, &f.path)?);
    }
    let mut changed = Vec::new();
    for (f, t) in files.iter().zip(targets) {
        let same_content = std::fs::read(&t).map(|c| c == f.contents.as_bytes()).unwrap_or(false);
        let same_mode = std::fs::metadata(&t).map(|m| m.permissions().mode() & 0o777 == f.mode).unwrap_or(false);
        if same_content && same_mode {
            continue;
        }
        let err = |source| FilesError::Write { path: f.path.clone(), source };
        if let Some(dir) = t.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        fleetadm_common::fsutil::write_atomic(&t, f.contents.as_bytes(), f.mode).map_err(err)?;
        changed.push(f.path.clone());
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::needless_update)]
    fn spec(path: &str, mode: u32) -> FileSpec {
        FileSpec { path: path.into(), contents: format!("content of {path}"), mode, ..Default::default() }
    }

    #[test]
    fn installs_with_exact_modes_and_is_idempotent() {
        let root = tempfile::tempdir().unwrap();
        let files = [spec("/etc/kubernetes/pki/ca.key", 0o600), spec("/etc/kubernetes/pki/ca.crt", 0o644)];
        assert_eq!(install(root.path(), &files).unwrap().len(), 2);
        let key = root.path().join("etc/kubernetes/pki/ca.key");
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(install(root.path(), &files).unwrap().is_empty(), "second run changes nothing");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(install(root.path(), &files).unwrap(), vec!["/etc/kubernetes/pki/ca.key".to_string()]);
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn refuses_paths_outside_the_kubernetes_tree_before_writing_anything() {
        let root = tempfile::tempdir().unwrap();
        for bad in
            ["/etc/passwd", "/etc/kubernetes/../shadow", "etc/kubernetes/x", "/etc/kubernetes", "/etc/kubernetesX/a"]
        {
            let files = [spec("/etc/kubernetes/ok.conf", 0o600), spec(bad, 0o600)];
            assert!(matches!(install(root.path(), &files), Err(FilesError::OutsideRoot(_))), "{bad}");
        }
        assert!(!root.path().join("etc/kubernetes/ok.conf").exists());
        for mode in [0o4755, 0o666, 0o620, 0o602, 0o444] {
            let r = install(root.path(), &[spec("/etc/kubernetes/x", mode)]);
            assert!(matches!(r, Err(FilesError::BadMode { .. })), "{mode:o}");
        }
    }
}

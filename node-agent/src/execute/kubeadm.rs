//! `kubeadm init`, `join` and `reset`, idempotent: a host that already finished the step reports
//! "no change" instead of running kubeadm again (which would fail on its own leftovers).
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use super::command::{self, Cancel, Cmd, CommandError};

#[derive(Debug, Error)]
pub enum KubeadmError {
    #[error("writing {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("removing {path}")]
    Remove {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Command(#[from] CommandError),
}

/// The kubeadm configuration fleetadm writes (0600: it carries the bootstrap token).
pub fn config_path(kube_dir: &Path, step: &str) -> PathBuf {
    kube_dir.join("fleetadm").join(format!("kubeadm-{step}.yaml"))
}

pub struct Outcome {
    pub changed: bool,
    pub output: String,
}

fn done_init(kube_dir: &Path) -> bool {
    kube_dir.join("manifests/kube-apiserver.yaml").exists() && kube_dir.join("admin.conf").exists()
}

fn done_join(kube_dir: &Path, control_plane: bool) -> bool {
    kube_dir.join("kubelet.conf").exists()
        && (!control_plane || kube_dir.join("manifests/kube-apiserver.yaml").exists())
}

fn write_config(kube_dir: &Path, step: &str, config: &str) -> Result<PathBuf, KubeadmError> {
    let p = config_path(kube_dir, step);
    let err = |path: &Path| {
        let path = path.display().to_string();
        move |source| KubeadmError::Write { path, source }
    };
    if let Some(d) = p.parent() {
        fleetadm_common::fsutil::ensure_dir(d, 0o700).map_err(err(d))?;
    }
    fleetadm_common::fsutil::write_private(&p, config.as_bytes()).map_err(err(&p))?;
    Ok(p)
}

async fn kubeadm(args: &[&str], timeout: Duration, cancel: &Cancel) -> Result<String, KubeadmError> {
    Ok(command::run(&Cmd::new("kubeadm", args, timeout), cancel).await?.ok("kubeadm")?)
}

/// Runs blocking file work off the async threads.
async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KubeadmError> + Send + 'static,
) -> Result<T, KubeadmError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(KubeadmError::Write { path: "(worker thread)".into(), source: std::io::Error::other(e.to_string()) })
    })
}

pub async fn init(kube_dir: &Path, config: &str, timeout: Duration, cancel: &Cancel) -> Result<Outcome, KubeadmError> {
    if done_init(kube_dir) {
        return Ok(Outcome { changed: false, output: "control plane already initialised on this host".into() });
    }
    let (dir, config) = (kube_dir.to_path_buf(), config.to_string());
    let cfg = off_thread(move || write_config(&dir, "init", &config)).await?;
    let cfg = cfg.to_string_lossy().into_owned();
    let output = kubeadm(&["init", "--config", &cfg], timeout, cancel).await?;
    Ok(Outcome { changed: true, output })
}

pub async fn join(
    kube_dir: &Path,
    config: &str,
    control_plane: bool,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<Outcome, KubeadmError> {
    if done_join(kube_dir, control_plane) {
        return Ok(Outcome { changed: false, output: "already joined".into() });
    }
    let (dir, config) = (kube_dir.to_path_buf(), config.to_string());
    let cfg = off_thread(move || write_config(&dir, "join", &config)).await?;
    let cfg = cfg.to_string_lossy().into_owned();
    let output = kubeadm(&["join", "--config", &cfg], timeout, cancel).await?;
    Ok(Outcome { changed: true, output })
}

pub async fn reset(
    kube_dir: &Path,
    remove_paths: &[String],
    timeout: Duration,
    cancel: &Cancel,
) -> Result<Outcome, KubeadmError> {
    let mut output = if command::which("kubeadm").is_some() {
        kubeadm(&["reset", "--force"], timeout, cancel).await?
    } else {
        "kubeadm is not installed: nothing for it to reset".to_string()
    };
    let (dir, paths) = (kube_dir.to_path_buf(), remove_paths.to_vec());
    let removed = off_thread(move || {
        let mut out = String::new();
        for p in paths.iter().map(PathBuf::from).chain([dir.join("fleetadm")]) {
            if !fleetadm_common::fsutil::is_below(&dir, &p) {
                out.push_str(&format!("\nnot removing {} (outside {})", p.display(), dir.display()));
                continue;
            }
            match std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p)) {
                Ok(()) => out.push_str(&format!("\nremoved {}", p.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(KubeadmError::Remove { path: p.display().to_string(), source }),
            }
        }
        Ok(out)
    })
    .await?;
    output.push_str(&removed);
    Ok(Outcome { changed: true, output })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reset_removes_only_paths_below_the_kubernetes_tree() {
        if command::which("kubeadm").is_some() {
            return; // would run the real kubeadm reset on this machine
        }
        let root = tempfile::tempdir().unwrap();
        let kube = root.path().join("etc/kubernetes");
        std::fs::create_dir_all(kube.join("manifests")).unwrap();
        std::fs::write(root.path().join("etc/victim"), "keep").unwrap();
        std::fs::create_dir_all(root.path().join("etc/kubernetes-other")).unwrap();
        let paths = vec![
            kube.join("manifests").display().to_string(),
            format!("{}/../victim", kube.display()),
            format!("{}-other", kube.display()),
        ];
        let (_h, cancel) = Cancel::new();
        let out = reset(&kube, &paths, Duration::from_secs(5), &cancel).await.unwrap();
        assert!(!kube.join("manifests").exists(), "{}", out.output);
        assert!(root.path().join("etc/victim").exists(), "'..' must not leave the tree: {}", out.output);
        assert!(root.path().join("etc/kubernetes-other").exists(), "{}", out.output);
        assert_eq!(out.output.matches("not removing").count(), 2, "{}", out.output);
    }
}

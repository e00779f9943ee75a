//! `kubeadm init`, `join` and `reset`, idempotent: a host that already finished the step reports
//! "no change" instead of running kubeadm again (which would fail on its own leftovers).
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::command;

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

fn write_config(kube_dir: &Path, step: &str, config: &str) -> Result<PathBuf, String> {
    let p = config_path(kube_dir, step);
    if let Some(d) = p.parent() {
        fleetadm_common::fsutil::ensure_dir(d, 0o700).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    fleetadm_common::fsutil::write_private(&p, config.as_bytes())
        .map_err(|e| format!("writing {}: {e}", p.display()))?;
    Ok(p)
}

async fn kubeadm(args: &[&str], timeout: Duration) -> Result<String, String> {
    let ran = command::run("kubeadm", args, timeout).await.map_err(|e| e.to_string())?;
    if ran.success {
        Ok(ran.output)
    } else {
        Err(format!("kubeadm {} failed (exit {:?}):\n{}", args.first().unwrap_or(&""), ran.code, ran.output))
    }
}

pub async fn init(kube_dir: &Path, config: &str, timeout: Duration) -> Result<Outcome, String> {
    if done_init(kube_dir) {
        return Ok(Outcome { changed: false, output: "control plane already initialised on this host".into() });
    }
    let cfg = write_config(kube_dir, "init", config)?;
    let cfg = cfg.to_string_lossy().into_owned();
    let output = kubeadm(&["init", "--config", &cfg], timeout).await?;
    Ok(Outcome { changed: true, output })
}

pub async fn join(kube_dir: &Path, config: &str, control_plane: bool, timeout: Duration) -> Result<Outcome, String> {
    if done_join(kube_dir, control_plane) {
        return Ok(Outcome { changed: false, output: "already joined".into() });
    }
    let cfg = write_config(kube_dir, "join", config)?;
    let cfg = cfg.to_string_lossy().into_owned();
    let output = kubeadm(&["join", "--config", &cfg], timeout).await?;
    Ok(Outcome { changed: true, output })
}

pub async fn reset(kube_dir: &Path, remove_paths: &[String], timeout: Duration) -> Result<Outcome, String> {
    let mut output = if command::which("kubeadm").is_some() {
        kubeadm(&["reset", "--force"], timeout).await?
    } else {
        "kubeadm is not installed: nothing for it to reset".to_string()
    };
    for p in remove_paths.iter().map(PathBuf::from).chain([kube_dir.join("fleetadm")]) {
        if !p.starts_with(kube_dir) {
            output.push_str(&format!("\nnot removing {} (outside {})", p.display(), kube_dir.display()));
            continue;
        }
        match std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p)) {
            Ok(()) => output.push_str(&format!("\nremoved {}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing {}: {e}", p.display())),
        }
    }
    Ok(Outcome { changed: true, output })
}

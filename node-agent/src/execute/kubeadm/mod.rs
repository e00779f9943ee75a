//! `kubeadm init`, `join` and `reset`, idempotent and safe to retry: a host whose earlier attempt
//! finished (see [`attempt`]) reports "no change"; one whose attempt failed or was interrupted is
//! cleaned up with `kubeadm reset` (keeping the PKI the controller sent) before kubeadm runs again.
pub mod attempt;
pub mod nodes;
pub mod upgrade;

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
    #[error("recording the progress of kubeadm {step} in {path}")]
    Marker {
        step: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("keeping the controller's PKI across the clean-up of a failed kubeadm {step}")]
    Keep {
        step: &'static str,
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
    run_step(kube_dir, "init", &["init"], config, timeout, cancel).await
}

pub async fn join(
    kube_dir: &Path,
    config: &str,
    control_plane: bool,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<Outcome, KubeadmError> {
    let step = if control_plane { "join-control-plane" } else { "join" };
    run_step(kube_dir, step, &["join"], config, timeout, cancel).await
}

/// One kubeadm step: done already, or (after cleaning up what a failed attempt left) run it and
/// record success only once kubeadm exited 0.
async fn run_step(
    kube_dir: &Path,
    step: &'static str,
    args: &[&str],
    config: &str,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<Outcome, KubeadmError> {
    if attempt::finished(kube_dir, step) {
        return Ok(Outcome { changed: false, output: format!("kubeadm {step} already finished on this host") });
    }
    let mut output = String::new();
    let dir = kube_dir.to_path_buf();
    let left = off_thread(move || Ok(attempt::leftovers(&dir, step))).await?;
    if let Some(why) = left {
        output.push_str(&format!("cleaning up a failed attempt first ({why})\n"));
        output.push_str(&clean_failed_attempt(kube_dir, step, timeout, cancel).await?);
        output.push('\n');
    }
    let (dir, config) = (kube_dir.to_path_buf(), config.to_string());
    let cfg = off_thread(move || {
        let cfg = write_config(&dir, step.split('-').next().unwrap_or(step), &config)?;
        attempt::mark_started(&dir, step).map_err(marker_err(&dir, step))?;
        Ok(cfg)
    })
    .await?;
    let cfg = cfg.to_string_lossy().into_owned();
    let mut argv = args.to_vec();
    argv.extend(["--config", cfg.as_str()]);
    output.push_str(&kubeadm(&argv, timeout, cancel).await?);
    let dir = kube_dir.to_path_buf();
    off_thread(move || attempt::mark_done(&dir, step).map_err(marker_err(&dir, step))).await?;
    Ok(Outcome { changed: true, output })
}

fn marker_err(kube_dir: &Path, step: &'static str) -> impl FnOnce(std::io::Error) -> KubeadmError {
    let path = attempt::state_dir(kube_dir).display().to_string();
    move |source| KubeadmError::Marker { step, path, source }
}

/// `kubeadm reset --force` over a failed attempt, with the controller's PKI and kubeconfigs put
/// back afterwards (kubeadm reset removes them; the retry needs them).
async fn clean_failed_attempt(
    kube_dir: &Path,
    step: &'static str,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<String, KubeadmError> {
    let dir = kube_dir.to_path_buf();
    let kept = off_thread(move || {
        if attempt::keeps_controller_files(step) {
            attempt::Kept::take(&dir).map_err(|source| KubeadmError::Keep { step, source })
        } else {
            Ok(attempt::Kept::none())
        }
    })
    .await?;
    let out = if command::which("kubeadm").is_some() {
        kubeadm(&["reset", "--force"], timeout, cancel).await
    } else {
        Ok("kubeadm is not installed: nothing for it to reset".to_string())
    };
    // Put the PKI back even when the reset failed: it is needed whatever happens next.
    let dir = kube_dir.to_path_buf();
    let n = kept.len();
    off_thread(move || {
        kept.restore().map_err(|source| KubeadmError::Keep { step, source })?;
        attempt::clear_started(&dir, step).map_err(marker_err(&dir, step))
    })
    .await?;
    Ok(format!("{}\nkept {n} PKI and kubeconfig files from the controller", out?.trim_end()))
}

/// Bootstrap tokens on a first master: delete `delete_ids` (an id already gone is fine: kubeadm
/// fails on it, and the output says so), then, when `token` is set, delete and recreate it to live
/// `ttl` from now (so a retried attempt never trips over its own earlier success).
pub async fn token(
    kube_dir: &Path,
    token: Option<&fleetadm_common::token::BootstrapToken>,
    ttl: Duration,
    description: &str,
    delete_ids: &[String],
    timeout: Duration,
    cancel: &Cancel,
) -> Result<Outcome, KubeadmError> {
    let kubeconfig = kube_dir.join("admin.conf").to_string_lossy().into_owned();
    let mut output = String::new();
    let mut ids: Vec<&str> = delete_ids.iter().map(String::as_str).collect();
    if let Some(t) = token {
        ids.push(&t.id);
    }
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        let cmd = Cmd::new("kubeadm", &["token", "delete", id, "--kubeconfig", &kubeconfig], timeout);
        let ran = command::run(&cmd, cancel).await?;
        let said = ran.output.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        if ran.success {
            output.push_str(&format!("token {id} deleted\n"));
        } else {
            output.push_str(&format!("token {id} not deleted (already gone?): {said}\n"));
        }
    }
    if let Some(t) = token {
        let ttl = format!("{}s", ttl.as_secs());
        let secret = t.expose();
        let args =
            ["token", "create", &secret, "--ttl", &ttl, "--description", description, "--kubeconfig", &kubeconfig];
        // Its output is the token itself: not repeated in the report.
        kubeadm(&args, timeout, cancel).await?;
        output.push_str(&format!("token {} created, valid for {ttl}\n", t.id));
    }
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

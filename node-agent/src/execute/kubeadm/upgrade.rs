//! A Kubernetes upgrade on this host, one step per task, in the order kubeadm's documentation
//! gives: the new kubeadm is installed first (the bundle's bootstrap), then `kubeadm upgrade
//! apply` on the first master or `kubeadm upgrade node` everywhere else, the node drained (by the
//! controller, on a first master), the kubelet restarted on its new binary, and the node
//! uncordoned.
//!
//! `apply` and `node` check the installed kubeadm's version first (a wrong one is the most common
//! upgrade mistake, and kubeadm's own message for it names neither the host nor the fix) and are
//! recorded as finished only after kubeadm exited 0, so a re-sent or retried task does not run
//! them again. Certificates are never renewed by kubeadm here (`--certificate-renewal=false`): the
//! controller owns the PKI and its validity.
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::super::command::{self, Cancel, Cmd, CommandError};
use super::{attempt, Outcome};
use crate::lb::probe::{Prober, TlsTrust};

#[derive(Debug, Error)]
pub enum UpgradeError {
    #[error("unknown upgrade step {0:?} (apply, node, kubelet or uncordon)")]
    Step(String),
    #[error("{0:?} is not a Kubernetes version (vX.Y.Z)")]
    Version(String),
    #[error("bad upgrade parameter: {0}")]
    Param(String),
    #[error("kubeadm on this host is {found}; the upgrade to {want} needs kubeadm {want} installed first (upgrade with --bundle, or install it)")]
    WrongKubeadm { found: String, want: String },
    #[error("recording the finished {step} in {path}")]
    Marker {
        step: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the cluster CA {path}")]
    Ca {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the local apiserver on {addr} is not ready {secs}s after the upgrade: {last}")]
    NotReady { addr: SocketAddr, secs: u64, last: String },
    #[error("the kubelet is not active {secs}s after its restart (systemctl is-active kubelet: {state})")]
    KubeletInactive { secs: u64, state: String },
    #[error("the readiness prober")]
    Prober(#[source] crate::lb::probe::ProberError),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("the agent is stopping")]
    Cancelled,
}

const READY_WAIT: Duration = Duration::from_secs(180);
const KUBELET_WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(500);

/// `vX.Y.Z` (what kubeadm accepts as an upgrade target).
pub fn valid_version(v: &str) -> bool {
    let Some(rest) = v.strip_prefix('v') else { return false };
    let parts: Vec<&str> = rest.split('.').collect();
    parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.len() <= 4 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// One step of an upgrade (see the protocol's `KubeadmUpgradeTask`).
pub async fn step(
    kube_dir: &Path,
    t: &fleetadm_proto::KubeadmUpgradeTask,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<Outcome, UpgradeError> {
    if !valid_version(&t.version) {
        return Err(UpgradeError::Version(t.version.clone()));
    }
    let apiserver = || -> Result<Option<SocketAddr>, UpgradeError> {
        if t.apiserver.is_empty() {
            return Ok(None);
        }
        t.apiserver.parse().map(Some).map_err(|_| UpgradeError::Param(format!("apiserver {:?}", t.apiserver)))
    };
    match t.step.as_str() {
        "apply" | "node" => {
            let api = apiserver()?;
            kubeadm_step(kube_dir, &t.step, &t.version, api, timeout, cancel).await
        }
        "kubelet" => restart_kubelet(timeout, cancel).await,
        "uncordon" => {
            if !super::nodes::valid_node_name(&t.node) {
                return Err(UpgradeError::Param(format!("{:?} is not a Kubernetes node name", t.node)));
            }
            uncordon(kube_dir, &t.node, timeout, cancel).await
        }
        other => Err(UpgradeError::Step(other.to_string())),
    }
}

async fn run(program: &str, args: &[&str], timeout: Duration, cancel: &Cancel) -> Result<String, UpgradeError> {
    Ok(command::run(&Cmd::new(program, args, timeout), cancel).await?.ok(program)?)
}

async fn kubeadm_step(
    kube_dir: &Path,
    step: &str,
    version: &str,
    apiserver: Option<SocketAddr>,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<Outcome, UpgradeError> {
    let marker = format!("upgrade-{step}-{version}");
    if attempt::finished(kube_dir, &marker) {
        return Ok(Outcome { changed: false, output: format!("kubeadm upgrade {step} to {version} already finished") });
    }
    let found = run("kubeadm", &["version", "-o", "short"], Duration::from_secs(30), cancel).await?;
    let found = found.trim().to_string();
    if found != version {
        return Err(UpgradeError::WrongKubeadm { found, want: version.to_string() });
    }
    let mut output = String::new();
    if step == "apply" {
        output.push_str(&run("kubeadm", &["upgrade", "plan", version], timeout, cancel).await?);
        output.push('\n');
        let args = ["upgrade", "apply", version, "--yes", "--certificate-renewal=false"];
        output.push_str(&run("kubeadm", &args, timeout, cancel).await?);
    } else {
        output.push_str(&run("kubeadm", &["upgrade", "node", "--certificate-renewal=false"], timeout, cancel).await?);
    }
    if let Some(addr) = apiserver {
        let ca_path = kube_dir.join("pki/ca.crt");
        let ca = tokio::fs::read_to_string(&ca_path)
            .await
            .map_err(|source| UpgradeError::Ca { path: ca_path.display().to_string(), source })?;
        let secs = until_ready(addr, &ca, cancel).await?;
        output.push_str(&format!("\nkube-apiserver ready (/readyz) on {addr} after {secs:.1}s"));
    }
    let (dir, m) = (kube_dir.to_path_buf(), marker.clone());
    tokio::task::spawn_blocking(move || attempt::mark_done(&dir, &m))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|r| r)
        .map_err(|source| UpgradeError::Marker {
            step: marker,
            path: attempt::state_dir(kube_dir).display().to_string(),
            source,
        })?;
    Ok(Outcome { changed: true, output })
}

async fn until_ready(addr: SocketAddr, ca_pem: &str, cancel: &Cancel) -> Result<f64, UpgradeError> {
    let prober = Prober::new(Some(ca_pem), TlsTrust::Verify, Duration::from_secs(3)).map_err(UpgradeError::Prober)?;
    let t0 = Instant::now();
    loop {
        let last = match prober.probe(addr).await {
            Ok(()) => return Ok(t0.elapsed().as_secs_f64()),
            Err(e) => e.to_string(),
        };
        if t0.elapsed() > READY_WAIT {
            return Err(UpgradeError::NotReady { addr, secs: READY_WAIT.as_secs(), last });
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = cancel.fired() => return Err(UpgradeError::Cancelled),
        }
    }
}

/// The kubelet on its new binary and configuration: `systemctl daemon-reload` (the bundle may
/// have changed its unit), `systemctl restart kubelet`, then until `systemctl is-active kubelet`.
async fn restart_kubelet(timeout: Duration, cancel: &Cancel) -> Result<Outcome, UpgradeError> {
    let mut output = String::new();
    if Path::new("/run/systemd/system").is_dir() {
        run("systemctl", &["daemon-reload"], timeout, cancel).await?;
        output.push_str("systemctl daemon-reload\n");
    }
    run("systemctl", &["restart", "kubelet"], timeout, cancel).await?;
    output.push_str("systemctl restart kubelet\n");
    let t0 = Instant::now();
    loop {
        let ran =
            command::run(&Cmd::new("systemctl", &["is-active", "kubelet"], Duration::from_secs(30)), cancel).await?;
        let state = ran.output.trim().to_string();
        if ran.success && state == "active" {
            output.push_str(&format!("kubelet active after {:.1}s", t0.elapsed().as_secs_f64()));
            return Ok(Outcome { changed: true, output });
        }
        if t0.elapsed() > KUBELET_WAIT {
            return Err(UpgradeError::KubeletInactive { secs: KUBELET_WAIT.as_secs(), state });
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = cancel.fired() => return Err(UpgradeError::Cancelled),
        }
    }
}

/// `kubectl uncordon NODE` with this master's admin.conf. A node that is gone counts as done.
async fn uncordon(kube_dir: &Path, node: &str, timeout: Duration, cancel: &Cancel) -> Result<Outcome, UpgradeError> {
    let kubeconfig = kube_dir.join("admin.conf").to_string_lossy().into_owned();
    let ran =
        command::run(&Cmd::new("kubectl", &["--kubeconfig", &kubeconfig, "uncordon", node], timeout), cancel).await?;
    if !ran.success && ran.output.contains("(NotFound)") {
        return Ok(Outcome { changed: false, output: format!("node {node} is gone: nothing to uncordon") });
    }
    ran.ok("kubectl uncordon")?;
    Ok(Outcome { changed: true, output: format!("node {node} uncordoned") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        for ok in ["v1.30.5", "v1.29.0", "v2.0.10"] {
            assert!(valid_version(ok), "{ok}");
        }
        for bad in ["1.30.5", "v1.30", "v1.30.5-rc.1", "v1..5", "v1.30.5 ", "v1.30.5;rm", ""] {
            assert!(!valid_version(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn bad_parameters_are_refused_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        let t = |step: &str, version: &str, node: &str| fleetadm_proto::KubeadmUpgradeTask {
            step: step.into(),
            version: version.into(),
            node: node.into(),
            ..Default::default()
        };
        let (_h, cancel) = Cancel::new();
        let run = |t| {
            let (d, c) = (dir.path().to_path_buf(), cancel.clone());
            async move { step(&d, &t, Duration::from_secs(5), &c).await }
        };
        assert!(matches!(run(t("apply", "1.30", "")).await, Err(UpgradeError::Version(_))));
        assert!(matches!(run(t("rollback", "v1.30.5", "")).await, Err(UpgradeError::Step(_))));
        assert!(matches!(run(t("uncordon", "v1.30.5", "Bad_Name")).await, Err(UpgradeError::Param(_))));
        let mut a = t("node", "v1.30.5", "");
        a.apiserver = "not-an-address".into();
        assert!(matches!(run(a).await, Err(UpgradeError::Param(_))));
    }

    #[tokio::test]
    async fn a_finished_step_is_not_run_again() {
        let dir = tempfile::tempdir().unwrap();
        attempt::mark_done(dir.path(), "upgrade-node-v1.30.5").unwrap();
        let t =
            fleetadm_proto::KubeadmUpgradeTask { step: "node".into(), version: "v1.30.5".into(), ..Default::default() };
        let (_h, cancel) = Cancel::new();
        let o = step(dir.path(), &t, Duration::from_secs(5), &cancel).await.unwrap();
        assert!(!o.changed && o.output.contains("already finished"), "{}", o.output);
        // another version is not covered by that record: it needs kubeadm (absent or wrong here)
        let t2 = fleetadm_proto::KubeadmUpgradeTask { version: "v1.31.0".into(), ..t };
        assert!(step(dir.path(), &t2, Duration::from_secs(5), &cancel).await.is_err());
    }
}

//! Certificates on a control-plane host: report what is there (`certs-check`), and install
//! renewed or reissued files then restart the static pods that use them (`certs-install`).
//!
//! A static pod is restarted the way kubeadm's documentation says to: its manifest is moved out
//! of the manifests directory (the kubelet stops the pod), and once the pod no longer answers on
//! its address, moved back (the kubelet starts it with the new files). The held manifest is kept
//! below /etc/kubernetes/fleetadm/held-manifests, on the same file system, so an agent that stops
//! halfway puts it back on the next attempt.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::command::Cancel;
use crate::lb::probe::{Prober, TlsTrust};

/// The components whose manifests may be moved.
pub const PODS: &[&str] = &["kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd"];
/// How long the kubelet may take to stop a pod (kube-apiserver: its termination grace period
/// and `--shutdown-delay-duration`).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a pod may take to answer again.
pub const START_TIMEOUT: Duration = Duration::from_secs(180);
const POLL: Duration = Duration::from_millis(250);

#[derive(Debug, Error)]
pub enum CertsError {
    #[error("{0:?} is not a control-plane static pod (kube-apiserver, kube-controller-manager, kube-scheduler, etcd)")]
    UnknownPod(String),
    #[error("{pod}: bad probe address {probe:?}")]
    BadProbe { pod: String, probe: String },
    #[error("{pod} has no manifest in {dir}: is this a control-plane host?")]
    NoManifest { pod: String, dir: String },
    #[error("moving the manifest of {pod}")]
    Move {
        pod: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{pod} still answers on {probe} {waited:?} after its manifest was moved out (is the kubelet running?); its manifest is back")]
    DidNotStop { pod: String, probe: SocketAddr, waited: Duration },
    #[error("{pod} did not answer on {probe} within {waited:?} after its manifest came back: {last}")]
    DidNotStart { pod: String, probe: SocketAddr, waited: Duration, last: String },
    #[error("the cluster CA for probing the apiserver")]
    Prober(#[source] crate::lb::probe::ProberError),
    #[error("stopped (agent stopping or task timed out); the manifest of {0} is put back on the next attempt")]
    Cancelled(String),
}

/// A static pod to restart, with where it answers.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub probe: SocketAddr,
}

impl Pod {
    pub fn parse(name: &str, probe: &str) -> Result<Self, CertsError> {
        if !PODS.contains(&name) {
            return Err(CertsError::UnknownPod(name.to_string()));
        }
        let probe =
            probe.parse().map_err(|_| CertsError::BadProbe { pod: name.to_string(), probe: probe.to_string() })?;
        Ok(Self { name: name.to_string(), probe })
    }
}

fn manifest(kube_dir: &Path, pod: &str) -> PathBuf {
    kube_dir.join("manifests").join(format!("{pod}.yaml"))
}

fn held(kube_dir: &Path, pod: &str) -> PathBuf {
    kube_dir.join("fleetadm/held-manifests").join(format!("{pod}.yaml"))
}

/// Put back a manifest an earlier, interrupted restart held. Returns whether it did.
pub fn put_back(kube_dir: &Path, pod: &str) -> Result<bool, CertsError> {
    let (m, h) = (manifest(kube_dir, pod), held(kube_dir, pod));
    let err = |source| CertsError::Move { pod: pod.to_string(), source };
    if !h.exists() {
        return Ok(false);
    }
    if m.exists() {
        // The manifest is in place (put back, or rewritten since): the held copy is stale.
        std::fs::remove_file(&h).map_err(err)?;
        return Ok(false);
    }
    std::fs::rename(&h, &m).map_err(err)?;
    fleetadm_common::fsutil::sync_dir(m.parent().unwrap_or(kube_dir));
    Ok(true)
}

pub fn hold(kube_dir: &Path, pod: &str) -> Result<(), CertsError> {
    let (m, h) = (manifest(kube_dir, pod), held(kube_dir, pod));
    let err = |source| CertsError::Move { pod: pod.to_string(), source };
    if !m.exists() {
        return Err(CertsError::NoManifest {
            pod: pod.to_string(),
            dir: kube_dir.join("manifests").display().to_string(),
        });
    }
    if let Some(d) = h.parent() {
        std::fs::create_dir_all(d).map_err(err)?;
    }
    std::fs::rename(&m, &h).map_err(err)?;
    fleetadm_common::fsutil::sync_dir(m.parent().unwrap_or(kube_dir));
    Ok(())
}

/// Whether anything accepts connections on `addr`.
pub async fn listening(addr: SocketAddr) -> bool {
    matches!(tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await, Ok(Ok(_)))
}

/// Restart one static pod (see the module docs); `ca_pem` verifies kube-apiserver's `/readyz`.
pub async fn restart(kube_dir: &Path, pod: &Pod, ca_pem: &str, cancel: &Cancel) -> Result<String, CertsError> {
    let prober = if pod.name == "kube-apiserver" {
        Some(Prober::new(Some(ca_pem), TlsTrust::Verify, Duration::from_secs(3)).map_err(CertsError::Prober)?)
    } else {
        None
    };
    let kd = kube_dir.to_path_buf();
    let name = pod.name.clone();
    put_back(&kd, &name)?;
    hold(&kd, &name)?;
    let t0 = Instant::now();
    // Stopped: nothing listens any more (an apiserver in its shutdown delay still does).
    loop {
        if !listening(pod.probe).await {
            break;
        }
        if t0.elapsed() > STOP_TIMEOUT {
            put_back(&kd, &name)?;
            return Err(CertsError::DidNotStop { pod: name, probe: pod.probe, waited: STOP_TIMEOUT });
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = cancel.fired() => {
                put_back(&kd, &name)?;
                return Err(CertsError::Cancelled(name));
            }
        }
    }
    let stopped = t0.elapsed();
    put_back(&kd, &name)?;
    let t1 = Instant::now();
    let mut last = String::from("no answer yet");
    loop {
        let up = match &prober {
            Some(p) => match p.probe(pod.probe).await {
                Ok(()) => true,
                Err(e) => {
                    last = e.to_string();
                    false
                }
            },
            None => listening(pod.probe).await,
        };
        if up {
            break;
        }
        if t1.elapsed() > START_TIMEOUT {
            return Err(CertsError::DidNotStart { pod: name, probe: pod.probe, waited: START_TIMEOUT, last });
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = cancel.fired() => return Err(CertsError::Cancelled(name)),
        }
    }
    let what = if prober.is_some() { "ready (/readyz)" } else { "answering" };
    Ok(format!(
        "{name}: stopped after {:.1}s, {what} on {} after {:.1}s",
        stopped.as_secs_f64(),
        pod.probe,
        t1.elapsed().as_secs_f64()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in kubelet for one pod: listens on `addr` while the manifest exists.
    fn kubelet(kube_dir: PathBuf, pod: &'static str, addr: SocketAddr) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut listener: Option<tokio::net::TcpListener> = None;
            loop {
                let want = manifest(&kube_dir, pod).exists();
                if want && listener.is_none() {
                    listener = tokio::net::TcpListener::bind(addr).await.ok();
                } else if !want {
                    listener = None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }

    #[tokio::test]
    async fn a_restart_moves_the_manifest_out_until_the_pod_stops_then_back() {
        let dir = tempfile::tempdir().unwrap();
        let kd = dir.path().to_path_buf();
        std::fs::create_dir_all(kd.join("manifests")).unwrap();
        std::fs::write(manifest(&kd, "kube-scheduler"), "kind: Pod\n").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let k = kubelet(kd.clone(), "kube-scheduler", port);
        while !listening(port).await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pod = Pod::parse("kube-scheduler", &port.to_string()).unwrap();
        let out = restart(&kd, &pod, "", &Cancel::none()).await.unwrap();
        assert!(out.contains("kube-scheduler: stopped after"), "{out}");
        assert!(manifest(&kd, "kube-scheduler").exists() && !held(&kd, "kube-scheduler").exists());
        assert!(listening(port).await);
        k.abort();
    }

    #[tokio::test]
    async fn refusals_and_an_interrupted_restart_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let kd = dir.path().to_path_buf();
        assert!(matches!(Pod::parse("kube-proxy", "127.0.0.1:1"), Err(CertsError::UnknownPod(_))));
        assert!(matches!(Pod::parse("etcd", "localhost"), Err(CertsError::BadProbe { .. })));
        let pod = Pod::parse("etcd", "127.0.0.1:1").unwrap();
        let e = restart(&kd, &pod, "", &Cancel::none()).await.unwrap_err();
        assert!(matches!(e, CertsError::NoManifest { .. }), "{e}");
        // An earlier attempt held the manifest and stopped: the next one puts it back first.
        std::fs::create_dir_all(held(&kd, "etcd").parent().unwrap()).unwrap();
        std::fs::create_dir_all(kd.join("manifests")).unwrap();
        std::fs::write(held(&kd, "etcd"), "kind: Pod\n").unwrap();
        assert!(put_back(&kd, "etcd").unwrap());
        assert!(manifest(&kd, "etcd").exists() && !held(&kd, "etcd").exists());
        assert!(!put_back(&kd, "etcd").unwrap());
    }
}

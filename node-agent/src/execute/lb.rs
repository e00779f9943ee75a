//! The `lb` task: converge the IPVS rules now, then keep the guard running inside `node-agent run`
//! (no static pod). The desired state is saved in the state dir, so after an agent restart the
//! guard resumes (adopting the kernel's rules without a flap) before the controller says anything.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::watch;

use crate::lb::{self, guard::GuardConfig, guard::GuardStatus, probe, LbError, LbSpec};

#[derive(Debug, Error)]
pub enum LbTaskError {
    #[error(transparent)]
    BadEndpoint(#[from] crate::lb::BadEndpoint),
    #[error("invalid load balancer")]
    Invalid(#[source] LbError),
    #[error("programming the load balancer")]
    Apply(#[source] LbError),
    #[error("saving {path}")]
    Save {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the load balancer worker thread failed")]
    Worker(#[from] tokio::task::JoinError),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    pub vip: SocketAddr,
    pub real_servers: Vec<SocketAddr>,
    pub ca_pem: String,
}

impl Desired {
    pub fn parse(vip: &str, real_servers: &[String], ca_pem: &str) -> Result<Self, LbTaskError> {
        let vip = lb::parse_endpoint(vip).map_err(LbTaskError::BadEndpoint)?;
        let real_servers = real_servers
            .iter()
            .map(|r| lb::parse_endpoint(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(LbTaskError::BadEndpoint)?;
        let d = Self { vip, real_servers, ca_pem: ca_pem.to_string() };
        d.spec().validate().map_err(LbTaskError::Invalid)?;
        Ok(d)
    }

    fn spec(&self) -> LbSpec {
        LbSpec {
            vip: self.vip,
            real_servers: self.real_servers.clone(),
            interface: lb::DEFAULT_INTERFACE.into(),
            scheduler: "rr".into(),
        }
    }
}

struct Running {
    desired: Desired,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

pub struct LbManager {
    state_dir: PathBuf,
    running: Mutex<Option<Running>>,
    /// The guard's latest status, for the session (`None`: no load balancer on this node).
    status: watch::Sender<Option<GuardStatus>>,
}

impl LbManager {
    pub fn new(state_dir: &Path) -> Self {
        Self { state_dir: state_dir.to_path_buf(), running: Mutex::new(None), status: watch::channel(None).0 }
    }

    /// Follow the guard's status (every probe round updates it; compare what matters).
    pub fn status(&self) -> watch::Receiver<Option<GuardStatus>> {
        self.status.subscribe()
    }

    fn desired_path(&self) -> PathBuf {
        self.state_dir.join("lb.json")
    }

    /// Resume guarding what an earlier run was asked to guard.
    pub fn resume(&self) {
        let Ok(bytes) = std::fs::read(self.desired_path()) else { return };
        match serde_json::from_slice::<Desired>(&bytes) {
            Ok(d) => {
                tracing::info!(vip = %d.vip, "resuming the load balancer guard");
                self.start_guard(d);
            }
            Err(e) => tracing::warn!(error = %e, "ignoring unreadable {}", self.desired_path().display()),
        }
    }

    /// Converge now (reporting what changed), save the desired state, and (re)start the guard.
    pub async fn apply(&self, d: Desired) -> Result<(bool, String), LbTaskError> {
        let spec = d.spec();
        let changes = tokio::task::spawn_blocking(move || lb::apply(&spec)).await?.map_err(LbTaskError::Apply)?;
        let json = serde_json::to_vec_pretty(&d).unwrap_or_default();
        let path = self.desired_path();
        tokio::task::spawn_blocking(move || {
            fleetadm_common::fsutil::write_atomic(&path, &json, 0o600)
                .map_err(|source| LbTaskError::Save { path: path.display().to_string(), source })
        })
        .await??;
        let same = self
            .running
            .lock()
            .map(|r| r.as_ref().is_some_and(|r| r.desired == d && !r.task.is_finished()))
            .unwrap_or(false);
        if !same {
            self.start_guard(d.clone());
        }
        let mut out = format!(
            "IPVS {} -> {}",
            d.vip,
            d.real_servers.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
        );
        if changes.0.is_empty() {
            out.push_str("\nno change");
        }
        for c in &changes.0 {
            out.push_str(&format!("\n{c}"));
        }
        out.push_str(if same { "\nguard already running" } else { "\nguard started" });
        Ok((!changes.0.is_empty(), out))
    }

    /// Stop the guard and forget the desired state (the cluster is being deleted).
    pub fn stop_and_forget(&self) {
        if let Ok(mut slot) = self.running.lock() {
            if let Some(old) = slot.take() {
                let _ = old.stop.send(());
                old.task.abort();
            }
        }
        let _ = std::fs::remove_file(self.desired_path());
        let _ = std::fs::remove_file(lb::status_path(&self.state_dir));
        self.status.send_replace(None);
    }

    fn start_guard(&self, d: Desired) {
        let Ok(mut slot) = self.running.lock() else { return };
        if let Some(old) = slot.take() {
            let _ = old.stop.send(());
            old.task.abort();
        }
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let status_file = lb::status_path(&self.state_dir);
        let spec = d.spec();
        let ca = d.ca_pem.clone();
        let status = self.status.clone();
        let task = tokio::spawn(async move {
            let cfg = GuardConfig::default();
            let prober = match probe::Prober::new(Some(&ca), probe::TlsTrust::Verify, cfg.timeout) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "load balancer guard cannot start");
                    return;
                }
            };
            let stop = async {
                let _ = stop_rx.await;
            };
            if let Err(e) = lb::run_guard(spec, cfg, prober, status_file, status, stop).await {
                tracing::error!(error = %fleetadm_common::error_chain(&e), "load balancer guard stopped");
            }
        });
        *slot = Some(Running { desired: d, stop: stop_tx, task });
    }
}

//! The contract every task kind implements: a [`Handler`] takes its typed task message and a
//! [`Ctx`], does its work idempotently, and says what changed ([`Done`]) or why it failed
//! ([`TaskError`], with its cause chain). Handlers never open connections of their own: what
//! they need from the controller comes through the session's channel in the context.
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fleetadm_proto::agent_client::AgentClient;
use thiserror::Error;
use tokio::sync::watch;
use tonic::transport::Channel;

use super::command::{Cancel, CommandError};
use super::HostPaths;

/// The session's connection to the controller, when one is open.
pub type SessionChannel = watch::Receiver<Option<AgentClient<Channel>>>;

/// What one run of a task may use.
#[derive(Clone)]
pub struct Ctx {
    pub paths: Arc<HostPaths>,
    pub state_dir: Arc<PathBuf>,
    /// The task's own limit (the executor enforces it through `cancel`).
    pub timeout: Duration,
    /// Fires when the task must stop (timed out, agent stopping); every command run under this
    /// context is killed with its process group.
    pub cancel: Cancel,
    /// Progress for the controller (sent as a running report; cheap to lose).
    pub progress: Arc<dyn Fn(String) + Send + Sync>,
    pub lb: Arc<super::lb::LbManager>,
    pub channel: SessionChannel,
    /// The attempt being run (a self-upgrade hands it on to the agent that reports it).
    pub attempt: u32,
    /// This agent's state dir when it serves peers (and so may fetch from them).
    pub peers: Option<crate::identity::StateDir>,
}

/// A finished task: whether it changed the host, and what to tell the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    pub changed: bool,
    pub output: String,
    /// What a `certs-check` found (sent in the report's typed field).
    pub certs: Vec<fleetadm_proto::CertInfo>,
    /// What an `etcd-snapshot` uploaded.
    pub snapshot: Option<fleetadm_proto::SnapshotInfo>,
}

impl Done {
    pub fn new(changed: bool, output: impl Into<String>) -> Self {
        Self { changed, output: output.into(), certs: vec![], snapshot: None }
    }
}

#[derive(Debug, Error)]
pub enum TaskError {
    /// A check or a parameter the handler refuses, said in words (preflight problems, a bundle
    /// without kubeadm, a bad address).
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Files(#[from] super::files::FilesError),
    #[error(transparent)]
    Hosts(#[from] super::hosts::HostsError),
    #[error(transparent)]
    Fetch(#[from] super::fetch::FetchError),
    #[error(transparent)]
    Bootstrap(#[from] super::bootstrap::BootstrapError),
    #[error(transparent)]
    Kubeadm(#[from] super::kubeadm::KubeadmError),
    #[error(transparent)]
    Lb(#[from] super::lb::LbTaskError),
    #[error(transparent)]
    Certs(#[from] super::certs::CertsError),
    #[error(transparent)]
    Etcd(#[from] super::etcd::EtcdError),
    #[error(transparent)]
    Restore(#[from] super::etcd::RestoreError),
    #[error(transparent)]
    Upgrade(#[from] super::kubeadm::upgrade::UpgradeError),
    #[error(transparent)]
    AgentUpgrade(#[from] super::agent_upgrade::AgentUpgradeError),
    #[error("the task's worker thread failed")]
    Worker(#[from] tokio::task::JoinError),
}

/// One task kind.
pub trait Handler {
    type Task: Send + 'static;
    fn run(&self, task: Self::Task, cx: Ctx) -> impl Future<Output = Result<Done, TaskError>> + Send;
}

/// Run blocking work (file writes, fsyncs, hashing) off the async threads.
pub async fn blocking<T: Send + 'static, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, TaskError>
where
    TaskError: From<E>,
    E: Send + 'static,
{
    Ok(tokio::task::spawn_blocking(f).await??)
}

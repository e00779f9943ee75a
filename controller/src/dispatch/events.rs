//! What dispatch hands on to whoever runs the work (the rollout engine): task reports and session
//! changes. Dispatch owns this interface, so it neither knows the rollout's types nor its errors.
use fleetadm_proto::TaskReport;
use thiserror::Error;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a task report was refused (mapped to a gRPC status by the service).
#[derive(Debug, Error)]
pub enum ReportRejected {
    #[error("task {0} not found")]
    UnknownTask(String),
    #[error("task {task} belongs to host {owner}, not {caller}")]
    NotYours { task: String, owner: String, caller: String },
    #[error("invalid task report: {0}")]
    Invalid(&'static str),
    #[error("recording the task report")]
    Internal(#[source] BoxError),
}

#[tonic::async_trait]
pub trait TaskEvents: Send + Sync + 'static {
    /// A report from `node` (authenticated by its certificate). Returns once the report is
    /// recorded (flushed when it is an outcome), so the agent may forget it.
    async fn task_report(&self, node: &str, report: TaskReport) -> Result<(), ReportRejected>;
    /// A session for `node` opened: work may be waiting for it, or need re-sending.
    fn session_opened(&self, node: &str);
    /// Whether `node` belongs to a cluster that uses `bundle`, or a running agent upgrade sends
    /// it that bundle's package (may read the store: call it off the async threads).
    fn node_uses_bundle(&self, node: &str, bundle: &str) -> Result<bool, BoxError>;
}

//! The persisted state of a rollout.
use serde::{Deserialize, Serialize};

use crate::pki::kube::KubePki;
use crate::plan::phases::{ClusterShape, CountError, PhaseName, Plan, StepKind, TaskId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterState {
    Running,
    Succeeded,
    Failed,
}

impl std::fmt::Display for ClusterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClusterState::Running => "running",
            ClusterState::Succeeded => "succeeded",
            ClusterState::Failed => "failed",
        })
    }
}

/// What the operator asked for, beyond the hosts (kept so specs can be re-rendered identically).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterSpec {
    pub version: String,
    pub pod_cidr: String,
    pub service_cidr: String,
    pub dns_domain: String,
    /// The Clusterfile text, when the cluster was created from one (its kubeadm overrides apply).
    #[serde(default)]
    pub clusterfile: String,
    /// "N" or "P%" of workers that may fail.
    pub max_failures: String,
    pub cgroup_driver: String,
    pub cri_socket: String,
    pub image_repository: String,
    /// Validity of the cluster's certificates (0: recorded before fleetadm kept it; then the
    /// cluster CA's own lifetime is used).
    #[serde(default)]
    pub cert_validity_secs: u64,
    /// Names and addresses added to the apiserver certificate (`cluster certs --add-san`).
    #[serde(default)]
    pub extra_sans: Vec<String>,
    /// Scheduled etcd backups: every this long (0: none), keeping the newest `backup_keep`.
    #[serde(default)]
    pub backup_every_secs: u64,
    #[serde(default)]
    pub backup_keep: u32,
}

/// What the cluster's current plan does. Day-2 operations replace the plan; finished work of an
/// earlier operation stays in the store (its tasks keep their attempt counters).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Operation {
    /// `cluster create` (and a retry of it).
    #[default]
    Create,
    /// `cluster add --nodes`: these workers join the running cluster.
    AddWorkers { hosts: Vec<String> },
    /// `cluster delete`: the teardown.
    Delete,
    /// `cluster remove --nodes`: these workers leave the running cluster.
    RemoveWorkers { hosts: Vec<String> },
    /// `cluster add --masters [--nodes]`: masters (and workers) join; every master's apiserver
    /// certificate, every worker's IPVS and every host's /etc/hosts follow.
    AddHosts { masters: Vec<String>, workers: Vec<String> },
    /// `cluster remove --masters [--nodes]`: they leave (the shape no longer has them; they are
    /// in [`ClusterRecord::leaving`] until the operation ends).
    RemoveHosts { masters: Vec<String>, workers: Vec<String> },
    /// `cluster certs --renew/--add-san`: these certificates (kubeadm's names) were reissued and
    /// are installed on the masters.
    Certs { certs: Vec<String>, add_sans: Vec<String> },
    /// `cluster restore --snapshot ID`: every master's etcd restored from this backup.
    Restore { backup: String, sha256: String, size: u64 },
    /// `cluster upgrade --version TO [--bundle B]`: Kubernetes from `from` to `to` (the record's
    /// version is `to` from the start: later specs render for it).
    Upgrade {
        from: String,
        to: String,
        #[serde(default)]
        bundle: Option<String>,
    },
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Operation::Create => f.write_str("create"),
            Operation::AddWorkers { hosts } => write!(f, "add workers {}", hosts.join(",")),
            Operation::Delete => f.write_str("delete"),
            Operation::RemoveWorkers { hosts } => write!(f, "remove workers {}", hosts.join(",")),
            Operation::AddHosts { masters, workers } => write!(f, "add {}", hosts_text(masters, workers)),
            Operation::RemoveHosts { masters, workers } => write!(f, "remove {}", hosts_text(masters, workers)),
            Operation::Restore { backup, .. } => write!(f, "restore etcd from {backup}"),
            Operation::Upgrade { from, to, .. } => write!(f, "upgrade {from} -> {to}"),
            Operation::Certs { certs, add_sans } if add_sans.is_empty() => write!(f, "renew {}", certs.join(",")),
            Operation::Certs { add_sans, .. } => {
                write!(f, "add SANs {} to the apiserver certificate", add_sans.join(","))
            }
        }
    }
}

fn hosts_text(masters: &[String], workers: &[String]) -> String {
    let mut parts = vec![format!("masters {}", masters.join(","))];
    if !workers.is_empty() {
        parts.push(format!("workers {}", workers.join(",")));
    }
    parts.join(", ")
}

/// A host the current operation takes out of the cluster (no longer in the shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeavingHost {
    pub host: crate::plan::phases::PlannedHost,
    pub master: bool,
}

/// Cluster secrets. Never leave the controller except inside a task for a host that needs them.
#[derive(Clone, Serialize, Deserialize)]
pub struct ClusterSecrets {
    pub pki: KubePki,
    /// The current operation's join token (see [`super::token`]).
    pub bootstrap_token: String,
    /// `sha256:` pin of the cluster CA, as `kubeadm join --discovery-token-ca-cert-hash` wants it.
    pub ca_cert_hash: String,
    /// When the current token was made (0: before fleetadm tracked it).
    #[serde(default)]
    pub token_minted_ms: u64,
    /// Ids of the tokens it replaced, deleted when the operation ends.
    #[serde(default)]
    pub retired_token_ids: Vec<String>,
}

impl std::fmt::Debug for ClusterSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSecrets").field("ca_cert_hash", &self.ca_cert_hash).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: bool,
    pub time_ms: u64,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub name: String,
    pub created_ms: u64,
    pub updated_ms: u64,
    #[serde(default)]
    pub finished_ms: u64,
    pub state: ClusterState,
    /// The phase running now (or where it stopped).
    pub phase: PhaseName,
    /// Why it failed, or a summary when it succeeded.
    #[serde(default)]
    pub message: String,
    pub spec: ClusterSpec,
    pub shape: ClusterShape,
    pub plan: Plan,
    pub secrets: ClusterSecrets,
    /// Workers that failed and were left out (within the failure budget).
    #[serde(default)]
    pub failed_workers: Vec<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The files of the cluster's bundle (a snapshot; the bundle cannot be removed while used).
    #[serde(default)]
    pub bundle_files: Vec<fleetadm_common::tasks::BundleFile>,
    /// Being taken apart (`cluster delete`): the plan is the teardown; on success the record goes.
    #[serde(default)]
    pub deleting: bool,
    /// What the current plan does.
    #[serde(default)]
    pub operation: Operation,
    /// Attempt numbers up to this one may sit in agents' task journals under ids whose records
    /// are gone (a deleted cluster of this name): new task records start above it, so an agent
    /// never answers a new task from an old journal entry.
    #[serde(default)]
    pub attempt_floor: u32,
    /// Paused by the operator (`controller op pause cluster/NAME`): no new task goes out until
    /// it is resumed; tasks already running finish. Survives a controller restart.
    #[serde(default)]
    pub paused: bool,
    /// Hosts the current operation removes (`cluster remove --masters`): out of the shape already
    /// (so the remaining hosts' tasks are rendered without them), still reachable for their own
    /// reset tasks.
    #[serde(default)]
    pub leaving: Vec<LeavingHost>,
    /// The current operation's canary (its first wave of workers), and where it stands.
    #[serde(default)]
    pub canary: Canary,
    /// Why the rollout is paused when the operator did not pause it (a passed canary).
    #[serde(default)]
    pub pause_reason: String,
    /// When the current operation (or its latest retry) started (0: before fleetadm kept it).
    #[serde(default)]
    pub op_started_ms: u64,
}

impl ClusterRecord {
    /// Seconds since the current operation started (across controller restarts), or since
    /// `fallback` when that was not recorded.
    pub fn op_secs(&self, fallback: std::time::Instant) -> f64 {
        match self.op_started_ms {
            0 => fallback.elapsed().as_secs_f64(),
            t => fleetadm_common::clock::now_unix_ms().saturating_sub(t) as f64 / 1000.0,
        }
    }
}

/// A canary: the operation's first `workers` workers go first; once they are done the rollout
/// pauses (recorded) until `op resume` or `promote_at_ms`. A canary worker that failed fails the
/// operation instead (a retry runs the canary again).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canary {
    pub workers: usize,
    /// Go on by itself this long after the canary passed (0: only `op resume`).
    pub auto_promote_secs: u64,
    /// The canary passed (it never pauses this operation again, also after a restart).
    pub passed: bool,
    /// When the paused rollout goes on by itself (0: not scheduled).
    pub promote_at_ms: u64,
}

impl Canary {
    pub fn new(workers: usize, auto_promote_secs: u64) -> Self {
        Self { workers, auto_promote_secs, passed: false, promote_at_ms: 0 }
    }
}

impl ClusterRecord {
    pub fn set_condition(&mut self, kind: &str, status: bool, message: String, now_ms: u64) {
        let c = Condition { kind: kind.to_string(), status, time_ms: now_ms, message };
        match self.conditions.iter_mut().find(|c| c.kind == kind) {
            Some(slot) => *slot = c,
            None => self.conditions.push(c),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Pending,
    Running,
    Succeeded,
    Failed,
    /// Not run because its host failed earlier (within the failure budget).
    Skipped,
}

impl TaskState {
    pub fn is_final(self) -> bool {
        matches!(self, TaskState::Succeeded | TaskState::Skipped)
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Skipped => "skipped",
        })
    }
}

/// Largest task output kept per task.
pub const MAX_OUTPUT: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: TaskId,
    pub cluster: String,
    pub phase: PhaseName,
    pub host: String,
    pub kind: StepKind,
    pub state: TaskState,
    /// 0 until first sent; incremented on every retry.
    pub attempt: u32,
    /// The attempt counter when the current operation recorded this task (attempts are counted
    /// from here against the task's limit; numbers are never reused for one id).
    #[serde(default)]
    pub first_attempt: u32,
    #[serde(default)]
    pub dispatched_ms: u64,
    #[serde(default)]
    pub finished_ms: u64,
    #[serde(default)]
    pub changed: bool,
    #[serde(default)]
    pub output: String,
    /// Why a pending task is not being sent (the agent lacks its capability), for `cluster status`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub waiting: String,
}

impl TaskRecord {
    pub fn new(id: TaskId) -> Self {
        Self {
            cluster: id.cluster.clone(),
            phase: id.phase,
            host: id.host.clone(),
            kind: id.step,
            id,
            state: TaskState::Pending,
            attempt: 0,
            first_attempt: 0,
            dispatched_ms: 0,
            finished_ms: 0,
            changed: false,
            output: String::new(),
            waiting: String::new(),
        }
    }

    /// A new record whose attempts start above `floor`.
    pub fn above(id: TaskId, floor: u32) -> Self {
        Self { attempt: floor, first_attempt: floor, ..Self::new(id) }
    }

    /// This task again, for a new operation: pending, its attempt counter kept (so the agent's
    /// journal never mistakes the new attempts for the old ones), its attempt budget renewed.
    pub fn again(mut self) -> Self {
        self.state = TaskState::Pending;
        self.first_attempt = self.attempt;
        self.dispatched_ms = 0;
        self.finished_ms = 0;
        self.changed = false;
        self.output.clear();
        self.waiting.clear();
        self
    }

    /// Attempts made in the current operation.
    pub fn attempts_made(&self) -> u32 {
        self.attempt.saturating_sub(self.first_attempt)
    }

    /// The store key.
    pub fn key(&self) -> String {
        self.id.to_string()
    }
}

/// Keep the tail of long output (the end of a failing command says most).
pub fn bound_output(s: &str) -> String {
    if s.len() <= MAX_OUTPUT {
        return s.to_string();
    }
    let mut start = s.len() - MAX_OUTPUT;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("[... {start} bytes cut ...]\n{}", &s[start..])
}

/// Parse `--max-failures N|P%` against the number of workers.
pub fn failure_budget(spec: &str, workers: usize) -> Result<usize, CountError> {
    if spec.trim().is_empty() {
        return Ok(0);
    }
    crate::plan::phases::count_or_percent("--max-failures", spec, workers, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets() {
        assert_eq!(failure_budget("", 10).unwrap(), 0);
        assert_eq!(failure_budget("2", 10).unwrap(), 2);
        assert_eq!(failure_budget("25%", 10).unwrap(), 2);
        assert_eq!(failure_budget("100%", 3).unwrap(), 3);
        assert!(failure_budget("101%", 3).is_err());
        assert!(failure_budget("some", 3).is_err());
    }

    #[test]
    fn output_keeps_the_tail_on_a_char_boundary() {
        let long = format!("{}é-end", "x".repeat(MAX_OUTPUT));
        let b = bound_output(&long);
        assert!(b.ends_with("é-end") && b.starts_with("[... "));
        assert!(b.len() < MAX_OUTPUT + 64);
        assert_eq!(bound_output("short"), "short");
    }
}

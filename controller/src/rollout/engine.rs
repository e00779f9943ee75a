//! The rollout engine: creates, resumes and deletes clusters, starts one [`Actor`] per running
//! cluster, and routes each task report to its cluster's actor (or, when the cluster is not
//! rolling out, applies it to the store directly).
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetadm_common::clock::now_unix_ms;
use fleetadm_common::pin::CaPin;
use fleetadm_common::token::BootstrapToken;
use fleetadm_proto::TaskReport;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use super::actor::{Actor, Control, Msg};
use super::record::{self, ClusterRecord, ClusterSecrets, ClusterSpec, ClusterState, Operation, TaskRecord, TaskState};
use super::report::{self, Applied};
use super::token;
use crate::audit::{Audit, NewEvent};
use crate::dispatch::events::BoxError;
use crate::dispatch::{ReportRejected, Sessions, TaskEvents};
use crate::ops::exec::Execs;
use crate::pki::kube::{KubePki, MasterIdentity, PkiSpec};
use crate::plan::phases::{self, ClusterShape, CountError, PhaseName, TaskId};
use crate::store::{
    self, get_json, list_json, list_prefix_json, put_json, update_json, Durability, Store, StoreError, Table, Update,
};

#[derive(Debug, Error)]
pub enum RolloutError {
    #[error("cluster {0} not found (see `controller cluster list`)")]
    NotFound(String),
    #[error("cluster {name} already exists ({state}); see `controller cluster status {name}`")]
    Exists { name: String, state: ClusterState },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("invalid request")]
    Budget(#[from] CountError),
    #[error("generating the cluster PKI")]
    Pki(#[from] crate::pki::kube::KubePkiError),
    #[error("the generated cluster CA cannot be pinned")]
    Pin(#[source] BoxError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Tunables (defaults suit real hosts; tests shorten them).
#[derive(Debug, Clone)]
pub struct RolloutSettings {
    /// How often an actor re-checks when nothing wakes it.
    pub tick: Duration,
    /// Added to a task's own timeout before the controller gives up on a report.
    pub grace: Duration,
    /// Pause before retrying a failed attempt.
    pub retry_delay: Duration,
    /// How long a task waits for its host to connect before it fails.
    pub offline_grace: Duration,
}

impl Default for RolloutSettings {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(1),
            grace: Duration::from_secs(30),
            retry_delay: Duration::from_secs(2),
            offline_grace: Duration::from_secs(300),
        }
    }
}

/// How an operation's workers go: waves of `size`, and a canary (its first workers alone, then
/// a pause). A plain number is waves of that size without a canary.
#[derive(Debug, Clone, Default)]
pub struct Waves {
    pub size: usize,
    pub canary: record::Canary,
}

impl From<usize> for Waves {
    fn from(size: usize) -> Self {
        Self { size, canary: record::Canary::default() }
    }
}

/// A backup schedule's rules: every 1 minute at least (or 0: none), keeping at least one.
pub fn check_schedule(every: Duration, keep: u32) -> Result<(), RolloutError> {
    if !every.is_zero() && every < Duration::from_secs(60) {
        return Err(RolloutError::Invalid("--backup-every must be at least 1m (or 0 to turn it off)".into()));
    }
    if !every.is_zero() && keep == 0 {
        return Err(RolloutError::Invalid("--keep must be at least 1 with a schedule".into()));
    }
    Ok(())
}

/// What `cluster upgrade` asks for.
#[derive(Debug, Clone, Default)]
pub struct UpgradeTo {
    /// vX.Y.Z
    pub version: String,
    /// The bundle carrying it (name and files); `None`: the hosts have it.
    pub bundle: Option<(String, Vec<fleetadm_common::tasks::BundleFile>)>,
    /// Workers at once (`None`: the cluster's wave size).
    pub wave_size: Option<usize>,
    pub canary: record::Canary,
    /// The cluster's failure budget from now on (`None`: unchanged).
    pub max_failures: Option<String>,
}

impl UpgradeTo {
    pub fn version(v: &str) -> Self {
        Self { version: v.to_string(), ..Default::default() }
    }
}

/// The canary an operation over `workers` workers really has: none when it would cover them all.
fn effective(c: record::Canary, workers: usize) -> record::Canary {
    if c.workers == 0 || c.workers >= workers {
        record::Canary::default()
    } else {
        c
    }
}

/// The inputs of a new cluster, already resolved against the enrolled nodes.
pub struct NewCluster {
    pub shape: ClusterShape,
    /// The bundle's files, when the cluster is built from one.
    pub bundle_files: Vec<fleetadm_common::tasks::BundleFile>,
    pub spec: ClusterSpec,
    pub validity: Duration,
    /// After a passed canary (`shape.canary`), go on by itself this long after (0: never).
    pub auto_promote_secs: u64,
}

/// A running actor's inbox, and whether a new operation was recorded while it was finishing
/// (then the same task starts a fresh actor for it once the old one is done).
struct Slot {
    tx: mpsc::UnboundedSender<Msg>,
    again: bool,
}

type Actors = Arc<Mutex<HashMap<String, Slot>>>;

pub struct Rollouts {
    store: Arc<dyn Store>,
    sessions: Sessions,
    settings: RolloutSettings,
    /// The running clusters' actors.
    actors: Actors,
    /// Where task outcomes (and, through [`Rollouts::audit`], admin operations) are logged.
    audit: Audit,
    /// `controller exec` runs; their reports arrive here with the rollouts'.
    execs: Arc<Execs>,
}

impl Rollouts {
    pub fn new(store: Arc<dyn Store>, sessions: Sessions, settings: RolloutSettings) -> Arc<Self> {
        let audit = Audit::new(store.clone());
        let execs = Execs::new(sessions.clone());
        Arc::new(Self { store, sessions, settings, actors: Arc::default(), audit, execs })
    }

    /// Where `controller exec` runs.
    pub fn execs(&self) -> &Arc<Execs> {
        &self.execs
    }

    /// The audit log of this store.
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    pub fn get(&self, name: &str) -> Result<ClusterRecord, RolloutError> {
        get_json(&*self.store, Table::Clusters, name)?.ok_or_else(|| RolloutError::NotFound(name.to_string()))
    }

    pub fn list(&self) -> Result<Vec<ClusterRecord>, RolloutError> {
        Ok(list_json(&*self.store, Table::Clusters)?)
    }

    /// The cluster using `bundle`, if any. A store failure is an error, never "none".
    pub fn cluster_using(&self, bundle: &str) -> Result<Option<String>, RolloutError> {
        Ok(self.list()?.into_iter().find(|c| c.shape.bundle.as_deref() == Some(bundle)).map(|c| c.name))
    }

    pub fn tasks(&self, cluster: &str) -> Result<Vec<TaskRecord>, RolloutError> {
        let all: Vec<TaskRecord> = list_prefix_json(&*self.store, Table::Tasks, &TaskId::cluster_prefix(cluster))?;
        // The prefix scan also matches clusters whose name extends this one's with a '/' (not
        // possible with valid names, but the filter keeps it exact).
        Ok(all.into_iter().filter(|t| t.cluster == cluster).collect())
    }

    fn is_running(&self, name: &str) -> bool {
        self.actors.lock().map(|a| a.contains_key(name)).unwrap_or(false)
    }

    /// Generate the cluster's secrets, persist the record and every task (flushed), and start its
    /// actor. An existing failed cluster is resumed instead: its failed and skipped tasks are
    /// tried again; finished work is kept.
    pub fn create(&self, new: NewCluster) -> Result<ClusterRecord, RolloutError> {
        let name = new.shape.name.clone();
        if let Some(old) = get_json::<ClusterRecord>(&*self.store, Table::Clusters, &name)? {
            if old.state != ClusterState::Failed {
                return Err(RolloutError::Exists { name, state: old.state });
            }
            if old.operation != Operation::Create {
                return Err(RolloutError::Invalid(format!(
                    "cluster {name} exists; its last operation ({}) failed: run that again (see `controller cluster status {name}`)",
                    old.operation
                )));
            }
            if old.shape.masters != new.shape.masters || old.shape.workers != new.shape.workers {
                return Err(RolloutError::Invalid(format!(
                    "cluster {name} failed earlier with different hosts; a retry must name the same hosts"
                )));
            }
            return self.resume_failed(old);
        }
        record::failure_budget(&new.spec.max_failures, new.shape.workers.len())?;
        let wanted: Vec<&str> =
            new.shape.masters.iter().chain(new.shape.workers.iter()).map(|h| h.node.as_str()).collect();
        for other in self.list()? {
            let taken: Vec<&str> = other
                .shape
                .masters
                .iter()
                .chain(other.shape.workers.iter())
                .map(|h| h.node.as_str())
                .filter(|n| wanted.contains(n))
                .collect();
            if !taken.is_empty() {
                return Err(RolloutError::Invalid(format!(
                    "hosts already belong to cluster {}: {}",
                    other.name,
                    taken.join(", ")
                )));
            }
        }
        let pki = KubePki::generate(&PkiSpec {
            cluster_name: name.clone(),
            masters: new.shape.masters.iter().map(|m| MasterIdentity { hostname: m.node.clone(), ip: m.ip }).collect(),
            vip: new.shape.vip,
            service_cidr: new.spec.service_cidr.clone(),
            dns_domain: new.spec.dns_domain.clone(),
            extra_sans: new.spec.extra_sans.clone(),
            validity: new.validity,
            kubernetes_version: new.spec.version.clone(),
        })?;
        let ca_cert_hash = ca_pin(&pki.ca_cert_pem)?;
        let canary = effective(record::Canary::new(new.shape.canary, new.auto_promote_secs), new.shape.workers.len());
        let mut plan = phases::build(&new.shape);
        plan.mark_canary(canary.workers, &name);
        let now = now_unix_ms();
        let attempt_floor = get_json::<u32>(&*self.store, Table::Meta, &floor_key(&name))?.unwrap_or(0);
        let rec = ClusterRecord {
            name: name.clone(),
            created_ms: now,
            updated_ms: now,
            finished_ms: 0,
            state: ClusterState::Running,
            phase: plan.phases.first().map(|p| p.name).unwrap_or(PhaseName::Preflight),
            message: String::new(),
            spec: new.spec,
            shape: new.shape,
            plan,
            secrets: ClusterSecrets {
                pki,
                bootstrap_token: BootstrapToken::generate().expose(),
                ca_cert_hash,
                token_minted_ms: now,
                retired_token_ids: vec![],
            },
            failed_workers: vec![],
            conditions: vec![],
            bundle_files: new.bundle_files,
            deleting: false,
            operation: Operation::Create,
            attempt_floor,
            paused: false,
            leaving: vec![],
            canary,
            pause_reason: String::new(),
            op_started_ms: now,
        };
        // Tasks first, the cluster record last: a crash in between leaves no half-recorded cluster.
        self.record_tasks(&rec.plan, rec.attempt_floor)?;
        put_json(&*self.store, Table::Clusters, &name, &rec, Durability::Flush)?;
        tracing::info!(cluster = %name, tasks = rec.plan.tasks().count(), "cluster recorded; rollout starting");
        self.spawn(&name);
        Ok(rec)
    }

    /// Take a cluster apart on its hosts (reset tasks), then forget it. With `force`, forget it
    /// at once without touching the hosts (for hosts that are gone).
    pub fn delete(&self, name: &str, force: bool) -> Result<Option<ClusterRecord>, RolloutError> {
        let mut rec = self.get(name)?;
        let busy = self.is_running(name);
        if force {
            if busy {
                return Err(RolloutError::Invalid(format!("cluster {name} is rolling out; wait for it to stop first")));
            }
            forget(&*self.store, name)?;
            tracing::warn!(cluster = name, "cluster forgotten without resetting its hosts (--force)");
            return Ok(None);
        }
        // Busy while its record says so (an actor that has recorded the end is only finishing).
        if rec.state == ClusterState::Running {
            return Err(RolloutError::Invalid(if rec.deleting {
                format!("cluster {name} is being deleted already (cluster status {name} --watch)")
            } else {
                format!("cluster {name} is still rolling out; wait for it to finish (cluster status {name} --watch)")
            }));
        }
        if !rec.deleting {
            let plan = phases::teardown(&rec.shape);
            self.record_tasks(&plan, rec.attempt_floor)?;
            rec.plan = plan;
            rec.deleting = true;
            rec.operation = Operation::Delete;
            rec.conditions.clear();
        }
        for mut t in self.tasks(name)? {
            if t.phase == PhaseName::Reset && matches!(t.state, TaskState::Failed | TaskState::Skipped) {
                t.state = TaskState::Pending;
                put_json(&*self.store, Table::Tasks, &t.key(), &t, Durability::Lazy)?;
            }
        }
        rec.state = ClusterState::Running;
        rec.paused = false;
        rec.phase = PhaseName::Reset;
        rec.message = "deleting".into();
        rec.failed_workers.clear();
        rec.updated_ms = now_unix_ms();
        rec.op_started_ms = rec.updated_ms;
        put_json(&*self.store, Table::Clusters, name, &rec, Durability::Flush)?;
        tracing::info!(cluster = name, "deleting cluster: resetting its hosts");
        self.spawn(name);
        Ok(Some(rec))
    }

    /// Store every task of `plan` as pending (flushed by the cluster record written after them).
    /// A task an earlier operation ran keeps its attempt counter ([`TaskRecord::again`]); a new
    /// one starts above `floor`.
    fn record_tasks(&self, plan: &phases::Plan, floor: u32) -> Result<(), RolloutError> {
        for t in plan.tasks() {
            let tr = match get_json::<TaskRecord>(&*self.store, Table::Tasks, &t.id.to_string())? {
                Some(old) => old.again(),
                None => TaskRecord::above(t.id.clone(), floor),
            };
            put_json(&*self.store, Table::Tasks, &tr.key(), &tr, Durability::Lazy)?;
        }
        Ok(())
    }

    /// Start the operation just recorded in `rec` (its plan, operation and phase set): running,
    /// unpaused, the record flushed, then its actor spawned.
    fn start(&self, rec: &mut ClusterRecord) -> Result<(), RolloutError> {
        rec.state = ClusterState::Running;
        rec.paused = false;
        rec.message = format!("{}", rec.operation);
        rec.finished_ms = 0;
        rec.updated_ms = now_unix_ms();
        rec.op_started_ms = rec.updated_ms;
        put_json(&*self.store, Table::Clusters, &rec.name, rec, Durability::Flush)?;
        tracing::info!(cluster = %rec.name, operation = %rec.operation, "operation recorded; rollout starting");
        self.spawn(&rec.name);
        Ok(())
    }

    /// `cluster add --nodes`: plan (and unless `dry_run`, start) the join of `new` workers to a
    /// cluster that is up. A failed earlier add of the same workers is resumed.
    pub fn add_workers(
        &self,
        name: &str,
        new: Vec<phases::PlannedHost>,
        waves: impl Into<Waves>,
        dry_run: bool,
    ) -> Result<(phases::Plan, Option<ClusterRecord>), RolloutError> {
        let waves: Waves = waves.into();
        let mut rec = self.get(name)?;
        if new.is_empty() {
            return Err(RolloutError::Invalid("name at least one host to add (--nodes)".into()));
        }
        let names: Vec<String> = new.iter().map(|h| h.node.clone()).collect();
        let retry = may_start(&rec, &Operation::AddWorkers { hosts: names.clone() })?;
        self.check_free(name, &names, retry)?;
        if retry {
            if dry_run {
                return Ok((rec.plan.clone(), None));
            }
            let plan = rec.plan.clone();
            return Ok((plan, Some(self.resume_failed(rec)?)));
        }
        let mut shape = rec.shape.clone();
        shape.workers.extend(new.iter().cloned());
        shape.wave_size = waves.size.max(1);
        let canary = effective(waves.canary, new.len());
        shape.canary = canary.workers;
        let mut plan = phases::add_workers(&shape, &names);
        plan.mark_canary(canary.workers, name);
        if dry_run {
            return Ok((plan, None));
        }
        record::failure_budget(&rec.spec.max_failures, shape.workers.len())?;
        self.record_tasks(&plan, rec.attempt_floor)?;
        rec.shape = shape;
        rec.plan = plan.clone();
        rec.operation = Operation::AddWorkers { hosts: names };
        rec.canary = canary;
        // Only this operation's workers may be left out.
        rec.failed_workers.clear();
        rec.conditions.retain(|c| c.kind == "Ready");
        // The join token of this operation (the create's is long gone).
        self.new_join_token(&mut rec)?;
        rec.phase = plan.phases.first().map(|p| p.name).unwrap_or(PhaseName::Preflight);
        self.start(&mut rec)?;
        Ok((plan, Some(rec)))
    }

    /// `cluster set --backup-every D --keep N`: the cluster's backup schedule (flushed). Refused
    /// while an operation runs (its actor owns the record until it ends).
    pub fn set_backup_schedule(&self, name: &str, every: Duration, keep: u32) -> Result<ClusterRecord, RolloutError> {
        let mut rec = self.get(name)?;
        if rec.state == ClusterState::Running || self.is_running(name) {
            return Err(RolloutError::Invalid(format!(
                "cluster {name} is busy ({}); change its settings when it is done",
                rec.operation
            )));
        }
        check_schedule(every, keep)?;
        rec.spec.backup_every_secs = every.as_secs();
        rec.spec.backup_keep = keep;
        rec.updated_ms = now_unix_ms();
        put_json(&*self.store, Table::Clusters, name, &rec, Durability::Flush)?;
        Ok(rec)
    }

    /// `cluster restore --snapshot ID`: plan (and unless `dry_run`, start) restoring every
    /// master's etcd from the backup `backup` (content `sha256`, `size` bytes). A failed restore
    /// of the same backup is resumed.
    pub fn restore(
        &self,
        name: &str,
        backup: &str,
        sha256: &str,
        size: u64,
        dry_run: bool,
    ) -> Result<(phases::Plan, Option<ClusterRecord>), RolloutError> {
        let mut rec = self.get(name)?;
        let op = Operation::Restore { backup: backup.to_string(), sha256: sha256.to_string(), size };
        let retry = may_start(&rec, &op)?;
        if retry {
            if dry_run {
                return Ok((rec.plan.clone(), None));
            }
            let plan = rec.plan.clone();
            return Ok((plan, Some(self.resume_failed(rec)?)));
        }
        let plan = phases::restore(&rec.shape, backup);
        if dry_run {
            return Ok((plan, None));
        }
        self.record_tasks(&plan, rec.attempt_floor)?;
        rec.plan = plan.clone();
        rec.operation = op;
        rec.failed_workers.clear();
        rec.conditions.retain(|c| c.kind == "Ready");
        rec.phase = PhaseName::RestoreEtcd;
        tracing::warn!(cluster = name, backup, "etcd restore: the control plane goes down now");
        self.start(&mut rec)?;
        Ok((plan, Some(rec)))
    }

    /// `cluster upgrade --version TO [--bundle B]`: plan (and unless `dry_run`, start) upgrading
    /// Kubernetes one minor version (or a patch). `bundle` carries the new binaries (name and
    /// files); without one the hosts must have them. `wave_size` and `max_failures` change the
    /// cluster's settings when given. A failed upgrade to the same version is resumed (a failed
    /// one cannot be left for another operation: the cluster is half upgraded).
    pub fn upgrade(
        &self,
        name: &str,
        u: UpgradeTo,
        dry_run: bool,
    ) -> Result<(phases::Plan, Option<ClusterRecord>), RolloutError> {
        let UpgradeTo { version: to, bundle, wave_size, canary, max_failures } = u;
        let to = to.as_str();
        let mut rec = self.get(name)?;
        let bundle_name = bundle.as_ref().map(|(n, _)| n.clone());
        // A retry keeps the version it started from (the record says `to` already).
        let from = match &rec.operation {
            Operation::Upgrade { from, to: t, .. } if rec.state == ClusterState::Failed && t == to => from.clone(),
            _ => rec.spec.version.clone(),
        };
        let op = Operation::Upgrade { from: from.clone(), to: to.to_string(), bundle: bundle_name.clone() };
        let retry = may_start(&rec, &op)?;
        if retry {
            if dry_run {
                return Ok((rec.plan.clone(), None));
            }
            let plan = rec.plan.clone();
            return Ok((plan, Some(self.resume_failed(rec)?)));
        }
        crate::plan::version::check_upgrade(&from, to)
            .map_err(|e| RolloutError::Invalid(format!("cluster {name}: {e}")))?;
        let mut shape = rec.shape.clone();
        shape.version = to.to_string();
        if let Some(w) = wave_size {
            shape.wave_size = w.max(1);
        }
        if let Some((b, _)) = &bundle {
            shape.bundle = Some(b.clone());
        }
        let canary = effective(canary, shape.workers.len());
        shape.canary = canary.workers;
        let mut plan = phases::upgrade(&shape, &from);
        plan.mark_canary(canary.workers, name);
        let max_failures = max_failures.unwrap_or_else(|| rec.spec.max_failures.clone());
        record::failure_budget(&max_failures, shape.workers.len())?;
        if dry_run {
            return Ok((plan, None));
        }
        self.record_tasks(&plan, rec.attempt_floor)?;
        rec.shape = shape;
        rec.spec.version = to.to_string();
        rec.spec.max_failures = max_failures;
        if let Some((_, files)) = bundle {
            rec.bundle_files = files;
        }
        rec.plan = plan.clone();
        rec.operation = op;
        rec.canary = canary;
        rec.failed_workers.clear();
        rec.conditions.retain(|c| c.kind == "Ready");
        rec.phase = plan.phases.first().map(|p| p.name).unwrap_or(PhaseName::UpgradeMasters);
        self.start(&mut rec)?;
        Ok((plan, Some(rec)))
    }

    /// Refuse hosts that belong to a cluster already (this one too, unless `retry`: a retry names
    /// the hosts its failed attempt already recorded here).
    fn check_free(&self, name: &str, names: &[String], retry: bool) -> Result<(), RolloutError> {
        for other in self.list()?.into_iter().filter(|o| !(retry && o.name == name)) {
            let taken: Vec<&str> = other
                .shape
                .masters
                .iter()
                .chain(other.shape.workers.iter())
                .chain(other.leaving.iter().map(|l| &l.host))
                .map(|h| h.node.as_str())
                .filter(|n| names.iter().any(|m| m == n))
                .collect();
            if !taken.is_empty() {
                let whose =
                    if other.name == name { "this cluster".to_string() } else { format!("cluster {}", other.name) };
                return Err(RolloutError::Invalid(format!("hosts already belong to {whose}: {}", taken.join(", "))));
            }
        }
        Ok(())
    }

    /// `cluster add --masters [--nodes]`: plan (and unless `dry_run`, start) joining masters
    /// (and workers) to a cluster that is up. The apiserver certificate is reissued with the new
    /// masters' names (recorded with the operation); kubeadm's control-plane join adds each to
    /// etcd. A failed earlier add of the same hosts is resumed.
    pub fn add_masters(
        &self,
        name: &str,
        masters: Vec<phases::PlannedHost>,
        workers: Vec<phases::PlannedHost>,
        waves: impl Into<Waves>,
        dry_run: bool,
    ) -> Result<(phases::Plan, Option<ClusterRecord>), RolloutError> {
        let waves: Waves = waves.into();
        let mut rec = self.get(name)?;
        if masters.is_empty() {
            return self.add_workers(name, workers, waves, dry_run);
        }
        let m_names: Vec<String> = masters.iter().map(|h| h.node.clone()).collect();
        let w_names: Vec<String> = workers.iter().map(|h| h.node.clone()).collect();
        if let Some(both) = m_names.iter().find(|m| w_names.contains(m)) {
            return Err(RolloutError::Invalid(format!("{both} is named as a master and as a worker")));
        }
        let op = Operation::AddHosts { masters: m_names.clone(), workers: w_names.clone() };
        let retry = may_start(&rec, &op)?;
        let all: Vec<String> = m_names.iter().chain(w_names.iter()).cloned().collect();
        self.check_free(name, &all, retry)?;
        if retry {
            if dry_run {
                return Ok((rec.plan.clone(), None));
            }
            let plan = rec.plan.clone();
            return Ok((plan, Some(self.resume_failed(rec)?)));
        }
        let mut shape = rec.shape.clone();
        shape.masters.extend(masters.iter().cloned());
        shape.workers.extend(workers.iter().cloned());
        shape.wave_size = waves.size.max(1);
        let canary = effective(waves.canary, workers.len());
        shape.canary = canary.workers;
        let mut plan = phases::add_hosts(&shape, &m_names, &w_names);
        plan.mark_canary(canary.workers, name);
        if dry_run {
            return Ok((plan, None));
        }
        record::failure_budget(&rec.spec.max_failures, shape.workers.len())?;
        // The apiserver certificate valid for the new masters, and their own etcd certificates.
        let mut grown = rec.clone();
        grown.shape = shape.clone();
        let spec = super::certs::pki_spec(&grown, &rec.spec.extra_sans);
        let pki = rec.secrets.pki.reissue(&spec, &["apiserver"])?;
        self.record_tasks(&plan, rec.attempt_floor)?;
        rec.secrets.pki = pki;
        rec.shape = shape;
        rec.plan = plan.clone();
        rec.operation = op;
        rec.canary = canary;
        rec.failed_workers.clear();
        rec.conditions.retain(|c| c.kind == "Ready");
        self.new_join_token(&mut rec)?;
        rec.phase = plan.phases.first().map(|p| p.name).unwrap_or(PhaseName::Preflight);
        self.start(&mut rec)?;
        Ok((plan, Some(rec)))
    }

    /// Pause, resume or abort the cluster's running rollout (`controller op ... cluster/NAME`).
    pub async fn control(&self, name: &str, action: Control) -> Result<ClusterRecord, RolloutError> {
        let rec = self.get(name)?;
        let tx = self.actors.lock().ok().and_then(|a| a.get(name).map(|s| s.tx.clone()));
        let not_running = || {
            RolloutError::Invalid(format!(
                "cluster/{name} is not running ({}: {}); nothing to {}",
                rec.state,
                rec.operation,
                format!("{action:?}").to_lowercase()
            ))
        };
        if rec.state != ClusterState::Running {
            return Err(not_running());
        }
        let tx = tx.ok_or_else(not_running)?;
        let (reply, answer) = oneshot::channel();
        tx.send(Msg::Control { action, reply }).map_err(|_| not_running())?;
        answer.await.map_err(|_| not_running())?.map_err(RolloutError::Invalid)
    }

    /// `cluster remove --nodes`: plan (and unless `dry_run`, start) taking workers out of a
    /// cluster that is up. `refs` are node names or addresses of the cluster's hosts. A failed
    /// earlier removal of the same workers is resumed.
    pub fn remove_workers(
        &self,
        name: &str,
        refs: &[String],
        drain: bool,
        force: bool,
        dry_run: bool,
    ) -> Result<(phases::Plan, Option<ClusterRecord>), RolloutError> {
        self.remove_hosts(name, &[], refs, drain, force, dry_run)
    }

    /// `cluster remove --masters M [--nodes W]`: see [`phases::remove_hosts`]. The last master is
    /// refused; removing master0 makes the first remaining master the reference.
    pub fn remove_hosts(
        &self,
        name: &str,
        master_refs: &[String],
        refs: &[String],
        drain: bool,
        force: bool,
        dry_run: bool,
    ) -> Result<(phases::Plan, Option<ClusterRecord>), RolloutError> {
        let with_masters = !master_refs.is_empty();
        let mut rec = self.get(name)?;
        if with_masters {
            return self.remove_masters(rec, master_refs, refs, drain, force, dry_run);
        }
        if refs.is_empty() {
            return Err(RolloutError::Invalid("name at least one worker to remove (--nodes)".into()));
        }
        let of = |h: &phases::PlannedHost, r: &str| h.node == r || h.ip.to_string() == r;
        let mut leaving: Vec<phases::PlannedHost> = Vec::new();
        let (mut masters, mut unknown) = (Vec::new(), Vec::new());
        for r in refs {
            if let Some(m) = rec.shape.masters.iter().find(|m| of(m, r)) {
                masters.push(m.node.clone());
            } else if let Some(w) = rec.shape.workers.iter().find(|w| of(w, r)) {
                if !leaving.contains(w) {
                    leaving.push(w.clone());
                }
            } else {
                unknown.push(r.clone());
            }
        }
        if !masters.is_empty() && !with_masters {
            return Err(RolloutError::Invalid(format!(
                "{} {} of cluster {name}: name masters with --masters",
                masters.join(", "),
                if masters.len() == 1 { "is a master" } else { "are masters" }
            )));
        }
        if !unknown.is_empty() {
            let elsewhere: Vec<String> = self
                .list()?
                .iter()
                .filter(|o| o.name != name)
                .flat_map(|o| {
                    o.shape
                        .masters
                        .iter()
                        .chain(o.shape.workers.iter())
                        .filter(|h| unknown.iter().any(|u| of(h, u)))
                        .map(|h| format!("{} (cluster {})", h.node, o.name))
                        .collect::<Vec<_>>()
                })
                .collect();
            let mut msg = format!("not workers of cluster {name}: {}", unknown.join(", "));
            if !elsewhere.is_empty() {
                msg.push_str(&format!("; they belong to {}", elsewhere.join(", ")));
            }
            return Err(RolloutError::Invalid(msg));
        }
        let names: Vec<String> = leaving.iter().map(|h| h.node.clone()).collect();
        let op = Operation::RemoveWorkers { hosts: names.clone() };
        let retry = may_start(&rec, &op)?;
        let plan = phases::remove_workers(&rec.shape, &leaving, drain, force);
        if dry_run {
            return Ok((plan, None));
        }
        if retry && !force && rec.plan == plan {
            let plan = rec.plan.clone();
            return Ok((plan, Some(self.resume_failed(rec)?)));
        }
        self.record_tasks(&plan, rec.attempt_floor)?;
        rec.plan = plan.clone();
        rec.operation = op;
        rec.failed_workers.retain(|w| !names.contains(w));
        rec.conditions.retain(|c| c.kind == "Ready");
        rec.phase = plan.phases.first().map(|p| p.name).unwrap_or(PhaseName::Reset);
        self.start(&mut rec)?;
        Ok((plan, Some(rec)))
    }

    /// `cluster certs --renew/--add-san`: reissue the named certificates (and, with SANs, the
    /// apiserver certificate with them) from the cluster's CAs, keeping its validity, record the
    /// new PKI with the operation (flushed), and install it master by master. A failed earlier
    /// run of the same operation is resumed with the certificates it already issued.
    pub fn renew_certs(
        &self,
        name: &str,
        renew: &[String],
        add_sans: &[String],
        dry_run: bool,
    ) -> Result<(phases::Plan, Option<ClusterRecord>), RolloutError> {
        let mut rec = self.get(name)?;
        if renew.is_empty() && add_sans.is_empty() {
            return Err(RolloutError::Invalid("name certificates to --renew (or all), or a SAN to --add-san".into()));
        }
        let mut certs = super::certs::expand(&rec, renew).map_err(RolloutError::Invalid)?;
        let mut sans = Vec::new();
        for s in add_sans {
            let s = super::certs::check_san(s).map_err(RolloutError::Invalid)?;
            if !sans.contains(&s) {
                sans.push(s);
            }
        }
        if !sans.is_empty() && !certs.iter().any(|c| c == "apiserver") {
            certs.push("apiserver".into());
            certs.sort();
        }
        let op = Operation::Certs { certs: certs.clone(), add_sans: sans.clone() };
        let retry = may_start(&rec, &op)?;
        if retry {
            // Resumed with the certificates issued when it first ran (some masters have them).
            if dry_run {
                return Ok((rec.plan.clone(), None));
            }
            let plan = rec.plan.clone();
            return Ok((plan, Some(self.resume_failed(rec)?)));
        }
        let mut all_sans = rec.spec.extra_sans.clone();
        all_sans.extend(sans.iter().filter(|s| !rec.spec.extra_sans.contains(s)).cloned());
        let spec = super::certs::pki_spec(&rec, &all_sans);
        let names: Vec<&str> = certs.iter().map(String::as_str).collect();
        let pki = rec.secrets.pki.reissue(&spec, &names)?;
        let ip = rec
            .shape
            .masters
            .first()
            .map(|m| m.ip)
            .ok_or_else(|| RolloutError::Invalid(format!("cluster {name} has no masters")))?;
        let pods: Vec<&str> = super::certs::pods(&certs, ip).into_iter().map(|(p, _)| p).collect();
        let plan = phases::certs(&rec.shape, &certs.join(", "), &pods);
        if dry_run {
            return Ok((plan, None));
        }
        self.record_tasks(&plan, rec.attempt_floor)?;
        rec.secrets.pki = pki;
        rec.spec.extra_sans = all_sans;
        if rec.spec.cert_validity_secs == 0 {
            rec.spec.cert_validity_secs = spec.validity.as_secs();
        }
        rec.plan = plan.clone();
        rec.operation = op;
        rec.failed_workers.clear();
        rec.conditions.retain(|c| c.kind == "Ready");
        rec.phase = PhaseName::Certificates;
        self.start(&mut rec)?;
        Ok((plan, Some(rec)))
    }

    fn remove_masters(
        &self,
        mut rec: ClusterRecord,
        master_refs: &[String],
        refs: &[String],
        drain: bool,
        force: bool,
        dry_run: bool,
    ) -> Result<(phases::Plan, Option<ClusterRecord>), RolloutError> {
        let name = rec.name.clone();
        if force {
            return Err(RolloutError::Invalid(
                "--force is for workers that are gone; a master leaves etcd through its own reset".into(),
            ));
        }
        // A failed removal is retried with the same names: they are among the leaving hosts.
        let leaving_now = |r: &str| rec.leaving.iter().any(|l| l.host.node == r || l.host.ip.to_string() == r);
        if rec.state == ClusterState::Failed
            && matches!(rec.operation, Operation::RemoveHosts { .. })
            && master_refs.iter().chain(refs).all(|r| leaving_now(r))
        {
            may_start(&rec, &rec.operation.clone())?;
            if dry_run {
                return Ok((rec.plan.clone(), None));
            }
            let plan = rec.plan.clone();
            return Ok((plan, Some(self.resume_failed(rec)?)));
        }
        let of = |h: &phases::PlannedHost, r: &str| h.node == r || h.ip.to_string() == r;
        let (mut masters, mut workers, mut wrong) = (Vec::new(), Vec::new(), Vec::new());
        for r in master_refs {
            match rec.shape.masters.iter().find(|m| of(m, r)) {
                Some(m) if !masters.contains(m) => masters.push(m.clone()),
                Some(_) => {}
                None if rec.shape.workers.iter().any(|w| of(w, r)) => wrong.push(format!("{r} is a worker (--nodes)")),
                None => wrong.push(format!("{r} is not a master of cluster {name}")),
            }
        }
        for r in refs {
            match rec.shape.workers.iter().find(|w| of(w, r)) {
                Some(w) if !workers.contains(w) => workers.push(w.clone()),
                Some(_) => {}
                None if rec.shape.masters.iter().any(|m| of(m, r)) => {
                    wrong.push(format!("{r} is a master (--masters)"))
                }
                None => wrong.push(format!("{r} is not a worker of cluster {name}")),
            }
        }
        if !wrong.is_empty() {
            return Err(RolloutError::Invalid(wrong.join("; ")));
        }
        if masters.len() == rec.shape.masters.len() {
            return Err(RolloutError::Invalid(format!(
                "cluster {name} would have no master left; delete the cluster instead (cluster delete {name})"
            )));
        }
        let m_names: Vec<String> = masters.iter().map(|h| h.node.clone()).collect();
        let w_names: Vec<String> = workers.iter().map(|h| h.node.clone()).collect();
        let op = Operation::RemoveHosts { masters: m_names.clone(), workers: w_names.clone() };
        may_start(&rec, &op)?;
        let mut shape = rec.shape.clone();
        shape.masters.retain(|m| !m_names.contains(&m.node));
        shape.workers.retain(|w| !w_names.contains(&w.node));
        let plan = phases::remove_hosts(&shape, &masters, &workers, drain);
        if dry_run {
            return Ok((plan, None));
        }
        self.record_tasks(&plan, rec.attempt_floor)?;
        if rec.shape.masters.first().map(|m| &m.node) != shape.masters.first().map(|m| &m.node) {
            tracing::warn!(cluster = %name, new_master0 = %shape.masters[0].node, "master0 leaves; the first remaining master is the reference from now on");
        }
        rec.leaving = masters
            .into_iter()
            .map(|host| record::LeavingHost { host, master: true })
            .chain(workers.into_iter().map(|host| record::LeavingHost { host, master: false }))
            .collect();
        rec.shape = shape;
        rec.plan = plan.clone();
        rec.operation = op;
        rec.failed_workers.clear();
        rec.conditions.retain(|c| c.kind == "Ready");
        rec.phase = plan.phases.first().map(|p| p.name).unwrap_or(PhaseName::Reset);
        self.start(&mut rec)?;
        Ok((plan, Some(rec)))
    }

    fn resume_failed(&self, mut rec: ClusterRecord) -> Result<ClusterRecord, RolloutError> {
        for mut t in self.tasks(&rec.name)? {
            if matches!(t.state, TaskState::Failed | TaskState::Skipped) {
                t.state = TaskState::Pending;
                put_json(&*self.store, Table::Tasks, &t.key(), &t, Durability::Lazy)?;
            }
        }
        // A retry is a new operation: its own join token (the failed one's may have expired).
        self.new_join_token(&mut rec)?;
        rec.state = ClusterState::Running;
        rec.paused = false;
        rec.failed_workers.clear();
        rec.message = "retrying after a failure".into();
        rec.updated_ms = now_unix_ms();
        rec.op_started_ms = rec.updated_ms;
        rec.finished_ms = 0;
        put_json(&*self.store, Table::Clusters, &rec.name, &rec, Durability::Flush)?;
        tracing::info!(cluster = %rec.name, "resuming a failed rollout");
        self.spawn(&rec.name);
        Ok(rec)
    }

    /// Give the cluster's operation a new join token, and make its `join-token` task (if the
    /// plan has one) create it again. The record is written by the caller (flushed, after the
    /// task written here).
    fn new_join_token(&self, rec: &mut ClusterRecord) -> Result<(), RolloutError> {
        let Some(task) = rec.plan.tasks().find(|t| t.kind() == phases::StepKind::JoinToken).map(|t| t.id.clone())
        else {
            return Ok(());
        };
        token::mint(&mut rec.secrets, now_unix_ms());
        // Pending even if it was running: the next attempt creates the new token (an answer to
        // the old attempt is for the old token and is ignored).
        if let Some(mut t) = get_json::<TaskRecord>(&*self.store, Table::Tasks, &task.to_string())? {
            t.state = TaskState::Pending;
            put_json(&*self.store, Table::Tasks, &t.key(), &t, Durability::Lazy)?;
        }
        tracing::info!(cluster = %rec.name, "new join token for this operation");
        Ok(())
    }

    /// Restart the actors of every cluster that was running when the controller stopped.
    pub fn resume_all(&self) -> Result<usize, RolloutError> {
        let mut n = 0;
        for mut rec in self.list()? {
            if rec.state == ClusterState::Running {
                // Stopped long enough for the token to be half gone: the joins left get a new one.
                if !rec.deleting && token::stale(&rec.secrets, now_unix_ms()) {
                    self.new_join_token(&mut rec)?;
                    put_json(&*self.store, Table::Clusters, &rec.name, &rec, Durability::Flush)?;
                }
                tracing::info!(cluster = %rec.name, phase = %rec.phase, "resuming rollout after restart");
                self.spawn(&rec.name);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Start the cluster's actor unless it runs already (an actor that is finishing starts a new
    /// one for the newly recorded operation when it is done). Call within the tokio runtime.
    fn spawn(&self, name: &str) {
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let Ok(mut actors) = self.actors.lock() else { return };
            if let Some(slot) = actors.get_mut(name) {
                slot.again = true;
                return;
            }
            actors.insert(name.to_string(), Slot { tx, again: false });
        }
        let (store, sessions, settings, actors, audit) =
            (self.store.clone(), self.sessions.clone(), self.settings.clone(), self.actors.clone(), self.audit.clone());
        let name = name.to_string();
        tokio::spawn(async move {
            let mut rx = rx;
            loop {
                let (leftovers, next) = match Actor::load(
                    &name,
                    store.clone(),
                    sessions.clone(),
                    settings.clone(),
                    audit.clone(),
                    rx,
                )
                .await
                {
                    Ok(mut actor) => {
                        run_to_end(&mut actor, &store).await;
                        // Unregister first, then answer what was queued from the store: everything
                        // this actor wrote is there, and new reports no longer reach it.
                        let next = unregister(&actors, &name);
                        (Some(actor.close()), next)
                    }
                    Err(e) => {
                        tracing::error!(cluster = %name, error = %fleetadm_common::error_chain(&e), "cannot start the rollout");
                        (None, unregister(&actors, &name))
                    }
                };
                if let Some(mut old) = leftovers {
                    old.close();
                    while let Some(m) = old.recv().await {
                        match m {
                            Msg::Report { id, node, report, reply } => {
                                let _ = reply.send(report_to_store(store.clone(), &audit, id, node, *report).await);
                            }
                            Msg::Control { reply, .. } => {
                                let _ = reply.send(Err(format!("cluster/{name}: its rollout has just finished")));
                            }
                            Msg::HostChanged => {}
                        }
                    }
                }
                match next {
                    Some(new_rx) => {
                        tracing::info!(cluster = %name, "starting the next operation's rollout");
                        rx = new_rx;
                    }
                    None => break,
                }
            }
        });
    }
}

/// May a day-2 operation `op` start on the cluster now? `Ok(true)` when it retries the same
/// operation that failed last; refused while another runs, during a delete, or after a different
/// operation failed (that one is retried first).
fn may_start(rec: &ClusterRecord, op: &Operation) -> Result<bool, RolloutError> {
    let name = &rec.name;
    // Busy while its record says so (an actor that has recorded the end is only finishing).
    if rec.state == ClusterState::Running {
        return Err(RolloutError::Invalid(format!(
            "cluster {name} is busy ({}); wait for it to finish (cluster status {name} --watch)",
            rec.operation
        )));
    }
    if rec.deleting {
        return Err(RolloutError::Invalid(format!("cluster {name} is being deleted")));
    }
    let retry = rec.state == ClusterState::Failed && &rec.operation == op;
    if rec.state == ClusterState::Failed && !retry {
        return Err(RolloutError::Invalid(format!(
            "cluster {name}: its last operation ({}) failed: {}; retry that first",
            rec.operation, rec.message
        )));
    }
    Ok(retry)
}

/// Drive the plan, then record the outcome (or, for a finished teardown, forget the cluster).
async fn run_to_end(actor: &mut Actor, store: &Arc<dyn Store>) {
    let name = actor.rec.name.clone();
    let (state, message) = match actor.drive().await {
        Ok(_) if actor.rec.deleting => {
            let (s, n) = (store.clone(), name.clone());
            match store::off_thread(move || forget(&*s, &n)).await {
                Ok(()) => tracing::info!(cluster = %name, "cluster deleted"),
                Err(e) => {
                    tracing::error!(cluster = %name, error = %fleetadm_common::error_chain(&e), "could not forget the cluster")
                }
            }
            return;
        }
        Ok(summary) => (ClusterState::Succeeded, summary),
        Err(stop) => (ClusterState::Failed, stop.chain()),
    };
    // the operation's own duration (the cluster's age for records from before it was kept)
    let since = if actor.rec.op_started_ms > 0 { actor.rec.op_started_ms } else { actor.rec.created_ms };
    let took = fleetadm_common::clock::now_unix_ms().saturating_sub(since) as f64 / 1000.0;
    crate::metrics::metrics().rollout_finished(&name, &state.to_string(), took);
    match actor.finish(state, &message).await {
        Ok(()) if state == ClusterState::Succeeded => tracing::info!(cluster = %name, "{message}"),
        Ok(()) => tracing::error!(cluster = %name, "rollout failed: {message}"),
        Err(e) => {
            tracing::error!(cluster = %name, error = %fleetadm_common::error_chain(&e), "could not record the end of the rollout")
        }
    }
}

/// Remove a finished actor's slot; when a new operation was recorded meanwhile, give the slot a
/// new inbox instead and return it (the caller runs the next actor on it).
fn unregister(actors: &Actors, name: &str) -> Option<mpsc::UnboundedReceiver<Msg>> {
    let mut a = actors.lock().ok()?;
    match a.get_mut(name) {
        Some(slot) if slot.again => {
            let (tx, rx) = mpsc::unbounded_channel();
            *slot = Slot { tx, again: false };
            Some(rx)
        }
        _ => {
            a.remove(name);
            None
        }
    }
}

/// Where the highest attempt number of a forgotten cluster's tasks is kept (see
/// [`ClusterRecord::attempt_floor`]).
fn floor_key(cluster: &str) -> String {
    format!("attempt-floor/{cluster}")
}

/// Remove a cluster's record and tasks, keeping the attempt numbers they used: a new cluster of
/// this name numbers its attempts above them (the agents' journals still hold the old ones).
fn forget(store: &dyn Store, name: &str) -> Result<(), RolloutError> {
    let tasks: Vec<TaskRecord> = list_prefix_json(store, Table::Tasks, &TaskId::cluster_prefix(name))?;
    let tasks: Vec<TaskRecord> = tasks.into_iter().filter(|t| t.cluster == name).collect();
    let old = get_json::<u32>(store, Table::Meta, &floor_key(name))?.unwrap_or(0);
    let rec_floor = get_json::<ClusterRecord>(store, Table::Clusters, name)?.map(|r| r.attempt_floor).unwrap_or(0);
    let floor = tasks.iter().map(|t| t.attempt).chain([old, rec_floor]).max().unwrap_or(0);
    put_json(store, Table::Meta, &floor_key(name), &floor, Durability::Flush)?;
    for t in &tasks {
        store.remove(Table::Tasks, &t.key(), Durability::Lazy)?;
    }
    store.remove(Table::Clusters, name, Durability::Flush)?;
    Ok(())
}

/// A report for a cluster without a running actor: applied to the stored task (a late outcome of
/// an attempt that was still running when its rollout stopped), or refused.
async fn report_to_store(
    store: Arc<dyn Store>,
    audit: &Audit,
    id: TaskId,
    node: String,
    r: TaskReport,
) -> Result<(), ReportRejected> {
    let audit = audit.clone();
    store::off_thread(move || {
        let key = id.to_string();
        // Progress is cheap to lose (the next report repeats it); outcomes are flushed.
        let progress = r.state == fleetadm_proto::TaskState::Running as i32;
        let durability = if progress { Durability::Lazy } else { Durability::Flush };
        let mut outcome = None;
        let updated = update_json(&*store, Table::Tasks, &key, durability, |cur: Option<TaskRecord>| {
            let mut t = cur.ok_or_else(|| ReportRejected::UnknownTask(key.clone()))?;
            Ok(match report::apply(&mut t, &node, &r, now_unix_ms())? {
                Applied::Ignored => Update::Keep,
                Applied::Progress => Update::Put(t),
                Applied::Outcome => {
                    outcome = Some(task_event(&t, &format!("node:{node}")));
                    Update::Put(t)
                }
            })
        })
        .map_err(|e| ReportRejected::Internal(Box::new(e)))?;
        if let Some(e) = outcome {
            audit.record(e, Durability::Lazy)?;
        }
        updated.map(|_| ())
    })
    .await
}

impl From<StoreError> for ReportRejected {
    fn from(e: StoreError) -> Self {
        ReportRejected::Internal(Box::new(e))
    }
}

#[tonic::async_trait]
impl TaskEvents for Rollouts {
    async fn task_report(&self, node: &str, report: TaskReport) -> Result<(), ReportRejected> {
        if let Some(r) = self.execs.route(node, &report) {
            return r;
        }
        let id: TaskId = report.task_id.parse().map_err(|_| ReportRejected::UnknownTask(report.task_id.clone()))?;
        if id.host != node {
            return Err(ReportRejected::NotYours {
                task: report.task_id.clone(),
                owner: id.host.clone(),
                caller: node.to_string(),
            });
        }
        let actor = self.actors.lock().ok().and_then(|a| a.get(&id.cluster).map(|s| s.tx.clone()));
        if let Some(tx) = actor {
            let (reply, answer) = oneshot::channel();
            let msg = Msg::Report { id: id.clone(), node: node.to_string(), report: Box::new(report.clone()), reply };
            if tx.send(msg).is_ok() {
                if let Ok(r) = answer.await {
                    return r;
                }
            }
        }
        report_to_store(self.store.clone(), &self.audit, id, node.to_string(), report).await
    }

    fn session_opened(&self, _node: &str) {
        let actors: Vec<_> = self.actors.lock().map(|a| a.values().map(|s| s.tx.clone()).collect()).unwrap_or_default();
        for tx in actors {
            let _ = tx.send(Msg::HostChanged);
        }
    }

    fn node_uses_bundle(&self, node: &str, bundle: &str) -> Result<bool, BoxError> {
        if self.execs.grants_bundle(node, bundle) {
            return Ok(true);
        }
        Ok(self.list().map_err(Box::new)?.iter().any(|c| {
            c.shape.bundle.as_deref() == Some(bundle)
                && c.shape.masters.iter().chain(c.shape.workers.iter()).any(|h| h.node == node)
        }))
    }
}

/// The audit event for a task that reached an outcome.
pub(super) fn task_event(t: &TaskRecord, actor: &str) -> NewEvent {
    let last = t.output.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    NewEvent::new(actor, "task", t.id.to_string())
        .cluster(t.cluster.clone())
        .result(format!("{} (attempt {})", t.state, t.attempt))
        .detail(last.chars().take(300).collect::<String>())
}

fn ca_pin(pem: &str) -> Result<String, RolloutError> {
    let mut rd = pem.as_bytes();
    let der = match rustls_pemfile::certs(&mut rd).next() {
        Some(Ok(c)) => c.to_vec(),
        _ => return Err(RolloutError::Pin("the cluster CA certificate is not PEM".into())),
    };
    Ok(CaPin::of_cert_der(&der).map_err(|e| RolloutError::Pin(Box::new(e)))?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::sessions::SessionMeta;
    use crate::plan::phases::{PlannedHost, StepKind};
    use crate::store::SledStore;
    use fleetadm_proto::{server_event, task_assignment, TaskKind, TaskState as WireState};
    use tokio_stream::StreamExt;

    fn new_cluster() -> NewCluster {
        let h = |n: &str, ip: &str| PlannedHost { node: n.into(), ip: ip.parse().unwrap() };
        NewCluster {
            shape: ClusterShape {
                name: "lab".into(),
                version: "v1.29.9".into(),
                vip: "10.103.97.2".parse().unwrap(),
                masters: vec![h("m1", "10.0.0.1")],
                workers: vec![h("w1", "10.0.0.2")],
                wave_size: 1,
                bundle: None,
                canary: 0,
            },
            bundle_files: vec![],
            spec: ClusterSpec {
                version: "v1.29.9".into(),
                pod_cidr: "100.64.0.0/10".into(),
                service_cidr: "10.96.0.0/22".into(),
                dns_domain: "cluster.local".into(),
                clusterfile: String::new(),
                max_failures: "0".into(),
                cgroup_driver: "systemd".into(),
                cri_socket: "unix:///run/containerd/containerd.sock".into(),
                image_repository: "registry.k8s.io".into(),
                cert_validity_secs: 3600,
                extra_sans: vec![],
                backup_every_secs: 0,
                backup_keep: 0,
            },
            validity: Duration::from_secs(3600),
            auto_promote_secs: 0,
        }
    }

    fn fast() -> RolloutSettings {
        RolloutSettings { tick: Duration::from_millis(20), ..Default::default() }
    }

    fn report(id: &str, attempt: u32, state: WireState) -> TaskReport {
        TaskReport {
            task_id: id.into(),
            attempt,
            state: state as i32,
            output: "out".into(),
            changed: true,
            ..Default::default()
        }
    }

    fn meta(version: &str, caps: Vec<String>) -> SessionMeta {
        SessionMeta {
            peer: "127.0.0.1:1".into(),
            agent_version: version.into(),
            protocol: 1,
            capabilities: caps.into_iter().collect(),
            peer_port: 0,
        }
    }

    fn stored(store: &Arc<dyn Store>, id: &str) -> TaskRecord {
        get_json(&**store, Table::Tasks, id).unwrap().unwrap()
    }

    async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..250 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn reports_reach_the_actor_only_from_the_tasks_own_host() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let sessions = Sessions::new(|_| {});
        let r = Rollouts::new(store.clone(), sessions.clone(), fast());
        let rec = r.create(new_cluster()).unwrap();
        assert_eq!(rec.state, ClusterState::Running);
        let id = "lab/preflight/m1/preflight";
        // Nothing is connected, so the task is still pending: a report for it changes nothing.
        r.task_report("m1", report(id, 1, WireState::Succeeded)).await.unwrap();
        assert_eq!(stored(&store, id).state, TaskState::Pending);
        assert!(matches!(
            r.task_report("w1", report(id, 1, WireState::Succeeded)).await,
            Err(ReportRejected::NotYours { .. })
        ));
        assert!(matches!(
            r.task_report("m1", report("lab/nope", 1, WireState::Failed)).await,
            Err(ReportRejected::UnknownTask(_))
        ));
        assert!(matches!(
            r.task_report("m1", report("lab/preflight/m1/lb", 1, WireState::Failed)).await,
            Err(ReportRejected::UnknownTask(_))
        ));

        // m1 connects with every capability: its preflight task arrives, typed.
        let (_sid, _tx, mut stream) = sessions.open("m1", meta("0.1.0", TaskKind::all_capabilities()), 0, 16);
        r.session_opened("m1");
        let ev = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap();
        let Some(server_event::Event::Task(a)) = ev.event else { panic!("expected a task: {ev:?}") };
        assert_eq!(a.task_id, id);
        assert!(matches!(a.task, Some(task_assignment::Task::Preflight(_))), "{a:?}");
        assert_eq!(stored(&store, id).state, TaskState::Running, "recorded before it was sent");
        r.task_report("m1", report(id, a.attempt, WireState::Running)).await.unwrap();
        r.task_report("m1", report(id, a.attempt + 1, WireState::Failed)).await.unwrap();
        assert_eq!(stored(&store, id).state, TaskState::Running, "a report for another attempt is ignored");
        assert!(matches!(
            r.task_report("m1", report(id, a.attempt, WireState::Unspecified)).await,
            Err(ReportRejected::Invalid(_))
        ));
        r.task_report("m1", report(id, a.attempt, WireState::Succeeded)).await.unwrap();
        let t = stored(&store, id);
        assert_eq!((t.state, t.changed, t.output.as_str()), (TaskState::Succeeded, true, "out"));

        // The secrets never appear in the admin view.
        let view = super::super::view::build(&r.get("lab").unwrap(), &r.tasks("lab").unwrap(), true);
        let dbg = format!("{view:?}");
        assert!(!dbg.contains("PRIVATE KEY") && !dbg.contains(&rec.secrets.bootstrap_token));
        // Hosts of a running cluster cannot be claimed by another.
        let mut other = new_cluster();
        other.shape.name = "other".into();
        assert!(matches!(r.create(other), Err(RolloutError::Invalid(m)) if m.contains("already belong")));
        assert!(matches!(r.create(new_cluster()), Err(RolloutError::Exists { .. })));
    }

    #[tokio::test]
    async fn a_rollout_resumed_with_a_half_spent_join_token_gets_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let sessions = Sessions::new(|_| {});
        let r = Rollouts::new(store.clone(), sessions.clone(), fast());
        let rec = r.create(new_cluster()).unwrap();
        assert!(!token::stale(&rec.secrets, now_unix_ms()), "a new operation starts with a new token");
        let jt = "lab/join-token/m1/join-token";
        assert_eq!(stored(&store, jt).state, TaskState::Pending);
        // As if the controller had stopped mid-rollout, with the token made 90 minutes ago and
        // its task done.
        let mut old = r.get("lab").unwrap();
        old.secrets.token_minted_ms = now_unix_ms() - 90 * 60 * 1000;
        put_json(&*store, Table::Clusters, "lab", &old, Durability::Flush).unwrap();
        let mut t = stored(&store, jt);
        (t.state, t.attempt) = (TaskState::Succeeded, 1);
        put_json(&*store, Table::Tasks, jt, &t, Durability::Flush).unwrap();
        let r2 = Rollouts::new(store.clone(), sessions.clone(), fast());
        assert_eq!(r2.resume_all().unwrap(), 1);
        let now = r2.get("lab").unwrap();
        assert_ne!(now.secrets.bootstrap_token, old.secrets.bootstrap_token);
        assert_eq!(now.secrets.retired_token_ids, vec![token::id_of(&old.secrets.bootstrap_token).to_string()]);
        assert_eq!(stored(&store, jt).state, TaskState::Pending, "the new token is created before the joins left");
        // The end of the operation deletes both.
        let drop = rec.plan.tasks().find(|t| t.kind() == StepKind::DropToken).unwrap().clone();
        let Ok(task_assignment::Task::KubeadmToken(d)) = super::super::specs::spec_for(&now, &drop) else {
            panic!("drop-token is a kubeadm-token task")
        };
        assert_eq!(d.delete_ids.len(), 2);
        assert!(d.token.is_empty(), "{d:?}");
    }

    /// Plays an agent that succeeds at every task it is sent.
    fn obliging_agent(
        r: &Arc<Rollouts>,
        sessions: &Sessions,
        node: &str,
        caps: Vec<String>,
    ) -> tokio::task::JoinHandle<()> {
        let (_sid, tx, mut stream) = sessions.open(node, meta("0.9.0", caps), 0, 64);
        r.session_opened(node);
        let (r, node) = (r.clone(), node.to_string());
        tokio::spawn(async move {
            let _keep = tx;
            while let Some(Ok(ev)) = stream.next().await {
                if let Some(server_event::Event::Task(a)) = ev.event {
                    let _ = r.task_report(&node, report(&a.task_id, a.attempt, WireState::Succeeded)).await;
                }
            }
        })
    }

    #[tokio::test]
    async fn an_upgrade_checks_versions_and_budgets_failures_against_the_worker_a_task_is_about() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let sessions = Sessions::new(|_| {});
        let settings = RolloutSettings { retry_delay: Duration::from_millis(20), ..fast() };
        let r = Rollouts::new(store.clone(), sessions.clone(), settings);
        let mut new = new_cluster();
        new.shape.workers.push(PlannedHost { node: "w2".into(), ip: "10.0.0.3".parse().unwrap() });
        new.spec.max_failures = "1".into();
        r.create(new).unwrap();
        let all = TaskKind::all_capabilities();
        let _w1 = obliging_agent(&r, &sessions, "w1", all.clone());
        let _w2 = obliging_agent(&r, &sessions, "w2", all.clone());
        // m1 fails one task: the drain of w2 (it runs on m1, it is about w2).
        let (_sid, tx, mut stream) = sessions.open("m1", meta("0.9.0", all.clone()), 0, 64);
        r.session_opened("m1");
        let r2 = r.clone();
        let _m1 = tokio::spawn(async move {
            let _keep = tx;
            while let Some(Ok(ev)) = stream.next().await {
                if let Some(server_event::Event::Task(a)) = ev.event {
                    let state =
                        if a.task_id.ends_with("drain-nodes@w2") { WireState::Failed } else { WireState::Succeeded };
                    let _ = r2.task_report("m1", report(&a.task_id, a.attempt, state)).await;
                }
            }
        });
        wait_for("the create to finish", || r.get("lab").unwrap().state != ClusterState::Running).await;
        let refused = |res: Result<(phases::Plan, Option<ClusterRecord>), RolloutError>, what: &str| match res {
            Err(RolloutError::Invalid(m)) => assert!(m.contains(what), "{m}"),
            other => panic!("expected a refusal ({what}), got {:?}", other.map(|(p, _)| p.render())),
        };
        refused(r.upgrade("lab", UpgradeTo::version("v1.31.0"), false), "skips a minor version");
        refused(r.upgrade("lab", UpgradeTo::version("v1.29.9"), false), "at v1.29.9 already");
        refused(r.upgrade("lab", UpgradeTo::version("v1.28.0"), false), "downgrades are not supported");
        refused(r.upgrade("lab", UpgradeTo::version("1.30"), false), "not a Kubernetes version");
        assert!(matches!(
            r.upgrade("lab", UpgradeTo { max_failures: Some("x".into()), ..UpgradeTo::version("v1.30.5") }, false),
            Err(RolloutError::Budget(_))
        ));
        let (plan, none) =
            r.upgrade("lab", UpgradeTo { wave_size: Some(2), ..UpgradeTo::version("v1.30.5") }, true).unwrap();
        assert!(none.is_none() && plan.render().contains("upgrade apply v1.30.5"));
        assert_eq!(r.get("lab").unwrap().spec.version, "v1.29.9", "a dry run changes nothing");

        let (_, rec) =
            r.upgrade("lab", UpgradeTo { wave_size: Some(2), ..UpgradeTo::version("v1.30.5") }, false).unwrap();
        let rec = rec.unwrap();
        assert_eq!(
            (rec.spec.version.as_str(), rec.shape.version.as_str(), rec.shape.wave_size),
            ("v1.30.5", "v1.30.5", 2)
        );
        // what each host is sent
        let spec = |id: &str| {
            let t = rec.plan.tasks().find(|t| t.id.to_string() == id).unwrap().clone();
            match super::super::specs::spec_for(&rec, &t).unwrap() {
                fleetadm_proto::task_assignment::Task::KubeadmUpgrade(u) => (u.step, u.version, u.apiserver, u.node),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            spec("lab/upgrade-masters/m1/kubeadm-upgrade"),
            ("apply".into(), "v1.30.5".into(), "10.0.0.1:6443".into(), String::new())
        );
        assert_eq!(
            spec("lab/upgrade-workers/w1/kubeadm-upgrade"),
            ("node".into(), "v1.30.5".into(), String::new(), String::new())
        );
        assert_eq!(spec("lab/upgrade-workers/m1/uncordon@w2").3, "w2");
        wait_for("the upgrade to finish", || r.get("lab").unwrap().state != ClusterState::Running).await;
        let done = r.get("lab").unwrap();
        assert_eq!(done.state, ClusterState::Succeeded, "{}", done.message);
        assert_eq!(done.failed_workers, ["w2"], "the drain failed on m1, but it was about w2");
        assert_eq!(stored(&store, "lab/upgrade-workers/w2/kubelet-restart").state, TaskState::Skipped);
        assert_eq!(stored(&store, "lab/upgrade-workers/m1/uncordon@w2").state, TaskState::Skipped);
        assert_eq!(
            stored(&store, "lab/upgrade-workers/m1/uncordon@w1").state,
            TaskState::Succeeded,
            "m1 is not a failed worker"
        );
        assert!(matches!(&done.operation, Operation::Upgrade { from, to, .. } if from == "v1.29.9" && to == "v1.30.5"));
        refused(r.upgrade("lab", UpgradeTo::version("v1.30.5"), false), "at v1.30.5 already");
    }

    /// An agent that answers every task, failing those whose id ends with one of `fail`.
    fn picky_agent(
        r: &Arc<Rollouts>,
        sessions: &Sessions,
        node: &str,
        fail: Arc<std::sync::Mutex<Vec<String>>>,
    ) -> tokio::task::JoinHandle<()> {
        let (_sid, tx, mut stream) = sessions.open(node, meta("0.9.0", TaskKind::all_capabilities()), 0, 64);
        r.session_opened(node);
        let (r, node) = (r.clone(), node.to_string());
        tokio::spawn(async move {
            let _keep = tx;
            while let Some(Ok(ev)) = stream.next().await {
                if let Some(server_event::Event::Task(a)) = ev.event {
                    let bad = fail.lock().unwrap().iter().any(|f| a.task_id.ends_with(f.as_str()));
                    let state = if bad { WireState::Failed } else { WireState::Succeeded };
                    let _ = r.task_report(&node, report(&a.task_id, a.attempt, state)).await;
                }
            }
        })
    }

    #[tokio::test]
    async fn a_canary_goes_first_then_the_rollout_pauses_until_resumed_or_promoted() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let sessions = Sessions::new(|_| {});
        let settings = RolloutSettings { retry_delay: Duration::from_millis(20), ..fast() };
        let r = Rollouts::new(store.clone(), sessions.clone(), settings);
        let mut new = new_cluster();
        for (n, ip) in [("w2", "10.0.0.3"), ("w3", "10.0.0.4")] {
            new.shape.workers.push(PlannedHost { node: n.into(), ip: ip.parse().unwrap() });
        }
        new.spec.max_failures = "1".into();
        // create with a canary of one, promoted by itself after a second
        new.shape.canary = 1;
        new.auto_promote_secs = 1;
        let rec = r.create(new).unwrap();
        assert_eq!(rec.canary.workers, 1);
        assert!(rec.plan.render().contains("canary: the first 1 worker(s)"), "{}", rec.plan.render());
        let fail = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let mut agents = Vec::new();
        for n in ["m1", "w1", "w2", "w3"] {
            agents.push(picky_agent(&r, &sessions, n, fail.clone()));
        }
        wait_for("the create's canary to pass", || r.get("lab").unwrap().canary.passed).await;
        let paused = r.get("lab").unwrap();
        assert!(paused.paused && paused.pause_reason.contains("the canary (w1) passed"), "{}", paused.pause_reason);
        assert!(paused.canary.promote_at_ms > 0);
        wait_for("the auto-promoted create to finish", || r.get("lab").unwrap().state != ClusterState::Running).await;
        let done = r.get("lab").unwrap();
        assert_eq!(done.state, ClusterState::Succeeded, "{}", done.message);
        assert!(!done.paused && done.pause_reason.is_empty());

        // an upgrade with a canary of one: w1 goes first, then it holds until resumed
        let canary = record::Canary::new(1, 0);
        r.upgrade(
            "lab",
            UpgradeTo { wave_size: Some(2), canary: canary.clone(), ..UpgradeTo::version("v1.30.0") },
            false,
        )
        .unwrap();
        wait_for("the upgrade's canary to pass", || r.get("lab").unwrap().canary.passed).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let held = r.get("lab").unwrap();
        assert_eq!(held.state, ClusterState::Running);
        assert!(held.paused && held.canary.promote_at_ms == 0, "no auto-promotion asked for");
        assert_eq!(stored(&store, "lab/upgrade-workers/w1/kubelet-restart").state, TaskState::Succeeded);
        assert_eq!(stored(&store, "lab/upgrade-workers/m1/uncordon@w1").state, TaskState::Succeeded);
        let w2 = stored(&store, "lab/upgrade-workers/w2/kubeadm-upgrade");
        assert_eq!((w2.state, w2.attempt), (TaskState::Pending, 0), "nothing past the canary is sent");
        assert!(w2.waiting.contains("the canary (w1) passed"), "{}", w2.waiting);
        r.control("lab", Control::Resume).await.unwrap();
        wait_for("the upgrade to finish", || r.get("lab").unwrap().state != ClusterState::Running).await;
        assert_eq!(r.get("lab").unwrap().state, ClusterState::Succeeded);

        // a canary worker that fails (within the budget) fails the operation; nobody else starts
        fail.lock().unwrap().push("w1/kubelet-restart".into());
        r.upgrade(
            "lab",
            UpgradeTo { wave_size: Some(2), canary: canary.clone(), ..UpgradeTo::version("v1.30.1") },
            false,
        )
        .unwrap();
        wait_for("the failed canary", || r.get("lab").unwrap().state != ClusterState::Running).await;
        let failed = r.get("lab").unwrap();
        assert_eq!(failed.state, ClusterState::Failed);
        assert!(failed.message.contains("the canary failed on w1"), "{}", failed.message);
        assert_eq!(stored(&store, "lab/upgrade-workers/w3/kubeadm-upgrade").state, TaskState::Pending);
        // fixed and retried with the same command: the canary runs again, passes, holds
        fail.lock().unwrap().clear();
        r.upgrade("lab", UpgradeTo { wave_size: Some(2), canary, ..UpgradeTo::version("v1.30.1") }, false).unwrap();
        wait_for("the retried canary", || r.get("lab").unwrap().paused).await;
        r.control("lab", Control::Resume).await.unwrap();
        wait_for("the retried upgrade", || r.get("lab").unwrap().state != ClusterState::Running).await;
        let done = r.get("lab").unwrap();
        assert_eq!(done.state, ClusterState::Succeeded, "{}", done.message);
        assert_eq!(done.spec.version, "v1.30.1");
    }

    #[tokio::test]
    async fn an_older_master0_agent_skips_per_operation_tokens_instead_of_blocking_the_rollout() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let sessions = Sessions::new(|_| {});
        let r = Rollouts::new(store.clone(), sessions.clone(), fast());
        r.create(new_cluster()).unwrap();
        let older: Vec<String> =
            TaskKind::all_capabilities().into_iter().filter(|c| !c.starts_with("kubeadm-token-")).collect();
        let _m1 = obliging_agent(&r, &sessions, "m1", older);
        let _w1 = obliging_agent(&r, &sessions, "w1", TaskKind::all_capabilities());
        wait_for("the rollout to finish", || r.get("lab").unwrap().state != ClusterState::Running).await;
        assert_eq!(r.get("lab").unwrap().state, ClusterState::Succeeded, "{:?}", r.get("lab").unwrap().message);
        let jt = stored(&store, "lab/join-token/m1/join-token");
        assert_eq!((jt.state, jt.attempt), (TaskState::Skipped, 0), "never sent to an agent that cannot run it");
        assert!(jt.output.contains("cannot run kubeadm-token-v1") && jt.output.contains("init configuration"));
        assert_eq!(stored(&store, "lab/join-workers/w1/kubeadm-join").state, TaskState::Succeeded);
    }

    #[tokio::test]
    async fn workers_added_later_join_with_a_fresh_token_and_attempts_never_repeat() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let sessions = Sessions::new(|_| {});
        let r = Rollouts::new(store.clone(), sessions.clone(), fast());
        let created = r.create(new_cluster()).unwrap();
        let all = TaskKind::all_capabilities();
        let _m1 = obliging_agent(&r, &sessions, "m1", all.clone());
        let _w1 = obliging_agent(&r, &sessions, "w1", all.clone());
        wait_for("the create to finish", || r.get("lab").unwrap().state != ClusterState::Running).await;
        let jt = "lab/join-token/m1/join-token";
        assert_eq!(stored(&store, jt).attempt, 1);
        let w2 = PlannedHost { node: "w2".into(), ip: "10.0.0.3".parse().unwrap() };

        // Refused: a host already in the cluster; nothing is recorded.
        let w1 = PlannedHost { node: "w1".into(), ip: "10.0.0.2".parse().unwrap() };
        assert!(
            matches!(r.add_workers("lab", vec![w1], 1, false), Err(RolloutError::Invalid(m)) if m.contains("this cluster"))
        );
        assert!(matches!(r.add_workers("nosuch", vec![w2.clone()], 1, false), Err(RolloutError::NotFound(_))));
        // A dry run only plans.
        let (plan, none) = r.add_workers("lab", vec![w2.clone()], 1, true).unwrap();
        assert!(none.is_none() && plan.tasks().any(|t| t.host() == "w2"));
        assert_eq!(r.get("lab").unwrap().shape.workers.len(), 1);

        let (_, rec) = r.add_workers("lab", vec![w2.clone()], 1, false).unwrap();
        let rec = rec.unwrap();
        assert_eq!(rec.operation, Operation::AddWorkers { hosts: vec!["w2".into()] });
        assert_ne!(rec.secrets.bootstrap_token, created.secrets.bootstrap_token, "a token of its own");
        assert!(
            matches!(r.add_workers("lab", vec![w2.clone()], 1, false), Err(RolloutError::Invalid(m)) if m.contains("busy"))
        );
        let _w2 = obliging_agent(&r, &sessions, "w2", all.clone());
        wait_for("the add to finish", || r.get("lab").unwrap().state != ClusterState::Running).await;
        let done = r.get("lab").unwrap();
        assert_eq!(done.state, ClusterState::Succeeded, "{}", done.message);
        assert!(done.message.contains("1 of 1 new workers joined"), "{}", done.message);
        assert_eq!(done.shape.workers.iter().map(|w| w.node.as_str()).collect::<Vec<_>>(), ["w1", "w2"]);
        let t = stored(&store, jt);
        assert_eq!((t.state, t.attempt, t.first_attempt), (TaskState::Succeeded, 2, 1), "ran again as attempt 2");
        assert_eq!(stored(&store, "lab/join-workers/w2/kubeadm-join").state, TaskState::Succeeded);
        let w1_join = stored(&store, "lab/join-workers/w1/kubeadm-join");
        assert_eq!((w1_join.state, w1_join.attempt), (TaskState::Succeeded, 1), "the existing worker was not touched");
        let view = super::super::view::build(&done, &r.tasks("lab").unwrap(), false);
        assert_eq!(view.operation, "add workers w2");
        assert!(view.hosts.iter().find(|h| h.name == "w1").unwrap().tasks.is_empty(), "the plan is the add's");

        // Deleted and created again under the same name: the new tasks' attempts start above
        // every attempt the agents may still have in their journals.
        let _ = r.delete("lab", false).unwrap();
        wait_for("the delete to finish", || matches!(r.get("lab"), Err(RolloutError::NotFound(_)))).await;
        let again = r.create(new_cluster()).unwrap();
        assert_eq!(again.attempt_floor, 2);
        let t = stored(&store, jt);
        assert_eq!((t.state, t.attempt, t.first_attempt), (TaskState::Pending, 2, 2));
    }

    #[tokio::test]
    async fn a_failed_add_is_retried_by_naming_the_same_hosts_again() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let sessions = Sessions::new(|_| {});
        let settings = RolloutSettings { offline_grace: Duration::from_secs(1), ..fast() };
        let r = Rollouts::new(store.clone(), sessions.clone(), settings);
        r.create(new_cluster()).unwrap();
        let all = TaskKind::all_capabilities();
        let _m1 = obliging_agent(&r, &sessions, "m1", all.clone());
        let _w1 = obliging_agent(&r, &sessions, "w1", all.clone());
        wait_for("the create to finish", || r.get("lab").unwrap().state != ClusterState::Running).await;
        let w2 = PlannedHost { node: "w2".into(), ip: "10.0.0.3".parse().unwrap() };
        let w3 = PlannedHost { node: "w3".into(), ip: "10.0.0.4".parse().unwrap() };

        // w2 never connects: the add fails (no failure budget).
        let (_, first) = r.add_workers("lab", vec![w2.clone()], 1, false).unwrap();
        let first = first.unwrap();
        wait_for("the add to fail", || r.get("lab").unwrap().state != ClusterState::Running).await;
        let failed = r.get("lab").unwrap();
        assert_eq!(failed.state, ClusterState::Failed, "{}", failed.message);
        // Another operation is refused until that one is retried.
        assert!(
            matches!(r.add_workers("lab", vec![w3], 1, false), Err(RolloutError::Invalid(m)) if m.contains("retry that first"))
        );
        // Naming the same hosts retries it, with a token of its own.
        let _w2 = obliging_agent(&r, &sessions, "w2", all.clone());
        let (_, again) = r.add_workers("lab", vec![w2], 1, false).unwrap();
        let again = again.unwrap();
        assert_ne!(again.secrets.bootstrap_token, first.secrets.bootstrap_token);
        wait_for("the retry to finish", || r.get("lab").unwrap().state != ClusterState::Running).await;
        let done = r.get("lab").unwrap();
        assert_eq!(done.state, ClusterState::Succeeded, "{}", done.message);
        assert_eq!(done.shape.workers.iter().map(|w| w.node.as_str()).collect::<Vec<_>>(), ["w1", "w2"]);
        assert_eq!(stored(&store, "lab/join-workers/w2/kubeadm-join").state, TaskState::Succeeded);
    }

    #[tokio::test]
    async fn the_operator_pauses_resumes_and_aborts_a_rollout() {
        use super::super::actor::Control;
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let sessions = Sessions::new(|_| {});
        let r = Rollouts::new(store.clone(), sessions.clone(), fast());
        r.create(new_cluster()).unwrap();
        // Paused before any host is connected: nothing goes out once they are.
        let rec = r.control("lab", Control::Pause).await.unwrap();
        assert!(rec.paused);
        assert!(get_json::<ClusterRecord>(&*store, Table::Clusters, "lab").unwrap().unwrap().paused, "flushed");
        assert!(
            matches!(r.control("lab", Control::Pause).await, Err(RolloutError::Invalid(m)) if m.contains("paused already"))
        );
        let all = TaskKind::all_capabilities();
        let _m1 = obliging_agent(&r, &sessions, "m1", all.clone());
        let _w1 = obliging_agent(&r, &sessions, "w1", all.clone());
        let first = "lab/preflight/m1/preflight";
        wait_for("the task to say it is paused", || stored(&store, first).waiting.contains("op resume cluster/lab"))
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = stored(&store, first);
        assert_eq!((t.state, t.attempt), (TaskState::Pending, 0), "not sent while paused");
        let view = super::super::view::build(&r.get("lab").unwrap(), &r.tasks("lab").unwrap(), false);
        assert!(view.paused);

        // Resumed: it runs to the end.
        assert!(!r.control("lab", Control::Resume).await.unwrap().paused);
        wait_for("the create to finish", || r.get("lab").unwrap().state != ClusterState::Running).await;
        let done = r.get("lab").unwrap();
        assert_eq!(done.state, ClusterState::Succeeded, "{}", done.message);
        assert!(stored(&store, first).waiting.is_empty());
        // Nothing runs now: there is nothing to steer.
        assert!(
            matches!(r.control("lab", Control::Abort).await, Err(RolloutError::Invalid(m)) if m.contains("not running"))
        );
        assert!(matches!(r.control("nosuch", Control::Pause).await, Err(RolloutError::NotFound(_))));

        // An add aborted while paused fails as aborted, with its task unsent; naming the same
        // hosts again resumes it (unpaused).
        let w2 = PlannedHost { node: "w2".into(), ip: "10.0.0.3".parse().unwrap() };
        r.add_workers("lab", vec![w2.clone()], 1, false).unwrap();
        r.control("lab", Control::Pause).await.unwrap();
        r.control("lab", Control::Abort).await.unwrap();
        wait_for("the abort", || r.get("lab").unwrap().state != ClusterState::Running).await;
        let aborted = r.get("lab").unwrap();
        assert_eq!(aborted.state, ClusterState::Failed);
        assert!(aborted.message.contains("aborted by the operator"), "{}", aborted.message);
        let _w2 = obliging_agent(&r, &sessions, "w2", all.clone());
        let (_, again) = r.add_workers("lab", vec![w2], 1, false).unwrap();
        assert!(!again.unwrap().paused);
        wait_for("the add to finish", || r.get("lab").unwrap().state != ClusterState::Running).await;
        assert_eq!(r.get("lab").unwrap().state, ClusterState::Succeeded);
    }

    #[tokio::test]
    async fn workers_are_removed_refusals_first_and_can_be_added_back() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let sessions = Sessions::new(|_| {});
        let r = Rollouts::new(store.clone(), sessions.clone(), fast());
        r.create(new_cluster()).unwrap();
        let all = TaskKind::all_capabilities();
        let _m1 = obliging_agent(&r, &sessions, "m1", all.clone());
        let _w1 = obliging_agent(&r, &sessions, "w1", all.clone());
        wait_for("the create to finish", || r.get("lab").unwrap().state != ClusterState::Running).await;
        let refs = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let refused = |res: Result<(phases::Plan, Option<ClusterRecord>), RolloutError>, what: &str| match res {
            Err(RolloutError::Invalid(m)) => assert!(m.contains(what), "{m}"),
            other => panic!("expected a refusal ({what}), got {:?}", other.map(|(p, _)| p.render())),
        };
        refused(r.remove_workers("lab", &refs(&["m1"]), false, false, false), "is a master of cluster lab");
        refused(r.remove_workers("lab", &refs(&["nosuch"]), false, false, false), "not workers of cluster lab: nosuch");
        refused(r.remove_workers("lab", &[], false, false, false), "at least one worker");
        assert!(matches!(
            r.remove_workers("nosuch", &refs(&["w1"]), false, false, false),
            Err(RolloutError::NotFound(_))
        ));
        // A dry run (by address) plans the drain, the reset on w1 and the Node object's deletion.
        let (plan, none) = r.remove_workers("lab", &refs(&["10.0.0.2"]), true, false, true).unwrap();
        assert!(none.is_none());
        let steps: Vec<String> = plan.tasks().map(|t| t.id.to_string()).collect();
        assert_eq!(
            steps,
            [
                "lab/drain/m1/drain-nodes@w1",
                "lab/reset/w1/kubeadm-reset",
                "lab/reset/w1/lb-clean",
                "lab/reset/w1/hosts-clean",
                "lab/remove-nodes/m1/delete-nodes"
            ]
        );
        assert_eq!(r.get("lab").unwrap().operation, Operation::Create, "a dry run records nothing");
        // --force (the host is gone): only its Node object is deleted.
        let (forced, _) = r.remove_workers("lab", &refs(&["w1"]), false, true, true).unwrap();
        let ids: Vec<String> = forced.tasks().map(|t| t.id.to_string()).collect();
        assert_eq!(ids, ["lab/remove-nodes/m1/delete-nodes"]);

        let (_, rec) = r.remove_workers("lab", &refs(&["w1"]), true, false, false).unwrap();
        let rec = rec.unwrap();
        let spec = super::super::specs::spec_for(&rec, plan.tasks().last().unwrap()).unwrap();
        let task_assignment::Task::NodeObjects(n) = spec else { panic!("{spec:?}") };
        assert_eq!((n.nodes, n.drain, n.delete), (vec!["w1".to_string()], false, true));
        // a drain is a task of its own per node (its own timeout), run by master0
        let spec = super::super::specs::spec_for(&rec, plan.tasks().next().unwrap()).unwrap();
        let task_assignment::Task::NodeObjects(n) = spec else { panic!("{spec:?}") };
        assert_eq!((n.nodes, n.drain, n.delete), (vec!["w1".to_string()], true, false));
        wait_for("the removal to finish", || r.get("lab").unwrap().state != ClusterState::Running).await;
        let done = r.get("lab").unwrap();
        assert_eq!(done.state, ClusterState::Succeeded, "{}", done.message);
        assert!(done.message.contains("workers w1 removed"), "{}", done.message);
        assert!(done.shape.workers.is_empty());
        assert_eq!(stored(&store, "lab/drain/m1/drain-nodes@w1").state, TaskState::Succeeded);
        refused(r.remove_workers("lab", &refs(&["w1"]), false, false, false), "not workers of cluster lab: w1");

        // Added back: its join runs again (a new attempt), it does not count as done.
        let w1 = PlannedHost { node: "w1".into(), ip: "10.0.0.2".parse().unwrap() };
        r.add_workers("lab", vec![w1], 1, false).unwrap();
        wait_for("the add to finish", || r.get("lab").unwrap().state != ClusterState::Running).await;
        assert_eq!(r.get("lab").unwrap().state, ClusterState::Succeeded);
        let join = stored(&store, "lab/join-workers/w1/kubeadm-join");
        assert_eq!((join.state, join.attempt, join.first_attempt), (TaskState::Succeeded, 2, 1));
    }

    #[tokio::test]
    async fn certificates_are_reissued_recorded_and_installed_on_the_masters_only() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let sessions = Sessions::new(|_| {});
        let r = Rollouts::new(store.clone(), sessions.clone(), fast());
        r.create(new_cluster()).unwrap();
        let all = TaskKind::all_capabilities();
        let _m1 = obliging_agent(&r, &sessions, "m1", all.clone());
        let _w1 = obliging_agent(&r, &sessions, "w1", all.clone());
        wait_for("the create to finish", || r.get("lab").unwrap().state != ClusterState::Running).await;
        let before = r.get("lab").unwrap();
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let refused = |res: Result<(phases::Plan, Option<ClusterRecord>), RolloutError>, what: &str| match res {
            Err(RolloutError::Invalid(m)) => assert!(m.contains(what), "{m}"),
            other => panic!("expected a refusal ({what}), got {:?}", other.map(|(p, _)| p.render())),
        };
        refused(r.renew_certs("lab", &[], &[], false), "--renew");
        refused(r.renew_certs("lab", &v(&["ca"]), &[], false), "CAs are not renewed");
        refused(r.renew_certs("lab", &[], &v(&["bad name"]), false), "neither an IP address nor a DNS name");
        assert!(matches!(r.renew_certs("nosuch", &v(&["all"]), &[], false), Err(RolloutError::NotFound(_))));
        // dry run: one task per master, nothing recorded
        let (plan, none) = r.renew_certs("lab", &[], &v(&["api.example.org"]), true).unwrap();
        assert!(none.is_none());
        let ids: Vec<String> = plan.tasks().map(|t| t.id.to_string()).collect();
        assert_eq!(ids, ["lab/certificates/m1/certs-install"]);
        let after_dry = r.get("lab").unwrap();
        assert_eq!(after_dry.operation, Operation::Create);
        assert_eq!(after_dry.secrets.pki.shared, before.secrets.pki.shared, "a dry run reissues nothing");

        let (_, rec) = r.renew_certs("lab", &[], &v(&["API.example.org", "192.0.2.7"]), false).unwrap();
        let rec = rec.unwrap();
        assert_eq!(rec.spec.extra_sans, v(&["api.example.org", "192.0.2.7"]));
        let stored_rec = r.get("lab").unwrap();
        assert_eq!(stored_rec.secrets.pki.shared, rec.secrets.pki.shared, "the new PKI is recorded");
        let spec = super::super::specs::spec_for(&rec, plan.tasks().next().unwrap()).unwrap();
        let task_assignment::Task::CertsInstall(ci) = spec else { panic!("{spec:?}") };
        let paths: Vec<&str> = ci.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["/etc/kubernetes/pki/apiserver.crt", "/etc/kubernetes/pki/apiserver.key"]);
        let new_api = &ci.files[0].contents;
        let old_api = &before.secrets.pki.shared.iter().find(|f| f.path == "pki/apiserver.crt").unwrap().contents;
        assert_ne!(new_api, old_api);
        let info = fleetadm_common::certs::describe("apiserver", "x", new_api.as_bytes()).unwrap();
        assert!(info.sans.contains(&"api.example.org".to_string()) && info.sans.contains(&"192.0.2.7".to_string()));
        assert_eq!(
            info.not_after_unix - info.not_before_unix,
            3600 + 300,
            "the cluster's validity (+5 min back-dating)"
        );
        assert_eq!(
            ci.restart.iter().map(|p| (p.name.as_str(), p.probe.as_str())).collect::<Vec<_>>(),
            [("kube-apiserver", "10.0.0.1:6443")]
        );
        wait_for("the certs operation to finish", || r.get("lab").unwrap().state != ClusterState::Running).await;
        let done = r.get("lab").unwrap();
        assert_eq!(done.state, ClusterState::Succeeded, "{}", done.message);
        assert!(done.message.contains("add SANs api.example.org,192.0.2.7"), "{}", done.message);
        // renew all keeps the SANs added before and the CAs
        let (_, rec) = r.renew_certs("lab", &v(&["all"]), &[], false).unwrap();
        let rec = rec.unwrap();
        assert_eq!(rec.secrets.pki.ca_cert_pem, before.secrets.pki.ca_cert_pem);
        let api = rec.secrets.pki.shared.iter().find(|f| f.path == "pki/apiserver.crt").unwrap();
        let info = fleetadm_common::certs::describe("apiserver", "x", api.contents.as_bytes()).unwrap();
        assert!(info.sans.contains(&"api.example.org".to_string()), "{:?}", info.sans);
        wait_for("the renewal to finish", || r.get("lab").unwrap().state != ClusterState::Running).await;
        assert_eq!(r.get("lab").unwrap().state, ClusterState::Succeeded);
    }

    #[tokio::test]
    async fn masters_join_and_leave_and_master0_can_go() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let sessions = Sessions::new(|_| {});
        let r = Rollouts::new(store.clone(), sessions.clone(), fast());
        r.create(new_cluster()).unwrap();
        let all = TaskKind::all_capabilities();
        let _m1 = obliging_agent(&r, &sessions, "m1", all.clone());
        let _w1 = obliging_agent(&r, &sessions, "w1", all.clone());
        let _m2 = obliging_agent(&r, &sessions, "m2", all.clone());
        wait_for("the create to finish", || r.get("lab").unwrap().state != ClusterState::Running).await;
        let m2 = PlannedHost { node: "m2".into(), ip: "10.0.0.3".parse().unwrap() };
        let (plan, rec) = r.add_masters("lab", vec![m2.clone()], vec![], 1, false).unwrap();
        let ids: Vec<String> = plan.tasks().map(|t| t.id.to_string()).collect();
        assert_eq!(
            ids,
            [
                "lab/preflight/m2/preflight",
                "lab/hosts/m2/hosts",
                "lab/certificates/m1/certs-install",
                "lab/join-token/m1/join-token",
                "lab/join-masters/m2/pki",
                "lab/join-masters/m2/kubeadm-join",
                "lab/join-masters/m2/hosts",
                "lab/sync-ipvs/w1/lb",
                "lab/sync-hosts/m1/hosts",
                "lab/sync-hosts/w1/hosts",
                "lab/record/m1/drop-token",
            ]
        );
        let rec = rec.unwrap();
        let spec = |rec: &ClusterRecord, id: &str| {
            let t = rec.plan.tasks().find(|t| t.id.to_string() == id).unwrap_or_else(|| panic!("{id}"));
            super::super::specs::spec_for(rec, t).unwrap()
        };
        let task_assignment::Task::CertsInstall(ci) = spec(&rec, "lab/certificates/m1/certs-install") else { panic!() };
        let info = fleetadm_common::certs::describe("apiserver", "x", ci.files[0].contents.as_bytes()).unwrap();
        assert!(
            info.sans.contains(&"10.0.0.3".to_string()) && info.sans.contains(&"m2".to_string()),
            "{:?}",
            info.sans
        );
        assert!(rec.secrets.pki.per_master.contains_key("m2"), "m2's own etcd certificates");
        let task_assignment::Task::Lb(lb) = spec(&rec, "lab/sync-ipvs/w1/lb") else { panic!() };
        assert_eq!(lb.real_servers, ["10.0.0.1:6443", "10.0.0.3:6443"]);
        let task_assignment::Task::Hosts(h) = spec(&rec, "lab/sync-hosts/m1/hosts") else { panic!() };
        let line = |h: &fleetadm_proto::HostsTask, name: &str| {
            h.entries.iter().find(|e| e.names.contains(&name.to_string())).map(|e| e.ip.clone())
        };
        assert_eq!(line(&h, "apiserver.cluster.local").as_deref(), Some("10.0.0.1"), "a master resolves itself");
        assert_eq!(line(&h, "m2").as_deref(), Some("10.0.0.3"));
        let task_assignment::Task::Hosts(h) = spec(&rec, "lab/hosts/m2/hosts") else { panic!() };
        assert_eq!(line(&h, "apiserver.cluster.local").as_deref(), Some("10.0.0.1"), "master0 while joining");
        wait_for("the add to finish", || r.get("lab").unwrap().state != ClusterState::Running).await;
        let done = r.get("lab").unwrap();
        assert_eq!(done.state, ClusterState::Succeeded, "{}", done.message);
        assert!(done.message.contains("add masters m2") && done.message.contains("2 masters"), "{}", done.message);

        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let refused = |res: Result<(phases::Plan, Option<ClusterRecord>), RolloutError>, what: &str| match res {
            Err(RolloutError::Invalid(m)) => assert!(m.contains(what), "{m}"),
            other => panic!("expected a refusal ({what}), got {:?}", other.map(|(p, _)| p.render())),
        };
        refused(r.remove_hosts("lab", &v(&["m1", "m2"]), &[], false, false, false), "no master left");
        refused(r.remove_hosts("lab", &v(&["w1"]), &[], false, false, false), "w1 is a worker");
        refused(r.remove_hosts("lab", &v(&["m9"]), &[], false, false, false), "m9 is not a master of cluster lab");
        refused(r.remove_hosts("lab", &[], &v(&["m2"]), false, false, false), "name masters with --masters");
        refused(r.add_masters("lab", vec![m2.clone()], vec![], 1, false), "already belong to this cluster: m2");
        // master0 leaves: m2 is the reference from now on
        let (plan, rec) = r.remove_hosts("lab", &v(&["10.0.0.1"]), &[], false, false, false).unwrap();
        let ids: Vec<String> = plan.tasks().map(|t| t.id.to_string()).collect();
        assert_eq!(
            ids,
            [
                "lab/sync-ipvs/w1/lb",
                "lab/reset/m1/kubeadm-reset",
                "lab/reset/m1/hosts-clean",
                "lab/remove-nodes/m2/delete-nodes",
                "lab/sync-hosts/m2/hosts",
                "lab/sync-hosts/w1/hosts",
            ]
        );
        let rec = rec.unwrap();
        assert_eq!(rec.shape.masters, vec![m2.clone()]);
        let task_assignment::Task::Lb(lb) = spec(&rec, "lab/sync-ipvs/w1/lb") else { panic!() };
        assert_eq!(lb.real_servers, ["10.0.0.3:6443"], "m1 out of rotation first");
        let task_assignment::Task::KubeadmReset(_) = spec(&rec, "lab/reset/m1/kubeadm-reset") else { panic!() };
        let task_assignment::Task::NodeObjects(n) = spec(&rec, "lab/remove-nodes/m2/delete-nodes") else { panic!() };
        assert_eq!(n.nodes, ["m1"]);
        let task_assignment::Task::Hosts(h) = spec(&rec, "lab/sync-hosts/w1/hosts") else { panic!() };
        assert!(line(&h, "m1").is_none() && line(&h, "m2").is_some());
        wait_for("the removal to finish", || r.get("lab").unwrap().state != ClusterState::Running).await;
        let done = r.get("lab").unwrap();
        assert_eq!(done.state, ClusterState::Succeeded, "{}", done.message);
        assert!(done.leaving.is_empty() && done.shape.masters == vec![m2]);
        refused(r.remove_hosts("lab", &v(&["m2"]), &[], false, false, false), "no master left");
    }

    #[tokio::test]
    async fn an_agent_without_the_capability_is_not_sent_the_task() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let sessions = Sessions::new(|_| {});
        let r = Rollouts::new(store.clone(), sessions.clone(), fast());
        r.create(new_cluster()).unwrap();
        let all_but_preflight: Vec<String> =
            TaskKind::all_capabilities().into_iter().filter(|c| !c.starts_with("preflight-")).collect();
        let (_sid, _tx, mut stream) = sessions.open("m1", meta("0.0.9", all_but_preflight), 0, 16);
        r.session_opened("m1");
        let id = "lab/preflight/m1/preflight";
        wait_for("the task to say why it waits", || !stored(&store, id).waiting.is_empty()).await;
        let t = stored(&store, id);
        assert_eq!(t.waiting, "m1: agent 0.0.9 cannot run preflight-v1; upgrade node-agent");
        assert_eq!((t.state, t.attempt), (TaskState::Pending, 0), "not sent, not failed");
        assert!(tokio::time::timeout(Duration::from_millis(200), stream.next()).await.is_err(), "nothing was sent");
        let view = super::super::view::build(&r.get("lab").unwrap(), &r.tasks("lab").unwrap(), false);
        assert!(view.hosts[0].tasks[0].waiting.contains("upgrade node-agent"));
        // The upgraded agent reconnects with the capability: the task goes out.
        drop(stream);
        let (_sid, _tx, mut stream) = sessions.open("m1", meta("0.2.0", TaskKind::all_capabilities()), 0, 16);
        r.session_opened("m1");
        let ev = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap();
        assert!(matches!(ev.event, Some(server_event::Event::Task(_))));
        wait_for("the waiting note to clear", || stored(&store, id).waiting.is_empty()).await;
    }

    #[test]
    fn specs_send_keys_only_to_masters() {
        let rec_store = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(rec_store.path()).unwrap());
        let rt = tokio::runtime::Runtime::new().unwrap();
        let r = Rollouts::new(store, Sessions::new(|_| {}), RolloutSettings::default());
        let rec = rt.block_on(async { r.create(new_cluster()).unwrap() });
        let task = |phase, host: &str, step| phases::Task {
            id: TaskId::new("lab", phase, host, step),
            description: String::new(),
        };
        let spec = |t| format!("{:?}", super::super::specs::spec_for(&rec, &t).unwrap());
        let pki = spec(task(PhaseName::InitMaster0, "m1", StepKind::Pki));
        assert!(pki.contains("PRIVATE KEY"));
        let join = spec(task(PhaseName::JoinWorkers, "w1", StepKind::KubeadmJoin));
        assert!(!join.contains("PRIVATE KEY") && join.contains(&rec.secrets.bootstrap_token));
        let lb = spec(task(PhaseName::SyncIpvs, "w1", StepKind::Lb));
        assert!(lb.contains("10.103.97.2:6443") && lb.contains("10.0.0.1:6443") && !lb.contains("PRIVATE KEY"));
        let hosts = super::super::specs::spec_for(&rec, &task(PhaseName::Hosts, "w1", StepKind::Hosts)).unwrap();
        let task_assignment::Task::Hosts(h) = hosts else { panic!("{hosts:?}") };
        assert_eq!(
            (h.entries[0].ip.as_str(), h.entries[0].names[0].as_str()),
            ("10.103.97.2", "apiserver.cluster.local")
        );
        assert!(super::super::specs::spec_for(&rec, &task(PhaseName::Hosts, "ghost", StepKind::Hosts)).is_err());
    }
}

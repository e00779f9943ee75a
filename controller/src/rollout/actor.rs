//! One actor per running cluster. It holds the cluster's record and task records in memory, is
//! the only writer of them while it runs (recording every change before acting on it), walks the
//! plan's phases and steps, hands tasks to their hosts' sessions, and receives its own cluster's
//! reports on its channel. What to do with each task is [`decide`](super::decide::decide).
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use fleetadm_common::clock::now_unix_ms;
use fleetadm_proto::{server_event, ServerEvent, TaskAssignment, TaskReport};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use super::decide::{decide, Facts, HostNow, Limits, Missing, Next};
use super::engine::RolloutSettings;
use super::record::{self, ClusterRecord, ClusterState, TaskRecord, TaskState};
use super::report::{self, Applied};
use super::specs::{self, SpecError};
use crate::audit::Audit;
use crate::dispatch::{ReportRejected, Sessions};
use crate::plan::phases::{CountError, StepKind, Task, TaskId};
use crate::store::{self, get_json, list_prefix_json, put_json, Durability, Store, StoreError, Table};

/// What reaches a cluster's actor.
pub(super) enum Msg {
    Report {
        id: TaskId,
        node: String,
        report: Box<TaskReport>,
        reply: oneshot::Sender<Result<(), ReportRejected>>,
    },
    /// A host's session opened: pending work may go out now.
    HostChanged,
    /// The operator steers the rollout; answered with the record as it is afterwards.
    Control {
        action: Control,
        reply: oneshot::Sender<Result<ClusterRecord, String>>,
    },
}

/// What the operator can do to a running rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// No new task goes out (running ones finish); recorded, so it holds across a restart.
    Pause,
    Resume,
    /// Stop now: the operation fails with this reason; running tasks finish on their hosts, and
    /// running the same command again resumes it.
    Abort,
}

/// Why a rollout stopped before its plan was done.
#[derive(Debug, Error)]
pub(super) enum Stop {
    /// The operator-facing reason (a task failed for good, the budget was exceeded).
    #[error("{0}")]
    Failed(String),
    #[error("the cluster's failure budget")]
    Budget(#[from] CountError),
    #[error("rendering task {task}")]
    Spec {
        task: String,
        #[source]
        source: SpecError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Stop {
    /// One line with the cause chain, for the cluster's message.
    pub fn chain(&self) -> String {
        fleetadm_common::error_chain(self)
    }
}

pub(super) struct Actor {
    store: Arc<dyn Store>,
    sessions: Sessions,
    settings: RolloutSettings,
    pub rec: ClusterRecord,
    tasks: HashMap<TaskId, TaskRecord>,
    /// Which session each running task was last sent on (after a restart: none, so everything
    /// running is re-sent and the agents answer from their journals).
    sent_on: HashMap<TaskId, u64>,
    /// Since when a task has waited for its disconnected host.
    offline_since: HashMap<TaskId, Instant>,
    rx: mpsc::UnboundedReceiver<Msg>,
    audit: Audit,
    /// `controller op abort`: the rollout stops at its next turn.
    aborted: bool,
}

/// The reason an aborted operation records.
pub(super) const ABORTED: &str =
    "aborted by the operator (controller op abort); tasks already running were left to finish; run the same command again to resume";

impl Actor {
    pub async fn load(
        name: &str,
        store: Arc<dyn Store>,
        sessions: Sessions,
        settings: RolloutSettings,
        audit: Audit,
        rx: mpsc::UnboundedReceiver<Msg>,
    ) -> Result<Self, StoreError> {
        let (s, n) = (store.clone(), name.to_string());
        let (rec, tasks) = store::off_thread(move || {
            let rec: Option<ClusterRecord> = get_json(&*s, Table::Clusters, &n)?;
            let tasks: Vec<TaskRecord> = list_prefix_json(&*s, Table::Tasks, &TaskId::cluster_prefix(&n))?;
            Ok::<_, StoreError>((rec, tasks))
        })
        .await?;
        let rec = rec.ok_or_else(|| StoreError::Io {
            table: Table::Clusters.name(),
            source: format!("cluster {name} disappeared before its rollout started").into(),
        })?;
        let tasks = tasks.into_iter().filter(|t| t.cluster == name).map(|t| (t.id.clone(), t)).collect();
        Ok(Self {
            store,
            sessions,
            settings,
            rec,
            tasks,
            sent_on: HashMap::new(),
            offline_since: HashMap::new(),
            rx,
            audit,
            aborted: false,
        })
    }

    /// Walk the plan. `Ok(summary)` when every phase completed.
    pub async fn drive(&mut self) -> Result<String, Stop> {
        let started = Instant::now();
        let budget = record::failure_budget(&self.rec.spec.max_failures, self.rec.shape.workers.len())?;
        let phases = self.rec.plan.phases.clone();
        for phase in &phases {
            self.rec.phase = phase.name;
            self.save_cluster().await?;
            let t0 = Instant::now();
            // The canary: the workers of the phase's first wave.
            let canary: Vec<String> = match phase.steps.first() {
                Some(first)
                    if crate::plan::phases::WAVED.contains(&phase.name)
                        && self.rec.canary.workers > 0
                        && !self.rec.canary.passed =>
                {
                    first.iter().map(|t| t.id.subject().to_string()).collect()
                }
                _ => vec![],
            };
            for step in &phase.steps {
                self.run_step(step, phase.name.is_worker_phase().then_some(budget)).await?;
                if !canary.is_empty() && !self.rec.canary.passed && self.finished_in(phase, &canary) {
                    self.canary_done(&canary).await?;
                }
            }
            let msg = format!("completed in {:.1}s", t0.elapsed().as_secs_f64());
            self.rec.set_condition(phase.name.as_str(), true, msg, now_unix_ms());
            self.save_cluster().await?;
        }
        if let record::Operation::RemoveWorkers { hosts } = &self.rec.operation {
            // They are gone: out of the cluster's shape (recorded with the outcome).
            let hosts = hosts.clone();
            self.rec.shape.workers.retain(|w| !hosts.contains(&w.node));
            self.rec.failed_workers.retain(|w| !hosts.contains(w));
        }
        // Hosts a master-set removal took out: gone now.
        self.rec.leaving.clear();
        let failed = &self.rec.failed_workers;
        let mut summary = match &self.rec.operation {
            record::Operation::RemoveWorkers { hosts } => format!(
                "cluster {}: workers {} removed in {:.0}s ({} masters, {} workers now)",
                self.rec.name,
                hosts.join(", "),
                self.rec.op_secs(started),
                self.rec.shape.masters.len(),
                self.rec.shape.workers.len() - failed.len(),
            ),
            record::Operation::AddWorkers { hosts } => format!(
                "cluster {}: {} of {} new workers joined in {:.0}s ({} masters, {} workers now)",
                self.rec.name,
                hosts.len() - hosts.iter().filter(|h| failed.contains(h)).count(),
                hosts.len(),
                self.rec.op_secs(started),
                self.rec.shape.masters.len(),
                self.rec.shape.workers.len() - failed.len(),
            ),
            record::Operation::AddHosts { .. }
            | record::Operation::RemoveHosts { .. }
            | record::Operation::Upgrade { .. } => format!(
                "cluster {}: {} done in {:.0}s ({} masters, {} workers now)",
                self.rec.name,
                self.rec.operation,
                self.rec.op_secs(started),
                self.rec.shape.masters.len(),
                self.rec.shape.workers.len() - failed.len(),
            ),
            record::Operation::Restore { .. } => format!(
                "cluster {}: {} on {} masters in {:.0}s",
                self.rec.name,
                self.rec.operation,
                self.rec.shape.masters.len(),
                self.rec.op_secs(started)
            ),
            record::Operation::Certs { .. } => format!(
                "cluster {}: {} on {} masters in {:.0}s",
                self.rec.name,
                self.rec.operation,
                self.rec.shape.masters.len(),
                self.rec.op_secs(started)
            ),
            _ => format!(
                "cluster {} is ready: {} masters, {} workers in {:.0}s",
                self.rec.name,
                self.rec.shape.masters.len(),
                self.rec.shape.workers.len() - failed.len(),
                self.rec.op_secs(started)
            ),
        };
        if !failed.is_empty() {
            summary.push_str(&format!(" ({} workers failed: {})", failed.len(), failed.join(", ")));
        }
        Ok(summary)
    }

    /// Are all of `hosts`' tasks in `phase` finished?
    fn finished_in(&self, phase: &crate::plan::phases::Phase, hosts: &[String]) -> bool {
        phase.steps.iter().flatten().filter(|t| hosts.iter().any(|h| h == t.id.subject())).all(|t| {
            self.tasks.get(&t.id).is_some_and(|r| matches!(r.state, TaskState::Succeeded | TaskState::Skipped))
        })
    }

    /// The canary's workers are through: a failed one fails the operation (a retry runs the
    /// canary again); otherwise the rollout pauses (recorded, so it holds across a restart)
    /// until `op resume` or the auto-promotion.
    async fn canary_done(&mut self, hosts: &[String]) -> Result<(), Stop> {
        let name = self.rec.name.clone();
        let failed: Vec<&String> = hosts.iter().filter(|h| self.rec.failed_workers.contains(h)).collect();
        if !failed.is_empty() {
            return Err(Stop::Failed(format!(
                "the canary failed on {} (see `controller cluster logs {name}`); no other worker was started; run the same command again to retry",
                failed.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        let now = now_unix_ms();
        self.rec.canary.passed = true;
        self.rec.paused = true;
        let mut reason = format!(
            "the canary ({}) passed; go on with `controller op resume cluster/{name}`, or stop with `controller op abort cluster/{name}`",
            hosts.join(", ")
        );
        if self.rec.canary.auto_promote_secs > 0 {
            self.rec.canary.promote_at_ms = now + self.rec.canary.auto_promote_secs * 1000;
            reason.push_str(&format!("; it goes on by itself in {}s", self.rec.canary.auto_promote_secs));
        }
        tracing::info!(cluster = %name, "{reason}");
        self.rec.pause_reason = reason;
        self.save_cluster().await?;
        Ok(())
    }

    /// A paused canary whose time has come goes on by itself.
    async fn maybe_promote(&mut self) -> Result<(), Stop> {
        let at = self.rec.canary.promote_at_ms;
        if self.rec.paused && at > 0 && now_unix_ms() >= at {
            self.rec.paused = false;
            self.rec.pause_reason.clear();
            self.rec.canary.promote_at_ms = 0;
            self.save_cluster().await?;
            tracing::info!(cluster = %self.rec.name, "the canary passed and its time is up: promoted");
        }
        Ok(())
    }

    /// Record how the rollout ended.
    pub async fn finish(&mut self, state: ClusterState, message: &str) -> Result<(), StoreError> {
        let now = now_unix_ms();
        self.rec.state = state;
        self.rec.message = message.to_string();
        self.rec.finished_ms = now;
        self.rec.set_condition("Ready", state == ClusterState::Succeeded, message.to_string(), now);
        self.save_cluster().await
    }

    /// Stop taking messages and hand back what is still queued (answered by the caller from the
    /// store, now that this actor has written everything it will write).
    pub fn close(mut self) -> mpsc::UnboundedReceiver<Msg> {
        self.rx.close();
        self.rx
    }

    /// Run one step (tasks in parallel) to completion. `budget` is set for worker phases: failed
    /// workers are recorded and skipped until more than `budget` have failed.
    async fn run_step(&mut self, step: &[Task], budget: Option<usize>) -> Result<(), Stop> {
        loop {
            if self.aborted {
                return Err(Stop::Failed(ABORTED.into()));
            }
            self.maybe_promote().await?;
            let mut open = 0usize;
            for t in step {
                if self.advance(t, budget).await? {
                    open += 1;
                }
            }
            if open == 0 {
                return Ok(());
            }
            self.wait().await;
        }
    }

    /// Until a message arrives or a tick passes; then whatever else is queued.
    async fn wait(&mut self) {
        tokio::select! {
            Some(m) = self.rx.recv() => self.handle(m).await,
            _ = tokio::time::sleep(self.settings.tick) => {}
        }
        while let Ok(m) = self.rx.try_recv() {
            self.handle(m).await;
        }
    }

    async fn handle(&mut self, m: Msg) {
        match m {
            Msg::Report { id, node, report, reply } => {
                let r = self.on_report(id, &node, &report).await;
                let _ = reply.send(r);
            }
            Msg::HostChanged => {}
            Msg::Control { action, reply } => {
                let r = self.control(action).await;
                let _ = reply.send(r);
            }
        }
    }

    async fn control(&mut self, action: Control) -> Result<ClusterRecord, String> {
        let name = self.rec.name.clone();
        match action {
            Control::Pause if self.rec.paused => return Err(format!("cluster/{name} is paused already")),
            Control::Resume if !self.rec.paused => return Err(format!("cluster/{name} is not paused")),
            Control::Pause | Control::Resume => {
                self.rec.paused = action == Control::Pause;
                // The operator's word replaces a canary's pause (and its auto-promotion).
                self.rec.pause_reason.clear();
                self.rec.canary.promote_at_ms = 0;
                self.rec.updated_ms = now_unix_ms();
                // Flushed before it is acknowledged: a restarted controller keeps it paused.
                self.save_cluster().await.map_err(|e| fleetadm_common::error_chain(&e))?;
            }
            Control::Abort => self.aborted = true,
        }
        tracing::info!(cluster = %name, ?action, "rollout steered by the operator");
        Ok(self.rec.clone())
    }

    async fn on_report(&mut self, id: TaskId, node: &str, r: &TaskReport) -> Result<(), ReportRejected> {
        let Some(current) = self.tasks.get(&id) else {
            return Err(ReportRejected::UnknownTask(id.to_string()));
        };
        let mut t = current.clone();
        let durability = match report::apply(&mut t, node, r, now_unix_ms())? {
            Applied::Ignored => return Ok(()),
            Applied::Progress => Durability::Lazy,
            Applied::Outcome => Durability::Flush,
        };
        self.save_task_with(&t, durability).await.map_err(|e| ReportRejected::Internal(Box::new(e)))?;
        if durability == Durability::Flush {
            self.log_outcome(&t, &format!("node:{node}")).await;
        }
        self.tasks.insert(id, t);
        Ok(())
    }

    fn host_now(&mut self, id: &TaskId, host: &str) -> HostNow {
        match self.sessions.info(host) {
            Some(info) => {
                self.offline_since.remove(id);
                let capability = id.step.task_kind().capability();
                let missing = (!info.meta.capabilities.contains(&capability))
                    .then(|| Missing { agent_version: info.meta.agent_version.clone(), capability });
                HostNow::Connected { session: info.id, missing }
            }
            None => {
                let since = *self.offline_since.entry(id.clone()).or_insert_with(Instant::now);
                HostNow::Offline { for_ms: since.elapsed().as_millis() as u64 }
            }
        }
    }

    /// Move one task on. `Ok(true)` while the step must wait for it.
    async fn advance(&mut self, t: &Task, budget: Option<usize>) -> Result<bool, Stop> {
        let Some(tr) = self.tasks.get(&t.id).cloned() else {
            return Err(Stop::Failed(format!("task {} is missing from the store", t.id)));
        };
        let now = now_unix_ms();
        let facts = Facts {
            state: tr.state,
            attempt: tr.attempts_made(),
            max_attempts: t.kind().max_attempts(),
            since_finished_ms: now.saturating_sub(tr.finished_ms),
            since_dispatched_ms: now.saturating_sub(tr.dispatched_ms),
            limit_ms: u64::from(t.kind().timeout_secs()) * 1000 + self.settings.grace.as_millis() as u64,
            host: self.host_now(&t.id, &tr.host),
            sent_on: self.sent_on.get(&t.id).copied(),
            host_failed_earlier: budget.is_some() && self.rec.failed_workers.iter().any(|w| w == t.id.subject()),
        };
        let limits = Limits {
            retry_delay_ms: self.settings.retry_delay.as_millis() as u64,
            offline_grace_ms: self.settings.offline_grace.as_millis() as u64,
        };
        let mut tr = tr;
        match decide(&facts, limits) {
            Next::Done => Ok(false),
            Next::Wait => Ok(true),
            Next::Skip => {
                tr.state = TaskState::Skipped;
                tr.output = format!("skipped: host {} failed earlier", t.id.subject());
                self.save_task(tr).await?;
                Ok(false)
            }
            Next::Dispatch if self.rec.paused || self.aborted => {
                let why = if self.rec.pause_reason.is_empty() {
                    format!("paused by the operator (controller op resume cluster/{})", self.rec.name)
                } else {
                    format!("paused: {}", self.rec.pause_reason)
                };
                if tr.waiting != why {
                    tr.waiting = why;
                    self.save_task_with(&tr, Durability::Lazy).await?;
                    self.tasks.insert(tr.id.clone(), tr);
                }
                Ok(true)
            }
            Next::Dispatch => {
                if tr.state == TaskState::Failed {
                    tracing::warn!(task = %tr.id, attempt = tr.attempt, "retrying failed task");
                }
                // Record the attempt (flushed) before sending it, so a report can never arrive
                // for an attempt the store does not know.
                tr.attempt += 1;
                tr.state = TaskState::Running;
                tr.dispatched_ms = now;
                tr.output.clear();
                tr.waiting.clear();
                let attempt = tr.attempt;
                self.save_task(tr).await?;
                self.send(t, attempt)?;
                Ok(true)
            }
            Next::Resend => {
                tracing::info!(task = %tr.id, attempt = tr.attempt, "re-sending task");
                self.send(t, tr.attempt)?;
                Ok(true)
            }
            Next::Blocked(m) if matches!(t.kind(), StepKind::JoinToken | StepKind::DropToken) => {
                // An older agent on master0: joins use the init configuration's token, as before
                // per-operation tokens (it expires on its own). Not a reason to stop the rollout.
                tr.state = TaskState::Skipped;
                tr.output = format!(
                    "skipped: agent {} on {} cannot run {}; joins use the token from the init configuration (upgrade node-agent for a token per operation)",
                    if m.agent_version.is_empty() { "(unknown version)" } else { &m.agent_version },
                    tr.host,
                    m.capability
                );
                tracing::warn!(task = %tr.id, "{}", tr.output);
                self.save_task(tr).await?;
                Ok(false)
            }
            Next::Blocked(m) => {
                let why = format!(
                    "{}: agent {} cannot run {}; upgrade node-agent",
                    tr.host,
                    if m.agent_version.is_empty() { "(unknown version)" } else { &m.agent_version },
                    m.capability
                );
                if tr.waiting != why {
                    tracing::warn!(task = %tr.id, "{why}");
                    tr.waiting = why;
                    self.save_task_with(&tr, Durability::Lazy).await?;
                    self.tasks.insert(tr.id.clone(), tr);
                }
                Ok(true)
            }
            Next::TimedOut => {
                tr.state = TaskState::Failed;
                tr.finished_ms = now;
                tr.output = format!("no report from {} within {}s", tr.host, facts.limit_ms / 1000);
                self.log_outcome(&tr, "controller").await;
                self.save_task(tr).await?;
                Ok(true)
            }
            Next::HostGone => {
                tr.state = TaskState::Failed;
                tr.attempt = tr.attempt.max(tr.first_attempt + t.kind().max_attempts());
                tr.finished_ms = now;
                tr.output = format!(
                    "host {} has not been connected for {}s; is node-agent running there?",
                    tr.host,
                    self.settings.offline_grace.as_secs()
                );
                self.log_outcome(&tr, "controller").await;
                self.save_task(tr).await?;
                Ok(true)
            }
            Next::Exhausted => {
                let last = tr.output.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
                let why = format!("{}: {} failed after {} attempt(s): {last}", tr.host, tr.kind, tr.attempts_made());
                let Some(allowed) = budget else { return Err(Stop::Failed(why)) };
                // The worker the task is about (master0 draining w3 counts against w3).
                let subject = t.id.subject().to_string();
                if !self.rec.failed_workers.contains(&subject) {
                    self.rec.failed_workers.push(subject);
                    self.save_cluster().await?;
                }
                tracing::warn!(cluster = %self.rec.name, "{why}");
                let failed = &self.rec.failed_workers;
                if failed.len() > allowed {
                    return Err(Stop::Failed(format!(
                        "{} workers failed ({}), more than --max-failures allows ({allowed}); last: {why}",
                        failed.len(),
                        failed.join(", ")
                    )));
                }
                tr.state = TaskState::Skipped;
                tr.output.push_str("\n(host left out within the failure budget)");
                self.save_task(tr).await?;
                Ok(false)
            }
        }
    }

    fn send(&mut self, t: &Task, attempt: u32) -> Result<(), Stop> {
        let task = specs::spec_for(&self.rec, t).map_err(|source| Stop::Spec { task: t.id.to_string(), source })?;
        #[allow(unused_mut)]
        let mut a = TaskAssignment {
            task_id: t.id.to_string(),
            attempt,
            timeout_secs: t.kind().timeout_secs(),
            task: Some(task),
            ..Default::default()
        };
        #[cfg(feature = "skew-probe")]
        fleetadm_proto::skew::stamp(&mut a, "from-a-newer-controller");
        match self.sessions.send(t.host(), ServerEvent { event: Some(server_event::Event::Task(a)) }) {
            Some(session) => {
                self.sent_on.insert(t.id.clone(), session);
                tracing::debug!(task = %t.id, attempt, "task sent");
            }
            None => tracing::debug!(task = %t.id, "host not reachable now; will re-send"),
        }
        Ok(())
    }

    /// Log a task's outcome in the audit log. A failure to log is reported, not fatal: the task
    /// record itself is already stored.
    async fn log_outcome(&self, t: &TaskRecord, actor: &str) {
        crate::metrics::metrics().task_outcome(t.kind.as_str(), &t.state.to_string());
        let (audit, e) = (self.audit.clone(), super::engine::task_event(t, actor));
        if let Err(err) = store::off_thread(move || audit.record(e, Durability::Lazy)).await {
            tracing::error!(task = %t.id, error = %fleetadm_common::error_chain(&err), "cannot write the audit log");
        }
    }

    async fn save_task(&mut self, t: TaskRecord) -> Result<(), StoreError> {
        self.save_task_with(&t, Durability::Flush).await?;
        self.tasks.insert(t.id.clone(), t);
        Ok(())
    }

    async fn save_task_with(&self, t: &TaskRecord, d: Durability) -> Result<(), StoreError> {
        let (store, key, t) = (self.store.clone(), t.key(), t.clone());
        store::off_thread(move || put_json(&*store, Table::Tasks, &key, &t, d)).await
    }

    async fn save_cluster(&mut self) -> Result<(), StoreError> {
        self.rec.updated_ms = now_unix_ms();
        let (store, rec) = (self.store.clone(), self.rec.clone());
        store::off_thread(move || put_json(&*store, Table::Clusters, &rec.name, &rec, Durability::Flush)).await
    }
}

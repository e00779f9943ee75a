//! The rollout driver: one tokio task per running cluster walks the plan's phases and steps,
//! hands each task to its host's session, and waits for the reports. Retries with a fresh attempt
//! number, re-sends (same attempt) when a host reconnects or the controller restarted, times tasks
//! out, and keeps a failure budget for workers.
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetadm_common::clock::now_unix_ms;
use fleetadm_common::pin::CaPin;
use fleetadm_common::token::BootstrapToken;
use fleetadm_proto::{server_event, ServerEvent, TaskAssignment, TaskReport, TaskState as WireState};
use thiserror::Error;
use tokio::sync::Notify;

use super::record::{
    self, bound_output, ClusterRecord, ClusterSecrets, ClusterSpec, ClusterState, TaskRecord, TaskState,
};
use super::specs;
use crate::dispatch::Sessions;
use crate::pki::kube::{KubePki, MasterIdentity, PkiSpec};
use crate::plan::phases::{self, ClusterShape, Task};
use crate::store::{
    get_json, list_json, list_prefix_json, put_json, update_json, Durability, Store, StoreError, Table, Update,
};

#[derive(Debug, Error)]
pub enum RolloutError {
    #[error("cluster {0} not found (see `controller cluster list`)")]
    NotFound(String),
    #[error("cluster {name} already exists ({state}); see `controller cluster status {name}`")]
    Exists { name: String, state: ClusterState },
    #[error("task {0} not found")]
    UnknownTask(String),
    #[error("task {task} belongs to host {owner}, not {caller}")]
    NotYours { task: String, owner: String, caller: String },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("generating the cluster PKI: {0}")]
    Pki(#[from] crate::pki::kube::KubePkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Tunables (defaults suit real hosts; tests shorten them).
#[derive(Debug, Clone)]
pub struct RolloutSettings {
    /// How often the driver re-checks when nothing wakes it.
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

pub struct Rollouts {
    store: Arc<dyn Store>,
    sessions: Sessions,
    settings: RolloutSettings,
    /// Wakes the drivers: a report arrived or a session opened.
    wake: Notify,
    running: Mutex<HashSet<String>>,
    /// Which session each running task was last sent on (in memory: after a restart, everything
    /// running is re-sent, and the agents answer from their journals).
    sent_on: Mutex<HashMap<String, u64>>,
    /// Since when a pending task has waited for its (disconnected) host.
    waiting: Mutex<HashMap<String, std::time::Instant>>,
}

/// The inputs of a new cluster, already resolved against the enrolled nodes.
pub struct NewCluster {
    pub shape: ClusterShape,
    /// The bundle's files, when the cluster is built from one.
    pub bundle_files: Vec<fleetadm_common::tasks::BundleFile>,
    pub spec: ClusterSpec,
    pub validity: Duration,
}

fn task_key(cluster: &str) -> String {
    format!("{cluster}/")
}

impl Rollouts {
    pub fn new(store: Arc<dyn Store>, sessions: Sessions, settings: RolloutSettings) -> Arc<Self> {
        Arc::new(Self {
            store,
            sessions,
            settings,
            wake: Notify::new(),
            running: Mutex::default(),
            sent_on: Mutex::default(),
            waiting: Mutex::default(),
        })
    }

    /// Something changed that a driver may be waiting for.
    pub fn poke(&self) {
        self.wake.notify_waiters();
    }

    pub fn get(&self, name: &str) -> Result<ClusterRecord, RolloutError> {
        get_json(&*self.store, Table::Clusters, name)?.ok_or_else(|| RolloutError::NotFound(name.to_string()))
    }

    pub fn list(&self) -> Result<Vec<ClusterRecord>, RolloutError> {
        Ok(list_json(&*self.store, Table::Clusters)?)
    }

    /// Whether `node` belongs to a cluster (not failed for good) that uses `bundle`.
    pub fn node_uses_bundle(&self, node: &str, bundle: &str) -> bool {
        self.list().unwrap_or_default().iter().any(|c| {
            c.shape.bundle.as_deref() == Some(bundle)
                && c.shape.masters.iter().chain(c.shape.workers.iter()).any(|h| h.node == node)
        })
    }

    /// The cluster using `bundle`, if any.
    pub fn cluster_using(&self, bundle: &str) -> Option<String> {
        self.list().unwrap_or_default().into_iter().find(|c| c.shape.bundle.as_deref() == Some(bundle)).map(|c| c.name)
    }

    pub fn tasks(&self, cluster: &str) -> Result<Vec<TaskRecord>, RolloutError> {
        Ok(list_prefix_json(&*self.store, Table::Tasks, &task_key(cluster))?)
    }

    /// Generate the cluster's secrets, persist the record and every task (flushed), and start the
    /// driver. An existing failed cluster is resumed instead: its failed and skipped tasks are
    /// tried again; finished work is kept.
    pub fn create(self: &Arc<Self>, new: NewCluster) -> Result<ClusterRecord, RolloutError> {
        let name = new.shape.name.clone();
        if let Some(old) = get_json::<ClusterRecord>(&*self.store, Table::Clusters, &name)? {
            if old.state != ClusterState::Failed {
                return Err(RolloutError::Exists { name, state: old.state });
            }
            if old.shape.masters != new.shape.masters || old.shape.workers != new.shape.workers {
                return Err(RolloutError::Invalid(format!(
                    "cluster {name} failed earlier with different hosts; a retry must name the same hosts"
                )));
            }
            return self.resume_failed(old);
        }
        record::failure_budget(&new.spec.max_failures, new.shape.workers.len()).map_err(RolloutError::Invalid)?;
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
            extra_sans: vec![],
            validity: new.validity,
            admin_group: "system:masters".into(),
        })?;
        let ca_der = rustls_pemfile_der(&pki.ca_cert_pem).map_err(RolloutError::Invalid)?;
        let ca_cert_hash = CaPin::of_cert_der(&ca_der).map_err(|e| RolloutError::Invalid(e.to_string()))?.to_string();
        let plan = phases::build(&new.shape);
        let now = now_unix_ms();
        let rec = ClusterRecord {
            name: name.clone(),
            created_ms: now,
            updated_ms: now,
            finished_ms: 0,
            state: ClusterState::Running,
            phase: plan.phases.first().map(|p| p.name.clone()).unwrap_or_default(),
            message: String::new(),
            spec: new.spec,
            shape: new.shape,
            plan,
            secrets: ClusterSecrets { pki, bootstrap_token: BootstrapToken::generate().expose(), ca_cert_hash },
            failed_workers: vec![],
            conditions: vec![],
            bundle_files: new.bundle_files,
            deleting: false,
        };
        // Tasks first, the cluster record last: a crash in between leaves no half-recorded cluster.
        self.record_tasks(&name, &rec.plan)?;
        put_json(&*self.store, Table::Clusters, &name, &rec, Durability::Flush)?;
        tracing::info!(cluster = %name, tasks = rec.plan.tasks().count(), "cluster recorded; rollout starting");
        self.spawn(name);
        Ok(rec)
    }

    /// Take a cluster apart on its hosts (reset tasks), then forget it. With `force`, forget it
    /// at once without touching the hosts (for hosts that are gone).
    pub fn delete(self: &Arc<Self>, name: &str, force: bool) -> Result<Option<ClusterRecord>, RolloutError> {
        let mut rec = self.get(name)?;
        let busy = self.running.lock().map(|r| r.contains(name)).unwrap_or(false);
        if force {
            if busy {
                return Err(RolloutError::Invalid(format!("cluster {name} is rolling out; wait for it to stop first")));
            }
            self.forget(name)?;
            tracing::warn!(cluster = name, "cluster forgotten without resetting its hosts (--force)");
            return Ok(None);
        }
        if busy || (rec.state == ClusterState::Running && !rec.deleting) {
            return Err(RolloutError::Invalid(format!(
                "cluster {name} is still rolling out; wait for it to finish (cluster status {name} --watch)"
            )));
        }
        if !rec.deleting {
            let plan = phases::teardown(&rec.shape);
            self.record_tasks(name, &plan)?;
            rec.plan = plan;
            rec.deleting = true;
            rec.conditions.clear();
        }
        for mut t in self.tasks(name)? {
            if t.phase == "reset" && matches!(t.state, TaskState::Failed | TaskState::Skipped) {
                t.state = TaskState::Pending;
                put_json(&*self.store, Table::Tasks, &t.id, &t, Durability::Lazy)?;
            }
        }
        rec.state = ClusterState::Running;
        rec.phase = "reset".into();
        rec.message = "deleting".into();
        rec.failed_workers.clear();
        rec.updated_ms = now_unix_ms();
        put_json(&*self.store, Table::Clusters, name, &rec, Durability::Flush)?;
        tracing::info!(cluster = name, "deleting cluster: resetting its hosts");
        self.spawn(name.to_string());
        Ok(Some(rec))
    }

    /// Store every task of `plan` as pending (flushed by the cluster record written after them).
    fn record_tasks(&self, cluster: &str, plan: &phases::Plan) -> Result<(), RolloutError> {
        for phase in &plan.phases {
            for t in phase.steps.iter().flatten() {
                let tr = TaskRecord {
                    id: t.id.clone(),
                    cluster: cluster.to_string(),
                    phase: phase.name.clone(),
                    host: t.host.clone(),
                    kind: t.kind.clone(),
                    state: TaskState::Pending,
                    attempt: 0,
                    dispatched_ms: 0,
                    finished_ms: 0,
                    changed: false,
                    output: String::new(),
                };
                put_json(&*self.store, Table::Tasks, &t.id, &tr, Durability::Lazy)?;
            }
        }
        Ok(())
    }

    /// Remove a cluster's record and tasks.
    fn forget(&self, name: &str) -> Result<(), RolloutError> {
        for t in self.tasks(name)? {
            self.store.remove(Table::Tasks, &t.id, Durability::Lazy)?;
        }
        self.store.remove(Table::Clusters, name, Durability::Flush)?;
        if let Ok(mut m) = self.sent_on.lock() {
            m.retain(|k, _| !k.starts_with(&task_key(name)));
        }
        Ok(())
    }

    fn resume_failed(self: &Arc<Self>, mut rec: ClusterRecord) -> Result<ClusterRecord, RolloutError> {
        for mut t in self.tasks(&rec.name)? {
            if matches!(t.state, TaskState::Failed | TaskState::Skipped) {
                t.state = TaskState::Pending;
                put_json(&*self.store, Table::Tasks, &t.id, &t, Durability::Lazy)?;
            }
        }
        rec.state = ClusterState::Running;
        rec.failed_workers.clear();
        rec.message = "retrying after a failure".into();
        rec.updated_ms = now_unix_ms();
        rec.finished_ms = 0;
        put_json(&*self.store, Table::Clusters, &rec.name, &rec, Durability::Flush)?;
        tracing::info!(cluster = %rec.name, "resuming a failed rollout");
        self.spawn(rec.name.clone());
        Ok(rec)
    }

    /// Restart the drivers of every cluster that was running when the controller stopped.
    pub fn resume_all(self: &Arc<Self>) -> Result<usize, RolloutError> {
        let mut n = 0;
        for rec in self.list()? {
            if rec.state == ClusterState::Running {
                tracing::info!(cluster = %rec.name, phase = %rec.phase, "resuming rollout after restart");
                self.spawn(rec.name);
                n += 1;
            }
        }
        Ok(n)
    }

    fn spawn(self: &Arc<Self>, name: String) {
        let fresh = self.running.lock().map(|mut r| r.insert(name.clone())).unwrap_or(false);
        if !fresh {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let outcome = me.drive(&name).await;
            let deleting = me.get(&name).map(|r| r.deleting).unwrap_or(false);
            let (state, message) = match outcome {
                Ok(_) if deleting => {
                    match me.forget(&name) {
                        Ok(()) => tracing::info!(cluster = %name, "cluster deleted"),
                        Err(e) => tracing::error!(cluster = %name, error = %e, "could not forget the cluster"),
                    }
                    if let Ok(mut r) = me.running.lock() {
                        r.remove(&name);
                    }
                    return;
                }
                Ok(msg) => (ClusterState::Succeeded, msg),
                Err(msg) => (ClusterState::Failed, msg),
            };
            if let Err(e) = me.finish(&name, state, &message) {
                tracing::error!(cluster = %name, error = %e, "could not record the end of the rollout");
            }
            if let Ok(mut r) = me.running.lock() {
                r.remove(&name);
            }
        });
    }

    fn finish(&self, name: &str, state: ClusterState, message: &str) -> Result<(), RolloutError> {
        self.update_cluster(name, |rec| {
            let now = now_unix_ms();
            rec.state = state;
            rec.message = message.to_string();
            rec.finished_ms = now;
            rec.set_condition("Ready", state == ClusterState::Succeeded, message.to_string(), now);
        })
        .map_err(RolloutError::Invalid)?;
        match state {
            ClusterState::Succeeded => tracing::info!(cluster = name, "{message}"),
            _ => tracing::error!(cluster = name, "rollout failed: {message}"),
        }
        Ok(())
    }

    fn update_cluster(&self, name: &str, f: impl Fn(&mut ClusterRecord)) -> Result<ClusterRecord, String> {
        update_json(
            &*self.store,
            Table::Clusters,
            name,
            Durability::Flush,
            |cur: Option<ClusterRecord>| -> Result<Update<ClusterRecord>, ()> {
                let mut rec = cur.ok_or(())?;
                f(&mut rec);
                rec.updated_ms = now_unix_ms();
                Ok(Update::Put(rec))
            },
        )
        .map_err(|e| e.to_string())?
        .map_err(|_| format!("cluster {name} disappeared"))?
        .ok_or_else(|| format!("cluster {name} disappeared"))
    }

    /// Walk the plan. `Ok(summary)` on success, `Err(reason)` when the rollout must stop.
    async fn drive(&self, name: &str) -> Result<String, String> {
        let rec = self.get(name).map_err(|e| e.to_string())?;
        let started = std::time::Instant::now();
        let budget = record::failure_budget(&rec.spec.max_failures, rec.shape.workers.len())?;
        for phase in &rec.plan.phases {
            let phase_name = phase.name.clone();
            self.update_cluster(name, |r| r.phase = phase_name.clone())?;
            let worker_phase = matches!(phase.name.as_str(), "join-workers" | "sync-ipvs");
            let t0 = std::time::Instant::now();
            for step in &phase.steps {
                self.run_step(name, step, worker_phase.then_some(budget)).await?;
            }
            let msg = format!("completed in {:.1}s", t0.elapsed().as_secs_f64());
            let now = now_unix_ms();
            self.update_cluster(name, |r| r.set_condition(&phase_name, true, msg.clone(), now))?;
        }
        let rec = self.get(name).map_err(|e| e.to_string())?;
        let mut summary = format!(
            "cluster {name} is ready: {} masters, {} workers in {:.0}s",
            rec.shape.masters.len(),
            rec.shape.workers.len() - rec.failed_workers.len(),
            started.elapsed().as_secs_f64()
        );
        if !rec.failed_workers.is_empty() {
            summary.push_str(&format!(
                " ({} workers failed: {})",
                rec.failed_workers.len(),
                rec.failed_workers.join(", ")
            ));
        }
        Ok(summary)
    }

    fn load_task(&self, id: &str) -> Result<TaskRecord, String> {
        get_json::<TaskRecord>(&*self.store, Table::Tasks, id)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("task {id} is missing from the store"))
    }

    fn save_task(&self, t: &TaskRecord) -> Result<(), String> {
        put_json(&*self.store, Table::Tasks, &t.id, t, Durability::Flush).map_err(|e| e.to_string())
    }

    /// Run one step (tasks in parallel) to completion. `budget` is set for worker phases: failed
    /// workers are recorded and skipped until more than `budget` have failed.
    async fn run_step(&self, cluster: &str, step: &[Task], budget: Option<usize>) -> Result<(), String> {
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let rec = self.get(cluster).map_err(|e| e.to_string())?;
            let mut open = 0usize;
            for t in step {
                let mut tr = self.load_task(&t.id)?;
                if tr.state.is_final() {
                    continue;
                }
                if budget.is_some() && rec.failed_workers.contains(&tr.host) {
                    tr.state = TaskState::Skipped;
                    tr.output = format!("skipped: host {} failed earlier", tr.host);
                    self.save_task(&tr)?;
                    continue;
                }
                open += 1;
                match tr.state {
                    TaskState::Failed if tr.attempt < specs::max_attempts(&tr.kind) => {
                        let since = now_unix_ms().saturating_sub(tr.finished_ms);
                        if since >= self.settings.retry_delay.as_millis() as u64 {
                            tracing::warn!(task = %tr.id, attempt = tr.attempt, "retrying failed task");
                            tr.state = TaskState::Pending;
                            self.save_task(&tr)?;
                            self.dispatch(&rec, t, &mut tr)?;
                        }
                    }
                    TaskState::Failed => {
                        let last = tr.output.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
                        let why = format!("{}: {} failed after {} attempt(s): {last}", tr.host, tr.kind, tr.attempt);
                        match budget {
                            Some(allowed) => {
                                let host = tr.host.clone();
                                let rec = self.update_cluster(cluster, |r| {
                                    if !r.failed_workers.contains(&host) {
                                        r.failed_workers.push(host.clone());
                                    }
                                })?;
                                tracing::warn!(cluster, "{why}");
                                if rec.failed_workers.len() > allowed {
                                    return Err(format!(
                                        "{} workers failed ({}), more than --max-failures allows ({allowed}); last: {why}",
                                        rec.failed_workers.len(),
                                        rec.failed_workers.join(", ")
                                    ));
                                }
                                tr.state = TaskState::Skipped;
                                tr.output.push_str("\n(host left out within the failure budget)");
                                self.save_task(&tr)?;
                            }
                            None => return Err(why),
                        }
                    }
                    TaskState::Pending => {
                        if self.sessions.is_connected(&tr.host) {
                            self.waiting.lock().map(|mut w| w.remove(&tr.id)).ok();
                            self.dispatch(&rec, t, &mut tr)?
                        } else {
                            let since = self
                                .waiting
                                .lock()
                                .map(|mut w| *w.entry(tr.id.clone()).or_insert_with(std::time::Instant::now))
                                .unwrap_or_else(|_| std::time::Instant::now());
                            if since.elapsed() > self.settings.offline_grace {
                                tr.state = TaskState::Failed;
                                tr.attempt = tr.attempt.max(specs::max_attempts(&tr.kind));
                                tr.finished_ms = now_unix_ms();
                                tr.output = format!(
                                    "host {} has not been connected for {}s; is node-agent running there?",
                                    tr.host,
                                    self.settings.offline_grace.as_secs()
                                );
                                self.save_task(&tr)?;
                            }
                        }
                    }
                    TaskState::Running => {
                        let limit =
                            u64::from(specs::timeout_secs(&tr.kind)) * 1000 + self.settings.grace.as_millis() as u64;
                        if now_unix_ms().saturating_sub(tr.dispatched_ms) > limit {
                            tr.state = TaskState::Failed;
                            tr.finished_ms = now_unix_ms();
                            tr.output = format!("no report from {} within {}s", tr.host, limit / 1000);
                            self.save_task(&tr)?;
                            continue;
                        }
                        let current = self.sessions.info(&tr.host).map(|s| s.id);
                        let sent = self.sent_on.lock().ok().and_then(|m| m.get(&tr.id).copied());
                        if current.is_some() && current != sent {
                            // Reconnected agent or restarted controller: send the same attempt again.
                            tracing::info!(task = %tr.id, attempt = tr.attempt, "re-sending task");
                            self.send(&rec, t, &tr)?;
                        }
                    }
                    TaskState::Succeeded | TaskState::Skipped => {}
                }
            }
            if open == 0 {
                return Ok(());
            }
            tokio::select! {
                _ = &mut woken => {}
                _ = tokio::time::sleep(self.settings.tick) => {}
            }
        }
    }

    /// Start a new attempt: record it (flushed) before sending, so a report can never arrive for
    /// an attempt the store does not know.
    fn dispatch(&self, rec: &ClusterRecord, t: &Task, tr: &mut TaskRecord) -> Result<(), String> {
        if !self.sessions.is_connected(&tr.host) {
            return Ok(());
        }
        tr.attempt += 1;
        tr.state = TaskState::Running;
        tr.dispatched_ms = now_unix_ms();
        tr.output.clear();
        self.save_task(tr)?;
        self.send(rec, t, tr)
    }

    fn send(&self, rec: &ClusterRecord, t: &Task, tr: &TaskRecord) -> Result<(), String> {
        let spec = specs::spec_for(rec, t)?;
        let spec_json = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
        let ev = ServerEvent {
            event: Some(server_event::Event::Task(TaskAssignment {
                task_id: tr.id.clone(),
                attempt: tr.attempt,
                // The kind of the parameters (a plan step such as hosts-clean reuses `hosts`).
                kind: spec.kind().to_string(),
                spec_json,
                timeout_secs: specs::timeout_secs(&tr.kind),
            })),
        };
        match self.sessions.send(&tr.host, ev) {
            Some(session) => {
                if let Ok(mut m) = self.sent_on.lock() {
                    m.insert(tr.id.clone(), session);
                }
                tracing::debug!(task = %tr.id, attempt = tr.attempt, host = %tr.host, "task sent");
            }
            None => tracing::debug!(task = %tr.id, host = %tr.host, "host not reachable now; will re-send"),
        }
        Ok(())
    }

    /// A report from `node`. Only the task's own host may report; reports for another attempt
    /// (late answers to a timed-out try) are acknowledged and ignored.
    pub fn report(&self, node: &str, r: &TaskReport) -> Result<(), RolloutError> {
        let state = WireState::try_from(r.state).unwrap_or(WireState::Unspecified);
        let now = now_unix_ms();
        // Progress is cheap to lose (the next report repeats it); outcomes are flushed.
        let durability = if state == WireState::Running { Durability::Lazy } else { Durability::Flush };
        let res = update_json(&*self.store, Table::Tasks, &r.task_id, durability, |cur: Option<TaskRecord>| {
            let mut t = cur.ok_or_else(|| RolloutError::UnknownTask(r.task_id.clone()))?;
            if t.host != node {
                return Err(RolloutError::NotYours { task: t.id, owner: t.host, caller: node.to_string() });
            }
            if t.attempt != r.attempt || t.state != TaskState::Running {
                return Ok(Update::Keep);
            }
            match state {
                WireState::Succeeded => t.state = TaskState::Succeeded,
                WireState::Failed => t.state = TaskState::Failed,
                WireState::Running => {
                    t.output = bound_output(&r.output);
                    return Ok(Update::Put(t));
                }
                WireState::Unspecified => {
                    return Err(RolloutError::Invalid("task report without a state".into()));
                }
            }
            t.output = bound_output(&r.output);
            t.changed = r.changed;
            t.finished_ms = now;
            Ok(Update::Put(t))
        })?;
        res?;
        self.poke();
        Ok(())
    }
}

fn rustls_pemfile_der(pem: &str) -> Result<Vec<u8>, String> {
    let mut rd = pem.as_bytes();
    let first = rustls_pemfile::certs(&mut rd).next();
    match first {
        Some(Ok(c)) => Ok(c.to_vec()),
        _ => Err("cluster CA certificate is not PEM".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::phases::PlannedHost;
    use crate::store::SledStore;

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
            },
            validity: Duration::from_secs(3600),
        }
    }

    fn report(id: &str, attempt: u32, state: WireState) -> TaskReport {
        TaskReport { task_id: id.into(), attempt, state: state as i32, output: "out".into(), changed: true }
    }

    #[tokio::test]
    async fn only_the_owner_reports_and_stale_attempts_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let r = Rollouts::new(store.clone(), Sessions::new(|_| {}), RolloutSettings::default());
        let rec = r.create(new_cluster()).unwrap();
        assert_eq!(rec.state, ClusterState::Running);
        let id = "lab/preflight/m1/preflight";
        // Nothing is connected, so the task is still pending: a report for it changes nothing.
        r.report("m1", &report(id, 1, WireState::Succeeded)).unwrap();
        let t: TaskRecord = get_json(&*store, Table::Tasks, id).unwrap().unwrap();
        assert_eq!(t.state, TaskState::Pending);
        // Mark it running at attempt 2 (as the driver would), then report.
        let mut t = t;
        t.state = TaskState::Running;
        t.attempt = 2;
        put_json(&*store, Table::Tasks, id, &t, Durability::Flush).unwrap();
        assert!(matches!(r.report("w1", &report(id, 2, WireState::Succeeded)), Err(RolloutError::NotYours { .. })));
        assert!(matches!(r.report("m1", &report("lab/nope", 1, WireState::Failed)), Err(RolloutError::UnknownTask(_))));
        assert!(matches!(r.report("m1", &report(id, 2, WireState::Unspecified)), Err(RolloutError::Invalid(_))));
        r.report("m1", &report(id, 1, WireState::Failed)).unwrap();
        let t: TaskRecord = get_json(&*store, Table::Tasks, id).unwrap().unwrap();
        assert_eq!(t.state, TaskState::Running, "a late report for an older attempt is ignored");
        r.report("m1", &report(id, 2, WireState::Succeeded)).unwrap();
        let t: TaskRecord = get_json(&*store, Table::Tasks, id).unwrap().unwrap();
        assert_eq!((t.state, t.changed, t.output.as_str()), (TaskState::Succeeded, true, "out"));
        // The secrets never appear in the admin view.
        let view = super::super::view::build(&r.get("lab").unwrap(), &r.tasks("lab").unwrap(), true);
        let json = serde_json::to_string(&view).unwrap();
        assert!(!json.contains("PRIVATE KEY") && !json.contains(&rec.secrets.bootstrap_token));
        // Hosts of a running cluster cannot be claimed by another.
        let mut other = new_cluster();
        other.shape.name = "other".into();
        assert!(matches!(r.create(other), Err(RolloutError::Invalid(m)) if m.contains("already belong")));
        assert!(matches!(r.create(new_cluster()), Err(RolloutError::Exists { .. })));
    }

    #[test]
    fn specs_send_keys_only_to_masters() {
        let rec_store = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(rec_store.path()).unwrap());
        let rt = tokio::runtime::Runtime::new().unwrap();
        let r = rt.block_on(async { Rollouts::new(store, Sessions::new(|_| {}), RolloutSettings::default()) });
        let rec = rt.block_on(async { r.create(new_cluster()).unwrap() });
        let pki =
            Task { id: "lab/init/m1/pki".into(), host: "m1".into(), kind: "pki".into(), description: String::new() };
        let spec = serde_json::to_string(&specs::spec_for(&rec, &pki).unwrap()).unwrap();
        assert!(spec.contains("PRIVATE KEY"));
        let join = Task {
            id: "lab/join-workers/w1/kubeadm-join".into(),
            host: "w1".into(),
            kind: "kubeadm-join".into(),
            description: String::new(),
        };
        let spec = serde_json::to_string(&specs::spec_for(&rec, &join).unwrap()).unwrap();
        assert!(!spec.contains("PRIVATE KEY") && spec.contains(&rec.secrets.bootstrap_token));
        let lb =
            Task { id: "lab/sync-ipvs/w1/lb".into(), host: "w1".into(), kind: "lb".into(), description: String::new() };
        let spec = serde_json::to_string(&specs::spec_for(&rec, &lb).unwrap()).unwrap();
        assert!(spec.contains("10.103.97.2:6443") && spec.contains("10.0.0.1:6443") && !spec.contains("PRIVATE KEY"));
        let hosts = Task {
            id: "lab/hosts/w1/hosts".into(),
            host: "w1".into(),
            kind: "hosts".into(),
            description: String::new(),
        };
        let spec = serde_json::to_string(&specs::spec_for(&rec, &hosts).unwrap()).unwrap();
        assert!(spec.contains(r#"{"ip":"10.103.97.2","names":["apiserver.cluster.local"]}"#), "{spec}");
    }
}

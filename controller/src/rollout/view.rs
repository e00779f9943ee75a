//! What `controller cluster status/list/logs/get` show: the cluster record without its secrets,
//! with per-host task states and counts.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::record::{ClusterRecord, ClusterState, Condition, TaskRecord, TaskState};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub total: usize,
    pub succeeded: usize,
    pub running: usize,
    pub pending: usize,
    pub failed: usize,
    pub skipped: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskView {
    pub id: String,
    pub phase: String,
    pub kind: String,
    pub state: TaskState,
    pub attempt: u32,
    pub changed: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output: String,
    #[serde(default)]
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostView {
    pub name: String,
    pub ip: String,
    pub role: String,
    pub tasks: Vec<TaskView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterView {
    pub name: String,
    pub state: ClusterState,
    pub phase: String,
    pub message: String,
    pub version: String,
    pub vip: String,
    pub pod_cidr: String,
    pub service_cidr: String,
    pub masters: Vec<String>,
    pub workers: Vec<String>,
    pub failed_workers: Vec<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub finished_ms: u64,
    pub conditions: Vec<Condition>,
    pub counts: Counts,
    /// Per phase: tasks done / total, in plan order.
    pub phases: Vec<(String, usize, usize)>,
    pub hosts: Vec<HostView>,
    /// The Clusterfile the cluster was created from, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub clusterfile: String,
}

pub fn build(rec: &ClusterRecord, tasks: &[TaskRecord], with_output: bool) -> ClusterView {
    let mut counts = Counts::default();
    let by_id: BTreeMap<&str, &TaskRecord> = tasks.iter().map(|t| (t.id.as_str(), t)).collect();
    let mut hosts: Vec<HostView> = rec
        .shape
        .masters
        .iter()
        .map(|h| (h, "master"))
        .chain(rec.shape.workers.iter().map(|h| (h, "worker")))
        .map(|(h, role)| HostView { name: h.node.clone(), ip: h.ip.to_string(), role: role.into(), tasks: vec![] })
        .collect();
    let mut phases = Vec::new();
    for p in &rec.plan.phases {
        let (mut done, mut total) = (0, 0);
        for t in p.steps.iter().flatten() {
            let Some(tr) = by_id.get(t.id.as_str()) else { continue };
            total += 1;
            counts.total += 1;
            match tr.state {
                TaskState::Succeeded => {
                    counts.succeeded += 1;
                    done += 1
                }
                TaskState::Skipped => {
                    counts.skipped += 1;
                    done += 1
                }
                TaskState::Running => counts.running += 1,
                TaskState::Pending => counts.pending += 1,
                TaskState::Failed => counts.failed += 1,
            }
            if let Some(h) = hosts.iter_mut().find(|h| h.name == tr.host) {
                h.tasks.push(TaskView {
                    id: tr.id.clone(),
                    phase: tr.phase.clone(),
                    kind: tr.kind.clone(),
                    state: tr.state,
                    attempt: tr.attempt,
                    changed: tr.changed,
                    output: if with_output { tr.output.clone() } else { String::new() },
                    duration_ms: tr.finished_ms.saturating_sub(tr.dispatched_ms),
                });
            }
        }
        phases.push((p.name.clone(), done, total));
    }
    hosts.iter_mut().for_each(|h| h.tasks.sort_by_key(|t| t.id.clone()));
    // Keep plan order inside each host instead of id order.
    for h in &mut hosts {
        let order: Vec<&str> = rec.plan.tasks().filter(|t| t.host == h.name).map(|t| t.id.as_str()).collect();
        h.tasks.sort_by_key(|t| order.iter().position(|id| *id == t.id).unwrap_or(usize::MAX));
    }
    ClusterView {
        name: rec.name.clone(),
        state: rec.state,
        phase: rec.phase.clone(),
        message: rec.message.clone(),
        version: rec.spec.version.clone(),
        vip: rec.shape.vip.to_string(),
        pod_cidr: rec.spec.pod_cidr.clone(),
        service_cidr: rec.spec.service_cidr.clone(),
        masters: rec.shape.masters.iter().map(|h| h.node.clone()).collect(),
        workers: rec.shape.workers.iter().map(|h| h.node.clone()).collect(),
        failed_workers: rec.failed_workers.clone(),
        created_ms: rec.created_ms,
        updated_ms: rec.updated_ms,
        finished_ms: rec.finished_ms,
        conditions: rec.conditions.clone(),
        counts,
        phases,
        hosts,
        clusterfile: rec.spec.clusterfile.clone(),
    }
}

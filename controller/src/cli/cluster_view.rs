//! How the CLI presents a cluster (`cluster status -o json|yaml`, the progress lines): the typed
//! `fleetadm.v1.ClusterView` from the admin API, with enums as words.
use fleetadm_proto as pb;
use serde::Serialize;

use crate::rollout::record::{ClusterState, Condition, TaskState};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub total: u32,
    pub succeeded: u32,
    pub running: u32,
    pub pending: u32,
    pub failed: u32,
    pub skipped: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskView {
    pub id: String,
    pub phase: String,
    pub kind: String,
    pub state: TaskState,
    pub attempt: u32,
    pub changed: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub output: String,
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub waiting: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostView {
    pub name: String,
    pub ip: String,
    pub role: String,
    pub tasks: Vec<TaskView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    pub name: String,
    pub state: ClusterState,
    pub phase: String,
    /// What the current plan does ("create", "add workers h6", "delete").
    #[serde(skip_serializing_if = "String::is_empty")]
    pub operation: String,
    /// Paused by the operator: no new task goes out until `controller op resume cluster/NAME`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
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
    pub phases: Vec<(String, u32, u32)>,
    pub hosts: Vec<HostView>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub clusterfile: String,
}

/// A view this CLI cannot interpret (an enum value from a newer controller).
#[derive(Debug, thiserror::Error)]
#[error("the controller sent a cluster {what} this CLI does not know ({value}); upgrade the controller CLI")]
pub struct UnknownValue {
    what: &'static str,
    value: i32,
}

fn cluster_state(v: i32) -> Result<ClusterState, UnknownValue> {
    match pb::ClusterState::try_from(v) {
        Ok(pb::ClusterState::Running) => Ok(ClusterState::Running),
        Ok(pb::ClusterState::Succeeded) => Ok(ClusterState::Succeeded),
        Ok(pb::ClusterState::Failed) => Ok(ClusterState::Failed),
        _ => Err(UnknownValue { what: "state", value: v }),
    }
}

fn step_state(v: i32) -> Result<TaskState, UnknownValue> {
    match pb::StepState::try_from(v) {
        Ok(pb::StepState::Pending) => Ok(TaskState::Pending),
        Ok(pb::StepState::Running) => Ok(TaskState::Running),
        Ok(pb::StepState::Succeeded) => Ok(TaskState::Succeeded),
        Ok(pb::StepState::Failed) => Ok(TaskState::Failed),
        Ok(pb::StepState::Skipped) => Ok(TaskState::Skipped),
        _ => Err(UnknownValue { what: "task state", value: v }),
    }
}

impl TryFrom<&pb::ClusterView> for ClusterView {
    type Error = UnknownValue;

    fn try_from(v: &pb::ClusterView) -> Result<Self, UnknownValue> {
        let c = v.counts.unwrap_or_default();
        let hosts = v
            .hosts
            .iter()
            .map(|h| {
                let tasks = h
                    .tasks
                    .iter()
                    .map(|t| {
                        Ok(TaskView {
                            id: t.id.clone(),
                            phase: t.phase.clone(),
                            kind: t.kind.clone(),
                            state: step_state(t.state)?,
                            attempt: t.attempt,
                            changed: t.changed,
                            output: t.output.clone(),
                            duration_ms: t.duration_ms,
                            waiting: t.waiting.clone(),
                        })
                    })
                    .collect::<Result<_, UnknownValue>>()?;
                let role = match pb::HostRole::try_from(h.role) {
                    Ok(pb::HostRole::Master) => "master",
                    Ok(pb::HostRole::Worker) => "worker",
                    _ => "unknown",
                };
                Ok(HostView { name: h.name.clone(), ip: h.ip.clone(), role: role.into(), tasks })
            })
            .collect::<Result<_, UnknownValue>>()?;
        Ok(ClusterView {
            name: v.name.clone(),
            state: cluster_state(v.state)?,
            phase: v.phase.clone(),
            operation: v.operation.clone(),
            paused: v.paused,
            message: v.message.clone(),
            version: v.version.clone(),
            vip: v.vip.clone(),
            pod_cidr: v.pod_cidr.clone(),
            service_cidr: v.service_cidr.clone(),
            masters: v.masters.clone(),
            workers: v.workers.clone(),
            failed_workers: v.failed_workers.clone(),
            created_ms: v.created_unix_ms,
            updated_ms: v.updated_unix_ms,
            finished_ms: v.finished_unix_ms,
            conditions: v
                .conditions
                .iter()
                .map(|c| Condition {
                    kind: c.r#type.clone(),
                    status: c.status,
                    time_ms: c.time_unix_ms,
                    message: c.message.clone(),
                })
                .collect(),
            counts: Counts {
                total: c.total,
                succeeded: c.succeeded,
                running: c.running,
                pending: c.pending,
                failed: c.failed,
                skipped: c.skipped,
            },
            phases: v.phases.iter().map(|p| (p.name.clone(), p.done, p.total)).collect(),
            hosts,
            clusterfile: v.clusterfile.clone(),
        })
    }
}

/// The plan for `--dry-run -o json`.
pub fn plan_json(p: &pb::PlanView) -> serde_json::Value {
    serde_json::json!({
        "cluster": p.cluster,
        "phases": p.phases.iter().map(|ph| serde_json::json!({
            "name": ph.name,
            "note": (!ph.note.is_empty()).then_some(&ph.note),
            "steps": ph.steps.iter().map(|s| s.tasks.iter().map(|t| serde_json::json!({
                "id": t.id, "host": t.host, "kind": t.kind, "description": t.description,
            })).collect::<Vec<_>>()).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

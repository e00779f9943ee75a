//! What the admin API returns for a cluster: the record without its secrets, with per-host task
//! states and counts, as typed protocol messages (`fleetadm.v1.ClusterView`, `PlanView`).
use std::collections::BTreeMap;

use fleetadm_proto as pb;

use super::record::{ClusterRecord, ClusterState, TaskRecord, TaskState};

pub fn cluster_state(s: ClusterState) -> pb::ClusterState {
    match s {
        ClusterState::Running => pb::ClusterState::Running,
        ClusterState::Succeeded => pb::ClusterState::Succeeded,
        ClusterState::Failed => pb::ClusterState::Failed,
    }
}

pub fn step_state(s: TaskState) -> pb::StepState {
    match s {
        TaskState::Pending => pb::StepState::Pending,
        TaskState::Running => pb::StepState::Running,
        TaskState::Succeeded => pb::StepState::Succeeded,
        TaskState::Failed => pb::StepState::Failed,
        TaskState::Skipped => pb::StepState::Skipped,
    }
}

pub fn build(rec: &ClusterRecord, tasks: &[TaskRecord], with_output: bool) -> pb::ClusterView {
    let mut counts = pb::TaskCounts::default();
    let by_id: BTreeMap<String, &TaskRecord> = tasks.iter().map(|t| (t.key(), t)).collect();
    let mut hosts: Vec<pb::HostView> = rec
        .shape
        .masters
        .iter()
        .map(|h| (h, pb::HostRole::Master))
        .chain(rec.shape.workers.iter().map(|h| (h, pb::HostRole::Worker)))
        // (hosts a removal takes out: still shown with their tasks until it ends)
        .chain(
            rec.leaving.iter().map(|l| (&l.host, if l.master { pb::HostRole::Master } else { pb::HostRole::Worker })),
        )
        .map(|(h, role)| pb::HostView { name: h.node.clone(), ip: h.ip.to_string(), role: role as i32, tasks: vec![] })
        .collect();
    let mut phases = Vec::new();
    // Plan order, per host and overall.
    for p in &rec.plan.phases {
        let (mut done, mut total) = (0, 0);
        for t in p.steps.iter().flatten() {
            let Some(tr) = by_id.get(&t.id.to_string()) else { continue };
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
                h.tasks.push(pb::TaskView {
                    id: tr.key(),
                    phase: tr.phase.to_string(),
                    kind: tr.kind.to_string(),
                    state: step_state(tr.state) as i32,
                    attempt: tr.attempt,
                    changed: tr.changed,
                    output: if with_output { tr.output.clone() } else { String::new() },
                    duration_ms: tr.finished_ms.saturating_sub(tr.dispatched_ms),
                    waiting: tr.waiting.clone(),
                });
            }
        }
        phases.push(pb::PhaseProgress { name: p.name.to_string(), done, total });
    }
    pb::ClusterView {
        name: rec.name.clone(),
        state: cluster_state(rec.state) as i32,
        phase: rec.phase.to_string(),
        message: rec.message.clone(),
        version: rec.spec.version.clone(),
        vip: rec.shape.vip.to_string(),
        pod_cidr: rec.spec.pod_cidr.clone(),
        service_cidr: rec.spec.service_cidr.clone(),
        masters: rec.shape.masters.iter().map(|h| h.node.clone()).collect(),
        workers: rec.shape.workers.iter().map(|h| h.node.clone()).collect(),
        failed_workers: rec.failed_workers.clone(),
        created_unix_ms: rec.created_ms,
        updated_unix_ms: rec.updated_ms,
        finished_unix_ms: rec.finished_ms,
        conditions: rec
            .conditions
            .iter()
            .map(|c| pb::Condition {
                r#type: c.kind.clone(),
                status: c.status,
                time_unix_ms: c.time_ms,
                message: c.message.clone(),
            })
            .collect(),
        counts: Some(counts),
        phases,
        hosts,
        clusterfile: rec.spec.clusterfile.clone(),
        deleting: rec.deleting,
        operation: rec.operation.to_string(),
        paused: rec.paused && rec.state == ClusterState::Running,
    }
}

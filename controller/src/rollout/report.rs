//! Applying an agent's report to a task record: pure, shared by the cluster's actor and by the
//! path for clusters that are not rolling out (a late answer after a rollout stopped).
use fleetadm_proto::{TaskReport, TaskState as WireState};

use super::record::{bound_output, TaskRecord, TaskState};
use crate::dispatch::ReportRejected;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// For another attempt, or for a task that is not running: acknowledged, changes nothing.
    Ignored,
    /// Progress of the running attempt (cheap to lose: the next report repeats it).
    Progress,
    /// The attempt's outcome: must be flushed before the agent is answered.
    Outcome,
}

/// What is kept of a task's output: secrets redacted (kubeadm prints join tokens and the
/// certificate key), then bounded.
fn stored_output(out: &str) -> String {
    bound_output(&fleetadm_common::redact::secrets(out))
}

/// Apply `r` from `node` to `t`. Only the task's own host may report on it.
pub fn apply(t: &mut TaskRecord, node: &str, r: &TaskReport, now_ms: u64) -> Result<Applied, ReportRejected> {
    if t.host != node {
        return Err(ReportRejected::NotYours { task: t.key(), owner: t.host.clone(), caller: node.to_string() });
    }
    if t.attempt != r.attempt || t.state != TaskState::Running {
        return Ok(Applied::Ignored);
    }
    let state = match WireState::try_from(r.state) {
        Ok(WireState::Succeeded) => TaskState::Succeeded,
        Ok(WireState::Failed) => TaskState::Failed,
        Ok(WireState::Running) => {
            t.output = stored_output(&r.output);
            return Ok(Applied::Progress);
        }
        Ok(WireState::Unspecified) | Err(_) => return Err(ReportRejected::Invalid("a task report needs a state")),
    };
    t.state = state;
    t.output = stored_output(&r.output);
    t.changed = r.changed;
    t.finished_ms = now_ms;
    t.waiting.clear();
    Ok(Applied::Outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::phases::{PhaseName, StepKind, TaskId};

    fn running(attempt: u32) -> TaskRecord {
        let mut t = TaskRecord::new(TaskId::new("lab", PhaseName::Preflight, "m1", StepKind::Preflight));
        t.state = TaskState::Running;
        t.attempt = attempt;
        t
    }

    fn report(attempt: u32, state: WireState) -> TaskReport {
        TaskReport {
            task_id: "lab/preflight/m1/preflight".into(),
            attempt,
            state: state as i32,
            output: "out".into(),
            changed: true,
            ..Default::default()
        }
    }

    #[test]
    fn owner_attempt_and_state_rules() {
        let mut t = running(2);
        assert!(matches!(
            apply(&mut t, "w1", &report(2, WireState::Succeeded), 5),
            Err(ReportRejected::NotYours { .. })
        ));
        assert!(matches!(apply(&mut t, "m1", &report(2, WireState::Unspecified), 5), Err(ReportRejected::Invalid(_))));
        assert_eq!(apply(&mut t, "m1", &report(1, WireState::Failed), 5).unwrap(), Applied::Ignored);
        assert_eq!(t.state, TaskState::Running, "a late report for an older attempt changes nothing");
        assert_eq!(apply(&mut t, "m1", &report(2, WireState::Running), 5).unwrap(), Applied::Progress);
        assert_eq!((t.state, t.output.as_str()), (TaskState::Running, "out"));
        assert_eq!(apply(&mut t, "m1", &report(2, WireState::Succeeded), 5).unwrap(), Applied::Outcome);
        assert_eq!((t.state, t.changed, t.finished_ms), (TaskState::Succeeded, true, 5));
        assert_eq!(
            apply(&mut t, "m1", &report(2, WireState::Failed), 6).unwrap(),
            Applied::Ignored,
            "outcomes are final"
        );
        let mut pending = TaskRecord::new(TaskId::new("lab", PhaseName::Preflight, "m1", StepKind::Preflight));
        assert_eq!(apply(&mut pending, "m1", &report(0, WireState::Succeeded), 5).unwrap(), Applied::Ignored);
    }

    #[test]
    fn secrets_in_output_are_redacted_before_they_are_stored() {
        let mut t = running(1);
        let r = TaskReport {
            output: "kubeadm join x:6443 --token abcdef.0123456789abcdef --certificate-key ".to_string()
                + &"c".repeat(64),
            ..report(1, WireState::Succeeded)
        };
        apply(&mut t, "m1", &r, 1).unwrap();
        assert!(!t.output.contains("0123456789abcdef") && !t.output.contains(&"c".repeat(64)), "{}", t.output);
        assert!(t.output.contains("--token <redacted>"), "{}", t.output);
    }
}

//! "What to do next with this task": a pure function of the task's record and what the actor knows
//! about its host right now. The actor ([`super::actor`]) gathers the facts, calls [`decide`], and
//! carries the answer out (recording before acting).
use super::record::TaskState;

/// The host of a task, as the actor sees it at this moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostNow {
    /// No session; for this long (ms) while the task waited.
    Offline { for_ms: u64 },
    /// A session with this id. `missing` names the capability the agent lacks, with its version.
    Connected { session: u64, missing: Option<Missing> },
}

/// The agent cannot run the task: it did not announce `capability`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub agent_version: String,
    pub capability: String,
}

/// Everything [`decide`] looks at.
#[derive(Debug, Clone)]
pub struct Facts {
    pub state: TaskState,
    pub attempt: u32,
    pub max_attempts: u32,
    /// Milliseconds since the last attempt finished (for the retry delay).
    pub since_finished_ms: u64,
    /// Milliseconds since the current attempt was sent.
    pub since_dispatched_ms: u64,
    /// The agent's own timeout plus the controller's grace.
    pub limit_ms: u64,
    pub host: HostNow,
    /// The session the current attempt was last sent on (in memory: unknown after a restart).
    pub sent_on: Option<u64>,
    /// The task is in a worker phase with a failure budget, and its host already failed there.
    pub host_failed_earlier: bool,
}

/// Tunables the decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub retry_delay_ms: u64,
    pub offline_grace_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Finished (succeeded or skipped): nothing to do.
    Done,
    /// Leave it for now; look again on the next wake-up.
    Wait,
    /// Its host failed earlier in this phase and was left out within the budget.
    Skip,
    /// Start a new attempt (record it, then send it).
    Dispatch,
    /// Send the current attempt again (the agent reconnected or the controller restarted; the
    /// agent answers from its journal if it already ran it).
    Resend,
    /// The agent is connected but cannot run this kind: say why, do not send, do not fail.
    Blocked(Missing),
    /// The running attempt produced no final report in time: it failed.
    TimedOut,
    /// The host stayed away too long: fail the task for good.
    HostGone,
    /// Failed with every attempt used: count it against the budget or stop the rollout.
    Exhausted,
}

pub fn decide(f: &Facts, l: Limits) -> Next {
    match f.state {
        TaskState::Succeeded | TaskState::Skipped => Next::Done,
        _ if f.host_failed_earlier => Next::Skip,
        TaskState::Failed if f.attempt >= f.max_attempts => Next::Exhausted,
        TaskState::Failed if f.since_finished_ms < l.retry_delay_ms => Next::Wait,
        // A retry is a fresh dispatch of a pending task.
        TaskState::Failed | TaskState::Pending => match &f.host {
            HostNow::Connected { missing: Some(m), .. } => Next::Blocked(m.clone()),
            HostNow::Connected { missing: None, .. } => Next::Dispatch,
            HostNow::Offline { for_ms } if *for_ms > l.offline_grace_ms => Next::HostGone,
            HostNow::Offline { .. } => Next::Wait,
        },
        TaskState::Running if f.since_dispatched_ms > f.limit_ms => Next::TimedOut,
        TaskState::Running => match &f.host {
            HostNow::Connected { missing: Some(m), .. } => Next::Blocked(m.clone()),
            HostNow::Connected { session, missing: None } if f.sent_on != Some(*session) => Next::Resend,
            _ => Next::Wait,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits { retry_delay_ms: 2_000, offline_grace_ms: 300_000 };

    fn facts(state: TaskState, host: HostNow) -> Facts {
        Facts {
            state,
            attempt: 1,
            max_attempts: 3,
            since_finished_ms: 10_000,
            since_dispatched_ms: 1_000,
            limit_ms: 60_000,
            host,
            sent_on: Some(7),
            host_failed_earlier: false,
        }
    }

    fn up(session: u64) -> HostNow {
        HostNow::Connected { session, missing: None }
    }

    fn lacking() -> HostNow {
        HostNow::Connected {
            session: 7,
            missing: Some(Missing { agent_version: "0.1.0".into(), capability: "bootstrap-v2".into() }),
        }
    }

    #[test]
    fn table() {
        use TaskState::*;
        let m = Missing { agent_version: "0.1.0".into(), capability: "bootstrap-v2".into() };
        let cases: Vec<(&str, Facts, Next)> = vec![
            ("succeeded is done", facts(Succeeded, up(7)), Next::Done),
            ("skipped is done", facts(Skipped, HostNow::Offline { for_ms: 0 }), Next::Done),
            ("pending on a connected host is sent", facts(Pending, up(7)), Next::Dispatch),
            ("pending on an offline host waits", facts(Pending, HostNow::Offline { for_ms: 1_000 }), Next::Wait),
            (
                "pending past the offline grace fails",
                facts(Pending, HostNow::Offline { for_ms: 300_001 }),
                Next::HostGone,
            ),
            (
                "an agent without the capability is not sent the task",
                facts(Pending, lacking()),
                Next::Blocked(m.clone()),
            ),
            ("running on the session it was sent on waits", facts(Running, up(7)), Next::Wait),
            ("running after a reconnect is re-sent", facts(Running, up(8)), Next::Resend),
            (
                "running after a controller restart is re-sent",
                Facts { sent_on: None, ..facts(Running, up(7)) },
                Next::Resend,
            ),
            ("running on an offline host waits", facts(Running, HostNow::Offline { for_ms: 5_000 }), Next::Wait),
            (
                "running past its limit times out",
                Facts { since_dispatched_ms: 60_001, ..facts(Running, up(7)) },
                Next::TimedOut,
            ),
            (
                "running past its limit times out even when offline",
                Facts { since_dispatched_ms: 60_001, ..facts(Running, HostNow::Offline { for_ms: 0 }) },
                Next::TimedOut,
            ),
            (
                "a failed attempt waits for the retry delay",
                Facts { since_finished_ms: 1_999, ..facts(Failed, up(7)) },
                Next::Wait,
            ),
            ("a failed attempt is retried after the delay", facts(Failed, up(7)), Next::Dispatch),
            ("a failed attempt waits for an offline host", facts(Failed, HostNow::Offline { for_ms: 10 }), Next::Wait),
            ("every attempt used is exhausted", Facts { attempt: 3, ..facts(Failed, up(7)) }, Next::Exhausted),
            ("preflight is tried once", Facts { attempt: 1, max_attempts: 1, ..facts(Failed, up(7)) }, Next::Exhausted),
            (
                "a host that failed earlier is skipped",
                Facts { host_failed_earlier: true, ..facts(Pending, up(7)) },
                Next::Skip,
            ),
            (
                "a finished task of a failed host stays finished",
                Facts { host_failed_earlier: true, ..facts(Succeeded, up(7)) },
                Next::Done,
            ),
        ];
        for (what, f, want) in cases {
            assert_eq!(decide(&f, L), want, "{what}");
        }
    }
}

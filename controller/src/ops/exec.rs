//! `controller exec`: one command on many hosts through their agents, at most `max_parallel` at
//! once, each host's output streamed back as it comes, each host's outcome audited.
//!
//! Commands are not idempotent, so an exec is never resumed: if the controller stops while one
//! runs, the operator sees the stream end, and the audit log has what finished.
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetadm_proto::task_assignment::Task;
use fleetadm_proto::{server_event, ExecEvent, ExecTask, ServerEvent, TaskAssignment, TaskKind, TaskReport, TaskState};
use tokio::sync::mpsc;

use super::control::{Ops, Running};
use crate::dispatch::{ReportRejected, Sessions};

/// Prefix of exec task ids: `exec/OP/HOST`.
pub const PREFIX: &str = "exec/";
/// Added to a command's timeout before the controller stops waiting for its host's answer.
const GRACE: Duration = Duration::from_secs(30);

/// One exec: what to run where.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    pub id: String,
    pub hosts: Vec<String>,
    pub argv: Vec<String>,
    pub timeout: Duration,
    pub max_parallel: usize,
    /// Failed hosts tolerated; once more have failed, no further host starts (None: no limit).
    pub max_failures: Option<usize>,
    /// The first this many hosts run first; the rest wait for `op resume` or `auto_promote`.
    pub canary: usize,
    pub auto_promote: Option<Duration>,
}

/// How each host did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub succeeded: Vec<String>,
    pub failed: Vec<(String, String)>,
    /// Not started: the failure budget was spent.
    pub skipped: Vec<String>,
}

impl Summary {
    pub fn line(&self) -> String {
        let mut s = format!(
            "{} hosts: {} succeeded, {} failed",
            self.succeeded.len() + self.failed.len() + self.skipped.len(),
            self.succeeded.len(),
            self.failed.len()
        );
        if !self.failed.is_empty() {
            let names: Vec<&str> = self.failed.iter().map(|(h, _)| h.as_str()).collect();
            s.push_str(&format!(" ({})", names.join(", ")));
        }
        if !self.skipped.is_empty() {
            s.push_str(&format!(", {} skipped over the failure budget", self.skipped.len()));
        }
        s
    }
}

enum Outcome {
    Ran(Result<(), String>),
    Skipped,
}

fn skipped_event(host: &str, why: &str) -> ExecEvent {
    ExecEvent { host: host.to_string(), done: true, success: false, error: why.to_string(), ..Default::default() }
}

/// The caller's event stream, with each host's events also kept in the operation's record (for
/// `op status` and `op logs`, also after the caller went away).
#[derive(Clone)]
struct Tap {
    op: Arc<super::control::OpControl>,
    events: mpsc::Sender<ExecEvent>,
}

impl Tap {
    async fn send(&self, ev: ExecEvent) -> Result<(), mpsc::error::SendError<ExecEvent>> {
        if !ev.host.is_empty() {
            let state = ev.done.then(|| match (ev.success, ev.error.starts_with("skipped")) {
                (true, _) => "succeeded",
                (false, true) => "skipped",
                (false, false) => "failed",
            });
            self.op.host_event(&ev.host, state, &ev.output, &ev.error);
        }
        self.events.send(ev).await
    }
}

/// Runs execs and takes the reports of their tasks.
pub struct Execs {
    sessions: Sessions,
    ops: Arc<Ops>,
    /// Reports for running exec tasks, by task id.
    waiting: Mutex<HashMap<String, mpsc::UnboundedSender<TaskReport>>>,
}

impl Execs {
    pub fn new(sessions: Sessions) -> Arc<Self> {
        Arc::new(Self { sessions, ops: Arc::default(), waiting: Mutex::default() })
    }

    /// A report for an exec task (`None`: not an exec task). Only the host the task was sent to
    /// may report on it.
    pub fn route(&self, node: &str, r: &TaskReport) -> Option<Result<(), ReportRejected>> {
        let rest = r.task_id.strip_prefix(PREFIX)?;
        let owner = rest.rsplit_once('/').map(|(_, h)| h).unwrap_or_default();
        if owner != node {
            return Some(Err(ReportRejected::NotYours {
                task: r.task_id.clone(),
                owner: owner.to_string(),
                caller: node.to_string(),
            }));
        }
        let tx = self.waiting.lock().ok().and_then(|w| w.get(&r.task_id).cloned());
        Some(match tx {
            Some(tx) => {
                let _ = tx.send(r.clone());
                Ok(())
            }
            // Finished or given up on: nothing is waiting, and the agent may forget it.
            None => Ok(()),
        })
    }

    /// The agents' sessions (which hosts are connected, with what capabilities).
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The running execs, for `controller op list|pause|resume|abort`.
    pub fn ops(&self) -> &Arc<Ops> {
        &self.ops
    }

    /// Run `spec` to its end, sending every host's output and outcome to `events`. With a
    /// canary, its hosts run first; the rest wait for `op resume` (or `--auto-promote`), and are
    /// skipped if a canary host failed or the operation is aborted.
    pub async fn run(self: &Arc<Self>, spec: ExecSpec, events: mpsc::Sender<ExecEvent>) -> Summary {
        let running = self.ops.start(&spec.id, "exec", spec.argv.join(" "), spec.hosts.len());
        // Shared by every host's task (the host list alone is O(hosts): never copied per host).
        let spec = Arc::new(spec);
        let events = Tap { op: running.op.clone(), events };
        let notice = |text: String| ExecEvent { op: spec.id.clone(), notice: text, ..Default::default() };
        let _ = events.send(notice(String::new())).await;
        let failures = Arc::new(AtomicUsize::new(0));
        // Without a canary, every host is in the first (and only) wave.
        let canary = if spec.canary == 0 { spec.hosts.len() } else { spec.canary.min(spec.hosts.len()) };
        let (first, rest) = spec.hosts.split_at(canary);
        let mut outcomes = self.wave(&spec, first, &running, &events, &failures).await;
        if !first.is_empty() && !rest.is_empty() {
            let canary_failed = outcomes.iter().any(|(_, o)| !matches!(o, Outcome::Ran(Ok(()))));
            let promoted = !canary_failed
                && {
                    let id = &spec.id;
                    let why = match spec.auto_promote {
                    Some(d) => format!(
                        "the canary ({canary} hosts) passed; the other {} start in {}s, or now with `controller op resume {id}`",
                        rest.len(),
                        d.as_secs()
                    ),
                    None => format!(
                        "the canary ({canary} hosts) passed; start the other {} with `controller op resume {id}`, or stop with `controller op abort {id}`",
                        rest.len()
                    ),
                };
                    let _ = running.op.pause(&why);
                    let _ = events.send(notice(why)).await;
                    running.op.wait_promoted(spec.auto_promote).await
                };
            if promoted {
                let _ = events.send(notice(format!("promoted: starting the other {} hosts", rest.len()))).await;
                outcomes.extend(self.wave(&spec, rest, &running, &events, &failures).await);
            } else {
                let why =
                    if canary_failed { "skipped: the canary failed" } else { "skipped: the operation was aborted" };
                for host in rest {
                    let _ = events.send(skipped_event(host, why)).await;
                    outcomes.push((host.clone(), Outcome::Skipped));
                }
            }
        }
        let mut summary = Summary::default();
        for (host, o) in outcomes {
            match o {
                Outcome::Ran(Ok(())) => summary.succeeded.push(host),
                Outcome::Ran(Err(e)) => summary.failed.push((host, e)),
                Outcome::Skipped => summary.skipped.push(host),
            }
        }
        summary.succeeded.sort();
        summary.failed.sort();
        summary.skipped.sort();
        summary
    }

    /// Run `hosts` (in order, at most `max_parallel` at once); each checks the gate and the
    /// failures so far before it starts.
    async fn wave(
        self: &Arc<Self>,
        spec: &Arc<ExecSpec>,
        hosts: &[String],
        running: &Running,
        events: &Tap,
        failures: &Arc<AtomicUsize>,
    ) -> Vec<(String, Outcome)> {
        // A slot is taken before a host's task is spawned, so hosts start in the order given.
        let sem = Arc::new(tokio::sync::Semaphore::new(spec.max_parallel.max(1)));
        let mut runs = tokio::task::JoinSet::new();
        for host in hosts.iter().cloned() {
            let slot = sem.clone().acquire_owned().await;
            let (me, spec, events) = (self.clone(), spec.clone(), events.clone());
            let (failures, op) = (failures.clone(), running.op.clone());
            runs.spawn(async move {
                let _slot = slot;
                if !op.wait_open().await {
                    let _ = events.send(skipped_event(&host, "skipped: the operation was aborted")).await;
                    return (host, Outcome::Skipped);
                }
                let failed_so_far = failures.load(Ordering::SeqCst);
                if let Some(budget) = spec.max_failures.filter(|b| failed_so_far > *b) {
                    let why = format!("skipped: {failed_so_far} hosts failed, over --max-failures {budget}");
                    let _ = events.send(skipped_event(&host, &why)).await;
                    return (host, Outcome::Skipped);
                }
                let outcome = me.on_host(&spec, &host, &events).await;
                if outcome.is_err() {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                crate::metrics::metrics().task_outcome("exec", if outcome.is_ok() { "succeeded" } else { "failed" });
                let (success, error) = match &outcome {
                    Ok(()) => (true, String::new()),
                    Err(e) => (false, e.clone()),
                };
                let done = ExecEvent { host: host.clone(), done: true, success, error, ..Default::default() };
                let _ = events.send(done).await;
                (host, Outcome::Ran(outcome))
            });
        }
        let mut out = Vec::new();
        while let Some(r) = runs.join_next().await {
            match r {
                Ok((host, o)) => {
                    running.finished_host(matches!(o, Outcome::Ran(Ok(()))));
                    out.push((host, o));
                }
                Err(e) => out.push(("(internal)".into(), Outcome::Ran(Err(e.to_string())))),
            }
        }
        out
    }

    /// One host: `Err(why)` when it did not run the command to a successful end.
    async fn on_host(&self, spec: &ExecSpec, host: &str, events: &Tap) -> Result<(), String> {
        let info =
            self.sessions.info(host).ok_or_else(|| format!("{host} is not connected; is node-agent running?"))?;
        let capability = TaskKind::Exec.capability();
        if !info.meta.capabilities.contains(&capability) {
            return Err(format!(
                "agent {} on {host} cannot run {capability}; upgrade node-agent",
                info.meta.agent_version
            ));
        }
        let task_id = format!("{PREFIX}{}/{host}", spec.id);
        let (tx, mut rx) = mpsc::unbounded_channel();
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(task_id.clone(), tx);
        }
        let _unregister = Unregister { execs: self, task_id: task_id.clone() };
        let a = TaskAssignment {
            task_id: task_id.clone(),
            attempt: 1,
            timeout_secs: spec.timeout.as_secs().clamp(1, u64::from(u32::MAX)) as u32,
            task: Some(Task::Exec(ExecTask { argv: spec.argv.clone(), ..Default::default() })),
            ..Default::default()
        };
        if self.sessions.send(host, ServerEvent { event: Some(server_event::Event::Task(a)) }).is_none() {
            return Err(format!("{host} could not be reached (session closed or busy)"));
        }
        let deadline = tokio::time::Instant::now() + spec.timeout + GRACE;
        let mut streamed = false;
        loop {
            let r = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(r)) => r,
                Ok(None) => return Err("internal: report channel closed".into()),
                Err(_) => return Err(format!("no answer from {host} within {}s", (spec.timeout + GRACE).as_secs())),
            };
            let piece = |output: String| ExecEvent { host: host.to_string(), output, ..Default::default() };
            match TaskState::try_from(r.state) {
                Ok(TaskState::Running) => {
                    streamed |= !r.output.is_empty();
                    let _ = events.send(piece(r.output)).await;
                }
                Ok(TaskState::Succeeded) => {
                    if !streamed && !r.output.is_empty() {
                        let _ = events.send(piece(r.output)).await;
                    }
                    return Ok(());
                }
                Ok(TaskState::Failed) => {
                    // The agent's error: why, with the exit status and the output's tail.
                    let why = r.output.lines().next().unwrap_or("failed").to_string();
                    if !streamed {
                        let rest: String = r.output.lines().skip(1).map(|l| format!("{l}\n")).collect();
                        if !rest.is_empty() {
                            let _ = events.send(piece(rest)).await;
                        }
                    }
                    return Err(why);
                }
                _ => return Err(format!("{host} sent a report without a state")),
            }
        }
    }
}

impl Execs {
    /// Send one read-only task to `host` and wait for its outcome (its running reports are
    /// skipped): the final report, or why there was none. The task id is `exec/OP/HOST`, so
    /// only that host may answer it.
    pub async fn ask(&self, op: &str, host: &str, task: Task, timeout: Duration) -> Result<TaskReport, String> {
        let info =
            self.sessions.info(host).ok_or_else(|| format!("{host} is not connected; is node-agent running?"))?;
        let capability = TaskKind::of(&task).capability();
        if !info.meta.capabilities.contains(&capability) {
            return Err(format!(
                "agent {} on {host} cannot run {capability}; upgrade node-agent",
                info.meta.agent_version
            ));
        }
        let task_id = format!("{PREFIX}{op}/{host}");
        let (tx, mut rx) = mpsc::unbounded_channel();
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(task_id.clone(), tx);
        }
        let _unregister = Unregister { execs: self, task_id: task_id.clone() };
        let a = TaskAssignment {
            task_id,
            attempt: 1,
            timeout_secs: timeout.as_secs().clamp(1, u64::from(u32::MAX)) as u32,
            task: Some(task),
            ..Default::default()
        };
        if self.sessions.send(host, ServerEvent { event: Some(server_event::Event::Task(a)) }).is_none() {
            return Err(format!("{host} could not be reached (session closed or busy)"));
        }
        let deadline = tokio::time::Instant::now() + timeout + GRACE;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(r)) if r.state == TaskState::Running as i32 => continue,
                Ok(Some(r)) if r.state == TaskState::Succeeded as i32 => return Ok(r),
                Ok(Some(r)) => return Err(r.output.lines().next().unwrap_or("failed").to_string()),
                Ok(None) => return Err("internal: report channel closed".into()),
                Err(_) => return Err(format!("no answer from {host} within {}s", (timeout + GRACE).as_secs())),
            }
        }
    }
}

/// Stops routing a task's reports once its host is done with.
struct Unregister<'a> {
    execs: &'a Execs,
    task_id: String,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        if let Ok(mut w) = self.execs.waiting.lock() {
            w.remove(&self.task_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::sessions::SessionMeta;
    use tokio_stream::StreamExt;

    fn meta(caps: Vec<String>) -> SessionMeta {
        SessionMeta {
            peer: "127.0.0.1:1".into(),
            agent_version: "0.9.0".into(),
            protocol: 1,
            capabilities: caps.into_iter().collect(),
        }
    }

    #[tokio::test]
    async fn every_host_answers_for_itself_and_failures_say_why() {
        let sessions = Sessions::new(|_| {});
        let execs = Execs::new(sessions.clone());
        let (_a, _ta, mut h1) = sessions.open("h1", meta(TaskKind::all_capabilities()), 0, 16);
        let older: Vec<String> = TaskKind::all_capabilities().into_iter().filter(|c| c != "exec-v1").collect();
        let (_b, _tb, _h2) = sessions.open("h2", meta(older), 0, 16);
        let spec = ExecSpec {
            id: "x1".into(),
            hosts: vec!["h1".into(), "h2".into(), "h9".into()],
            argv: vec!["hostname".into()],
            timeout: Duration::from_secs(5),
            max_parallel: 2,
            max_failures: None,
            canary: 0,
            auto_promote: None,
        };
        let (tx, mut rx) = mpsc::channel(64);
        let run = {
            let e = execs.clone();
            tokio::spawn(async move { e.run(spec, tx).await })
        };
        let ev = tokio::time::timeout(Duration::from_secs(5), h1.next()).await.unwrap().unwrap().unwrap();
        let Some(server_event::Event::Task(a)) = ev.event else { panic!("{ev:?}") };
        assert_eq!(a.task_id, "exec/x1/h1");
        let report = |state: TaskState, out: &str| TaskReport {
            task_id: a.task_id.clone(),
            attempt: 1,
            state: state as i32,
            output: out.into(),
            ..Default::default()
        };
        assert!(matches!(
            execs.route("h2", &report(TaskState::Succeeded, "")),
            Some(Err(ReportRejected::NotYours { .. }))
        ));
        assert!(execs
            .route("h1", &TaskReport { task_id: "lab/init/h1/kubeadm-init".into(), ..Default::default() })
            .is_none());
        execs.route("h1", &report(TaskState::Running, "h1\n")).unwrap().unwrap();
        execs.route("h1", &report(TaskState::Succeeded, "h1\n")).unwrap().unwrap();
        let summary = run.await.unwrap();
        assert_eq!(summary.succeeded, vec!["h1".to_string()]);
        let failed: HashMap<_, _> = summary.failed.iter().cloned().collect();
        assert!(failed["h2"].contains("cannot run exec-v1"), "{failed:?}");
        assert!(failed["h9"].contains("not connected"), "{failed:?}");
        assert_eq!(summary.line(), "3 hosts: 1 succeeded, 2 failed (h2, h9)");
        let mut got = Vec::new();
        while let Ok(e) = rx.try_recv() {
            got.push(e);
        }
        let h1_out: String = got.iter().filter(|e| e.host == "h1").map(|e| e.output.clone()).collect();
        assert_eq!(h1_out, "h1\n", "streamed once, not repeated by the final report");
        assert!(got.iter().any(|e| e.host == "h1" && e.done && e.success));
        assert!(execs.route("h1", &report(TaskState::Succeeded, "late")).unwrap().is_ok(), "late reports are accepted");
    }

    #[tokio::test]
    async fn no_host_starts_once_the_failure_budget_is_spent() {
        let execs = Execs::new(Sessions::new(|_| {}));
        // None of these is connected, so each host that starts fails at once; one at a time.
        let run = |budget: Option<usize>| {
            let spec = ExecSpec {
                id: "b".into(),
                hosts: ["h1", "h2", "h3", "h4"].map(String::from).to_vec(),
                argv: vec!["true".into()],
                timeout: Duration::from_secs(5),
                max_parallel: 1,
                max_failures: budget,
                canary: 0,
                auto_promote: None,
            };
            let execs = execs.clone();
            async move { execs.run(spec, mpsc::channel(64).0).await }
        };
        let s = run(Some(0)).await;
        assert_eq!((s.failed.len(), s.skipped.clone()), (1, vec!["h2".to_string(), "h3".into(), "h4".into()]));
        assert_eq!(s.line(), "4 hosts: 0 succeeded, 1 failed (h1), 3 skipped over the failure budget");
        let s = run(Some(2)).await;
        assert_eq!((s.failed.len(), s.skipped.len()), (3, 1), "{s:?}");
        let s = run(None).await;
        assert_eq!((s.failed.len(), s.skipped.len()), (4, 0), "no limit: every host runs");
    }
}

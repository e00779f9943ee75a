//! `controller exec`: one command on many hosts through their agents, at most `max_parallel` at
//! once, each host's output streamed back as it comes, each host's outcome audited. The same
//! machinery (waves, failure budget, canary, `op` control) runs `controller agent upgrade` and
//! `controller agent ping` ([`Work`]).
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

/// What each host of a fleet operation does.
#[derive(Debug, Clone)]
pub enum Work {
    /// `controller exec`: run a command.
    Command(Vec<String>),
    /// `controller agent upgrade`: install the node-agent package from `bundle` and come back.
    AgentUpgrade { bundle: String, version: String, packages: Vec<fleetadm_proto::BundleFile> },
    /// `controller agent ping`: the no-op task (each agent answers what runs; nothing changes).
    Ping,
}

impl Work {
    /// The operation's kind (op list) and what it does (its description).
    pub fn describe(&self) -> (&'static str, String) {
        match self {
            Work::Command(argv) => ("exec", argv.join(" ")),
            Work::AgentUpgrade { bundle, version, .. } => {
                ("agent-upgrade", format!("node-agent {version} from bundle {bundle}"))
            }
            Work::Ping => ("ping", "the no-op task".to_string()),
        }
    }

    fn task(&self) -> Task {
        match self {
            Work::Command(argv) => Task::Exec(ExecTask { argv: argv.clone(), ..Default::default() }),
            Work::AgentUpgrade { bundle, packages, .. } => Task::AgentUpgrade(fleetadm_proto::AgentUpgradeTask {
                bundle: bundle.clone(),
                packages: packages.clone(),
                ..Default::default()
            }),
            Work::Ping => Task::Ping(fleetadm_proto::PingTask::default()),
        }
    }

    /// Hosts at once when the operator did not say: every host for a ping (it costs the host
    /// nothing), 10 for what changes hosts.
    pub fn default_parallel(&self, hosts: usize) -> usize {
        match self {
            Work::Ping => hosts,
            _ => 10,
        }
    }

    /// Per-host limit when the operator did not say.
    pub fn default_timeout(&self) -> Duration {
        match self {
            Work::Ping => Duration::from_secs(30),
            _ => Duration::from_secs(600),
        }
    }
}

/// One exec (or agent upgrade): what to run where.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    pub id: String,
    pub hosts: Vec<String>,
    pub work: Work,
    pub timeout: Duration,
    pub max_parallel: usize,
    /// Failed hosts tolerated; once more have failed, no further host starts (None: no limit).
    pub max_failures: Option<usize>,
    /// The first this many hosts run first; the rest wait for `op resume` or `auto_promote`.
    pub canary: usize,
    pub auto_promote: Option<Duration>,
}

/// The version of a node-agent package from its bundle path (`packages/node-agent_0.2.0-1_amd64.deb`,
/// `packages/node-agent-0.2.0-1.x86_64.rpm`); None for any other file. (What is shown to the
/// operator: the agent reads the version from the package itself before installing it.)
pub fn agent_package_version(path: &str) -> Option<String> {
    let name = path.strip_prefix("packages/")?;
    if let Some(rest) = name.strip_prefix("node-agent_").and_then(|r| r.strip_suffix(".deb")) {
        let (version, arch) = rest.rsplit_once('_')?;
        return (!version.is_empty() && !arch.is_empty()).then(|| version.to_string());
    }
    let rest = name.strip_prefix("node-agent-").and_then(|r| r.strip_suffix(".rpm"))?;
    let (version, arch) = rest.rsplit_once('.')?;
    (!version.is_empty() && !arch.is_empty() && version.starts_with(|c: char| c.is_ascii_digit()))
        .then(|| version.to_string())
}

/// The waves a spec runs in, as lines for a dry run.
pub fn describe_waves(spec: &ExecSpec) -> Vec<String> {
    let (kind, what) = spec.work.describe();
    let mut out = vec![format!("{kind}: {what} on {} hosts, at most {} at once", spec.hosts.len(), spec.max_parallel)];
    if let Work::AgentUpgrade { packages, .. } = &spec.work {
        let names: Vec<&str> = packages.iter().map(|p| p.path.as_str()).collect();
        out.push(format!("packages (each host installs the one of its package manager): {}", names.join(", ")));
    }
    let canary = spec.canary.min(spec.hosts.len());
    let (first, rest) = spec.hosts.split_at(canary);
    if !first.is_empty() {
        let then = match spec.auto_promote {
            Some(d) => format!("then the rest after {}s (or `controller op resume`)", d.as_secs()),
            None => "then a pause until `controller op resume`".to_string(),
        };
        out.push(format!("canary: {}; {then}", first.join(", ")));
    }
    if !rest.is_empty() {
        let shown: Vec<&str> = rest.iter().take(20).map(String::as_str).collect();
        let more =
            if rest.len() > shown.len() { format!(" and {} more", rest.len() - shown.len()) } else { String::new() };
        let label = if first.is_empty() { "hosts" } else { "then" };
        out.push(format!("{label}, in this order, {} at a time: {}{more}", spec.max_parallel.max(1), shown.join(", ")));
    }
    if let Some(b) = spec.max_failures {
        out.push(format!("stops once more than {b} hosts failed"));
    }
    out.push("dry run: nothing was started".to_string());
    out
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
    /// (node, bundle) a running agent upgrade lets the node fetch blobs of.
    bundle_grants: Mutex<HashMap<(String, String), usize>>,
}

impl Execs {
    pub fn new(sessions: Sessions) -> Arc<Self> {
        Arc::new(Self { sessions, ops: Arc::default(), waiting: Mutex::default(), bundle_grants: Mutex::default() })
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

    /// Whether a running agent upgrade lets `node` fetch the blobs of `bundle`.
    pub fn grants_bundle(&self, node: &str, bundle: &str) -> bool {
        self.bundle_grants.lock().map(|g| g.contains_key(&(node.to_string(), bundle.to_string()))).unwrap_or(false)
    }

    fn grant_bundle(&self, node: &str, bundle: &str, on: bool) {
        if let Ok(mut g) = self.bundle_grants.lock() {
            let key = (node.to_string(), bundle.to_string());
            if on {
                *g.entry(key).or_default() += 1;
            } else if let Some(n) = g.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    g.remove(&key);
                }
            }
        }
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
        let (kind, what) = spec.work.describe();
        let running = self.ops.start(&spec.id, kind, what, spec.hosts.len());
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
                let kind = spec.work.describe().0;
                crate::metrics::metrics().task_outcome(kind, if outcome.is_ok() { "succeeded" } else { "failed" });
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
        let task = spec.work.task();
        let capability = TaskKind::of(&task).capability();
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
        // An agent upgrade fetches its package as a bundle blob: allowed while it runs.
        let upgrade_bundle = match &spec.work {
            Work::AgentUpgrade { bundle, .. } => Some(bundle.clone()),
            Work::Command(_) | Work::Ping => None,
        };
        let _grant = upgrade_bundle.as_ref().map(|b| {
            self.grant_bundle(host, b, true);
            Ungrant { execs: self, node: host.to_string(), bundle: b.clone() }
        });
        let a = TaskAssignment {
            task_id: task_id.clone(),
            attempt: 1,
            timeout_secs: spec.timeout.as_secs().clamp(1, u64::from(u32::MAX)) as u32,
            task: Some(task),
            ..Default::default()
        };
        let send = |a: &TaskAssignment| {
            self.sessions.send(host, ServerEvent { event: Some(server_event::Event::Task(a.clone())) })
        };
        let sent = std::time::Instant::now();
        let Some(mut session) = send(&a) else {
            return Err(format!("{host} could not be reached (session closed or busy)"));
        };
        let deadline = tokio::time::Instant::now() + spec.timeout + GRACE;
        let mut streamed = false;
        let mut recheck = tokio::time::interval(RESEND_CHECK);
        loop {
            let r = tokio::select! {
                r = tokio::time::timeout_at(deadline, rx.recv()) => match r {
                    Ok(Some(r)) => r,
                    Ok(None) => return Err("internal: report channel closed".into()),
                    Err(_) => return Err(format!("no answer from {host} within {}s", (spec.timeout + GRACE).as_secs())),
                },
                // An upgrading agent restarts on purpose: its successor gets the task again (and
                // answers it from its journal), so a report lost with the old session is not
                // waited for until the deadline.
                _ = recheck.tick(), if upgrade_bundle.is_some() => {
                    if self.sessions.info(host).is_some_and(|i| i.id != session) {
                        if let Some(id) = send(&a) {
                            session = id;
                        }
                    }
                    continue;
                }
            };
            let piece = |output: String| ExecEvent { host: host.to_string(), output, ..Default::default() };
            match TaskState::try_from(r.state) {
                Ok(TaskState::Running) => {
                    streamed |= !r.output.is_empty();
                    let _ = events.send(piece(r.output)).await;
                }
                Ok(TaskState::Succeeded) if matches!(spec.work, Work::Ping) => {
                    // The answer and how long the round trip through the agent took.
                    let ms = sent.elapsed().as_secs_f64() * 1000.0;
                    let _ = events.send(piece(format!("{} ({ms:.1} ms)\n", r.output.trim_end()))).await;
                    return Ok(());
                }
                Ok(TaskState::Succeeded) => {
                    // A command's final report repeats what was streamed; an upgraded agent's
                    // is its own news (the old agent streamed only its progress).
                    if (!streamed || upgrade_bundle.is_some()) && !r.output.is_empty() {
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

/// How often a waiting agent upgrade checks whether its host came back in a new session.
const RESEND_CHECK: Duration = Duration::from_secs(2);

/// Withdraws an agent upgrade's permission to fetch its bundle.
struct Ungrant<'a> {
    execs: &'a Execs,
    node: String,
    bundle: String,
}

impl Drop for Ungrant<'_> {
    fn drop(&mut self) {
        self.execs.grant_bundle(&self.node, &self.bundle, false);
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

/// The next task a test's fake agent session receives (within `within`).
#[cfg(test)]
async fn next_task<E: std::fmt::Debug>(
    session: &mut (impl tokio_stream::Stream<Item = Result<ServerEvent, E>> + Unpin),
    within: Duration,
) -> TaskAssignment {
    use tokio_stream::StreamExt;
    let ev = tokio::time::timeout(within, session.next()).await.expect("a task in time").expect("session open");
    let ev = ev.expect("an event");
    let Some(server_event::Event::Task(a)) = ev.event else { panic!("not a task: {ev:?}") };
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::sessions::SessionMeta;

    fn meta(caps: Vec<String>) -> SessionMeta {
        SessionMeta {
            peer: "127.0.0.1:1".into(),
            agent_version: "0.9.0".into(),
            protocol: 1,
            capabilities: caps.into_iter().collect(),
            peer_port: 0,
        }
    }

    fn spec(id: &str, hosts: &[&str], work: Work, max_parallel: usize) -> ExecSpec {
        ExecSpec {
            id: id.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            work,
            timeout: Duration::from_secs(5),
            max_parallel,
            max_failures: None,
            canary: 0,
            auto_promote: None,
        }
    }

    /// The agent's report on `a` (attempt 1).
    fn report_on(a: &TaskAssignment, state: TaskState, out: &str) -> TaskReport {
        TaskReport {
            task_id: a.task_id.clone(),
            attempt: 1,
            state: state as i32,
            output: out.into(),
            ..Default::default()
        }
    }

    /// Run `spec` in the background: its summary at the end, its events as they come.
    fn start(execs: &Arc<Execs>, spec: ExecSpec) -> (tokio::task::JoinHandle<Summary>, mpsc::Receiver<ExecEvent>) {
        let (tx, rx) = mpsc::channel(64);
        let e = execs.clone();
        (tokio::spawn(async move { e.run(spec, tx).await }), rx)
    }

    #[tokio::test]
    async fn every_host_answers_for_itself_and_failures_say_why() {
        let sessions = Sessions::new(|_| {});
        let execs = Execs::new(sessions.clone());
        let (_a, _ta, mut h1) = sessions.open("h1", meta(TaskKind::all_capabilities()), 0, 16);
        let older: Vec<String> = TaskKind::all_capabilities().into_iter().filter(|c| c != "exec-v1").collect();
        let (_b, _tb, _h2) = sessions.open("h2", meta(older), 0, 16);
        let (run, mut rx) = start(&execs, spec("x1", &["h1", "h2", "h9"], Work::Command(vec!["hostname".into()]), 2));
        let a = next_task(&mut h1, Duration::from_secs(5)).await;
        assert_eq!(a.task_id, "exec/x1/h1");
        let report = |state: TaskState, out: &str| report_on(&a, state, out);
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
    async fn a_ping_shows_each_answer_with_its_round_trip_and_older_agents_are_named() {
        let sessions = Sessions::new(|_| {});
        let execs = Execs::new(sessions.clone());
        let (_a, _ta, mut h1) = sessions.open("h1", meta(TaskKind::all_capabilities()), 0, 16);
        let older: Vec<String> = TaskKind::all_capabilities().into_iter().filter(|c| c != "ping-v1").collect();
        let (_b, _tb, _h2) = sessions.open("h2", meta(older), 0, 16);
        let work = Work::Ping;
        assert_eq!((work.default_parallel(3), work.default_timeout()), (3, Duration::from_secs(30)));
        assert_eq!(Work::Command(vec!["true".into()]).default_parallel(3), 10);
        let (run, mut rx) = start(&execs, spec("ping-1", &["h1", "h2"], work, 2));
        let a = next_task(&mut h1, Duration::from_secs(5)).await;
        assert!(matches!(a.task, Some(Task::Ping(_))), "{a:?}");
        assert_eq!(a.task_id, "exec/ping-1/h1");
        let report = |state: TaskState, out: &str| report_on(&a, state, out);
        execs.route("h1", &report(TaskState::Running, "")).unwrap().unwrap();
        execs.route("h1", &report(TaskState::Succeeded, "pong: node-agent 9.9.9")).unwrap().unwrap();
        let summary = run.await.unwrap();
        assert_eq!(summary.succeeded, vec!["h1".to_string()]);
        assert!(summary.failed[0].1.contains("cannot run ping-v1; upgrade node-agent"), "{summary:?}");
        let mut out = String::new();
        while let Ok(e) = rx.try_recv() {
            if e.host == "h1" {
                out.push_str(&e.output);
            }
        }
        let (answer, rest) = out.split_once(" (").unwrap_or_else(|| panic!("{out:?}"));
        assert_eq!(answer, "pong: node-agent 9.9.9");
        assert!(rest.ends_with(" ms)\n") && rest.trim_end_matches(" ms)\n").parse::<f64>().is_ok(), "{out:?}");
    }

    #[tokio::test]
    async fn no_host_starts_once_the_failure_budget_is_spent() {
        let execs = Execs::new(Sessions::new(|_| {}));
        // None of these is connected, so each host that starts fails at once; one at a time.
        let run = |budget: Option<usize>| {
            let spec = ExecSpec {
                id: "b".into(),
                hosts: ["h1", "h2", "h3", "h4"].map(String::from).to_vec(),
                work: Work::Command(vec!["true".into()]),
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

#[cfg(test)]
mod agent_upgrade_tests {
    use super::*;
    use crate::dispatch::sessions::SessionMeta;

    #[test]
    fn package_versions_come_from_debian_and_rpm_file_names() {
        let v = |p: &str| agent_package_version(p);
        assert_eq!(v("packages/node-agent_0.1.0-2_amd64.deb").as_deref(), Some("0.1.0-2"));
        assert_eq!(v("packages/node-agent-0.1.0-2.x86_64.rpm").as_deref(), Some("0.1.0-2"));
        assert_eq!(v("packages/fleetadm-relay_0.1.0-2_amd64.deb"), None);
        assert_eq!(v("bin/node-agent_0.1.0-2_amd64.deb"), None, "only packages/");
        assert_eq!(v("packages/node-agent_amd64.deb"), None);
        assert_eq!(v("packages/node-agent-relay.rpm"), None);
    }

    fn spec(hosts: &[&str]) -> ExecSpec {
        ExecSpec {
            id: "agent-upgrade-1".into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            work: Work::AgentUpgrade {
                bundle: "agents".into(),
                version: "0.1.0-2".into(),
                packages: vec![fleetadm_proto::BundleFile {
                    path: "packages/node-agent_0.1.0-2_amd64.deb".into(),
                    size: 3,
                    mode: 0o644,
                    sha256: "ab".repeat(32),
                }],
            },
            timeout: Duration::from_secs(30),
            max_parallel: 2,
            max_failures: Some(0),
            canary: 1,
            auto_promote: None,
        }
    }

    #[test]
    fn a_dry_run_names_the_package_the_canary_and_the_order() {
        let lines = describe_waves(&spec(&["h1", "h2", "h3"]));
        let text = lines.join("\n");
        assert!(text.contains("agent-upgrade: node-agent 0.1.0-2 from bundle agents on 3 hosts"), "{text}");
        assert!(text.contains("packages/node-agent_0.1.0-2_amd64.deb"), "{text}");
        assert!(text.contains("canary: h1; then a pause"), "{text}");
        assert!(text.contains("then, in this order, 2 at a time: h2, h3"), "{text}");
        assert!(text.contains("more than 0 hosts failed") && text.ends_with("nothing was started"), "{text}");
    }

    fn meta() -> SessionMeta {
        SessionMeta {
            peer: "127.0.0.1:1".into(),
            agent_version: "0.1.0".into(),
            protocol: 1,
            capabilities: TaskKind::all_capabilities().into_iter().collect(),
            peer_port: 0,
        }
    }

    #[tokio::test]
    async fn the_restarted_agent_gets_the_task_again_and_its_report_ends_it() {
        let sessions = Sessions::new(|_| {});
        let execs = Execs::new(sessions.clone());
        let (_id, _tx, mut old) = sessions.open("h1", meta(), 0, 16);
        let mut s = spec(&["h1"]);
        s.canary = 0;
        let run = {
            let e = execs.clone();
            tokio::spawn(async move { e.run(s, mpsc::channel(64).0).await })
        };
        let a = next_task(&mut old, Duration::from_secs(5)).await;
        let Some(Task::AgentUpgrade(t)) = &a.task else { panic!("{a:?}") };
        assert_eq!((t.bundle.as_str(), t.packages.len()), ("agents", 1));
        assert!(execs.grants_bundle("h1", "agents"), "the host may fetch the package while it upgrades");
        assert!(!execs.grants_bundle("h2", "agents") && !execs.grants_bundle("h1", "other"));
        // The package restarts the agent: a new session, and the task again on it.
        drop(old);
        let (_id2, _tx2, mut new) = sessions.open("h1", meta(), 1, 16);
        let again = next_task(&mut new, Duration::from_secs(10)).await;
        assert_eq!((again.task_id.as_str(), again.attempt), (a.task_id.as_str(), a.attempt));
        let done = TaskReport {
            task_id: a.task_id.clone(),
            attempt: 1,
            state: TaskState::Succeeded as i32,
            output: "node-agent upgraded from 0.1.0-1 to 0.1.0-2".into(),
            ..Default::default()
        };
        execs.route("h1", &done).unwrap().unwrap();
        let summary = tokio::time::timeout(Duration::from_secs(5), run).await.unwrap().unwrap();
        assert_eq!(summary.succeeded, vec!["h1".to_string()]);
        assert!(!execs.grants_bundle("h1", "agents"), "the permission ends with the host's upgrade");
        let op = execs.ops().get("agent-upgrade-1").unwrap();
        assert_eq!((op.kind, op.description.as_str()), ("agent-upgrade", "node-agent 0.1.0-2 from bundle agents"));
    }
}

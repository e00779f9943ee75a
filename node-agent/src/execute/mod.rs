//! Executing the tasks the controller assigns: one module per kind, each idempotent and reporting
//! whether it changed anything. [`Executor`] receives assignments from the session, answers
//! duplicates from the [`journal`], runs new ones in the background and hands reports back.
pub mod agent_upgrade;
pub mod bootstrap;
pub mod certs;
pub mod command;
pub mod etcd;
pub mod exec;
pub mod fetch;
pub mod files;
pub mod handler;
pub mod handlers;
pub mod hosts;
pub mod journal;
pub mod kubeadm;
pub mod lb;
pub mod preflight;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetadm_common::clock::now_unix_ms;
use fleetadm_proto::agent_client::AgentClient;
use fleetadm_proto::{TaskAssignment, TaskKind, TaskReport, TaskState};
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use crate::report::task::{bounded, report_of};
use handler::{Ctx, Done, TaskError};
use journal::{Entry, Journal, Outcome};

/// Where the tasks touch the host. Real hosts use [`HostPaths::system`].
#[derive(Debug, Clone)]
pub struct HostPaths {
    pub root: PathBuf,
    pub hosts_file: PathBuf,
    pub kube_dir: PathBuf,
    pub proc_swaps: PathBuf,
}

impl HostPaths {
    pub fn system() -> Self {
        Self {
            root: "/".into(),
            hosts_file: "/etc/hosts".into(),
            kube_dir: files::ALLOWED_ROOT.into(),
            proc_swaps: "/proc/swaps".into(),
        }
    }
}

pub struct Executor {
    state_dir: Arc<PathBuf>,
    journal: Journal,
    paths: Arc<HostPaths>,
    lb: Arc<lb::LbManager>,
    /// Tasks running now: id -> (digest, the newest attempt the controller sent for it). An entry
    /// goes only when the run has really ended (its commands reaped), never on a timeout alone.
    inflight: Mutex<HashMap<String, (String, u32)>>,
    reports: mpsc::UnboundedSender<TaskReport>,
    /// The session's connection, when one is open (the session sets it).
    channel: watch::Sender<Option<AgentClient<Channel>>>,
    /// Set when this agent serves peers: bundle blobs may then come from peers too.
    peers: Mutex<Option<crate::identity::StateDir>>,
}

/// The capabilities this agent announces: every task kind it implements.
pub fn capabilities() -> Vec<String> {
    TaskKind::all_capabilities()
}

impl Executor {
    /// The executor and the stream of reports the session must deliver.
    pub fn new(state_dir: &Path, paths: HostPaths) -> (Arc<Self>, mpsc::UnboundedReceiver<TaskReport>) {
        let (tx, rx) = mpsc::unbounded_channel();
        std::sync::LazyLock::force(&handlers::STARTED);
        let ex = Arc::new(Self {
            state_dir: Arc::new(state_dir.to_path_buf()),
            journal: Journal::new(state_dir),
            paths: Arc::new(paths),
            lb: Arc::new(lb::LbManager::new(state_dir)),
            inflight: Mutex::default(),
            reports: tx,
            channel: watch::channel(None).0,
            peers: Mutex::default(),
        });
        (ex, rx)
    }

    /// Background duties that outlive sessions (the load balancer guard), and the outcome of a
    /// self-upgrade the agent before this one started.
    pub fn resume(self: &Arc<Self>) {
        self.lb.resume();
        let Some(m) = agent_upgrade::Marker::load(&self.state_dir) else { return };
        // The controller re-sends the task to this new session: it is answered by the outcome
        // below, not run again.
        if let Ok(mut inflight) = self.inflight.lock() {
            inflight.insert(m.task_id.clone(), (m.digest.clone(), m.attempt));
        }
        let me = self.clone();
        tokio::spawn(async move {
            // The installer may still be finishing (the package's scripts restarted us).
            let r = agent_upgrade::conclude(&agent_upgrade::Host, &me.state_dir, &m, Duration::from_secs(180)).await;
            let (state, outcome, output) = match r {
                Ok(out) => (TaskState::Succeeded, Outcome::Succeeded, out),
                Err(why) => (TaskState::Failed, Outcome::Failed, why),
            };
            match state {
                TaskState::Succeeded => tracing::info!(task = %m.task_id, "{output}"),
                _ => tracing::warn!(task = %m.task_id, "{output}"),
            }
            let output = bounded(output);
            let entry = Entry {
                task_id: m.task_id.clone(),
                attempt: m.attempt,
                digest: m.digest.clone(),
                outcome,
                changed: state == TaskState::Succeeded,
                output: output.clone(),
                updated_ms: now_unix_ms(),
            };
            // Journal first (a re-sent task is answered from it), then the marker goes.
            me.journal_put(&entry).await;
            let dir = me.state_dir.clone();
            let _ = tokio::task::spawn_blocking(move || agent_upgrade::Marker::clear(&dir)).await;
            let latest = me.inflight.lock().ok().and_then(|mut f| f.remove(&m.task_id)).map(|(_, a)| a);
            let a = TaskAssignment {
                task_id: m.task_id,
                attempt: latest.unwrap_or(m.attempt).max(m.attempt),
                ..Default::default()
            };
            me.report(&a, state, entry.changed, output);
        });
    }

    /// The guard's status, as it changes.
    pub fn lb_status(&self) -> watch::Receiver<Option<crate::lb::guard::GuardStatus>> {
        self.lb.status()
    }

    /// This agent serves peers (with the identity in `dir`), so it may fetch from them.
    pub fn set_peers(&self, dir: crate::identity::StateDir) {
        if let Ok(mut p) = self.peers.lock() {
            *p = Some(dir);
        }
    }

    /// The session's connection for tasks that need the controller (bundle chunks); `None` while
    /// no session is open.
    pub fn set_channel(&self, client: Option<AgentClient<Channel>>) {
        self.channel.send_replace(client);
    }

    /// Handle one assignment from the controller.
    pub fn submit(self: &Arc<Self>, a: TaskAssignment) {
        let Some(task) = a.task.clone() else {
            let e = fleetadm_proto::UnknownTask;
            self.report(&a, TaskState::Failed, false, e.to_string());
            return;
        };
        let kind = TaskKind::of(&task);
        // An exec or a ping is never re-sent (a command is not idempotent and the controller
        // does not resume one; a ping is asked afresh), so nothing would read its journal entry:
        // none is written or looked up (two flushed writes and a read saved per host of every
        // fleet-wide command).
        let journaled = !matches!(kind, TaskKind::Exec | TaskKind::Ping);
        let me = self.clone();
        let digest = fleetadm_common::tasks::digest(&task);
        if !journaled {
            me.start(a, task, kind, digest, false);
            return;
        }
        // The journal is files: read off the async threads.
        tokio::spawn(async move {
            let (journal, id, attempt, d) = (me.journal.clone(), a.task_id.clone(), a.attempt, digest.clone());
            let done = tokio::task::spawn_blocking(move || journal.finished(&id, attempt, &d)).await;
            if let Ok(Some(done)) = done {
                tracing::info!(task = %a.task_id, attempt = a.attempt, "answering a repeated task from the journal");
                let st = if done.outcome == Outcome::Succeeded { TaskState::Succeeded } else { TaskState::Failed };
                me.report(&a, st, done.changed, done.output);
                return;
            }
            me.start(a, task, kind, digest, true);
        });
    }

    /// Run `a` unless the same task is running already (then the newest attempt is answered
    /// when it ends).
    fn start(
        self: &Arc<Self>,
        a: TaskAssignment,
        task: fleetadm_proto::task_assignment::Task,
        kind: TaskKind,
        digest: String,
        journaled: bool,
    ) {
        let fresh = self
            .inflight
            .lock()
            .map(|mut m| match m.get_mut(&a.task_id) {
                // The controller retried (a new attempt) while this run is still going: the same
                // work answers the newest attempt when it finishes.
                Some((d, latest)) if *d == digest => {
                    *latest = (*latest).max(a.attempt);
                    false
                }
                Some(_) => false,
                None => {
                    m.insert(a.task_id.clone(), (digest.clone(), a.attempt));
                    true
                }
            })
            .unwrap_or(false);
        if !fresh {
            tracing::debug!(task = %a.task_id, attempt = a.attempt, "already running");
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut entry = Entry {
                task_id: a.task_id.clone(),
                attempt: a.attempt,
                digest,
                outcome: Outcome::Started,
                changed: false,
                output: String::new(),
                updated_ms: now_unix_ms(),
            };
            if journaled {
                me.journal_put(&entry).await;
            }
            me.report(&a, TaskState::Running, false, String::new());
            tracing::info!(task = %a.task_id, attempt = a.attempt, kind = %kind, "task started");
            let result = me.run_bounded(&a, task).await;
            let (state, changed, output, certs, snapshot) = match result {
                Ok(d) => (TaskState::Succeeded, d.changed, d.output, d.certs, d.snapshot),
                Err(e) => (TaskState::Failed, false, fleetadm_common::error_chain(&e), vec![], None),
            };
            #[cfg(feature = "skew-probe")]
            let output = format!("{output}\nskew-probe: the task carried {:?}", fleetadm_proto::skew::read(&a));
            let output = bounded(output);
            let latest = me
                .inflight
                .lock()
                .ok()
                .and_then(|mut m| m.remove(&a.task_id))
                .map(|(_, latest)| latest)
                .unwrap_or(a.attempt);
            let mut a = a;
            a.attempt = a.attempt.max(latest);
            entry.attempt = a.attempt;
            entry.outcome = if state == TaskState::Succeeded { Outcome::Succeeded } else { Outcome::Failed };
            entry.changed = changed;
            entry.output = output.clone();
            entry.updated_ms = now_unix_ms();
            // Journal first: if the report is lost, the re-sent task is answered from here.
            if journaled {
                me.journal_put(&entry).await;
            }
            match state {
                TaskState::Succeeded => tracing::info!(task = %a.task_id, changed, "task succeeded"),
                _ => tracing::warn!(task = %a.task_id, output = %output, "task failed"),
            }
            let mut r = report_of(&a, state, changed, output);
            // (a read-only check's findings; a repeat of it is answered without them)
            r.certs = certs;
            r.snapshot = snapshot;
            let _ = me.reports.send(r);
        });
    }

    /// Run the task's handler within its timeout. On a timeout the run is cancelled (its commands
    /// killed with their process groups) and awaited to its real end before this returns.
    async fn run_bounded(
        &self,
        a: &TaskAssignment,
        task: fleetadm_proto::task_assignment::Task,
    ) -> Result<Done, TaskError> {
        let timeout = Duration::from_secs(u64::from(a.timeout_secs.max(1)));
        let (stop, cancel) = command::Cancel::new();
        let progress = {
            let (reports, a) = (self.reports.clone(), a.clone());
            Arc::new(move |msg: String| {
                let _ = reports.send(report_of(&a, TaskState::Running, false, msg));
            })
        };
        let cx = Ctx {
            paths: self.paths.clone(),
            state_dir: self.state_dir.clone(),
            timeout,
            cancel,
            progress,
            lb: self.lb.clone(),
            channel: self.channel.subscribe(),
            attempt: a.attempt,
            peers: self.peers.lock().ok().and_then(|p| p.clone()),
        };
        let mut work = tokio::spawn(handlers::run(a.task_id.clone(), task, cx));
        tokio::select! {
            r = &mut work => r?,
            _ = tokio::time::sleep(timeout) => {
                stop.cancel();
                tracing::warn!(task = %a.task_id, secs = timeout.as_secs(), "task timed out; stopping it");
                let ended = (&mut work).await;
                let why = format!("timed out after {}s and was stopped", timeout.as_secs());
                Err(TaskError::Refused(match ended {
                    Ok(Err(e)) => format!("{why}: {}", fleetadm_common::error_chain(&e)),
                    _ => why,
                }))
            }
        }
    }

    async fn journal_put(&self, e: &Entry) {
        let (journal, e) = (self.journal.clone(), e.clone());
        match tokio::task::spawn_blocking(move || journal.put(&e)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "task journal not writable"),
            Err(e) => tracing::warn!(error = %e, "task journal worker failed"),
        }
    }

    fn report(&self, a: &TaskAssignment, state: TaskState, changed: bool, output: String) {
        let _ = self.reports.send(report_of(a, state, changed, output));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::needless_update)]
    fn assignment(attempt: u32) -> TaskAssignment {
        TaskAssignment {
            task_id: "lab/preflight/h1/preflight".into(),
            attempt,
            timeout_secs: 10,
            task: Some(fleetadm_proto::task_assignment::Task::Preflight(Default::default())),
            ..Default::default()
        }
    }

    /// A host whose files live under `root`.
    fn paths(root: &Path) -> HostPaths {
        HostPaths {
            root: root.into(),
            hosts_file: root.join("hosts"),
            kube_dir: root.join("etc/kubernetes"),
            proc_swaps: root.join("swaps"),
        }
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<TaskReport>) -> (u32, TaskState) {
        let r = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        (r.attempt, TaskState::try_from(r.state).unwrap())
    }

    #[tokio::test]
    async fn repeated_tasks_are_answered_from_the_journal_new_attempts_run() {
        let state = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let (ex, mut rx) = Executor::new(state.path(), paths(root.path()));
        ex.submit(assignment(1));
        assert_eq!(next(&mut rx).await, (1, TaskState::Running));
        assert_eq!(next(&mut rx).await, (1, TaskState::Succeeded));
        // The same attempt again (a reconnect, a controller restart): answered, not run.
        ex.submit(assignment(1));
        assert_eq!(next(&mut rx).await, (1, TaskState::Succeeded));
        // A new attempt runs again.
        ex.submit(assignment(2));
        assert_eq!(next(&mut rx).await, (2, TaskState::Running));
        assert_eq!(next(&mut rx).await, (2, TaskState::Succeeded));
        // A task of a kind this agent does not know (a newer controller's) fails clearly.
        let mut unknown = assignment(3);
        unknown.task = None;
        ex.submit(unknown);
        assert_eq!(next(&mut rx).await, (3, TaskState::Failed));
    }

    #[tokio::test]
    async fn a_ping_is_answered_with_what_runs_and_leaves_nothing_behind() {
        let state = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let (ex, mut rx) = Executor::new(state.path(), paths(root.path()));
        let ping = TaskAssignment {
            task_id: "exec/ping-1/h1".into(),
            attempt: 1,
            timeout_secs: 5,
            task: Some(fleetadm_proto::task_assignment::Task::Ping(Default::default())),
            ..Default::default()
        };
        ex.submit(ping.clone());
        assert_eq!(next(&mut rx).await, (1, TaskState::Running));
        let r = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        assert_eq!(r.state, TaskState::Succeeded as i32);
        assert!(!r.changed);
        let want = format!(
            "pong: node-agent {} (protocol {}), pid {}, up 0h",
            env!("CARGO_PKG_VERSION"),
            fleetadm_proto::PROTOCOL_VERSION,
            std::process::id()
        );
        assert!(r.output.starts_with(&want), "{}", r.output);
        // Not journaled: asked again, it is answered again by a new run (Running first).
        assert!(!state.path().join("tasks").exists());
        ex.submit(ping);
        assert_eq!(next(&mut rx).await, (1, TaskState::Running));
        assert_eq!(next(&mut rx).await, (1, TaskState::Succeeded));
        assert!(!state.path().join("tasks").exists());
    }

    #[tokio::test]
    async fn a_timed_out_task_is_stopped_before_it_is_reported_or_retried() {
        let state = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let kube = root.path().join("etc/kubernetes");
        let paths = HostPaths {
            root: root.path().into(),
            hosts_file: root.path().join("hosts"),
            kube_dir: kube.clone(),
            proc_swaps: root.path().join("swaps"),
        };
        // A kubeadm that hangs and records that it ran.
        let bin = root.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let marker = root.path().join("ran");
        // Its child carries the test's directory in its command line, so pgrep can find it.
        let tag = root.path().display().to_string();
        std::fs::write(
            bin.join("kubeadm"),
            format!("#!/bin/sh\necho run >> {}\nsh -c 'sleep 300' {tag}\n", marker.display()),
        )
        .unwrap();
        std::fs::set_permissions(bin.join("kubeadm"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let (ex, mut rx) = Executor::new(state.path(), paths);
        let a = TaskAssignment {
            task_id: "lab/init/h1/kubeadm-init".into(),
            attempt: 1,
            timeout_secs: 1,
            task: Some(fleetadm_proto::task_assignment::Task::KubeadmInit(fleetadm_proto::KubeadmInitTask {
                config: "kind: InitConfiguration".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        // The agent finds kubeadm in PATH, as on a host (the lab does the same with its simulator).
        // Only this test adds to PATH, and only a directory no other test's commands live in.
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        std::env::set_var("PATH", path);
        ex.submit(a.clone());
        assert_eq!(next(&mut rx).await, (1, TaskState::Running));
        // The controller retries while it runs: answered by the same run, not a second one.
        let mut retry = a.clone();
        retry.attempt = 2;
        ex.submit(retry);
        let r = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
        assert_eq!((r.attempt, TaskState::try_from(r.state).unwrap()), (2, TaskState::Failed));
        assert!(r.output.contains("timed out after 1s and was stopped"), "{}", r.output);
        // Only one kubeadm ran, and it is gone (its process group was killed before the report).
        assert_eq!(std::fs::read_to_string(&marker).unwrap().lines().count(), 1);
        let o = std::process::Command::new("pgrep").args(["-f", &tag]).output().unwrap();
        assert!(o.stdout.is_empty(), "the timed-out kubeadm is still running: {}", String::from_utf8_lossy(&o.stdout));
    }
}

//! Executing the tasks the controller assigns: one module per kind, each idempotent and reporting
//! whether it changed anything. [`Executor`] receives assignments from the session, answers
//! duplicates from the [`journal`], runs new ones in the background and hands reports back.
pub mod bootstrap;
pub mod command;
pub mod fetch;
pub mod files;
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
use fleetadm_common::tasks::TaskSpec;
use fleetadm_proto::{TaskAssignment, TaskReport, TaskState};
use tokio::sync::mpsc;

use journal::{Entry, Journal, Outcome};

/// Largest output sent in one report.
const MAX_REPORT_OUTPUT: usize = 32 * 1024;

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
    state_dir: PathBuf,
    dial: fleetadm_common::dial::DialOptions,
    journal: Journal,
    paths: HostPaths,
    lb: lb::LbManager,
    /// Tasks running now: id -> (digest, the newest attempt the controller sent for it).
    inflight: Mutex<HashMap<String, (String, u32)>>,
    reports: mpsc::UnboundedSender<TaskReport>,
}

fn bounded(mut s: String) -> String {
    if s.len() > MAX_REPORT_OUTPUT {
        let mut start = s.len() - MAX_REPORT_OUTPUT;
        while !s.is_char_boundary(start) {
            start += 1;
        }
        s = format!("[... cut ...]\n{}", &s[start..]);
    }
    s
}

impl Executor {
    /// The executor and the stream of reports the session must deliver.
    pub fn new(
        state_dir: &Path,
        paths: HostPaths,
        dial: fleetadm_common::dial::DialOptions,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<TaskReport>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let ex = Arc::new(Self {
            state_dir: state_dir.to_path_buf(),
            dial,
            journal: Journal::new(state_dir),
            paths,
            lb: lb::LbManager::new(state_dir),
            inflight: Mutex::default(),
            reports: tx,
        });
        (ex, rx)
    }

    /// Background duties that outlive sessions (the load balancer guard).
    pub fn resume(&self) {
        self.lb.resume();
    }

    /// Handle one assignment from the controller.
    pub fn submit(self: &Arc<Self>, a: TaskAssignment) {
        let spec: TaskSpec = match serde_json::from_slice(&a.spec_json) {
            Ok(s) => s,
            Err(e) => {
                self.report(&a, TaskState::Failed, false, format!("cannot read the task (agent too old?): {e}"));
                return;
            }
        };
        if spec.kind() != a.kind {
            self.report(
                &a,
                TaskState::Failed,
                false,
                format!("task kind {} does not match its parameters ({})", a.kind, spec.kind()),
            );
            return;
        }
        let digest = spec.digest();
        if let Some(done) = self.journal.finished(&a.task_id, a.attempt, &digest) {
            tracing::info!(task = %a.task_id, attempt = a.attempt, "answering a repeated task from the journal");
            let st = if done.outcome == Outcome::Succeeded { TaskState::Succeeded } else { TaskState::Failed };
            self.report(&a, st, done.changed, done.output);
            return;
        }
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
            if let Err(e) = me.journal.put(&entry) {
                tracing::warn!(error = %e, "task journal not writable");
            }
            me.report(&a, TaskState::Running, false, String::new());
            tracing::info!(task = %a.task_id, attempt = a.attempt, kind = %a.kind, "task started");
            let timeout = Duration::from_secs(u64::from(a.timeout_secs.max(1)));
            let progress = {
                let (me, a) = (me.clone(), a.clone());
                move |msg: String| me.report(&a, TaskState::Running, false, msg)
            };
            let result = match tokio::time::timeout(timeout, me.execute(spec, timeout, &progress)).await {
                Ok(r) => r,
                Err(_) => Err(format!("timed out after {}s", timeout.as_secs())),
            };
            let (state, changed, output) = match result {
                Ok((changed, out)) => (TaskState::Succeeded, changed, out),
                Err(e) => (TaskState::Failed, false, e),
            };
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
            if let Err(e) = me.journal.put(&entry) {
                tracing::warn!(error = %e, "task journal not writable");
            }
            match state {
                TaskState::Succeeded => tracing::info!(task = %a.task_id, changed, "task succeeded"),
                _ => tracing::warn!(task = %a.task_id, output = %output, "task failed"),
            }
            me.report(&a, state, changed, output);
        });
    }

    fn report(&self, a: &TaskAssignment, state: TaskState, changed: bool, output: String) {
        let _ = self.reports.send(TaskReport {
            task_id: a.task_id.clone(),
            attempt: a.attempt,
            state: state as i32,
            output,
            changed,
        });
    }

    /// Run `f` on a [`bootstrap::Bootstrap`] for this host, off the async threads.
    async fn with_bootstrap<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut bootstrap::Bootstrap<'_, bootstrap::HostSystem>) -> Result<T, String> + Send + 'static,
    ) -> Result<Result<T, String>, String> {
        let state_dir = self.state_dir.clone();
        let root = self.paths.root.clone();
        tokio::task::spawn_blocking(move || {
            let cache = fetch::BlobCache::new(&state_dir);
            let mut b = bootstrap::Bootstrap {
                root,
                cache: &cache,
                record_path: state_dir.join("bootstrap.json"),
                sys: bootstrap::HostSystem,
            };
            f(&mut b)
        })
        .await
        .map_err(|e| e.to_string())
    }

    async fn execute(
        &self,
        spec: TaskSpec,
        timeout: Duration,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<(bool, String), String> {
        let p = &self.paths;
        match spec {
            TaskSpec::FetchBundle { bundle, files } => {
                let identity = crate::identity::Identity::load(&crate::identity::StateDir::new(&self.state_dir))
                    .map_err(|e| e.to_string())?;
                let opts = crate::session::RunOptions { dial: self.dial.clone(), ..Default::default() };
                let client = crate::session::connect(&identity, &opts).await?;
                let mut src = fetch::Remote { bundle: bundle.clone(), client };
                let cache = fetch::BlobCache::new(&self.state_dir);
                let mut last = std::time::Instant::now();
                let stats = fetch::fetch_all(&cache, &mut src, &files, |done, total| {
                    if last.elapsed() >= Duration::from_secs(1) {
                        last = std::time::Instant::now();
                        progress(format!("fetched {done} of {total} bytes"));
                    }
                })
                .await?;
                Ok((
                    stats.fetched > 0,
                    format!(
                        "bundle {bundle}: {} blobs fetched ({} bytes, {} resumed), {} already cached",
                        stats.fetched, stats.bytes, stats.resumed_bytes, stats.cached
                    ),
                ))
            }
            TaskSpec::Bootstrap { bundle, kubernetes_version, files } => self
                .with_bootstrap(move |b| b.install(&files, &bundle, &kubernetes_version))
                .await?
                .and_then(|changes| {
                    // Commands the next phases need must exist now.
                    match command::which("kubeadm") {
                        Some(_) => Ok(changes),
                        None => Err(format!(
                            "kubeadm is still not in PATH after installing the bundle (does it carry bin/kubeadm?)\n{}",
                            changes.join("\n")
                        )),
                    }
                })
                .map(|changes| {
                    let real: Vec<&String> =
                        changes.iter().filter(|c| !c.starts_with("warning") && !c.starts_with("skipped")).collect();
                    (!real.is_empty(), if changes.is_empty() { "no change".to_string() } else { changes.join("\n") })
                }),
            TaskSpec::BootstrapReset {} => self.with_bootstrap(|b| b.reset()).await?.map(|changes| {
                (!changes.is_empty(), if changes.is_empty() { "nothing to undo".into() } else { changes.join("\n") })
            }),
            TaskSpec::BundleAddons { files } => {
                let cache = fetch::BlobCache::new(&self.state_dir);
                let mut manifests = Vec::new();
                for f in &files {
                    let data =
                        std::fs::read(cache.path(&f.sha256)).map_err(|e| format!("{} is not fetched: {e}", f.path))?;
                    manifests.push(fleetadm_common::tasks::FileSpec {
                        path: f.path.clone(),
                        contents: String::from_utf8(data).map_err(|_| format!("{} is not text", f.path))?,
                        mode: 0o600,
                    });
                }
                Box::pin(self.execute(TaskSpec::Addons { manifests }, timeout, progress)).await
            }
            TaskSpec::Preflight { ports, commands, free_bytes, cri_socket } => {
                let mut problems =
                    preflight::check_with_disk(&ports, &commands, &p.proc_swaps, Some((&self.state_dir, free_bytes)));
                problems.extend(preflight::leftovers(&p.kube_dir));
                let warnings = preflight::warnings(&cri_socket);
                if problems.is_empty() {
                    let mut ok = vec![format!("ports {ports:?} free"), "swap off".into()];
                    if !commands.is_empty() {
                        ok.push(format!("{} present", commands.join(", ")));
                    }
                    if free_bytes > 0 {
                        ok.push(format!("{} MiB free for the bundle", free_bytes.div_ceil(1 << 20)));
                    }
                    let mut out = format!("ok: {}", ok.join(", "));
                    for w in warnings {
                        out.push_str(&format!("\n{w}"));
                    }
                    Ok((false, out))
                } else {
                    Err(problems.join("\n"))
                }
            }
            TaskSpec::Hosts { entries } => {
                let parsed = entries
                    .iter()
                    .map(|e| {
                        e.ip.parse()
                            .map(|ip| hosts::Entry { ip, names: e.names.clone() })
                            .map_err(|_| format!("bad address {:?} in hosts entry", e.ip))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let path = p.hosts_file.clone();
                let changed = tokio::task::spawn_blocking(move || hosts::ensure(&path, &parsed))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                let lines: Vec<String> = entries.iter().map(|e| format!("{} {}", e.ip, e.names.join(" "))).collect();
                Ok((
                    changed,
                    format!(
                        "{}: {}\n{}",
                        p.hosts_file.display(),
                        if changed { "updated" } else { "no change" },
                        lines.join("\n")
                    ),
                ))
            }
            TaskSpec::Files { files } => {
                let root = p.root.clone();
                let n = files.len();
                let changed = tokio::task::spawn_blocking(move || files::install(&root, &files))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| {
                        let mut s = e.to_string();
                        if let Some(src) = std::error::Error::source(&e) {
                            s.push_str(&format!(": {src}"));
                        }
                        s
                    })?;
                Ok((
                    !changed.is_empty(),
                    format!("{n} files in place, {} written\n{}", changed.len(), changed.join("\n")),
                ))
            }
            TaskSpec::KubeadmInit { config } => {
                kubeadm::init(&p.kube_dir, &config, timeout).await.map(|o| (o.changed, o.output))
            }
            TaskSpec::KubeadmJoin { config, control_plane } => {
                kubeadm::join(&p.kube_dir, &config, control_plane, timeout).await.map(|o| (o.changed, o.output))
            }
            TaskSpec::KubeadmReset { remove_paths } => {
                kubeadm::reset(&p.kube_dir, &remove_paths, timeout).await.map(|o| (o.changed, o.output))
            }
            TaskSpec::LbClean { vip } => {
                let vip = crate::lb::parse_endpoint(&vip)?;
                self.lb.stop_and_forget();
                let changes =
                    tokio::task::spawn_blocking(move || crate::lb::clean(Some(vip), crate::lb::DEFAULT_INTERFACE))
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                let changed = !changes.0.is_empty();
                Ok((changed, if changed { changes.0.join("\n") } else { "nothing to clean".into() }))
            }
            TaskSpec::Lb { vip, real_servers, ca_pem } => {
                let d = lb::Desired::parse(&vip, &real_servers, &ca_pem)?;
                self.lb.apply(d).await
            }
            TaskSpec::Addons { manifests } => {
                if manifests.is_empty() {
                    return Ok((false, "no manifests".into()));
                }
                let dir = p.kube_dir.join("fleetadm/addons");
                let specs: Vec<_> = manifests
                    .into_iter()
                    .map(|mut m| {
                        let name = Path::new(&m.path)
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        m.path = dir.join(name).to_string_lossy().into_owned();
                        m
                    })
                    .collect();
                let root = p.root.clone();
                let written = specs.clone();
                tokio::task::spawn_blocking(move || files::install(&root, &written))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                let kubeconfig = p.kube_dir.join("admin.conf").to_string_lossy().into_owned();
                let dir_s = dir.to_string_lossy().into_owned();
                let ran = command::run("kubectl", &["--kubeconfig", &kubeconfig, "apply", "-f", &dir_s], timeout)
                    .await
                    .map_err(|e| e.to_string())?;
                if ran.success {
                    Ok((true, ran.output))
                } else {
                    Err(format!("kubectl apply failed (exit {:?}):\n{}", ran.code, ran.output))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(attempt: u32) -> TaskAssignment {
        let spec = TaskSpec::Preflight { ports: vec![], commands: vec![], free_bytes: 0, cri_socket: String::new() };
        TaskAssignment {
            task_id: "lab/preflight/h1/preflight".into(),
            attempt,
            kind: "preflight".into(),
            spec_json: serde_json::to_vec(&spec).unwrap(),
            timeout_secs: 10,
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
        let paths = HostPaths {
            root: root.path().into(),
            hosts_file: root.path().join("hosts"),
            kube_dir: root.path().join("etc/kubernetes"),
            proc_swaps: root.path().join("swaps"),
        };
        let (ex, mut rx) = Executor::new(state.path(), paths, Default::default());
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
        // Garbage parameters or a kind that does not match them fail clearly.
        let mut bad = assignment(3);
        bad.spec_json = b"{\"kind\":\"format-disk\"}".to_vec();
        ex.submit(bad);
        assert_eq!(next(&mut rx).await, (3, TaskState::Failed));
        let mut lying = assignment(4);
        lying.kind = "kubeadm-init".into();
        ex.submit(lying);
        assert_eq!(next(&mut rx).await, (4, TaskState::Failed));
    }
}

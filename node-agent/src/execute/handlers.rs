//! One [`Handler`] per task kind: each takes its typed task message and calls the module that
//! knows how (hosts, files, kubeadm, lb, fetch, bootstrap, preflight). [`run`] picks the handler.
#![allow(clippy::needless_update)]
use std::path::Path;
use std::time::Duration;

use fleetadm_common::tasks::BundleFile;
use fleetadm_proto::task_assignment::Task;
use fleetadm_proto::{self as pb};

use super::command::{self, Cmd};
use super::handler::{blocking, Ctx, Done, Handler, TaskError};
use super::{agent_upgrade, bootstrap, certs, etcd, exec, fetch, files, hosts, kubeadm, lb, preflight};

/// Run `task` with the handler of its kind.
pub async fn run(task_id: String, task: Task, cx: Ctx) -> Result<Done, TaskError> {
    match task {
        Task::Preflight(t) => Preflight.run(t, cx).await,
        Task::Hosts(t) => Hosts.run(t, cx).await,
        Task::Files(t) => Files.run(t, cx).await,
        Task::KubeadmInit(t) => KubeadmInit.run(t, cx).await,
        Task::KubeadmJoin(t) => KubeadmJoin.run(t, cx).await,
        Task::KubeadmReset(t) => KubeadmReset.run(t, cx).await,
        Task::Lb(t) => Lb.run(t, cx).await,
        Task::LbClean(t) => LbClean.run(t, cx).await,
        Task::Addons(t) => Addons.run(t, cx).await,
        Task::BundleAddons(t) => BundleAddons.run(t, cx).await,
        Task::FetchBundle(t) => FetchBundle.run(t, cx).await,
        Task::Bootstrap(t) => Bootstrap.run(t, cx).await,
        Task::BootstrapReset(t) => BootstrapReset.run(t, cx).await,
        Task::KubeadmToken(t) => KubeadmToken.run(t, cx).await,
        Task::Exec(t) => Exec.run(t, cx).await,
        Task::NodeObjects(t) => NodeObjects.run(t, cx).await,
        Task::CertsCheck(t) => CertsCheck.run(t, cx).await,
        Task::CertsInstall(t) => CertsInstall.run(t, cx).await,
        Task::EtcdSnapshot(t) => EtcdSnapshot { task_id }.run(t, cx).await,
        Task::EtcdRestore(t) => EtcdRestore.run(t, cx).await,
        Task::KubeadmUpgrade(t) => KubeadmUpgrade.run(t, cx).await,
        Task::AgentUpgrade(t) => AgentUpgrade { task_id }.run(t, cx).await,
        Task::Ping(t) => Ping.run(t, cx).await,
    }
}

/// When this agent process started (set when its executor is made).
pub static STARTED: std::sync::LazyLock<std::time::Instant> = std::sync::LazyLock::new(std::time::Instant::now);

/// `controller agent ping`: the no-op task. Answers with what is running; touches nothing.
pub struct Ping;

impl Handler for Ping {
    type Task = pb::PingTask;
    async fn run(&self, _t: pb::PingTask, _cx: Ctx) -> Result<Done, TaskError> {
        Ok(Done::new(false, pong(STARTED.elapsed())))
    }
}

fn pong(up: Duration) -> String {
    let s = up.as_secs();
    format!(
        "pong: node-agent {} (protocol {}), pid {}, up {}h{:02}m{:02}s",
        env!("CARGO_PKG_VERSION"),
        pb::PROTOCOL_VERSION,
        std::process::id(),
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

pub struct Preflight;

impl Handler for Preflight {
    type Task = pb::PreflightTask;
    async fn run(&self, t: pb::PreflightTask, cx: Ctx) -> Result<Done, TaskError> {
        let ports = t
            .ports
            .iter()
            .map(|p| u16::try_from(*p).map_err(|_| TaskError::Refused(format!("port {p} is out of range"))))
            .collect::<Result<Vec<u16>, _>>()?;
        let (state_dir, commands, free, cri) = (cx.state_dir.clone(), t.commands.clone(), t.free_bytes, t.cri_socket);
        let paths = cx.paths.clone();
        let ports2 = ports.clone();
        let (problems, warnings) = blocking(move || {
            let mut problems =
                preflight::check_with_disk(&ports2, &commands, &paths.proc_swaps, Some((&state_dir, free)));
            problems.extend(preflight::leftovers(&paths.kube_dir));
            Ok::<_, TaskError>((problems, preflight::warnings(&cri)))
        })
        .await?;
        if !problems.is_empty() {
            return Err(TaskError::Refused(problems.join("\n")));
        }
        let mut ok = vec![format!("ports {ports:?} free"), "swap off".into()];
        if !t.commands.is_empty() {
            ok.push(format!("{} present", t.commands.join(", ")));
        }
        if t.free_bytes > 0 {
            ok.push(format!("{} MiB free for the bundle", t.free_bytes.div_ceil(1 << 20)));
        }
        let mut out = format!("ok: {}", ok.join(", "));
        for w in warnings {
            out.push_str(&format!("\n{w}"));
        }
        Ok(Done::new(false, out))
    }
}

pub struct Hosts;

impl Handler for Hosts {
    type Task = pb::HostsTask;
    async fn run(&self, t: pb::HostsTask, cx: Ctx) -> Result<Done, TaskError> {
        let parsed = t
            .entries
            .iter()
            .map(|e| {
                e.ip.parse()
                    .map(|ip| hosts::Entry { ip, names: e.names.clone() })
                    .map_err(|_| TaskError::Refused(format!("bad address {:?} in hosts entry", e.ip)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let path = cx.paths.hosts_file.clone();
        let p2 = path.clone();
        let changed = blocking(move || hosts::ensure(&p2, &parsed)).await?;
        let lines: Vec<String> = t.entries.iter().map(|e| format!("{} {}", e.ip, e.names.join(" "))).collect();
        Ok(Done::new(
            changed,
            format!("{}: {}\n{}", path.display(), if changed { "updated" } else { "no change" }, lines.join("\n")),
        ))
    }
}

pub struct Files;

impl Handler for Files {
    type Task = pb::FilesTask;
    async fn run(&self, t: pb::FilesTask, cx: Ctx) -> Result<Done, TaskError> {
        let root = cx.paths.root.clone();
        let n = t.files.len();
        let changed = blocking(move || files::install(&root, &t.files)).await?;
        Ok(Done::new(
            !changed.is_empty(),
            format!("{n} files in place, {} written\n{}", changed.len(), changed.join("\n")),
        ))
    }
}

pub struct KubeadmInit;

impl Handler for KubeadmInit {
    type Task = pb::KubeadmInitTask;
    async fn run(&self, t: pb::KubeadmInitTask, cx: Ctx) -> Result<Done, TaskError> {
        let o = kubeadm::init(&cx.paths.kube_dir, &t.config, cx.timeout, &cx.cancel).await?;
        Ok(Done::new(o.changed, o.output))
    }
}

pub struct KubeadmJoin;

impl Handler for KubeadmJoin {
    type Task = pb::KubeadmJoinTask;
    async fn run(&self, t: pb::KubeadmJoinTask, cx: Ctx) -> Result<Done, TaskError> {
        let o = kubeadm::join(&cx.paths.kube_dir, &t.config, t.control_plane, cx.timeout, &cx.cancel).await?;
        Ok(Done::new(o.changed, o.output))
    }
}

pub struct Exec;

impl Handler for Exec {
    type Task = pb::ExecTask;
    async fn run(&self, t: pb::ExecTask, cx: Ctx) -> Result<Done, TaskError> {
        if t.argv.is_empty() || t.argv[0].is_empty() {
            return Err(TaskError::Refused("exec: no command given".into()));
        }
        let output = exec::run(&t.argv, cx.timeout, &cx.cancel, cx.progress.clone()).await?;
        Ok(Done::new(true, output))
    }
}

pub struct KubeadmToken;

impl Handler for KubeadmToken {
    type Task = pb::KubeadmTokenTask;
    async fn run(&self, t: pb::KubeadmTokenTask, cx: Ctx) -> Result<Done, TaskError> {
        use fleetadm_common::token::BootstrapToken;
        let token = match t.token.as_str() {
            "" => None,
            text => Some(BootstrapToken::parse(text).map_err(|e| TaskError::Refused(e.to_string()))?),
        };
        if let Some(bad) = t
            .delete_ids
            .iter()
            .find(|id| id.len() != 6 || !id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
        {
            return Err(TaskError::Refused(format!("{bad:?} is not a bootstrap token id ([a-z0-9]{{6}})")));
        }
        if token.is_some() && !(60..=7 * 24 * 3600).contains(&t.ttl_secs) {
            return Err(TaskError::Refused(format!("token ttl {}s is outside 1m..7d", t.ttl_secs)));
        }
        let description: String = t.description.chars().filter(|c| !c.is_control()).take(200).collect();
        let ttl = Duration::from_secs(u64::from(t.ttl_secs));
        let o = kubeadm::token(
            &cx.paths.kube_dir,
            token.as_ref(),
            ttl,
            &description,
            &t.delete_ids,
            cx.timeout,
            &cx.cancel,
        )
        .await?;
        Ok(Done::new(o.changed, o.output))
    }
}

pub struct NodeObjects;

impl Handler for NodeObjects {
    type Task = pb::NodeObjectsTask;
    async fn run(&self, t: pb::NodeObjectsTask, cx: Ctx) -> Result<Done, TaskError> {
        if t.nodes.is_empty() {
            return Err(TaskError::Refused("node-objects: no node given".into()));
        }
        if let Some(bad) = t.nodes.iter().find(|n| !kubeadm::nodes::valid_node_name(n)) {
            return Err(TaskError::Refused(format!("{bad:?} is not a Kubernetes node name")));
        }
        let drain = t.drain.then(|| Duration::from_secs(u64::from(t.drain_timeout_secs.clamp(10, 3600))));
        let o = kubeadm::nodes::leave(&cx.paths.kube_dir, &t.nodes, drain, t.delete, cx.timeout, &cx.cancel).await?;
        Ok(Done::new(o.changed, o.output))
    }
}

pub struct CertsCheck;

impl Handler for CertsCheck {
    type Task = pb::CertsCheckTask;
    async fn run(&self, _t: pb::CertsCheckTask, cx: Ctx) -> Result<Done, TaskError> {
        let (root, kube_dir) = (cx.paths.root.clone(), cx.paths.kube_dir.clone());
        let found = blocking(move || Ok::<_, TaskError>(fleetadm_common::certs::scan(&root, &kube_dir))).await?;
        let broken = found.iter().filter(|c| !c.error.is_empty()).count();
        let mut done = Done::new(false, format!("{} certificates read, {broken} unreadable", found.len()));
        done.certs = found;
        Ok(done)
    }
}

pub struct CertsInstall;

impl Handler for CertsInstall {
    type Task = pb::CertsInstallTask;
    async fn run(&self, t: pb::CertsInstallTask, cx: Ctx) -> Result<Done, TaskError> {
        let pods = t.restart.iter().map(|p| certs::Pod::parse(&p.name, &p.probe)).collect::<Result<Vec<_>, _>>()?;
        let root = cx.paths.root.clone();
        let n = t.files.len();
        let written = blocking(move || files::install(&root, &t.files)).await?;
        let mut out = vec![format!("{n} files in place, {} written", written.len())];
        out.extend(written.iter().cloned());
        let ca_path = cx.paths.kube_dir.join("pki/ca.crt");
        let ca = blocking(move || {
            std::fs::read_to_string(&ca_path).map_err(|e| {
                TaskError::Refused(format!("{}: {e} (the cluster CA is needed to probe)", ca_path.display()))
            })
        })
        .await?;
        // One at a time: the next pod stops only once the previous one answers again.
        for pod in &pods {
            (cx.progress)(format!("restarting {}", pod.name));
            out.push(certs::restart(&cx.paths.kube_dir, pod, &ca, &cx.cancel).await?);
        }
        Ok(Done::new(!written.is_empty() || !pods.is_empty(), out.join("\n")))
    }
}

/// The task id names the upload (only the task's own upload is accepted by the controller).
pub struct EtcdSnapshot {
    task_id: String,
}

impl Handler for EtcdSnapshot {
    type Task = pb::EtcdSnapshotTask;
    async fn run(&self, t: pb::EtcdSnapshotTask, cx: Ctx) -> Result<Done, TaskError> {
        let endpoint = if t.endpoint.is_empty() { "127.0.0.1:2379".to_string() } else { t.endpoint };
        let info = etcd::snapshot(
            &cx.paths.kube_dir,
            &cx.state_dir,
            &self.task_id,
            &endpoint,
            &cx.channel,
            cx.timeout,
            &cx.cancel,
        )
        .await?;
        let mut done = Done::new(
            false,
            format!(
                "etcd snapshot at revision {} ({} keys, {} bytes, sha256 {}) uploaded",
                info.revision, info.total_keys, info.size, info.sha256
            ),
        );
        done.snapshot = Some(info);
        Ok(done)
    }
}

pub struct KubeadmUpgrade;

impl Handler for KubeadmUpgrade {
    type Task = pb::KubeadmUpgradeTask;
    async fn run(&self, t: pb::KubeadmUpgradeTask, cx: Ctx) -> Result<Done, TaskError> {
        let o = kubeadm::upgrade::step(&cx.paths.kube_dir, &t, cx.timeout, &cx.cancel).await?;
        Ok(Done::new(o.changed, o.output))
    }
}

/// `controller agent upgrade`: see [`agent_upgrade`].
pub struct AgentUpgrade {
    task_id: String,
}

impl Handler for AgentUpgrade {
    type Task = pb::AgentUpgradeTask;
    async fn run(&self, t: pb::AgentUpgradeTask, cx: Ctx) -> Result<Done, TaskError> {
        let digest = fleetadm_common::tasks::digest(&pb::task_assignment::Task::AgentUpgrade(t.clone()));
        let packages: Vec<BundleFile> = t.packages.iter().map(Into::into).collect();
        let exe = std::env::current_exe().unwrap_or_else(|_| "/usr/bin/node-agent".into());
        let cache = fetch::BlobCache::new(&cx.state_dir);
        let fetched = async |f: &BundleFile| -> Result<std::path::PathBuf, TaskError> {
            let mut src = fetch::Remote::new(t.bundle.clone(), cx.channel.clone(), cx.peers.clone());
            fetch::fetch_all(&cache, &mut src, std::slice::from_ref(f), |_, _| {}).await?;
            Ok(cache.path(&f.sha256))
        };
        let out = agent_upgrade::start(
            &agent_upgrade::Host,
            &cx.state_dir,
            &exe,
            &packages,
            fetched,
            (&self.task_id, cx.attempt, &digest),
            &*cx.progress,
            &cx.cancel,
            agent_upgrade::RESTART_GRACE,
        )
        .await?;
        Ok(Done::new(false, out))
    }
}

pub struct EtcdRestore;

impl Handler for EtcdRestore {
    type Task = pb::EtcdRestoreTask;
    async fn run(&self, t: pb::EtcdRestoreTask, cx: Ctx) -> Result<Done, TaskError> {
        let (changed, out) =
            etcd::restore_step(&cx.paths.root, &cx.paths.kube_dir, &cx.state_dir, &t, &cx.channel, &cx.cancel).await?;
        Ok(Done::new(changed, out))
    }
}

pub struct KubeadmReset;

impl Handler for KubeadmReset {
    type Task = pb::KubeadmResetTask;
    async fn run(&self, t: pb::KubeadmResetTask, cx: Ctx) -> Result<Done, TaskError> {
        let o = kubeadm::reset(&cx.paths.kube_dir, &t.remove_paths, cx.timeout, &cx.cancel).await?;
        Ok(Done::new(o.changed, o.output))
    }
}

pub struct Lb;

impl Handler for Lb {
    type Task = pb::LbTask;
    async fn run(&self, t: pb::LbTask, cx: Ctx) -> Result<Done, TaskError> {
        let d = lb::Desired::parse(&t.vip, &t.real_servers, &t.ca_pem)?;
        let (changed, output) = cx.lb.apply(d).await?;
        Ok(Done::new(changed, output))
    }
}

pub struct LbClean;

impl Handler for LbClean {
    type Task = pb::LbCleanTask;
    async fn run(&self, t: pb::LbCleanTask, cx: Ctx) -> Result<Done, TaskError> {
        let vip = crate::lb::parse_endpoint(&t.vip).map_err(lb::LbTaskError::from)?;
        cx.lb.stop_and_forget();
        let changes =
            blocking(move || crate::lb::clean(Some(vip), crate::lb::DEFAULT_INTERFACE).map_err(lb::LbTaskError::Apply))
                .await?;
        let changed = !changes.0.is_empty();
        Ok(Done::new(changed, if changed { changes.0.join("\n") } else { "nothing to clean".into() }))
    }
}

pub struct Addons;

impl Handler for Addons {
    type Task = pb::AddonsTask;
    async fn run(&self, t: pb::AddonsTask, cx: Ctx) -> Result<Done, TaskError> {
        if t.manifests.is_empty() {
            return Ok(Done::new(false, "no manifests"));
        }
        let dir = cx.paths.kube_dir.join("fleetadm/addons");
        let specs: Vec<pb::FileSpec> = t
            .manifests
            .into_iter()
            .map(|mut m| {
                let name = Path::new(&m.path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                m.path = dir.join(name).to_string_lossy().into_owned();
                m
            })
            .collect();
        let root = cx.paths.root.clone();
        blocking(move || files::install(&root, &specs)).await?;
        let kubeconfig = cx.paths.kube_dir.join("admin.conf").to_string_lossy().into_owned();
        let dir_s = dir.to_string_lossy().into_owned();
        let cmd = Cmd::new("kubectl", &["--kubeconfig", &kubeconfig, "apply", "-f", &dir_s], cx.timeout);
        let out = command::run(&cmd, &cx.cancel).await?.ok("kubectl apply")?;
        Ok(Done::new(true, out))
    }
}

pub struct BundleAddons;

impl Handler for BundleAddons {
    type Task = pb::BundleAddonsTask;
    async fn run(&self, t: pb::BundleAddonsTask, cx: Ctx) -> Result<Done, TaskError> {
        let state_dir = cx.state_dir.clone();
        let manifests = blocking(move || {
            let cache = fetch::BlobCache::new(&state_dir);
            t.files
                .iter()
                .map(|f| {
                    let data = std::fs::read(cache.path(&f.sha256))
                        .map_err(|e| TaskError::Refused(format!("{} is not fetched: {e}", f.path)))?;
                    let contents =
                        String::from_utf8(data).map_err(|_| TaskError::Refused(format!("{} is not text", f.path)))?;
                    Ok(pb::FileSpec { path: f.path.clone(), contents, mode: 0o600, ..Default::default() })
                })
                .collect::<Result<Vec<_>, TaskError>>()
        })
        .await?;
        Addons.run(pb::AddonsTask { manifests, ..Default::default() }, cx).await
    }
}

pub struct FetchBundle;

impl Handler for FetchBundle {
    type Task = pb::FetchBundleTask;
    async fn run(&self, t: pb::FetchBundleTask, cx: Ctx) -> Result<Done, TaskError> {
        let files: Vec<BundleFile> = t.files.iter().map(Into::into).collect();
        let mut src = fetch::Remote::new(t.bundle.clone(), cx.channel.clone(), cx.peers.clone());
        let cache = fetch::BlobCache::new(&cx.state_dir);
        let mut last = std::time::Instant::now();
        let fetching = fetch::fetch_all(&cache, &mut src, &files, |done, total| {
            if last.elapsed() >= Duration::from_secs(1) {
                last = std::time::Instant::now();
                (cx.progress)(format!("fetched {done} of {total} bytes"));
            }
        });
        // Stopping mid-transfer is safe: what arrived stays in the partial file for the next try.
        let stats = tokio::select! {
            r = fetching => r?,
            _ = cx.cancel.fired() => return Err(TaskError::Refused("the fetch was stopped; it resumes on the next attempt".into())),
        };
        Ok(Done::new(
            stats.fetched > 0,
            format!(
                "bundle {}: {} blobs fetched ({} bytes, {} resumed), {} already cached",
                t.bundle, stats.fetched, stats.bytes, stats.resumed_bytes, stats.cached
            ),
        ))
    }
}

/// Run `f` on a [`bootstrap::Bootstrap`] for this host, on a blocking thread.
async fn with_bootstrap<T: Send + 'static>(
    cx: &Ctx,
    f: impl FnOnce(&mut bootstrap::Bootstrap<'_, bootstrap::HostSystem>) -> Result<T, bootstrap::BootstrapError>
        + Send
        + 'static,
) -> Result<T, TaskError> {
    let (state_dir, root, cancel) = (cx.state_dir.clone(), cx.paths.root.clone(), cx.cancel.clone());
    blocking(move || {
        let cache = fetch::BlobCache::new(&state_dir);
        let mut b = bootstrap::Bootstrap {
            root,
            cache: &cache,
            record_path: state_dir.join("bootstrap.json"),
            sys: bootstrap::HostSystem { cancel },
        };
        f(&mut b)
    })
    .await
}

pub struct Bootstrap;

impl Handler for Bootstrap {
    type Task = pb::BootstrapTask;
    async fn run(&self, t: pb::BootstrapTask, cx: Ctx) -> Result<Done, TaskError> {
        let files: Vec<BundleFile> = t.files.iter().map(Into::into).collect();
        let changes = with_bootstrap(&cx, move |b| b.install(&files, &t.bundle, &t.kubernetes_version)).await?;
        // Commands the next phases need must exist now.
        if command::which("kubeadm").is_none() {
            return Err(TaskError::Refused(format!(
                "kubeadm is still not in PATH after installing the bundle (does it carry bin/kubeadm?)\n{}",
                changes.join("\n")
            )));
        }
        let real = changes.iter().any(|c| !c.starts_with("warning") && !c.starts_with("skipped"));
        Ok(Done::new(real, if changes.is_empty() { "no change".to_string() } else { changes.join("\n") }))
    }
}

pub struct BootstrapReset;

impl Handler for BootstrapReset {
    type Task = pb::BootstrapResetTask;
    async fn run(&self, _t: pb::BootstrapResetTask, cx: Ctx) -> Result<Done, TaskError> {
        let changes = with_bootstrap(&cx, |b| b.reset()).await?;
        Ok(Done::new(
            !changes.is_empty(),
            if changes.is_empty() { "nothing to undo".into() } else { changes.join("\n") },
        ))
    }
}

//! What each planned task carries to its host: the typed task message of the protocol. Rendered
//! from the cluster record at dispatch time (deterministically, so a re-sent task has the same
//! digest); secrets only go to hosts that need them: keys to masters, the bootstrap token to hosts
//! that join.
//!
//! Task messages are built with `..Default::default()`: a field added to a message (a newer
//! protocol revision, or the test-only `skew-probe` build) keeps this code source-compatible.
#![allow(clippy::needless_update)]
use fleetadm_proto::task_assignment::Task as WireTask;
use fleetadm_proto::{
    BootstrapResetTask, BootstrapTask, BundleAddonsTask, CertsInstallTask, EtcdRestoreTask, FetchBundleTask, FileSpec,
    FilesTask, HostsEntry, HostsTask, KubeadmInitTask, KubeadmJoinTask, KubeadmResetTask, KubeadmTokenTask,
    KubeadmUpgradeTask, LbCleanTask, LbTask, NodeObjectsTask, PreflightTask, StaticPod,
};
use thiserror::Error;

use super::record::ClusterRecord;
use super::token;
use crate::pki::kube::APISERVER_NAME;
use crate::plan::clusterfile;
use crate::plan::kubeadm::{self, ClusterInputs, HostInputs, HostRole};
use crate::plan::phases::{PhaseName, PlannedHost, StepKind, Task};

/// Ports a control-plane host must have free before `kubeadm init/join`.
pub const MASTER_PORTS: &[u32] = &[6443, 2379, 2380, 10250, 10257, 10259];
/// Ports a worker must have free.
pub const WORKER_PORTS: &[u32] = &[10250];
/// Where the agent keeps what fleetadm installs for Kubernetes.
pub const KUBE_DIR: &str = "/etc/kubernetes";

#[derive(Debug, Error)]
pub enum SpecError {
    #[error("host {host} is not part of cluster {cluster}")]
    NotInCluster { host: String, cluster: String },
    #[error("cluster {0} has no masters")]
    NoMasters(String),
    #[error("cluster {0} has no bundle")]
    NoBundle(String),
    #[error("cluster {0} is not being restored")]
    NotRestoring(String),
    #[error("the cluster's Clusterfile no longer parses")]
    Clusterfile(#[source] clusterfile::ClusterfileError),
    #[error("rendering the kubeadm configuration for {host}")]
    Kubeadm {
        host: String,
        #[source]
        source: kubeadm::RenderError,
    },
}

fn host<'a>(rec: &'a ClusterRecord, name: &str) -> Result<(&'a PlannedHost, bool), SpecError> {
    if let Some(h) = rec.shape.masters.iter().find(|m| m.node == name) {
        return Ok((h, true));
    }
    if let Some(h) = rec.shape.workers.iter().find(|w| w.node == name) {
        return Ok((h, false));
    }
    rec.leaving
        .iter()
        .find(|l| l.host.node == name)
        .map(|l| (&l.host, l.master))
        .ok_or_else(|| SpecError::NotInCluster { host: name.to_string(), cluster: rec.name.clone() })
}

/// The certificates the current operation reissued (installed by its `certs-install` tasks).
fn reissued(rec: &ClusterRecord) -> Vec<String> {
    match &rec.operation {
        super::record::Operation::Certs { certs, .. } => certs.clone(),
        super::record::Operation::AddHosts { .. } => vec!["apiserver".into()],
        _ => vec![],
    }
}

fn inputs(rec: &ClusterRecord) -> ClusterInputs {
    ClusterInputs {
        cluster_name: rec.name.clone(),
        version: rec.spec.version.clone(),
        pod_cidr: rec.spec.pod_cidr.clone(),
        service_cidr: rec.spec.service_cidr.clone(),
        dns_domain: rec.spec.dns_domain.clone(),
        vip: rec.shape.vip,
        cert_sans: vec![],
        bootstrap_token: rec.secrets.bootstrap_token.clone(),
        ca_cert_hash: rec.secrets.ca_cert_hash.clone(),
        cgroup_driver: rec.spec.cgroup_driver.clone(),
        cri_socket: rec.spec.cri_socket.clone(),
        image_repository: rec.spec.image_repository.clone(),
    }
}

fn render(rec: &ClusterRecord, h: &PlannedHost, role: HostRole) -> Result<String, SpecError> {
    let cf = if rec.spec.clusterfile.trim().is_empty() {
        None
    } else {
        Some(clusterfile::parse(&rec.spec.clusterfile).map_err(SpecError::Clusterfile)?)
    };
    kubeadm::render(&inputs(rec), &HostInputs { name: h.node.clone(), ip: h.ip, role }, cf.as_ref())
        .map_err(|source| SpecError::Kubeadm { host: h.node.clone(), source })
}

/// The entries of the managed /etc/hosts block: every cluster host by name, and the apiserver
/// name pointing at `apiserver`.
fn hosts_entries(rec: &ClusterRecord, apiserver: std::net::IpAddr) -> Vec<HostsEntry> {
    let entry = |ip: std::net::IpAddr, name: &str| HostsEntry {
        ip: ip.to_string(),
        names: vec![name.to_string()],
        ..Default::default()
    };
    let mut entries = vec![entry(apiserver, APISERVER_NAME)];
    for h in rec.shape.masters.iter().chain(rec.shape.workers.iter()) {
        entries.push(entry(h.ip, &h.node));
    }
    entries
}

fn bundle_name(rec: &ClusterRecord) -> Result<String, SpecError> {
    rec.shape.bundle.clone().ok_or_else(|| SpecError::NoBundle(rec.name.clone()))
}

fn bundle_files(rec: &ClusterRecord) -> Vec<fleetadm_proto::BundleFile> {
    rec.bundle_files.iter().map(Into::into).collect()
}

/// The task message for `task`. Which wire kind each step sends is [`StepKind::task_kind`]; the
/// match below is exhaustive so a new step cannot be planned without its parameters.
pub fn spec_for(rec: &ClusterRecord, task: &Task) -> Result<WireTask, SpecError> {
    let (h, is_master) = host(rec, task.host())?;
    let master0 = rec.shape.masters.first().ok_or_else(|| SpecError::NoMasters(rec.name.clone()))?;
    let vip_endpoint = std::net::SocketAddr::new(rec.shape.vip, 6443).to_string();
    Ok(match task.kind() {
        StepKind::Preflight => WireTask::Preflight(PreflightTask {
            ports: if is_master { MASTER_PORTS.to_vec() } else { WORKER_PORTS.to_vec() },
            // With a bundle, kubeadm arrives with the bootstrap (which checks for it then).
            commands: if rec.shape.bundle.is_some() { vec![] } else { vec!["kubeadm".into()] },
            // Room for the bundle in the agent's cache, plus a margin for the install.
            free_bytes: rec.bundle_files.iter().map(|f| f.size).sum::<u64>() * 2,
            cri_socket: rec.spec.cri_socket.clone(),
            ..Default::default()
        }),
        StepKind::Hosts => {
            // Masters: master0 until they have joined, then themselves. Workers: the VIP.
            let target = if !is_master {
                rec.shape.vip
            } else if matches!(task.id.phase, PhaseName::JoinMasters | PhaseName::SyncHosts) || h.node == master0.node {
                h.ip
            } else {
                master0.ip
            };
            WireTask::Hosts(HostsTask { entries: hosts_entries(rec, target), ..Default::default() })
        }
        StepKind::HostsClean => WireTask::Hosts(HostsTask { entries: vec![], ..Default::default() }),
        StepKind::Pki => WireTask::Files(FilesTask {
            files: rec
                .secrets
                .pki
                .files_for(&h.node)
                .into_iter()
                .map(|f| FileSpec {
                    path: format!("{KUBE_DIR}/{}", f.path),
                    contents: f.contents,
                    mode: f.mode,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        StepKind::KubeadmInit => WireTask::KubeadmInit(KubeadmInitTask {
            config: render(rec, h, HostRole::FirstMaster)?,
            ..Default::default()
        }),
        StepKind::KubeadmJoin => WireTask::KubeadmJoin(KubeadmJoinTask {
            config: render(rec, h, if is_master { HostRole::Master } else { HostRole::Worker })?,
            control_plane: is_master,
            ..Default::default()
        }),
        StepKind::Lb => WireTask::Lb(LbTask {
            vip: vip_endpoint,
            real_servers: rec.shape.masters.iter().map(|m| std::net::SocketAddr::new(m.ip, 6443).to_string()).collect(),
            ca_pem: rec.secrets.pki.ca_cert_pem.clone(),
            ..Default::default()
        }),
        StepKind::FetchBundle => WireTask::FetchBundle(FetchBundleTask {
            bundle: bundle_name(rec)?,
            files: bundle_files(rec),
            ..Default::default()
        }),
        StepKind::Bootstrap => WireTask::Bootstrap(BootstrapTask {
            bundle: bundle_name(rec)?,
            kubernetes_version: rec.spec.version.clone(),
            files: bundle_files(rec),
            ..Default::default()
        }),
        StepKind::Addons => WireTask::BundleAddons(BundleAddonsTask {
            files: bundle_files(rec).into_iter().filter(|f| f.path.starts_with("manifests/")).collect(),
            ..Default::default()
        }),
        StepKind::KubeadmReset => WireTask::KubeadmReset(KubeadmResetTask {
            remove_paths: vec![format!("{KUBE_DIR}/fleetadm")],
            ..Default::default()
        }),
        StepKind::LbClean => WireTask::LbClean(LbCleanTask { vip: vip_endpoint, ..Default::default() }),
        StepKind::BootstrapReset => WireTask::BootstrapReset(BootstrapResetTask { ..Default::default() }),
        StepKind::JoinToken => WireTask::KubeadmToken(KubeadmTokenTask {
            token: rec.secrets.bootstrap_token.clone(),
            ttl_secs: token::JOIN_TOKEN_TTL.as_secs() as u32,
            description: format!("fleetadm: joins of cluster {}", rec.name),
            delete_ids: vec![],
            ..Default::default()
        }),
        StepKind::DropToken => {
            WireTask::KubeadmToken(KubeadmTokenTask { delete_ids: token::all_ids(&rec.secrets), ..Default::default() })
        }
        StepKind::CertsInstall => {
            let certs = reissued(rec);
            let files = rec
                .secrets
                .pki
                .files_for(&h.node)
                .into_iter()
                .filter(|f| crate::pki::kube::cert_name(&f.path).is_some_and(|n| certs.iter().any(|c| c == n)))
                .map(|f| FileSpec {
                    path: format!("{KUBE_DIR}/{}", f.path),
                    contents: f.contents,
                    mode: f.mode,
                    ..Default::default()
                })
                .collect();
            let restart = super::certs::pods(&certs, h.ip)
                .into_iter()
                .map(|(name, probe)| StaticPod { name: name.into(), probe, ..Default::default() })
                .collect();
            WireTask::CertsInstall(CertsInstallTask { files, restart, ..Default::default() })
        }
        StepKind::EtcdStop | StepKind::EtcdRestore | StepKind::EtcdStart | StepKind::ApiserverStart => {
            let super::record::Operation::Restore { backup, sha256, size } = &rec.operation else {
                return Err(SpecError::NotRestoring(rec.name.clone()));
            };
            let step = match task.kind() {
                StepKind::EtcdStop => "stop",
                StepKind::EtcdRestore => "restore",
                StepKind::EtcdStart => "start-etcd",
                _ => "start-apiserver",
            };
            let peer = |m: &PlannedHost| format!("https://{}", std::net::SocketAddr::new(m.ip, 2380));
            WireTask::EtcdRestore(EtcdRestoreTask {
                step: step.into(),
                snapshot: Some(fleetadm_proto::BundleFile {
                    path: "etcd-snapshot.db".into(),
                    size: *size,
                    mode: 0o600,
                    sha256: sha256.clone(),
                    ..Default::default()
                }),
                source: backup_source(&rec.name, backup),
                member_name: h.node.clone(),
                initial_cluster: rec
                    .shape
                    .masters
                    .iter()
                    .map(|m| format!("{}={}", m.node, peer(m)))
                    .collect::<Vec<_>>()
                    .join(","),
                peer_url: peer(h),
                apiserver: std::net::SocketAddr::new(h.ip, 6443).to_string(),
                ..Default::default()
            })
        }
        StepKind::KubeadmUpgrade | StepKind::KubeletRestart | StepKind::Uncordon => {
            let step = match task.kind() {
                StepKind::KubeadmUpgrade if h.node == master0.node => "apply",
                StepKind::KubeadmUpgrade => "node",
                StepKind::KubeletRestart => "kubelet",
                _ => "uncordon",
            };
            WireTask::KubeadmUpgrade(KubeadmUpgradeTask {
                step: step.into(),
                version: rec.spec.version.clone(),
                // a master waits for its own apiserver to be ready again before it reports
                apiserver: if is_master && step != "uncordon" {
                    std::net::SocketAddr::new(h.ip, 6443).to_string()
                } else {
                    String::new()
                },
                node: task.id.target.clone().unwrap_or_default(),
                ..Default::default()
            })
        }
        StepKind::DrainNodes | StepKind::DeleteNodes => {
            let drain = task.id.step == StepKind::DrainNodes;
            WireTask::NodeObjects(NodeObjectsTask {
                // a task about one node (a drain each), or all the operation removes
                nodes: task.id.target.clone().map(|t| vec![t]).unwrap_or_else(|| leaving(rec)),
                drain,
                delete: !drain,
                drain_timeout_secs: 600,
                ..Default::default()
            })
        }
    })
}

/// What a restoring master asks FetchBlob for: `backup:CLUSTER/ID`.
pub fn backup_source(cluster: &str, backup: &str) -> String {
    format!("backup:{cluster}/{backup}")
}

/// The hosts the current operation removes.
fn leaving(rec: &ClusterRecord) -> Vec<String> {
    match &rec.operation {
        super::record::Operation::RemoveWorkers { hosts } => hosts.clone(),
        super::record::Operation::RemoveHosts { masters, workers } => masters.iter().chain(workers).cloned().collect(),
        _ => vec![],
    }
}

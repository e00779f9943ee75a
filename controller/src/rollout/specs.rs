//! What each planned task carries to its host. Rendered from the cluster record at dispatch time
//! (deterministically, so a re-sent task has the same digest); secrets only go to hosts that need
//! them: keys to masters, the bootstrap token to hosts that join.
use fleetadm_common::tasks::{FileSpec, HostsEntry, TaskSpec};

use super::record::ClusterRecord;
use crate::pki::kube::APISERVER_NAME;
use crate::plan::clusterfile;
use crate::plan::kubeadm::{self, ClusterInputs, HostInputs, HostRole};
use crate::plan::phases::{PlannedHost, Task};

/// Ports a control-plane host must have free before `kubeadm init/join`.
pub const MASTER_PORTS: &[u16] = &[6443, 2379, 2380, 10250, 10257, 10259];
/// Ports a worker must have free.
pub const WORKER_PORTS: &[u16] = &[10250];
/// Where the agent keeps what fleetadm installs for Kubernetes.
pub const KUBE_DIR: &str = "/etc/kubernetes";

fn host<'a>(rec: &'a ClusterRecord, name: &str) -> Result<(&'a PlannedHost, bool), String> {
    if let Some(h) = rec.shape.masters.iter().find(|m| m.node == name) {
        return Ok((h, true));
    }
    rec.shape
        .workers
        .iter()
        .find(|w| w.node == name)
        .map(|h| (h, false))
        .ok_or_else(|| format!("host {name} is not part of cluster {}", rec.name))
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

fn render(rec: &ClusterRecord, h: &PlannedHost, role: HostRole) -> Result<String, String> {
    let cf = if rec.spec.clusterfile.trim().is_empty() {
        None
    } else {
        Some(clusterfile::parse(&rec.spec.clusterfile).map_err(|e| e.to_string())?)
    };
    kubeadm::render(&inputs(rec), &HostInputs { name: h.node.clone(), ip: h.ip, role }, cf.as_ref())
        .map_err(|e| e.to_string())
}

/// The entries of the managed /etc/hosts block: every cluster host by name, and the apiserver
/// name pointing at `apiserver`.
fn hosts_entries(rec: &ClusterRecord, apiserver: std::net::IpAddr) -> Vec<HostsEntry> {
    let mut entries = vec![HostsEntry { ip: apiserver.to_string(), names: vec![APISERVER_NAME.to_string()] }];
    for h in rec.shape.masters.iter().chain(rec.shape.workers.iter()) {
        entries.push(HostsEntry { ip: h.ip.to_string(), names: vec![h.node.clone()] });
    }
    entries
}

fn bundle_name(rec: &ClusterRecord) -> Result<String, String> {
    rec.shape.bundle.clone().ok_or_else(|| format!("cluster {} has no bundle", rec.name))
}

pub fn spec_for(rec: &ClusterRecord, task: &Task) -> Result<TaskSpec, String> {
    let (h, is_master) = host(rec, &task.host)?;
    let master0 = rec.shape.masters.first().ok_or("cluster has no masters")?;
    let phase = task.id.split('/').nth(1).unwrap_or_default();
    Ok(match task.kind.as_str() {
        "preflight" => TaskSpec::Preflight {
            ports: if is_master { MASTER_PORTS.to_vec() } else { WORKER_PORTS.to_vec() },
            // With a bundle, kubeadm arrives with the bootstrap (which checks for it then).
            commands: if rec.shape.bundle.is_some() { vec![] } else { vec!["kubeadm".into()] },
            // Room for the bundle in the agent's cache, plus a margin for the install.
            free_bytes: rec.bundle_files.iter().map(|f| f.size).sum::<u64>() * 2,
            cri_socket: rec.spec.cri_socket.clone(),
        },
        "hosts" => {
            // Masters: master0 until they have joined, then themselves. Workers: the VIP.
            let target = if !is_master {
                rec.shape.vip
            } else if phase == "join-masters" || h.node == master0.node {
                h.ip
            } else {
                master0.ip
            };
            TaskSpec::Hosts { entries: hosts_entries(rec, target) }
        }
        "pki" => TaskSpec::Files {
            files: rec
                .secrets
                .pki
                .files_for(&h.node)
                .into_iter()
                .map(|f| FileSpec { path: format!("{KUBE_DIR}/{}", f.path), contents: f.contents, mode: f.mode })
                .collect(),
        },
        "kubeadm-init" => TaskSpec::KubeadmInit { config: render(rec, h, HostRole::FirstMaster)? },
        "kubeadm-join" => TaskSpec::KubeadmJoin {
            config: render(rec, h, if is_master { HostRole::Master } else { HostRole::Worker })?,
            control_plane: is_master,
        },
        "lb" => TaskSpec::Lb {
            vip: std::net::SocketAddr::new(rec.shape.vip, 6443).to_string(),
            real_servers: rec.shape.masters.iter().map(|m| std::net::SocketAddr::new(m.ip, 6443).to_string()).collect(),
            ca_pem: rec.secrets.pki.ca_cert_pem.clone(),
        },
        "fetch-bundle" => TaskSpec::FetchBundle { bundle: bundle_name(rec)?, files: rec.bundle_files.clone() },
        "bootstrap" => TaskSpec::Bootstrap {
            bundle: bundle_name(rec)?,
            kubernetes_version: rec.spec.version.clone(),
            files: rec.bundle_files.clone(),
        },
        "addons" => TaskSpec::BundleAddons {
            files: rec.bundle_files.iter().filter(|f| f.path.starts_with("manifests/")).cloned().collect(),
        },
        "kubeadm-reset" => TaskSpec::KubeadmReset { remove_paths: vec![format!("{KUBE_DIR}/fleetadm")] },
        "lb-clean" => TaskSpec::LbClean { vip: std::net::SocketAddr::new(rec.shape.vip, 6443).to_string() },
        "hosts-clean" => TaskSpec::Hosts { entries: vec![] },
        "bootstrap-reset" => TaskSpec::BootstrapReset {},
        other => return Err(format!("unknown task kind {other}")),
    })
}

/// Per-task timeout the agent enforces; the controller allows a grace period on top.
pub fn timeout_secs(kind: &str) -> u32 {
    match kind {
        "kubeadm-init" | "kubeadm-join" | "kubeadm-reset" => 900,
        "fetch-bundle" => 3600,
        "bootstrap" | "addons" => 600,
        "lb" => 180,
        _ => 120,
    }
}

/// How often a task is tried before it counts as failed.
pub fn max_attempts(kind: &str) -> u32 {
    match kind {
        // A failing check will fail again; say so at once.
        "preflight" => 1,
        _ => 3,
    }
}

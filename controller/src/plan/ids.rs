//! The names a plan is made of, as types: phases, step kinds and task ids. A task id is derived
//! from (cluster, phase, host, step), so re-planning after a crash yields the same ids; its text
//! form `CLUSTER/PHASE/HOST/STEP` is what the store and the agents' journals key on.
use std::fmt;
use std::str::FromStr;

use fleetadm_proto::TaskKind;
use serde::{Deserialize, Serialize};

/// The phases of a plan, in the order a create runs them (`Reset` is the teardown's only phase).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PhaseName {
    Preflight,
    Distribute,
    Bootstrap,
    Hosts,
    InitMaster0,
    JoinToken,
    JoinMasters,
    JoinWorkers,
    SyncIpvs,
    Addons,
    Record,
    Reset,
    /// `cluster remove --drain`: the leaving workers' pods evicted.
    Drain,
    /// `cluster remove`: the leaving workers' Node objects deleted (after their reset).
    RemoveNodes,
    /// `cluster certs --renew/--add-san`: reissued files installed master by master.
    Certificates,
    /// A master-set change: the other hosts' /etc/hosts blocks list the cluster's hosts again.
    SyncHosts,
    /// `cluster restore`: every master's etcd restored from one backup.
    RestoreEtcd,
    /// `cluster upgrade`: the masters, one at a time (kubeadm upgrade apply on the first).
    UpgradeMasters,
    /// `cluster upgrade`: the workers in waves, within the failure budget.
    UpgradeWorkers,
}

impl PhaseName {
    pub const ALL: [PhaseName; 19] = [
        PhaseName::Preflight,
        PhaseName::Distribute,
        PhaseName::Bootstrap,
        PhaseName::Hosts,
        PhaseName::InitMaster0,
        PhaseName::JoinToken,
        PhaseName::JoinMasters,
        PhaseName::JoinWorkers,
        PhaseName::SyncIpvs,
        PhaseName::Addons,
        PhaseName::Record,
        PhaseName::Reset,
        PhaseName::Drain,
        PhaseName::RemoveNodes,
        PhaseName::Certificates,
        PhaseName::SyncHosts,
        PhaseName::RestoreEtcd,
        PhaseName::UpgradeMasters,
        PhaseName::UpgradeWorkers,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PhaseName::Preflight => "preflight",
            PhaseName::Distribute => "distribute",
            PhaseName::Bootstrap => "bootstrap",
            PhaseName::Hosts => "hosts",
            PhaseName::InitMaster0 => "init-master0",
            PhaseName::JoinToken => "join-token",
            PhaseName::JoinMasters => "join-masters",
            PhaseName::JoinWorkers => "join-workers",
            PhaseName::SyncIpvs => "sync-ipvs",
            PhaseName::Addons => "addons",
            PhaseName::Record => "record",
            PhaseName::Reset => "reset",
            PhaseName::Drain => "drain",
            PhaseName::RemoveNodes => "remove-nodes",
            PhaseName::Certificates => "certificates",
            PhaseName::SyncHosts => "sync-hosts",
            PhaseName::RestoreEtcd => "restore-etcd",
            PhaseName::UpgradeMasters => "upgrade-masters",
            PhaseName::UpgradeWorkers => "upgrade-workers",
        }
    }

    /// The phase's segment in task ids (kept short and stable: ids are persisted).
    fn id_segment(self) -> &'static str {
        match self {
            PhaseName::InitMaster0 => "init",
            other => other.as_str(),
        }
    }

    /// Phases whose failures count against the workers' failure budget.
    pub fn is_worker_phase(self) -> bool {
        matches!(self, PhaseName::JoinWorkers | PhaseName::SyncIpvs | PhaseName::UpgradeWorkers)
    }
}

impl fmt::Display for PhaseName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one task of the plan does. Several steps may share a wire task kind (`hosts-clean` is a
/// `hosts` task with no entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepKind {
    Preflight,
    FetchBundle,
    Bootstrap,
    Hosts,
    Pki,
    KubeadmInit,
    KubeadmJoin,
    Lb,
    Addons,
    KubeadmReset,
    LbClean,
    HostsClean,
    BootstrapReset,
    JoinToken,
    DropToken,
    /// On master0: `kubectl drain` the leaving workers.
    DrainNodes,
    /// On master0: `kubectl delete node` the leaving workers.
    DeleteNodes,
    /// On a master: install reissued certificates, restart the static pods using them.
    CertsInstall,
    /// `cluster restore` on a master: stop etcd and the apiserver; restore the data; start them.
    EtcdStop,
    EtcdRestore,
    EtcdStart,
    ApiserverStart,
    /// `cluster upgrade`: `kubeadm upgrade apply` (first master) or `upgrade node`.
    KubeadmUpgrade,
    /// `cluster upgrade`: the kubelet restarted on its new binary.
    KubeletRestart,
    /// `cluster upgrade`, on a first master: `kubectl uncordon` a drained node.
    Uncordon,
}

impl StepKind {
    pub const ALL: [StepKind; 25] = [
        StepKind::Preflight,
        StepKind::FetchBundle,
        StepKind::Bootstrap,
        StepKind::Hosts,
        StepKind::Pki,
        StepKind::KubeadmInit,
        StepKind::KubeadmJoin,
        StepKind::Lb,
        StepKind::Addons,
        StepKind::KubeadmReset,
        StepKind::LbClean,
        StepKind::HostsClean,
        StepKind::BootstrapReset,
        StepKind::JoinToken,
        StepKind::DropToken,
        StepKind::DrainNodes,
        StepKind::DeleteNodes,
        StepKind::CertsInstall,
        StepKind::EtcdStop,
        StepKind::EtcdRestore,
        StepKind::EtcdStart,
        StepKind::ApiserverStart,
        StepKind::KubeadmUpgrade,
        StepKind::KubeletRestart,
        StepKind::Uncordon,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Preflight => "preflight",
            StepKind::FetchBundle => "fetch-bundle",
            StepKind::Bootstrap => "bootstrap",
            StepKind::Hosts => "hosts",
            StepKind::Pki => "pki",
            StepKind::KubeadmInit => "kubeadm-init",
            StepKind::KubeadmJoin => "kubeadm-join",
            StepKind::Lb => "lb",
            StepKind::Addons => "addons",
            StepKind::KubeadmReset => "kubeadm-reset",
            StepKind::LbClean => "lb-clean",
            StepKind::HostsClean => "hosts-clean",
            StepKind::BootstrapReset => "bootstrap-reset",
            StepKind::JoinToken => "join-token",
            StepKind::DropToken => "drop-token",
            StepKind::DrainNodes => "drain-nodes",
            StepKind::DeleteNodes => "delete-nodes",
            StepKind::CertsInstall => "certs-install",
            StepKind::EtcdStop => "etcd-stop",
            StepKind::EtcdRestore => "etcd-restore",
            StepKind::EtcdStart => "etcd-start",
            StepKind::ApiserverStart => "apiserver-start",
            StepKind::KubeadmUpgrade => "kubeadm-upgrade",
            StepKind::KubeletRestart => "kubelet-restart",
            StepKind::Uncordon => "uncordon",
        }
    }

    /// The wire task this step sends, and so the capability its host's agent must have.
    pub fn task_kind(self) -> TaskKind {
        match self {
            StepKind::Preflight => TaskKind::Preflight,
            StepKind::FetchBundle => TaskKind::FetchBundle,
            StepKind::Bootstrap => TaskKind::Bootstrap,
            StepKind::Hosts | StepKind::HostsClean => TaskKind::Hosts,
            StepKind::Pki => TaskKind::Files,
            StepKind::KubeadmInit => TaskKind::KubeadmInit,
            StepKind::KubeadmJoin => TaskKind::KubeadmJoin,
            StepKind::Lb => TaskKind::Lb,
            StepKind::Addons => TaskKind::BundleAddons,
            StepKind::KubeadmReset => TaskKind::KubeadmReset,
            StepKind::LbClean => TaskKind::LbClean,
            StepKind::BootstrapReset => TaskKind::BootstrapReset,
            StepKind::JoinToken | StepKind::DropToken => TaskKind::KubeadmToken,
            StepKind::DrainNodes | StepKind::DeleteNodes => TaskKind::NodeObjects,
            StepKind::CertsInstall => TaskKind::CertsInstall,
            StepKind::EtcdStop | StepKind::EtcdRestore | StepKind::EtcdStart | StepKind::ApiserverStart => {
                TaskKind::EtcdRestore
            }
            StepKind::KubeadmUpgrade | StepKind::KubeletRestart | StepKind::Uncordon => TaskKind::KubeadmUpgrade,
        }
    }

    /// How long the agent may take (the controller adds a grace period on top).
    pub fn timeout_secs(self) -> u32 {
        match self {
            StepKind::KubeadmInit
            | StepKind::KubeadmJoin
            | StepKind::KubeadmReset
            | StepKind::DrainNodes
            | StepKind::KubeadmUpgrade => 900,
            StepKind::KubeletRestart => 180,
            // up to four static pods, each stopped and started (3 min each at most)
            StepKind::CertsInstall => 1500,
            StepKind::EtcdStop | StepKind::EtcdRestore | StepKind::EtcdStart | StepKind::ApiserverStart => 900,
            StepKind::FetchBundle => 3600,
            StepKind::Bootstrap | StepKind::Addons => 600,
            StepKind::Lb => 180,
            StepKind::Preflight
            | StepKind::Hosts
            | StepKind::Pki
            | StepKind::LbClean
            | StepKind::HostsClean
            | StepKind::BootstrapReset
            | StepKind::JoinToken
            | StepKind::DropToken
            | StepKind::DeleteNodes
            | StepKind::Uncordon => 120,
        }
    }

    /// How often a task is tried before it counts as failed.
    pub fn max_attempts(self) -> u32 {
        match self {
            // A failing check will fail again; say so at once.
            StepKind::Preflight => 1,
            _ => 3,
        }
    }
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a task id (CLUSTER/PHASE/HOST/STEP): {why}")]
pub struct BadTaskId {
    input: String,
    why: &'static str,
}

/// `CLUSTER/PHASE/HOST/STEP`, or `CLUSTER/PHASE/HOST/STEP@TARGET` for a step a host runs once
/// per target (master0 draining each leaving worker: `lab/drain/m1/drain-nodes@w3`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId {
    pub cluster: String,
    pub phase: PhaseName,
    pub host: String,
    pub step: StepKind,
    /// What the step is about when it is not the host itself (a node name).
    pub target: Option<String>,
}

impl TaskId {
    pub fn new(cluster: &str, phase: PhaseName, host: &str, step: StepKind) -> Self {
        Self { cluster: cluster.to_string(), phase, host: host.to_string(), step, target: None }
    }

    /// A task `host` runs about `target`.
    pub fn about(cluster: &str, phase: PhaseName, host: &str, step: StepKind, target: &str) -> Self {
        Self { target: Some(target.to_string()), ..Self::new(cluster, phase, host, step) }
    }

    /// The host the task is about: its target when it has one (master0 draining w3 is about
    /// w3), else the host running it. Failure budgets count subjects.
    pub fn subject(&self) -> &str {
        self.target.as_deref().unwrap_or(&self.host)
    }

    /// The prefix every task id of `cluster` starts with (for store scans).
    pub fn cluster_prefix(cluster: &str) -> String {
        format!("{cluster}/")
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}/{}", self.cluster, self.phase.id_segment(), self.host, self.step.as_str())?;
        match &self.target {
            Some(t) => write!(f, "@{t}"),
            None => Ok(()),
        }
    }
}

impl FromStr for TaskId {
    type Err = BadTaskId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| BadTaskId { input: s.chars().take(200).collect(), why };
        let parts: Vec<&str> = s.split('/').collect();
        let [cluster, phase, host, step] = parts.as_slice() else {
            return Err(bad("expected four parts"));
        };
        if cluster.is_empty() || host.is_empty() {
            return Err(bad("empty cluster or host"));
        }
        let phase =
            PhaseName::ALL.into_iter().find(|p| p.id_segment() == *phase).ok_or_else(|| bad("unknown phase"))?;
        let (step, target) = match step.split_once('@') {
            Some((_, "")) => return Err(bad("empty target")),
            Some((s, t)) => (s, Some(t)),
            None => (*step, None),
        };
        let step = StepKind::ALL.into_iter().find(|k| k.as_str() == step).ok_or_else(|| bad("unknown step"))?;
        Ok(match target {
            Some(t) => TaskId::about(cluster, phase, host, step, t),
            None => TaskId::new(cluster, phase, host, step),
        })
    }
}

impl Serialize for TaskId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TaskId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_round_trip_through_text_and_json() {
        for phase in PhaseName::ALL {
            for step in StepKind::ALL {
                let id = TaskId::new("lab", phase, "h1", step);
                assert_eq!(id.to_string().parse::<TaskId>().unwrap(), id);
                let json = serde_json::to_string(&id).unwrap();
                assert_eq!(serde_json::from_str::<TaskId>(&json).unwrap(), id);
            }
        }
        let drain = TaskId::about("lab", PhaseName::Drain, "m1", StepKind::DrainNodes, "w3");
        assert_eq!(drain.to_string(), "lab/drain/m1/drain-nodes@w3");
        assert_eq!(drain.to_string().parse::<TaskId>().unwrap(), drain);
        assert!("lab/drain/m1/drain-nodes@".parse::<TaskId>().is_err());
        assert!("lab/drain/m1/nosuch@w3".parse::<TaskId>().is_err());
        assert_eq!(
            TaskId::new("lab", PhaseName::InitMaster0, "h1", StepKind::KubeadmInit).to_string(),
            "lab/init/h1/kubeadm-init"
        );
        for bad in [
            "",
            "lab",
            "lab/init/h1",
            "lab/init/h1/kubeadm-init/x",
            "lab/nope/h1/pki",
            "lab/init/h1/format",
            "/init/h1/pki",
            "lab/init//pki",
        ] {
            assert!(bad.parse::<TaskId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn phase_and_step_names_match_their_serde_names() {
        for p in PhaseName::ALL {
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
        for k in StepKind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
    }
}

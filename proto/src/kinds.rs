//! Task kinds: one per member of `TaskAssignment.task`, each with the capability an agent must
//! announce before the controller sends it one. A kind whose meaning changes gets a new
//! capability revision ("bootstrap-v2"); the old one stays for agents that only know it.
use crate::v1::task_assignment::Task;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskKind {
    Preflight,
    Hosts,
    Files,
    KubeadmInit,
    KubeadmJoin,
    KubeadmReset,
    Lb,
    Addons,
    FetchBundle,
    Bootstrap,
    BootstrapReset,
    LbClean,
    BundleAddons,
    KubeadmToken,
    Exec,
    NodeObjects,
    CertsCheck,
    CertsInstall,
    EtcdSnapshot,
    EtcdRestore,
    KubeadmUpgrade,
    AgentUpgrade,
    Ping,
}

/// A `TaskAssignment` without a task this build knows (from a newer controller).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the task is of a kind this agent does not know (sent by a newer controller?); upgrade node-agent")]
pub struct UnknownTask;

impl TaskKind {
    pub const ALL: [TaskKind; 23] = [
        TaskKind::Preflight,
        TaskKind::Hosts,
        TaskKind::Files,
        TaskKind::KubeadmInit,
        TaskKind::KubeadmJoin,
        TaskKind::KubeadmReset,
        TaskKind::Lb,
        TaskKind::Addons,
        TaskKind::FetchBundle,
        TaskKind::Bootstrap,
        TaskKind::BootstrapReset,
        TaskKind::LbClean,
        TaskKind::BundleAddons,
        TaskKind::KubeadmToken,
        TaskKind::Exec,
        TaskKind::NodeObjects,
        TaskKind::CertsCheck,
        TaskKind::CertsInstall,
        TaskKind::EtcdSnapshot,
        TaskKind::EtcdRestore,
        TaskKind::KubeadmUpgrade,
        TaskKind::AgentUpgrade,
        TaskKind::Ping,
    ];

    pub fn of(task: &Task) -> TaskKind {
        match task {
            Task::Preflight(_) => TaskKind::Preflight,
            Task::Hosts(_) => TaskKind::Hosts,
            Task::Files(_) => TaskKind::Files,
            Task::KubeadmInit(_) => TaskKind::KubeadmInit,
            Task::KubeadmJoin(_) => TaskKind::KubeadmJoin,
            Task::KubeadmReset(_) => TaskKind::KubeadmReset,
            Task::Lb(_) => TaskKind::Lb,
            Task::Addons(_) => TaskKind::Addons,
            Task::FetchBundle(_) => TaskKind::FetchBundle,
            Task::Bootstrap(_) => TaskKind::Bootstrap,
            Task::BootstrapReset(_) => TaskKind::BootstrapReset,
            Task::LbClean(_) => TaskKind::LbClean,
            Task::BundleAddons(_) => TaskKind::BundleAddons,
            Task::KubeadmToken(_) => TaskKind::KubeadmToken,
            Task::Exec(_) => TaskKind::Exec,
            Task::NodeObjects(_) => TaskKind::NodeObjects,
            Task::CertsCheck(_) => TaskKind::CertsCheck,
            Task::CertsInstall(_) => TaskKind::CertsInstall,
            Task::EtcdSnapshot(_) => TaskKind::EtcdSnapshot,
            Task::EtcdRestore(_) => TaskKind::EtcdRestore,
            Task::KubeadmUpgrade(_) => TaskKind::KubeadmUpgrade,
            Task::AgentUpgrade(_) => TaskKind::AgentUpgrade,
            Task::Ping(_) => TaskKind::Ping,
        }
    }

    /// The kind of an assignment's task, or [`UnknownTask`] when it carries none this build knows.
    pub fn of_assignment(a: &crate::v1::TaskAssignment) -> Result<TaskKind, UnknownTask> {
        a.task.as_ref().map(TaskKind::of).ok_or(UnknownTask)
    }

    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Preflight => "preflight",
            TaskKind::Hosts => "hosts",
            TaskKind::Files => "files",
            TaskKind::KubeadmInit => "kubeadm-init",
            TaskKind::KubeadmJoin => "kubeadm-join",
            TaskKind::KubeadmReset => "kubeadm-reset",
            TaskKind::Lb => "lb",
            TaskKind::Addons => "addons",
            TaskKind::FetchBundle => "fetch-bundle",
            TaskKind::Bootstrap => "bootstrap",
            TaskKind::BootstrapReset => "bootstrap-reset",
            TaskKind::LbClean => "lb-clean",
            TaskKind::BundleAddons => "bundle-addons",
            TaskKind::KubeadmToken => "kubeadm-token",
            TaskKind::Exec => "exec",
            TaskKind::NodeObjects => "node-objects",
            TaskKind::CertsCheck => "certs-check",
            TaskKind::CertsInstall => "certs-install",
            TaskKind::EtcdSnapshot => "etcd-snapshot",
            TaskKind::EtcdRestore => "etcd-restore",
            TaskKind::KubeadmUpgrade => "kubeadm-upgrade",
            TaskKind::AgentUpgrade => "agent-upgrade",
            TaskKind::Ping => "ping",
        }
    }

    /// The revision of this kind's meaning that this build implements.
    pub fn revision(self) -> u32 {
        1
    }

    /// What an agent announces when it can run this kind, and what the controller checks.
    pub fn capability(self) -> String {
        format!("{}-v{}", self.name(), self.revision())
    }

    /// Every capability this build's agent implements.
    pub fn all_capabilities() -> Vec<String> {
        TaskKind::ALL.iter().map(|k| k.capability()).collect()
    }
}

impl std::fmt::Display for TaskKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_capabilities_are_unique() {
        let names: std::collections::BTreeSet<&str> = TaskKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), TaskKind::ALL.len());
        assert!(TaskKind::all_capabilities().contains(&"bootstrap-v1".to_string()));
    }
}

//! Test-only (feature `skew-probe`): the field every task message gains in this build, standing in
//! for "a field the next release adds". See tests/tests/version_skew.rs.
use crate::v1::task_assignment::Task;
use crate::v1::TaskAssignment;

macro_rules! each_task {
    ($task:expr, $t:ident => $body:expr) => {
        match $task {
            Task::Preflight($t) => $body,
            Task::Hosts($t) => $body,
            Task::Files($t) => $body,
            Task::KubeadmInit($t) => $body,
            Task::KubeadmJoin($t) => $body,
            Task::KubeadmReset($t) => $body,
            Task::Lb($t) => $body,
            Task::Addons($t) => $body,
            Task::FetchBundle($t) => $body,
            Task::Bootstrap($t) => $body,
            Task::BootstrapReset($t) => $body,
            Task::LbClean($t) => $body,
            Task::BundleAddons($t) => $body,
            Task::KubeadmToken($t) => $body,
            Task::Exec($t) => $body,
            Task::NodeObjects($t) => $body,
            Task::CertsCheck($t) => $body,
            Task::CertsInstall($t) => $body,
            Task::EtcdSnapshot($t) => $body,
            Task::EtcdRestore($t) => $body,
            Task::KubeadmUpgrade($t) => $body,
            Task::AgentUpgrade($t) => $body,
            Task::Ping($t) => $body,
        }
    };
}

/// Set the probe on the assignment and on its task message.
pub fn stamp(a: &mut TaskAssignment, value: &str) {
    a.skew_probe = value.to_string();
    if let Some(task) = a.task.as_mut() {
        each_task!(task, t => t.skew_probe = value.to_string());
    }
}

/// The probe the task message carries ("" when the sender did not know the field).
pub fn read(a: &TaskAssignment) -> String {
    match a.task.as_ref() {
        Some(task) => each_task!(task, t => t.skew_probe.clone()),
        None => String::new(),
    }
}

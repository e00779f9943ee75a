//! What the controller asks an agent to do: the parameters of each task kind, as sent in
//! `TaskAssignment.spec_json`. Both sides use these types, so a change here is a protocol change.
use serde::{Deserialize, Serialize};

/// A file the agent must hold with exactly this content and mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    /// Absolute path on the host.
    pub path: String,
    pub contents: String,
    pub mode: u32,
}

/// One line of the managed /etc/hosts block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostsEntry {
    pub ip: String,
    pub names: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TaskSpec {
    /// Host checks that need the agent: ports free, swap off, required commands present.
    Preflight { ports: Vec<u16>, commands: Vec<String> },
    /// Converge the managed block of /etc/hosts to these entries.
    Hosts { entries: Vec<HostsEntry> },
    /// Install files (the Kubernetes PKI and kubeconfigs), private keys 0600.
    Files { files: Vec<FileSpec> },
    /// `kubeadm init` with this configuration (first master).
    KubeadmInit { config: String },
    /// `kubeadm join` with this configuration.
    KubeadmJoin { config: String, control_plane: bool },
    /// `kubeadm reset -f` and removal of what fleetadm installed for the cluster.
    KubeadmReset { remove_paths: Vec<String> },
    /// Program and keep guarding the apiserver load balancer (IPVS) under `node-agent run`.
    Lb { vip: String, real_servers: Vec<String>, ca_pem: String },
    /// `kubectl apply` these manifests with the admin kubeconfig (first master).
    Addons { manifests: Vec<FileSpec> },
}

impl TaskSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            TaskSpec::Preflight { .. } => "preflight",
            TaskSpec::Hosts { .. } => "hosts",
            TaskSpec::Files { .. } => "pki",
            TaskSpec::KubeadmInit { .. } => "kubeadm-init",
            TaskSpec::KubeadmJoin { .. } => "kubeadm-join",
            TaskSpec::KubeadmReset { .. } => "kubeadm-reset",
            TaskSpec::Lb { .. } => "lb",
            TaskSpec::Addons { .. } => "addons",
        }
    }

    /// SHA-256 over the canonical JSON: the agent's journal keys results by task id and digest,
    /// so a task re-sent with different parameters is run again rather than answered from memory.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(Sha256::digest(&json))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_unknown_fields() {
        let s = TaskSpec::KubeadmJoin { config: "x".into(), control_plane: true };
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains(r#""kind":"kubeadm-join""#), "{j}");
        assert_eq!(serde_json::from_str::<TaskSpec>(&j).unwrap(), s);
        assert!(serde_json::from_str::<TaskSpec>(r#"{"kind":"hosts","entries":[],"x":1}"#).is_err());
        assert!(serde_json::from_str::<TaskSpec>(r#"{"kind":"format-disk"}"#).is_err());
        assert_ne!(s.digest(), TaskSpec::KubeadmJoin { config: "y".into(), control_plane: true }.digest());
    }
}

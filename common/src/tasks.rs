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

/// One file of an offline bundle: where it goes inside the bundle, and the content-addressed blob
/// that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleFile {
    /// Relative path inside the bundle (`bin/kubeadm`, `conf/kubelet.service`, ...).
    pub path: String,
    pub size: u64,
    pub mode: u32,
    /// Hex SHA-256 of the content.
    pub sha256: String,
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
    Preflight {
        ports: Vec<u16>,
        commands: Vec<String>,
        /// Free space needed in the agent's state dir (the bundle cache), bytes.
        #[serde(default)]
        free_bytes: u64,
        /// The container runtime's socket (`unix:///run/containerd/containerd.sock`); checked,
        /// and reported as a warning when unreachable (a bundle may bring the runtime).
        #[serde(default)]
        cri_socket: String,
    },
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
    /// Fetch the bundle's blobs into the agent's cache (resumable, verified, never twice).
    FetchBundle { bundle: String, files: Vec<BundleFile> },
    /// Install the bundle on the host: binaries, units, modules, sysctls, swap off, images, hooks.
    Bootstrap { bundle: String, kubernetes_version: String, files: Vec<BundleFile> },
    /// Undo exactly what `Bootstrap` did.
    BootstrapReset {},
    /// Stop guarding the load balancer and remove its virtual service and VIP.
    LbClean { vip: String },
    /// Apply the bundle's addon manifests (from the agent's blob cache) with kubectl.
    BundleAddons { files: Vec<BundleFile> },
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
            TaskSpec::Addons { .. } | TaskSpec::BundleAddons { .. } => "addons",
            TaskSpec::FetchBundle { .. } => "fetch-bundle",
            TaskSpec::Bootstrap { .. } => "bootstrap",
            TaskSpec::BootstrapReset {} => "bootstrap-reset",
            TaskSpec::LbClean { .. } => "lb-clean",
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

/// Is `p` a safe relative path inside a bundle: no absolute path, no `..`, no empty or `.`
/// components, no NUL, not too long.
pub fn safe_bundle_path(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 4096
        && !p.starts_with('/')
        && !p.contains('\0')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Is `s` a lowercase hex SHA-256.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod path_tests {
    use super::*;

    #[test]
    fn bundle_paths() {
        for ok in ["bin/kubeadm", "conf/10-kubeadm.conf", "images/a.tar"] {
            assert!(safe_bundle_path(ok), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "bin/../../x", "bin//x", "./bin/x", "bin/.", "a\0b"] {
            assert!(!safe_bundle_path(bad), "{bad}");
        }
        assert!(is_sha256_hex(&"ab".repeat(32)));
        assert!(!is_sha256_hex(&"AB".repeat(32)) && !is_sha256_hex("ab"));
    }
}

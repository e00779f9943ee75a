//! Nodes leaving the cluster, run on a first master with its admin.conf: `kubectl drain` (cordon,
//! evict; DaemonSet pods stay) and `kubectl delete node`. A node that is already gone counts as
//! done, so a retried or resumed removal succeeds.
use std::path::Path;
use std::time::Duration;

use super::super::command::{self, Cancel, Cmd};
use super::{KubeadmError, Outcome};

/// A Kubernetes node name (RFC 1123 subdomain): lowercase letters, digits, '-' and '.', starting
/// and ending with a letter or digit, at most 253 characters.
pub fn valid_node_name(n: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    (1..=253).contains(&n.len())
        && n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && edge(n.chars().next())
        && edge(n.chars().last())
}

/// Does kubectl's output say the node does not exist?
fn gone(output: &str) -> bool {
    output.contains("(NotFound)") || output.contains("not found")
}

pub async fn leave(
    kube_dir: &Path,
    nodes: &[String],
    drain: Option<Duration>,
    delete: bool,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<Outcome, KubeadmError> {
    let kubeconfig = kube_dir.join("admin.conf").to_string_lossy().into_owned();
    let mut output = String::new();
    let mut changed = false;
    for node in nodes {
        if let Some(d) = drain {
            let limit = format!("{}s", d.as_secs());
            let args = [
                "--kubeconfig",
                &kubeconfig,
                "drain",
                node,
                "--ignore-daemonsets",
                "--delete-emptydir-data",
                "--timeout",
                &limit,
            ];
            let ran = command::run(&Cmd::new("kubectl", &args, timeout), cancel).await?;
            if ran.success {
                output.push_str(&format!("node {node} drained\n"));
                changed = true;
            } else if gone(&ran.output) {
                output.push_str(&format!("node {node} is gone already: nothing to drain\n"));
            } else {
                ran.ok("kubectl drain")?;
            }
        }
        if delete {
            let args = ["--kubeconfig", &kubeconfig, "delete", "node", node, "--ignore-not-found"];
            let said = command::run(&Cmd::new("kubectl", &args, timeout), cancel).await?.ok("kubectl delete node")?;
            if said.trim().is_empty() {
                output.push_str(&format!("node {node} is gone already\n"));
            } else {
                output.push_str(&format!("node {node} deleted\n"));
                changed = true;
            }
        }
    }
    Ok(Outcome { changed, output })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for ok in ["h6", "worker-1.zone-b", "0a"] {
            assert!(valid_node_name(ok), "{ok}");
        }
        for bad in ["", "-h", "h-", "H6", "h_6", "h6;reboot", "a b", &"a".repeat(254)] {
            assert!(!valid_node_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn kubectl_says_gone() {
        assert!(gone("Error from server (NotFound): nodes \"h6\" not found"));
        assert!(!gone("error: unable to drain node \"h6\": cannot evict pod"));
    }
}

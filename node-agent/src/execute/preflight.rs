//! The `preflight` task: checks only the host itself can answer. Every failure names what is wrong
//! and how to fix it.
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;

/// Problems found; empty = ready.
pub fn check(ports: &[u16], commands: &[String], proc_swaps: &Path) -> Vec<String> {
    check_with_disk(ports, commands, proc_swaps, None)
}

/// Also checks that `dir` (the agent's state dir, where bundles are cached) has `bytes` free.
pub fn check_with_disk(
    ports: &[u16],
    commands: &[String],
    proc_swaps: &Path,
    disk: Option<(&Path, u64)>,
) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some((dir, need)) = disk.filter(|(_, n)| *n > 0) {
        match nix::sys::statvfs::statvfs(dir) {
            Ok(st) => {
                let free = st.blocks_available() * st.fragment_size();
                if free < need {
                    problems.push(format!(
                        "{} has {} MiB free, the bundle needs {} MiB: free some space or move the state dir",
                        dir.display(),
                        free >> 20,
                        need.div_ceil(1 << 20)
                    ));
                }
            }
            Err(e) => problems.push(format!("cannot check free space in {}: {e}", dir.display())),
        }
    }
    for &port in ports {
        if let Err(e) = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)) {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                problems.push(format!(
                    "port {port} is in use: stop what listens there (ss -ltnp 'sport = :{port}'), or reset an old cluster with kubeadm reset"
                ));
            } else {
                problems.push(format!("cannot check port {port}: {e}"));
            }
        }
    }
    for c in commands {
        if super::command::which(c).is_none() {
            problems.push(format!(
                "{c} is not installed (not found in PATH); install it or create the cluster with --bundle"
            ));
        }
    }
    if let Ok(swaps) = std::fs::read_to_string(proc_swaps) {
        let active: Vec<&str> = swaps.lines().skip(1).filter_map(|l| l.split_whitespace().next()).collect();
        if !active.is_empty() {
            problems.push(format!(
                "swap is on ({}): run `swapoff -a` and remove swap entries from /etc/fstab",
                active.join(", ")
            ));
        }
    }
    problems
}

/// Kubernetes state already on the host (an old or foreign cluster): kubeadm would refuse or,
/// worse, mix the two.
pub fn leftovers(kube_dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for f in ["kubelet.conf", "manifests/kube-apiserver.yaml", "manifests/etcd.yaml"] {
        if kube_dir.join(f).exists() {
            found.push(format!(
                "{} exists: this host already belongs to a Kubernetes cluster; reset it (kubeadm reset, or controller cluster delete) first",
                kube_dir.join(f).display()
            ));
        }
    }
    found
}

/// Warnings that do not stop the rollout.
pub fn warnings(cri_socket: &str) -> Vec<String> {
    let mut w = Vec::new();
    if let Some(path) = cri_socket.strip_prefix("unix://") {
        if std::os::unix::net::UnixStream::connect(path).is_err() {
            w.push(format!(
                "warning: container runtime socket {path} is not reachable: install and start containerd (or ship it in the bundle); kubelet needs it"
            ));
        }
    }
    if std::fs::read_to_string("/proc/1/comm").map(|c| c.trim() != "systemd").unwrap_or(false) {
        w.push("warning: init is not systemd, but the kubelet is configured with cgroupDriver: systemd".into());
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_busy_ports_missing_commands_and_swap() {
        let busy = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let port = busy.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let swaps = dir.path().join("swaps");
        std::fs::write(&swaps, "Filename Type Size Used Priority\n/swapfile file 1024 0 -2\n").unwrap();
        let p = check(&[port], &["sh".into(), "no-such-kubeadm".into()], &swaps);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains(&format!("port {port} is in use")));
        assert!(p[1].contains("no-such-kubeadm is not installed"));
        assert!(p[2].contains("swapoff -a"));
        std::fs::write(&swaps, "Filename Type Size Used Priority\n").unwrap();
        drop(busy);
        assert!(check(&[port], &["sh".into()], &swaps).is_empty());
        let p = check_with_disk(&[], &[], &swaps, Some((dir.path(), u64::MAX / 2)));
        assert!(p.len() == 1 && p[0].contains("MiB free"), "{p:?}");
        assert!(check_with_disk(&[], &[], &swaps, Some((dir.path(), 1))).is_empty());
        std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
        assert!(leftovers(dir.path()).is_empty());
        std::fs::write(dir.path().join("manifests/etcd.yaml"), "x").unwrap();
        assert!(leftovers(dir.path())[0].contains("already belongs to a Kubernetes cluster"));
        assert!(warnings("unix:///nonexistent/containerd.sock")[0].contains("not reachable"));
    }
}

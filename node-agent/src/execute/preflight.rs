//! The `preflight` task: checks only the host itself can answer. Every failure names what is wrong
//! and how to fix it.
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;

/// Problems found; empty = ready.
pub fn check(ports: &[u16], commands: &[String], proc_swaps: &Path) -> Vec<String> {
    check_with_disk(ports, commands, proc_swaps, None)
}

/// Also checks that `dir` (the agent's state dir, where bundles are cached) has `bytes` free.
pub fn check_with_disk(ports: &[u16], commands: &[String], proc_swaps: &Path, disk: Option<(&Path, u64)>) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some((dir, need)) = disk.filter(|(_, n)| *n > 0) {
        match nix::sys::statvfs::statvfs(dir) {
            Ok(st) => {
                let free = st.blocks_available() as u64 * st.fragment_size() as u64;
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
    }
}

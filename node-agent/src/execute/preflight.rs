//! The `preflight` task: checks only the host itself can answer. Every failure names what is wrong
//! and how to fix it.
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;

/// Problems found; empty = ready.
pub fn check(ports: &[u16], commands: &[String], proc_swaps: &Path) -> Vec<String> {
    let mut problems = Vec::new();
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
    }
}

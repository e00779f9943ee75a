//! Host facts reported to the controller: collected from the real OS by [`collect`]; the parsers
//! of each `/proc` or `/etc` file are pure functions, tested on their text.
pub(crate) mod parse;

pub use parse::{cgroup_version, cpu_count, mem_total_bytes, os_release, swap_enabled};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fleetadm_common::clock::now_unix_ms;
use fleetadm_proto::{Component, Interface, Inventory, OsRelease};

/// Where the facts come from. `/` in production; tests may point at a prepared tree.
#[derive(Debug, Clone)]
pub struct Sources {
    pub root: PathBuf,
    /// Fallback machine-id file (the agent's own) when the OS has none.
    pub fallback_machine_id: PathBuf,
}

fn read(root: &Path, rel: &str) -> Option<String> {
    std::fs::read_to_string(root.join(rel.trim_start_matches('/'))).ok()
}

/// The machine-id: the OS's, or one the agent generated and keeps in its state dir.
pub fn machine_id(src: &Sources) -> String {
    for rel in ["etc/machine-id", "var/lib/dbus/machine-id"] {
        if let Some(id) = read(&src.root, rel).map(|s| s.trim().to_string()).filter(|s| !s.is_empty()) {
            return id;
        }
    }
    if let Ok(id) = std::fs::read_to_string(&src.fallback_machine_id) {
        let id = id.trim().to_string();
        if !id.is_empty() {
            return id;
        }
    }
    let id = hex_random();
    let _ = fleetadm_common::fsutil::write_atomic(&src.fallback_machine_id, id.as_bytes(), 0o644);
    id
}

fn hex_random() -> String {
    let b: [u8; 16] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Interface name -> addresses in CIDR form, from getifaddrs(3).
pub fn interfaces() -> Vec<Interface> {
    let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for ifa in addrs {
            let entry = by_name.entry(ifa.interface_name.clone()).or_default();
            let (Some(addr), mask) = (ifa.address, ifa.netmask) else { continue };
            if let Some(v4) = addr.as_sockaddr_in() {
                let prefix =
                    mask.and_then(|m| m.as_sockaddr_in().map(|m| u32::from(m.ip()).count_ones())).unwrap_or(32);
                entry.push(format!("{}/{}", v4.ip(), prefix));
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                let prefix =
                    mask.and_then(|m| m.as_sockaddr_in6().map(|m| u128::from(m.ip()).count_ones())).unwrap_or(128);
                entry.push(format!("{}/{}", v6.ip(), prefix));
            }
        }
    }
    by_name.into_iter().map(|(name, addresses)| Interface { name, addresses }).collect()
}

const COMPONENTS: &[&str] = &["containerd", "kubelet", "kubeadm"];
const BIN_DIRS: &[&str] = &["usr/local/bin", "usr/bin", "usr/sbin", "usr/local/sbin", "bin", "sbin", "opt/bin"];

/// Which of containerd / kubelet / kubeadm are installed.
pub fn components(root: &Path) -> Vec<Component> {
    COMPONENTS
        .iter()
        .map(|name| {
            let found = BIN_DIRS.iter().map(|d| root.join(d).join(name)).find(|p| is_executable(p));
            Component {
                name: name.to_string(),
                present: found.is_some(),
                path: found.map(|p| p.display().to_string()).unwrap_or_default(),
            }
        })
        .collect()
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Collect every fact. Blocking (reads files); call from a blocking thread.
pub fn collect(src: &Sources) -> Inventory {
    let uts = nix::sys::utsname::uname().ok();
    let os = read(&src.root, "etc/os-release").or_else(|| read(&src.root, "usr/lib/os-release")).unwrap_or_default();
    let (id, version_id, pretty_name) = os_release(&os);
    Inventory {
        hostname: nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default(),
        machine_id: machine_id(src),
        interfaces: interfaces(),
        os: Some(OsRelease { id, version_id, pretty_name }),
        kernel: uts.as_ref().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default(),
        arch: uts
            .as_ref()
            .map(|u| u.machine().to_string_lossy().into_owned())
            .unwrap_or_else(|| std::env::consts::ARCH.to_string()),
        cpus: read(&src.root, "proc/cpuinfo")
            .map(|t| cpu_count(&t))
            .filter(|n| *n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)),
        memory_bytes: read(&src.root, "proc/meminfo").map(|t| mem_total_bytes(&t)).unwrap_or(0),
        swap_enabled: read(&src.root, "proc/swaps").map(|t| swap_enabled(&t)).unwrap_or(false),
        clock_unix_ms: now_unix_ms(),
        cgroup_version: cgroup_version(&src.root.join("sys/fs/cgroup")),
        components: components(&src.root),
        expiring_certs: expiring_certs(&src.root, now_unix_ms() / 1000),
    }
}

/// How long before a certificate expires the agent starts warning.
pub const CERT_WARNING: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// The certificates below `root`/etc/kubernetes that expire within [`CERT_WARNING`] of
/// `now_secs` (or have expired). Unreadable ones are not listed here (`cluster certs` shows them).
pub fn expiring_certs(root: &Path, now_secs: u64) -> Vec<fleetadm_proto::CertInfo> {
    fleetadm_common::certs::scan(root, &root.join("etc/kubernetes"))
        .into_iter()
        .filter(|c| c.error.is_empty() && c.not_after_unix < now_secs + CERT_WARNING.as_secs())
        .map(|mut c| {
            // Only what the warning needs travels with every inventory.
            c.sans.clear();
            c
        })
        .collect()
}

/// Has anything but the clock changed?
pub fn changed(old: &Inventory, new: &Inventory) -> bool {
    let strip = |i: &Inventory| Inventory { clock_unix_ms: 0, ..i.clone() };
    strip(old) != strip(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_expiring_within_30_days_are_in_the_inventory() {
        let root = tempfile::tempdir().unwrap();
        let pki = root.path().join("etc/kubernetes/pki");
        std::fs::create_dir_all(&pki).unwrap();
        let cert = |days: i64| {
            let mut p = rcgen::CertificateParams::new(vec!["x".to_string()]).unwrap();
            p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
            p.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem()
        };
        std::fs::write(pki.join("apiserver.crt"), cert(10)).unwrap();
        std::fs::write(pki.join("front-proxy-client.crt"), cert(-1)).unwrap();
        std::fs::write(pki.join("ca.crt"), cert(3650)).unwrap();
        std::fs::write(pki.join("apiserver-etcd-client.crt"), "not a certificate").unwrap();
        let now = now_unix_ms() / 1000;
        let soon = expiring_certs(root.path(), now);
        let names: Vec<&str> = soon.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["apiserver", "front-proxy-client"], "expiring and expired; not the CA, not the unreadable");
        assert!(soon.iter().all(|c| c.sans.is_empty()));
        assert!(expiring_certs(&root.path().join("nowhere"), now).is_empty());
    }

    #[test]
    fn collects_real_facts_from_this_host() {
        let dir = tempfile::tempdir().unwrap();
        let inv = collect(&Sources { root: "/".into(), fallback_machine_id: dir.path().join("mid") });
        assert!(!inv.hostname.is_empty());
        assert!(!inv.machine_id.is_empty());
        assert!(!inv.kernel.is_empty());
        assert!(inv.cpus >= 1);
        assert!(inv.memory_bytes > 64 * 1024 * 1024);
        let lo = inv.interfaces.iter().find(|i| i.name == "lo").expect("loopback interface");
        assert!(lo.addresses.iter().any(|a| a == "127.0.0.1/8"), "{:?}", lo.addresses);
        assert_eq!(inv.components.len(), 3);
        assert!(inv.clock_unix_ms > 1_600_000_000_000);
        assert!(!changed(&inv, &Inventory { clock_unix_ms: 1, ..inv.clone() }));
    }

    #[test]
    fn facts_from_a_prepared_root() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::create_dir_all(r.join("proc")).unwrap();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::fs::create_dir_all(r.join("sys/fs/cgroup")).unwrap();
        std::fs::write(r.join("etc/machine-id"), "abc123\n").unwrap();
        std::fs::write(
            r.join("etc/os-release"),
            "ID=debian\nVERSION_ID=\"12\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
        )
        .unwrap();
        std::fs::write(r.join("proc/swaps"), "Filename Type Size Used Priority\n/swap file 1024 0 -2\n").unwrap();
        std::fs::write(r.join("sys/fs/cgroup/cgroup.controllers"), "cpu memory\n").unwrap();
        std::fs::write(r.join("usr/bin/kubeadm"), "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(r.join("usr/bin/kubeadm"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let inv = collect(&Sources { root: r.to_path_buf(), fallback_machine_id: r.join("mid") });
        assert_eq!(inv.machine_id, "abc123");
        assert_eq!(inv.os.as_ref().unwrap().pretty_name, "Debian GNU/Linux 12 (bookworm)");
        assert!(inv.swap_enabled);
        assert_eq!(inv.cgroup_version, 2);
        let kubeadm = inv.components.iter().find(|c| c.name == "kubeadm").unwrap();
        assert!(kubeadm.present && kubeadm.path.ends_with("usr/bin/kubeadm"));
        assert!(!inv.components.iter().find(|c| c.name == "kubelet").unwrap().present);
    }

    #[test]
    fn generated_machine_id_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let src = Sources { root: dir.path().to_path_buf(), fallback_machine_id: dir.path().join("mid") };
        let a = machine_id(&src);
        assert_eq!(a.len(), 32);
        assert_eq!(machine_id(&src), a);
    }
}

//! Host preparation for IPVS: kernel modules and sysctls. Idempotent; reports what it changed.
use crate::execute::command::{self, Cancel, Cmd};
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum HostError {
    #[error("cannot load kernel module {module}: {reason}")]
    Module { module: String, reason: String },
    #[error("cannot set sysctl {key}")]
    Sysctl {
        key: String,
        #[source]
        source: std::io::Error,
    },
}

/// Modules the load balancer needs, in load order (libcrc32c needs crc32c, which busybox-style
/// modprobe does not pull in by itself).
pub fn modules_for(scheduler: &str) -> Vec<String> {
    vec!["crc32c_generic".into(), "ip_vs".into(), format!("ip_vs_{scheduler}"), "dummy".into()]
}

fn loaded(sys: &Path, module: &str) -> bool {
    sys.join("module").join(module).exists()
}

/// Load missing modules with modprobe. Returns the modules it loaded.
pub fn load_modules(sys: &Path, scheduler: &str) -> Result<Vec<String>, HostError> {
    let mut out = Vec::new();
    for m in modules_for(scheduler) {
        if loaded(sys, &m) {
            continue;
        }
        let cmd = Cmd::new("modprobe", &[&m], std::time::Duration::from_secs(60));
        let res = command::run_blocking(&cmd, &Cancel::none());
        if matches!(&res, Ok(r) if r.success) {
            out.push(m);
            continue;
        }
        // crc32c may be built in or provided by another implementation; ip_vs will say if not.
        if m == "crc32c_generic" {
            continue;
        }
        // IPVS built into the kernel (not a module) is fine too.
        if m == "ip_vs" && Path::new("/proc/net/ip_vs").exists() {
            continue;
        }
        let reason = match res {
            Ok(r) => r.output.trim().to_string(),
            Err(e) => format!("cannot run modprobe: {e}"),
        };
        return Err(HostError::Module { module: m, reason });
    }
    Ok(out)
}

/// sysctls the VIP load balancer relies on.
pub const SYSCTLS: &[(&str, &str)] = &[
    // NAT for connections that originate on this host.
    ("net/ipv4/vs/conntrack", "1"),
    // Drop connections to a removed real server on their next packet instead of black-holing them.
    ("net/ipv4/vs/expire_nodest_conn", "1"),
];

/// Set sysctls under `proc_sys` (normally /proc/sys). Returns the keys it changed.
pub fn set_sysctls(proc_sys: &Path) -> Result<Vec<String>, HostError> {
    let mut changed = Vec::new();
    for (key, value) in SYSCTLS {
        let path: PathBuf = proc_sys.join(key);
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current.trim() == *value {
            continue;
        }
        std::fs::write(&path, value).map_err(|source| HostError::Sysctl { key: key.replace('/', "."), source })?;
        changed.push(format!("{}={value}", key.replace('/', ".")));
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctls_are_set_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("net/ipv4/vs")).unwrap();
        std::fs::write(dir.path().join("net/ipv4/vs/conntrack"), "0\n").unwrap();
        std::fs::write(dir.path().join("net/ipv4/vs/expire_nodest_conn"), "1\n").unwrap();
        assert_eq!(set_sysctls(dir.path()).unwrap(), vec!["net.ipv4.vs.conntrack=1".to_string()]);
        assert!(set_sysctls(dir.path()).unwrap().is_empty());
        assert!(set_sysctls(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn module_list_puts_crc32c_first() {
        assert_eq!(modules_for("wrr"), vec!["crc32c_generic", "ip_vs", "ip_vs_wrr", "dummy"]);
    }
}

//! Pure parsers for the files host facts come from.
use std::path::Path;

/// (ID, VERSION_ID, PRETTY_NAME) from os-release(5) text.
pub fn os_release(text: &str) -> (String, String, String) {
    let mut out = (String::new(), String::new(), String::new());
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else { continue };
        let v = v.trim().trim_matches('"').trim_matches('\'').to_string();
        match k.trim() {
            "ID" => out.0 = v,
            "VERSION_ID" => out.1 = v,
            "PRETTY_NAME" => out.2 = v,
            _ => {}
        }
    }
    out
}

/// Number of `processor` entries in /proc/cpuinfo.
pub fn cpu_count(cpuinfo: &str) -> u32 {
    cpuinfo.lines().filter(|l| l.split(':').next().map(|k| k.trim() == "processor").unwrap_or(false)).count() as u32
}

/// MemTotal from /proc/meminfo, in bytes.
pub fn mem_total_bytes(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Any active swap area in /proc/swaps (first line is a header).
pub fn swap_enabled(swaps: &str) -> bool {
    swaps.lines().skip(1).any(|l| !l.trim().is_empty())
}

/// 2 for the unified hierarchy, 1 for legacy, 0 when unknown.
pub fn cgroup_version(cgroup_mount: &Path) -> u32 {
    if cgroup_mount.join("cgroup.controllers").exists() {
        2
    } else if cgroup_mount.join("memory").exists() || cgroup_mount.join("cpu").exists() {
        1
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_and_etc_files() {
        assert_eq!(
            os_release(
                "NAME=\"Rocky Linux\"\nID=\"rocky\"\nVERSION_ID=\"9.3\"\nPRETTY_NAME=\"Rocky Linux 9.3 (Blue Onyx)\"\n"
            ),
            ("rocky".into(), "9.3".into(), "Rocky Linux 9.3 (Blue Onyx)".into())
        );
        assert_eq!(cpu_count("processor\t: 0\nmodel name\t: x\n\nprocessor\t: 1\n"), 2);
        assert_eq!(mem_total_bytes("MemTotal:       16314868 kB\nMemFree: 1 kB\n"), 16314868 * 1024);
        assert_eq!(mem_total_bytes("garbage"), 0);
        assert!(!swap_enabled("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"));
        assert!(swap_enabled("Filename Type\n/dev/sda2 partition 1 0 -2\n"));
    }
}

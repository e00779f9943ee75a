//! `/etc/hosts` resolution: a managed block, written atomically, every other line untouched.
//!
//! ```text
//! # BEGIN fleetadm managed block: do not edit
//! 10.0.0.11 apiserver.cluster.local
//! # END fleetadm managed block
//! ```
//! When `/etc/hosts` is a bind mount (containers, some cloud images) a rename over it fails with
//! EBUSY; the file is then rewritten in place.
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;

use thiserror::Error;

pub const BEGIN: &str = "# BEGIN fleetadm managed block: do not edit";
pub const END: &str = "# END fleetadm managed block";

#[derive(Debug, Error)]
pub enum HostsError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has a fleetadm block start without its end (line {line}); fix the file by hand")]
    Unterminated { path: String, line: usize },
    #[error("invalid host name {0:?}")]
    BadName(String),
}

/// One line of the block: an address and its names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub ip: IpAddr,
    pub names: Vec<String>,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// The block text (with trailing newline); empty when there are no entries.
pub fn render_block(entries: &[Entry]) -> Result<String, HostsError> {
    if entries.is_empty() {
        return Ok(String::new());
    }
    let mut out = format!("{BEGIN}\n");
    for e in entries {
        for n in &e.names {
            if !valid_name(n) {
                return Err(HostsError::BadName(n.clone()));
            }
        }
        out.push_str(&format!("{} {}\n", e.ip, e.names.join(" ")));
    }
    out.push_str(END);
    out.push('\n');
    Ok(out)
}

/// `original` with the managed block replaced by `block` (appended if absent, removed if
/// `block` is empty). Other lines are kept byte for byte. Should the file hold more than one
/// managed block (edited by hand), all are replaced by one, where the first was; a block that
/// is opened and never closed is refused (nothing is written).
pub fn with_block(original: &str, block: &str, path_for_errors: &str) -> Result<String, HostsError> {
    let lines: Vec<&str> = original.split_inclusive('\n').collect();
    let mut out = String::with_capacity(original.len() + block.len());
    let mut opened_at: Option<usize> = None;
    let mut placed = false;
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_end();
        match opened_at {
            None if t == BEGIN => opened_at = Some(i),
            None => out.push_str(l),
            Some(_) if t == END => {
                opened_at = None;
                if !placed {
                    out.push_str(block);
                    placed = true;
                }
            }
            Some(_) => {}
        }
    }
    if let Some(s) = opened_at {
        return Err(HostsError::Unterminated { path: path_for_errors.to_string(), line: s + 1 });
    }
    if !placed && !block.is_empty() {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(block);
    }
    Ok(out)
}

/// Make `path` carry exactly `entries` in its managed block. Returns true if it changed.
pub fn ensure(path: &Path, entries: &[Entry]) -> Result<bool, HostsError> {
    let p = path.display().to_string();
    let original = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => return Err(HostsError::Read { path: p, source }),
    };
    let updated = with_block(&original, &render_block(entries)?, &p)?;
    if updated == original {
        return Ok(false);
    }
    write(path, updated.as_bytes()).map_err(|source| HostsError::Write { path: p, source })?;
    Ok(true)
}

/// Atomic replace, keeping the file's mode; in place when the file is a mount point.
fn write(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644);
    match fleetadm_common::fsutil::write_atomic(path, data, mode) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EXDEV) | Some(libc::EPERM)) => {
            tracing::info!(path = %path.display(), "cannot rename over it (bind mount?); rewriting in place");
            let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(path)?;
            f.write_all(data)?;
            f.sync_all()
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(ip: &str, names: &[&str]) -> Entry {
        Entry { ip: ip.parse().unwrap(), names: names.iter().map(|s| s.to_string()).collect() }
    }

    const ORIGINAL: &str =
        "127.0.0.1\tlocalhost\n# a comment the operator wrote\n::1 ip6-localhost\n10.0.0.5 db.internal";

    #[test]
    fn block_is_appended_replaced_and_removed_leaving_other_lines() {
        let b1 = render_block(&[e("10.0.0.11", &["apiserver.cluster.local"])]).unwrap();
        let once = with_block(ORIGINAL, &b1, "x").unwrap();
        assert!(once.starts_with(ORIGINAL), "{once}");
        assert!(once.ends_with(&format!("{END}\n")));
        assert_eq!(with_block(&once, &b1, "x").unwrap(), once, "idempotent");
        let b2 = render_block(&[e("10.103.97.2", &["apiserver.cluster.local"])]).unwrap();
        let twice = with_block(&once, &b2, "x").unwrap();
        assert!(twice.contains("10.103.97.2 apiserver.cluster.local") && !twice.contains("10.0.0.11"));
        assert!(twice.contains("# a comment the operator wrote\n::1 ip6-localhost\n10.0.0.5 db.internal\n"));
        let removed = with_block(&twice, "", "x").unwrap();
        assert_eq!(removed, format!("{ORIGINAL}\n"));
    }

    #[test]
    fn lines_after_the_block_survive() {
        let b = render_block(&[e("10.0.0.11", &["a"])]).unwrap();
        let text = format!("x\n{b}y after\n");
        let b2 = render_block(&[e("10.0.0.12", &["a"])]).unwrap();
        assert_eq!(with_block(&text, &b2, "x").unwrap(), format!("x\n{b2}y after\n"));
    }

    #[test]
    fn broken_blocks_and_names_are_errors() {
        let text = format!("x\n{BEGIN}\n1.2.3.4 a\n");
        assert!(matches!(with_block(&text, "", "/etc/hosts"), Err(HostsError::Unterminated { line: 2, .. })));
        assert!(render_block(&[e("1.2.3.4", &["bad name"])]).is_err());
        assert!(render_block(&[e("1.2.3.4", &["-x"])]).is_err());
    }

    #[test]
    fn ensure_writes_real_files_and_reports_changes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hosts");
        std::fs::write(&p, ORIGINAL).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let entries = [e("10.0.0.11", &["apiserver.cluster.local"])];
        assert!(ensure(&p, &entries).unwrap());
        assert!(!ensure(&p, &entries).unwrap());
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o644);
        assert!(ensure(&p, &[]).unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), format!("{ORIGINAL}\n"));
    }

    #[test]
    fn bind_mounted_hosts_file_is_rewritten_in_place() {
        // A private mount namespace for this thread only, as root (the test suite runs as root).
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("hosts");
        let source = dir.path().join("hosts.real");
        std::fs::write(&target, "").unwrap();
        std::fs::write(&source, ORIGINAL).unwrap();
        let (t, s) = (target.clone(), source.clone());
        std::thread::spawn(move || {
            use nix::mount::{mount, MsFlags};
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare (needs root)");
            mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>).unwrap();
            mount(Some(&s), &t, None::<&str>, MsFlags::MS_BIND, None::<&str>).unwrap();
            assert!(ensure(&t, &[e("10.103.97.2", &["apiserver.cluster.local"])]).unwrap());
            // the content went through the bind mount into the real file
            let real = std::fs::read_to_string(&s).unwrap();
            assert!(real.contains("10.103.97.2 apiserver.cluster.local") && real.starts_with(ORIGINAL));
        })
        .join()
        .unwrap();
    }
}

//! Kubernetes versions and the upgrade rules kubeadm enforces (and fleetadm checks before it
//! plans anything): one minor version at a time, never down, never the same version again.
use std::fmt;
use std::str::FromStr;

use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KubeVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VersionError {
    #[error("{0:?} is not a Kubernetes version (vX.Y.Z, e.g. v1.30.5)")]
    Bad(String),
    #[error("cluster is at {0} already")]
    Same(String),
    #[error("{to} is older than the cluster's {from}: downgrades are not supported (restore an etcd backup instead)")]
    Downgrade { from: String, to: String },
    #[error("{from} -> {to} skips a minor version: kubeadm upgrades one minor at a time; upgrade to {next} first")]
    SkipsMinor { from: String, to: String, next: String },
    #[error("{from} -> {to} changes the major version: not supported")]
    Major { from: String, to: String },
}

impl FromStr for KubeVersion {
    type Err = VersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || VersionError::Bad(s.chars().take(64).collect());
        let parts: Vec<&str> = s.strip_prefix('v').ok_or_else(bad)?.split('.').collect();
        let [major, minor, patch] = parts.as_slice() else { return Err(bad()) };
        let n = |p: &str| -> Result<u32, VersionError> {
            if p.is_empty() || p.len() > 4 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            p.parse().map_err(|_| bad())
        };
        Ok(KubeVersion { major: n(major)?, minor: n(minor)?, patch: n(patch)? })
    }
}

impl fmt::Display for KubeVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// May a cluster at `from` be upgraded to `to`? A later patch of the same minor, or any patch of
/// the next minor.
pub fn check_upgrade(from: &str, to: &str) -> Result<(KubeVersion, KubeVersion), VersionError> {
    let (f, t): (KubeVersion, KubeVersion) = (from.parse()?, to.parse()?);
    let text = |v: KubeVersion| v.to_string();
    if t == f {
        return Err(VersionError::Same(text(f)));
    }
    if t < f {
        return Err(VersionError::Downgrade { from: text(f), to: text(t) });
    }
    if t.major != f.major {
        return Err(VersionError::Major { from: text(f), to: text(t) });
    }
    if t.minor > f.minor + 1 {
        let next = format!("v{}.{}.x", f.major, f.minor + 1);
        return Err(VersionError::SkipsMinor { from: text(f), to: text(t), next });
    }
    Ok((f, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_minor_at_a_time_never_down() {
        assert!(check_upgrade("v1.29.9", "v1.30.5").is_ok());
        assert!(check_upgrade("v1.29.9", "v1.30.0").is_ok());
        assert!(check_upgrade("v1.29.1", "v1.29.9").is_ok());
        assert_eq!(check_upgrade("v1.29.9", "v1.29.9"), Err(VersionError::Same("v1.29.9".into())));
        assert!(matches!(check_upgrade("v1.29.9", "v1.29.1"), Err(VersionError::Downgrade { .. })));
        assert!(matches!(check_upgrade("v1.30.1", "v1.29.9"), Err(VersionError::Downgrade { .. })));
        let e = check_upgrade("v1.29.9", "v1.31.0").unwrap_err();
        assert!(e.to_string().contains("upgrade to v1.30.x first"), "{e}");
        assert!(matches!(check_upgrade("v1.29.9", "v2.0.0"), Err(VersionError::Major { .. })));
        for bad in ["1.30.5", "v1.30", "v1.30.5-rc.0", "v1.3a.0", "", "v1..0", "v1.30.99999"] {
            assert!(matches!(check_upgrade("v1.29.9", bad), Err(VersionError::Bad(_))), "{bad}");
        }
        // patch numbers compare as numbers, not text
        assert!(check_upgrade("v1.29.9", "v1.29.10").is_ok());
    }
}

//! `bundle.yaml`: what a bundle is and everything it holds, with sizes, modes and SHA-256s.
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use fleetadm_common::tasks::{is_sha256_hex, safe_bundle_path, BundleFile};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::BundleError;

pub const MANIFEST: &str = "bundle.yaml";
/// Top-level directories a bundle may have.
/// Top-level directories of a bundle (`packages/`: node-agent packages for `controller agent upgrade`).
pub const LAYOUT: &[&str] = &["bin", "images", "conf", "manifests", "scripts", "packages"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    #[serde(rename = "kubernetesVersion")]
    pub kubernetes_version: String,
    /// Debian architecture name (amd64, arm64) as the agents report it.
    pub arch: String,
    pub files: Vec<BundleFile>,
}

impl Manifest {
    pub fn parse(text: &str) -> Result<Self, BundleError> {
        let m: Manifest = serde_yaml::from_str(text).map_err(|e| BundleError::Manifest(format!("{MANIFEST}: {e}")))?;
        m.validate()?;
        Ok(m)
    }

    pub fn validate(&self) -> Result<(), BundleError> {
        let bad = |m: String| Err(BundleError::Manifest(m));
        if crate::enroll::csr::validate_node_name(&self.name).is_err() {
            return bad(format!("name {:?} must be lowercase letters, digits, '-' and '.'", self.name));
        }
        crate::plan::kubeadm::parse_version(&self.kubernetes_version)
            .map_err(|e| BundleError::Manifest(format!("kubernetesVersion: {e}")))?;
        if !["amd64", "arm64", "ppc64el", "s390x", "riscv64"].contains(&self.arch.as_str()) {
            return bad(format!("arch {:?} is not a Debian architecture (amd64, arm64, ...)", self.arch));
        }
        let mut seen = std::collections::BTreeSet::new();
        for f in &self.files {
            if !safe_bundle_path(&f.path) {
                return bad(format!("path {:?} escapes the bundle (absolute, '..' or empty component)", f.path));
            }
            let top = f.path.split('/').next().unwrap_or_default();
            if !LAYOUT.contains(&top) {
                return bad(format!("path {:?} is outside the bundle layout ({})", f.path, LAYOUT.join("/, ")));
            }
            if !is_sha256_hex(&f.sha256) {
                return bad(format!("{}: sha256 {:?} is not a lowercase hex SHA-256", f.path, f.sha256));
            }
            if f.mode & !0o777 != 0 {
                return bad(format!("{}: mode {:o} has bits beyond rwx", f.path, f.mode));
            }
            if !seen.insert(f.path.as_str()) {
                return bad(format!("{} is listed twice", f.path));
            }
        }
        Ok(())
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// SHA-256 and size of a file, streaming.
pub fn hash_file(path: &Path) -> Result<(String, u64), BundleError> {
    let mut f = std::fs::File::open(path).map_err(|e| BundleError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf).map_err(|e| BundleError::io(path, e))?;
        if r == 0 {
            break;
        }
        h.update(&buf[..r]);
        n += r as u64;
    }
    Ok((hex::encode(h.finalize()), n))
}

/// Walk `dir` (the bundle layout directories only) and describe every regular file. Symlinks and
/// special files are refused: a bundle is plain files.
pub fn describe_dir(dir: &Path, name: &str, version: &str, arch: &str) -> Result<Manifest, BundleError> {
    let mut files = Vec::new();
    fn walk(root: &Path, rel: &str, files: &mut Vec<BundleFile>) -> Result<(), BundleError> {
        let here = root.join(rel);
        let mut entries: Vec<_> = std::fs::read_dir(&here)
            .map_err(|e| BundleError::io(&here, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| BundleError::io(&here, e))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = format!("{rel}/{name}");
            let meta = std::fs::symlink_metadata(e.path()).map_err(|err| BundleError::io(&e.path(), err))?;
            if meta.file_type().is_symlink() {
                return Err(BundleError::Manifest(format!("{rel} is a symlink; bundles hold plain files only")));
            } else if meta.is_dir() {
                walk(root, &rel, files)?;
            } else if meta.is_file() {
                let (sha256, size) = hash_file(&e.path())?;
                files.push(BundleFile { path: rel, size, mode: meta.permissions().mode() & 0o777, sha256 });
            } else {
                return Err(BundleError::Manifest(format!("{rel} is not a regular file")));
            }
        }
        Ok(())
    }
    for top in LAYOUT {
        if dir.join(top).is_dir() {
            walk(dir, top, &mut files)?;
        }
    }
    let m = Manifest { name: name.into(), kubernetes_version: version.into(), arch: arch.into(), files };
    m.validate()?;
    Ok(m)
}

/// Check a directory against its manifest: every listed file present with that size and hash, no
/// symlink anywhere on the way.
pub fn verify_dir(dir: &Path, m: &Manifest) -> Result<(), BundleError> {
    for f in &m.files {
        let mut p = dir.to_path_buf();
        for c in f.path.split('/') {
            p.push(c);
            let meta = std::fs::symlink_metadata(&p)
                .map_err(|_| BundleError::Verify(format!("{} is listed in the manifest but missing", f.path)))?;
            if meta.file_type().is_symlink() {
                return Err(BundleError::Verify(format!("{} goes through a symlink; refused", f.path)));
            }
        }
        let (sha, size) = hash_file(&p)?;
        if size != f.size {
            return Err(BundleError::Verify(format!("{}: size {size} but the manifest says {}", f.path, f.size)));
        }
        if sha != f.sha256 {
            return Err(BundleError::Verify(format!("{}: SHA-256 {sha} but the manifest says {}", f.path, f.sha256)));
        }
    }
    Ok(())
}

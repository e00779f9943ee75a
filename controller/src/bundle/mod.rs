//! Offline bundles: `bundle.yaml` ([`manifest`]), tar.gz packing and safe unpacking
//! ([`archive`]), the content-addressed blob store ([`blobs`]), and the registry of imported
//! bundles kept in the state store.
pub mod archive;
pub mod blobs;
pub mod manifest;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::store::{get_json, list_json, put_json, Durability, Store, StoreError, Table};
use blobs::BlobStore;
use manifest::{Manifest, MANIFEST};

#[derive(Debug, Error)]
pub enum BundleError {
    #[error("bad bundle manifest: {0}")]
    Manifest(String),
    #[error("bundle does not match its manifest: {0}")]
    Verify(String),
    #[error("bad bundle archive: {0}")]
    Archive(String),
    #[error("{path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bundle {0} not found (see `controller bundle list`)")]
    NotFound(String),
    #[error("bundle {name} is used by cluster {cluster}; delete the cluster first")]
    InUse { name: String, cluster: String },
    #[error("bundle {0} already exists with different contents; remove it first or pick another name")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl BundleError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.display().to_string(), source }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleRecord {
    pub manifest: Manifest,
    pub imported_ms: u64,
    /// Bytes newly stored by the import (the rest was already there from other bundles).
    pub new_bytes: u64,
}

pub struct Bundles {
    store: Arc<dyn Store>,
    pub blobs: BlobStore,
    tmp: PathBuf,
    /// What one import may unpack.
    pub budget: archive::Budget,
}

impl Bundles {
    pub fn new(store: Arc<dyn Store>, data_dir: &Path) -> Self {
        Self { store, blobs: BlobStore::new(data_dir), tmp: data_dir.join("tmp"), budget: Default::default() }
    }

    /// Verify a bundle (directory, tar or tar.gz) against its manifest and store its blobs.
    /// Nothing is recorded unless every file checked out.
    pub fn import(&self, path: &Path) -> Result<BundleRecord, BundleError> {
        let meta = std::fs::metadata(path).map_err(|e| BundleError::io(path, e))?;
        let _cleanup;
        let dir = if meta.is_dir() {
            path.to_path_buf()
        } else {
            std::fs::create_dir_all(&self.tmp).map_err(|e| BundleError::io(&self.tmp, e))?;
            let t = tempfile::Builder::new()
                .prefix("import-")
                .tempdir_in(&self.tmp)
                .map_err(|e| BundleError::io(&self.tmp, e))?;
            archive::unpack(path, t.path(), &self.budget)?;
            let p = t.path().to_path_buf();
            _cleanup = t;
            p
        };
        let text = std::fs::read_to_string(dir.join(MANIFEST))
            .map_err(|e| BundleError::Manifest(format!("cannot read {MANIFEST} at the bundle root: {e}")))?;
        let m = Manifest::parse(&text)?;
        self.budget.check(&m)?;
        manifest::verify_dir(&dir, &m)?;
        if let Some(old) = get_json::<BundleRecord>(&*self.store, Table::Bundles, &m.name)? {
            if old.manifest != m {
                return Err(BundleError::Conflict(m.name));
            }
        }
        let mut new_bytes = 0;
        for f in &m.files {
            if self.blobs.put_file(&dir.join(&f.path), &f.sha256, f.size)? {
                new_bytes += f.size;
            }
        }
        let rec = BundleRecord { manifest: m, imported_ms: fleetadm_common::clock::now_unix_ms(), new_bytes };
        put_json(&*self.store, Table::Bundles, &rec.manifest.name, &rec, Durability::Flush)?;
        tracing::info!(bundle = %rec.manifest.name, files = rec.manifest.files.len(), new_bytes, "bundle imported");
        Ok(rec)
    }

    pub fn get(&self, name: &str) -> Result<BundleRecord, BundleError> {
        get_json(&*self.store, Table::Bundles, name)?.ok_or_else(|| BundleError::NotFound(name.to_string()))
    }

    pub fn list(&self) -> Result<Vec<BundleRecord>, BundleError> {
        Ok(list_json(&*self.store, Table::Bundles)?)
    }

    /// Remove a bundle (the caller checks it is unused) and the blobs no other bundle needs.
    pub fn remove(&self, name: &str) -> Result<BundleRecord, BundleError> {
        let rec = self.get(name)?;
        self.store.remove(Table::Bundles, name, Durability::Flush)?;
        let still: std::collections::BTreeSet<String> =
            self.list()?.into_iter().flat_map(|b| b.manifest.files.into_iter().map(|f| f.sha256)).collect();
        for f in &rec.manifest.files {
            if !still.contains(&f.sha256) {
                self.blobs.remove(&f.sha256)?;
            }
        }
        Ok(rec)
    }

    /// Whether bundle `bundle` holds blob `sha256` (a store failure is an error, not "no").
    pub fn holds(&self, bundle: &str, sha256: &str) -> Result<bool, BundleError> {
        match self.get(bundle) {
            Ok(b) => Ok(b.manifest.files.iter().any(|f| f.sha256 == sha256)),
            Err(BundleError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;
    use fleetadm_common::tasks::BundleFile;
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt;

    fn tree(dir: &Path, files: &[(&str, &str)]) {
        for (p, body) in files {
            let p = dir.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, body).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    fn setup() -> (tempfile::TempDir, Bundles) {
        let d = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&d.path().join("state")).unwrap());
        let b = Bundles::new(store, d.path());
        (d, b)
    }

    fn build(d: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let src = d.join(format!("src-{name}"));
        tree(&src, files);
        let m = manifest::describe_dir(&src, name, "v1.29.9", "amd64").unwrap();
        let out = d.join(format!("{name}.tar.gz"));
        archive::pack(&src, &m, &out).unwrap();
        out
    }

    #[test]
    fn build_import_dedup_and_remove() {
        let (d, b) = setup();
        let a = build(d.path(), "k8s-a", &[("bin/kubeadm", "kubeadm-bytes"), ("conf/kubelet.service", "[Unit]")]);
        let c = build(d.path(), "k8s-b", &[("bin/kubeadm", "kubeadm-bytes"), ("bin/kubelet", "kubelet-bytes")]);
        let ra = b.import(&a).unwrap();
        assert_eq!(ra.new_bytes, 19);
        let rb = b.import(&c).unwrap();
        assert_eq!(rb.new_bytes, "kubelet-bytes".len() as u64, "the shared kubeadm blob is stored once");
        assert_eq!(b.list().unwrap().len(), 2);
        assert!(b.import(&a).is_ok(), "re-importing the same bundle is fine");
        let kubeadm = ra.manifest.files.iter().find(|f| f.path == "bin/kubeadm").unwrap().sha256.clone();
        // A stored blob that went bad (same size) is not reused: the next import replaces it.
        std::fs::write(b.blobs.path(&kubeadm), "kubeadm-BYTES").unwrap();
        assert!(!b.blobs.verified(&kubeadm, 13).unwrap());
        assert_eq!(b.import(&a).unwrap().new_bytes, 13);
        assert_eq!(std::fs::read(b.blobs.path(&kubeadm)).unwrap(), b"kubeadm-bytes");
        b.remove("k8s-a").unwrap();
        assert!(b.blobs.has(&kubeadm, 13), "still used by k8s-b");
        b.remove("k8s-b").unwrap();
        assert!(!b.blobs.has(&kubeadm, 13));
        assert!(matches!(b.remove("k8s-b"), Err(BundleError::NotFound(_))));
    }

    #[test]
    fn lying_manifests_and_hostile_archives_are_refused_and_record_nothing() {
        let (d, b) = setup();
        let src = d.path().join("liar");
        tree(&src, &[("bin/kubeadm", "real")]);
        let mut m = manifest::describe_dir(&src, "liar", "v1.29.9", "amd64").unwrap();
        m.files[0].size = 99;
        std::fs::write(src.join("bundle.yaml"), serde_yaml::to_string(&m).unwrap()).unwrap();
        assert!(matches!(b.import(&src), Err(BundleError::Verify(e)) if e.contains("size 4")));
        m.files[0].size = 4;
        m.files[0].sha256 = "ab".repeat(32);
        std::fs::write(src.join("bundle.yaml"), serde_yaml::to_string(&m).unwrap()).unwrap();
        assert!(matches!(b.import(&src), Err(BundleError::Verify(e)) if e.contains("SHA-256")));
        m.files[0].path = "../etc/passwd".into();
        std::fs::write(src.join("bundle.yaml"), serde_yaml::to_string(&m).unwrap()).unwrap();
        assert!(matches!(b.import(&src), Err(BundleError::Manifest(e)) if e.contains("escapes")));
        assert!(b.list().unwrap().is_empty());

        // A truncated tarball.
        let good = build(d.path(), "cut", &[("bin/kubeadm", &"x".repeat(100_000))]);
        let bytes = std::fs::read(&good).unwrap();
        let cut = d.path().join("cut-short.tar.gz");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(b.import(&cut), Err(BundleError::Archive(_))), "{:?}", b.import(&cut));

        // Entries that escape, or links.
        for (name, kind, target) in [
            ("../evil", tar::EntryType::Regular, None),
            ("bin/link", tar::EntryType::Symlink, Some("/etc/passwd")),
            ("bin/hard", tar::EntryType::Link, Some("../../etc/shadow")),
        ] {
            let p = d.path().join("hostile.tar");
            let mut t = tar::Builder::new(std::fs::File::create(&p).unwrap());
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(0);
            h.set_mode(0o644);
            if let Some(tg) = target {
                h.set_link_name(tg).unwrap();
            }
            // Write the raw name so the tar crate's own checks do not hide ours.
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            t.append(&h, std::io::empty()).unwrap();
            t.finish().unwrap();
            drop(t);
            let err = b.import(&p).unwrap_err();
            assert!(matches!(err, BundleError::Archive(_)), "{name}: {err}");
        }
        // Symlinks in a bundle directory.
        let src = d.path().join("linky");
        tree(&src, &[("bin/kubeadm", "x")]);
        std::os::unix::fs::symlink("/etc/passwd", src.join("bin/kubelet")).unwrap();
        assert!(manifest::describe_dir(&src, "linky", "v1.29.9", "amd64").is_err());
        assert!(b.list().unwrap().is_empty(), "nothing recorded");
    }

    /// A tar.gz with `manifest` first, then each (path, declared header size, data reader).
    fn archive_with(p: &Path, manifest: &Manifest, entries: Vec<(&str, u64, Box<dyn std::io::Read>)>) {
        let gz = flate2::write::GzEncoder::new(std::fs::File::create(p).unwrap(), flate2::Compression::fast());
        let mut t = tar::Builder::new(gz);
        let yaml = serde_yaml::to_string(manifest).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(yaml.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        t.append_data(&mut h, MANIFEST, yaml.as_bytes()).unwrap();
        for (path, size, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(size);
            h.set_mode(0o755);
            h.set_cksum();
            t.append_data(&mut h, path, data).unwrap();
        }
        t.into_inner().unwrap().finish().unwrap();
    }

    fn leftovers(d: &Path) -> usize {
        std::fs::read_dir(d.join("tmp")).map(|r| r.count()).unwrap_or(0)
    }

    #[test]
    fn imports_have_a_budget_and_leave_nothing_behind() {
        let (d, mut b) = setup();
        b.budget = archive::Budget {
            max_total_bytes: 8 << 20,
            max_files: 4,
            max_file_bytes: 4 << 20,
            max_manifest_bytes: 64 << 10,
        };
        let zeros = |n: u64| Box::new(std::io::repeat(0).take(n)) as Box<dyn std::io::Read>;
        let file = |path: &str, size: u64| BundleFile { path: path.into(), size, mode: 0o755, sha256: "ab".repeat(32) };
        let m = |files: Vec<BundleFile>| Manifest {
            name: "bomb".into(),
            kubernetes_version: "v1.29.9".into(),
            arch: "amd64".into(),
            files,
        };
        let p = d.path().join("bomb.tar.gz");
        let tmp_bytes = || {
            fn du(p: &Path) -> u64 {
                std::fs::read_dir(p)
                    .map(|r| {
                        r.flatten()
                            .map(|e| {
                                let md = e.metadata().unwrap();
                                if md.is_dir() {
                                    du(&e.path())
                                } else {
                                    md.len()
                                }
                            })
                            .sum()
                    })
                    .unwrap_or(0)
            }
            du(&d.path().join("tmp"))
        };

        // A gzip bomb: 64 MiB of zeros (~64 KiB compressed) under a manifest that declares them.
        archive_with(&p, &m(vec![file("bin/kubeadm", 64 << 20)]), vec![("bin/kubeadm", 64 << 20, zeros(64 << 20))]);
        assert!(std::fs::metadata(&p).unwrap().len() < 1 << 20);
        let e = b.import(&p).unwrap_err().to_string();
        assert!(e.contains("more than the 4194304 allowed per file"), "{e}");
        // ... or one that declares a small file and archives a large one.
        archive_with(&p, &m(vec![file("bin/kubeadm", 10)]), vec![("bin/kubeadm", 64 << 20, zeros(64 << 20))]);
        let e = b.import(&p).unwrap_err().to_string();
        assert!(e.contains("the archive says 67108864 bytes"), "{e}");
        // Too much in all, too many files.
        let four: Vec<BundleFile> = (0..4).map(|i| file(&format!("bin/f{i}"), 3 << 20)).collect();
        archive_with(&p, &m(four), vec![]);
        assert!(b.import(&p).unwrap_err().to_string().contains("bytes, more than the 8388608 allowed"));
        let five: Vec<BundleFile> = (0..5).map(|i| file(&format!("bin/f{i}"), 1)).collect();
        archive_with(&p, &m(five), vec![]);
        assert!(b.import(&p).unwrap_err().to_string().contains("lists 5 files"));
        // An entry the manifest does not list, or the manifest not first.
        archive_with(&p, &m(vec![file("bin/kubeadm", 1)]), vec![("bin/extra", 1, zeros(1))]);
        assert!(b.import(&p).unwrap_err().to_string().contains("\"bin/extra\" is not listed"));
        let mut t = tar::Builder::new(std::fs::File::create(d.path().join("late.tar")).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_cksum();
        t.append_data(&mut h, "bin/kubeadm", &b"hello"[..]).unwrap();
        t.finish().unwrap();
        drop(t);
        assert!(b.import(&d.path().join("late.tar")).unwrap_err().to_string().contains("must come first"));
        // Nothing was recorded, nothing is left in the import area, and no bomb ever hit the disk.
        assert!(b.list().unwrap().is_empty());
        assert_eq!(leftovers(d.path()), 0);
        assert_eq!(tmp_bytes(), 0);
    }
}

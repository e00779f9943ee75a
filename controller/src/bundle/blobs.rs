//! Content-addressed blob store under `DATA_DIR/blobs/sha256/ab/abcd...`: each content once, no
//! matter how many bundles carry it. Writes go to a temp file, are hashed while copied, and are
//! renamed into place only when the hash matches.
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::BundleError;

pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    pub fn new(data_dir: &Path) -> Self {
        Self { root: data_dir.join("blobs").join("sha256") }
    }

    /// A store of its own below `root` (etcd backups: never shared with bundles' blobs, which
    /// are removed with their bundles).
    pub fn at(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn path(&self, sha256: &str) -> PathBuf {
        self.root.join(&sha256[..2.min(sha256.len())]).join(sha256)
    }

    pub fn has(&self, sha256: &str, size: u64) -> bool {
        std::fs::metadata(self.path(sha256)).map(|m| m.len() == size).unwrap_or(false)
    }

    /// Is blob `sha256` present and intact (hashed, not just sized)? A corrupt one is removed.
    pub fn verified(&self, sha256: &str, size: u64) -> Result<bool, BundleError> {
        if !self.has(sha256, size) {
            return Ok(false);
        }
        let p = self.path(sha256);
        let (got, _) = super::manifest::hash_file(&p)?;
        if got == sha256 {
            return Ok(true);
        }
        tracing::warn!(blob = %sha256, got = %got, "stored blob is corrupt; replacing it");
        std::fs::remove_file(&p).map_err(|e| BundleError::io(&p, e))?;
        Ok(false)
    }

    /// Copy `src` in as blob `sha256`; returns false when it was already there (deduplicated).
    pub fn put_file(&self, src: &Path, sha256: &str, size: u64) -> Result<bool, BundleError> {
        if self.verified(sha256, size)? {
            return Ok(false);
        }
        let dst = self.path(sha256);
        let dir = dst.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| BundleError::io(&dir, e))?;
        let mut input = std::fs::File::open(src).map_err(|e| BundleError::io(src, e))?;
        let (tmp, mut out) =
            fleetadm_common::fsutil::create_temp_in(&dir, sha256, 0o644).map_err(|e| BundleError::io(&dir, e))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = input.read(&mut buf).map_err(|e| BundleError::io(src, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|e| BundleError::io(&tmp, e))?;
        }
        out.sync_all().map_err(|e| BundleError::io(&tmp, e))?;
        let got = hex::encode(h.finalize());
        if got != sha256 {
            let _ = std::fs::remove_file(&tmp);
            return Err(BundleError::Verify(format!(
                "{} changed while importing (SHA-256 {got}, expected {sha256})",
                src.display()
            )));
        }
        std::fs::rename(&tmp, &dst).map_err(|e| BundleError::io(&dst, e))?;
        Ok(true)
    }

    /// Up to `max` bytes of blob `sha256` from `offset`, and the blob's size.
    pub fn read_chunk(&self, sha256: &str, offset: u64, max: usize) -> Result<(Vec<u8>, u64), BundleError> {
        let p = self.path(sha256);
        let mut f = std::fs::File::open(&p).map_err(|e| BundleError::io(&p, e))?;
        let size = f.metadata().map_err(|e| BundleError::io(&p, e))?.len();
        if offset > size {
            return Err(BundleError::Verify(format!(
                "offset {offset} is past the end of blob {sha256} ({size} bytes)"
            )));
        }
        f.seek(SeekFrom::Start(offset)).map_err(|e| BundleError::io(&p, e))?;
        let want = ((size - offset) as usize).min(max);
        let mut buf = vec![0u8; want];
        f.read_exact(&mut buf).map_err(|e| BundleError::io(&p, e))?;
        Ok((buf, size))
    }

    pub fn remove(&self, sha256: &str) -> Result<(), BundleError> {
        let p = self.path(sha256);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BundleError::io(&p, e)),
        }
    }
}

//! The `fetch-bundle` task: pull a bundle's blobs into the agent's cache over the mTLS session,
//! in chunks, resuming a cut transfer from what is already on disk, verifying every blob's
//! SHA-256 before it is used, and never fetching a blob the cache already holds.
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use fleetadm_common::tasks::{is_sha256_hex, BundleFile};
use sha2::{Digest, Sha256};

/// Bytes asked for per call (the controller caps it too).
pub const CHUNK: u32 = 768 * 1024;

/// Where fetched blobs live: `STATE_DIR/blobs/<sha256>`, and `<sha256>.partial` while arriving.
pub struct BlobCache {
    dir: PathBuf,
}

impl BlobCache {
    pub fn new(state_dir: &Path) -> Self {
        Self { dir: state_dir.join("blobs") }
    }

    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    fn partial(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.partial"))
    }

    pub fn has(&self, f: &BundleFile) -> bool {
        std::fs::metadata(self.path(&f.sha256)).map(|m| m.len() == f.size).unwrap_or(false)
    }
}

/// Where chunks come from (the controller in production, a fake in tests).
pub trait ChunkSource {
    /// Up to `max` bytes of blob `sha256` from `offset`, and the blob's total size.
    fn chunk(
        &mut self,
        sha256: &str,
        offset: u64,
        max: u32,
    ) -> impl std::future::Future<Output = Result<(Vec<u8>, u64), String>> + Send;
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FetchStats {
    /// Blobs already in the cache.
    pub cached: usize,
    /// Blobs fetched (completely or the rest of a partial one).
    pub fetched: usize,
    /// Bytes transferred now.
    pub bytes: u64,
    /// Bytes a partial file already held when this run started.
    pub resumed_bytes: u64,
}

fn sha256_file(p: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Fetch every file's blob that is not cached yet. `progress(done_bytes, total_bytes)`.
pub async fn fetch_all<S: ChunkSource>(
    cache: &BlobCache,
    src: &mut S,
    files: &[BundleFile],
    mut progress: impl FnMut(u64, u64),
) -> Result<FetchStats, String> {
    std::fs::create_dir_all(&cache.dir).map_err(|e| format!("creating {}: {e}", cache.dir.display()))?;
    let mut stats = FetchStats::default();
    let mut seen = std::collections::BTreeSet::new();
    let unique: Vec<&BundleFile> = files.iter().filter(|f| seen.insert(f.sha256.clone())).collect();
    let total: u64 = unique.iter().map(|f| f.size).sum();
    let mut done = 0u64;
    for f in unique {
        if !is_sha256_hex(&f.sha256) {
            return Err(format!("{}: {:?} is not a SHA-256", f.path, f.sha256));
        }
        if cache.has(f) {
            stats.cached += 1;
            done += f.size;
            continue;
        }
        let part = cache.partial(&f.sha256);
        let mut have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if have > f.size {
            have = 0;
            let _ = std::fs::remove_file(&part);
        }
        stats.resumed_bytes += have;
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .map_err(|e| format!("opening {}: {e}", part.display()))?;
        while have < f.size {
            let (data, size) = src.chunk(&f.sha256, have, CHUNK).await?;
            if size != f.size {
                return Err(format!("{}: the controller has {size} bytes, the manifest says {}", f.path, f.size));
            }
            if data.is_empty() {
                return Err(format!("{}: empty chunk at offset {have} of {size}", f.path));
            }
            out.write_all(&data).map_err(|e| format!("writing {}: {e}", part.display()))?;
            have += data.len() as u64;
            stats.bytes += data.len() as u64;
            progress(done + have, total);
        }
        out.sync_all().map_err(|e| format!("syncing {}: {e}", part.display()))?;
        drop(out);
        let got = sha256_file(&part).map_err(|e| format!("reading {}: {e}", part.display()))?;
        if got != f.sha256 {
            let _ = std::fs::remove_file(&part);
            return Err(format!(
                "{}: fetched content has SHA-256 {got}, expected {}; discarded, it will be fetched again",
                f.path, f.sha256
            ));
        }
        std::fs::rename(&part, cache.path(&f.sha256)).map_err(|e| format!("storing {}: {e}", f.path))?;
        stats.fetched += 1;
        done += f.size;
    }
    Ok(stats)
}

/// The controller as a chunk source.
pub struct Remote {
    pub bundle: String,
    pub client: fleetadm_proto::agent_client::AgentClient<tonic::transport::Channel>,
}

impl ChunkSource for Remote {
    async fn chunk(&mut self, sha256: &str, offset: u64, max: u32) -> Result<(Vec<u8>, u64), String> {
        let r = self
            .client
            .fetch_blob(fleetadm_proto::FetchBlobRequest {
                bundle: self.bundle.clone(),
                sha256: sha256.to_string(),
                offset,
                max_len: max,
            })
            .await
            .map_err(|st| fleetadm_common::dial::explain_status(&st))?
            .into_inner();
        Ok((r.data, r.size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves blobs from memory; fails once after `cut_after` chunks, counts what it served.
    struct Fake {
        blobs: std::collections::HashMap<String, Vec<u8>>,
        cut_after: Option<usize>,
        served: usize,
        bytes: u64,
    }

    impl ChunkSource for Fake {
        async fn chunk(&mut self, sha256: &str, offset: u64, max: u32) -> Result<(Vec<u8>, u64), String> {
            if self.cut_after == Some(self.served) {
                self.cut_after = None;
                return Err("connection reset".into());
            }
            let b = self.blobs.get(sha256).ok_or("unknown blob")?;
            let end = (offset as usize + max as usize).min(b.len());
            self.served += 1;
            self.bytes += (end - offset as usize) as u64;
            Ok((b[offset as usize..end].to_vec(), b.len() as u64))
        }
    }

    fn file(path: &str, body: &[u8]) -> BundleFile {
        BundleFile {
            path: path.into(),
            size: body.len() as u64,
            mode: 0o755,
            sha256: hex::encode(Sha256::digest(body)),
        }
    }

    #[tokio::test]
    async fn resumes_after_a_cut_and_never_refetches() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(dir.path());
        let big: Vec<u8> = (0..(CHUNK as usize * 5 + 123)).map(|i| (i % 251) as u8).collect();
        let small = b"kubelet".to_vec();
        let files = vec![file("bin/kubeadm", &big), file("bin/kubectl", &big), file("bin/kubelet", &small)];
        let mut src = Fake {
            blobs: [(files[0].sha256.clone(), big.clone()), (files[2].sha256.clone(), small.clone())].into(),
            cut_after: Some(3),
            served: 0,
            bytes: 0,
        };
        let err = fetch_all(&cache, &mut src, &files, |_, _| {}).await.unwrap_err();
        assert!(err.contains("connection reset"));
        assert_eq!(src.bytes, 3 * CHUNK as u64, "three chunks arrived before the cut");
        src.bytes = 0;
        let mut last = (0, 0);
        let stats = fetch_all(&cache, &mut src, &files, |d, t| last = (d, t)).await.unwrap();
        assert_eq!(stats.resumed_bytes, 3 * CHUNK as u64);
        assert_eq!(src.bytes, big.len() as u64 - 3 * CHUNK as u64 + small.len() as u64, "only the missing part");
        assert_eq!(stats.fetched, 2, "kubeadm and kubectl share one blob");
        assert_eq!(last, ((big.len() + small.len()) as u64, (big.len() + small.len()) as u64));
        assert_eq!(std::fs::read(cache.path(&files[0].sha256)).unwrap(), big);
        src.bytes = 0;
        let stats = fetch_all(&cache, &mut src, &files, |_, _| {}).await.unwrap();
        assert_eq!((stats.cached, stats.fetched, src.bytes), (2, 0, 0), "nothing fetched twice");
    }

    #[tokio::test]
    async fn corrupt_content_is_discarded_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(dir.path());
        let mut f = file("bin/kubeadm", b"the real thing");
        let mut src = Fake {
            blobs: [(f.sha256.clone(), b"the evil thing".to_vec())].into(),
            cut_after: None,
            served: 0,
            bytes: 0,
        };
        let err = fetch_all(&cache, &mut src, std::slice::from_ref(&f), |_, _| {}).await.unwrap_err();
        assert!(err.contains("discarded"), "{err}");
        assert!(!cache.has(&f) && !cache.partial(&f.sha256).exists());
        f.size += 1;
        let err = fetch_all(&cache, &mut src, std::slice::from_ref(&f), |_, _| {}).await.unwrap_err();
        assert!(err.contains("manifest says"), "{err}");
    }
}

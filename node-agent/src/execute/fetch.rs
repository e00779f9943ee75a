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

/// Chunk requests in flight per blob (hides the round trip; the order of writes is kept).
pub const DEPTH: usize = 4;

type ChunkResult = Result<(Vec<u8>, u64), String>;

/// Where chunks come from (the controller in production, a fake in tests). Cheap to clone: each
/// request in flight works on its own clone.
pub trait ChunkSource: Clone + Send + 'static {
    /// Up to `max` bytes of blob `sha256` from `offset`, and the blob's total size.
    fn chunk(
        &self,
        sha256: String,
        offset: u64,
        max: u32,
    ) -> impl std::future::Future<Output = ChunkResult> + Send + 'static;
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
        // Up to DEPTH requests in flight, each for its own offset; written strictly in order.
        let mut inflight = std::collections::VecDeque::new();
        let mut next = have;
        while have < f.size {
            while inflight.len() < DEPTH && next < f.size {
                let want = CHUNK.min((f.size - next).min(u64::from(u32::MAX)) as u32);
                inflight.push_back((next, tokio::spawn(src.chunk(f.sha256.clone(), next, want))));
                next += u64::from(want);
            }
            let Some((offset, job)) = inflight.pop_front() else { break };
            let (data, size) = match job.await {
                Ok(r) => r,
                Err(e) => Err(format!("chunk request failed: {e}")),
            }
            .inspect_err(|_| inflight.iter().for_each(|(_, j)| j.abort()))?;
            if size != f.size {
                inflight.iter().for_each(|(_, j)| j.abort());
                return Err(format!("{}: the controller has {size} bytes, the manifest says {}", f.path, f.size));
            }
            let expect = CHUNK.min((f.size - offset) as u32) as usize;
            if offset != have || data.len() != expect {
                inflight.iter().for_each(|(_, j)| j.abort());
                return Err(format!(
                    "{}: chunk at offset {offset} has {} bytes, expected {expect}",
                    f.path,
                    data.len()
                ));
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
#[derive(Clone)]
pub struct Remote {
    pub bundle: String,
    pub client: fleetadm_proto::agent_client::AgentClient<tonic::transport::Channel>,
}

impl ChunkSource for Remote {
    fn chunk(
        &self,
        sha256: String,
        offset: u64,
        max: u32,
    ) -> impl std::future::Future<Output = ChunkResult> + Send + 'static {
        let mut client = self.client.clone();
        let bundle = self.bundle.clone();
        async move {
            let r = client
                .fetch_blob(fleetadm_proto::FetchBlobRequest { bundle, sha256, offset, max_len: max })
                .await
                .map_err(|st| fleetadm_common::dial::explain_status(&st))?
                .into_inner();
            Ok((r.data, r.size))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct State {
        blobs: std::collections::HashMap<String, Vec<u8>>,
        /// Requests for offsets at or beyond this fail (the connection was cut there), once.
        cut_at: Option<u64>,
        bytes: u64,
    }

    /// Serves blobs from memory; counts what it served.
    #[derive(Clone, Default)]
    struct Fake(std::sync::Arc<std::sync::Mutex<State>>);

    impl Fake {
        fn bytes(&self) -> u64 {
            self.0.lock().unwrap().bytes
        }
        fn reset_bytes(&self) {
            self.0.lock().unwrap().bytes = 0;
        }
    }

    impl ChunkSource for Fake {
        fn chunk(
            &self,
            sha256: String,
            offset: u64,
            max: u32,
        ) -> impl std::future::Future<Output = ChunkResult> + Send + 'static {
            let me = self.clone();
            async move {
                let mut st = me.0.lock().unwrap();
                if st.cut_at.is_some_and(|c| offset >= c) {
                    return Err("connection reset".into());
                }
                let b = st.blobs.get(&sha256).ok_or("unknown blob")?.clone();
                let end = (offset as usize + max as usize).min(b.len());
                st.bytes += (end - offset as usize) as u64;
                Ok((b[offset as usize..end].to_vec(), b.len() as u64))
            }
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
        let src = Fake::default();
        {
            let mut st = src.0.lock().unwrap();
            st.blobs = [(files[0].sha256.clone(), big.clone()), (files[2].sha256.clone(), small.clone())].into();
            st.cut_at = Some(3 * CHUNK as u64);
        }
        let mut s = src.clone();
        let err = fetch_all(&cache, &mut s, &files, |_, _| {}).await.unwrap_err();
        assert!(err.contains("connection reset"));
        let part = std::fs::metadata(cache.partial(&files[0].sha256)).unwrap().len();
        assert_eq!(part, 3 * CHUNK as u64, "the three chunks before the cut are kept");
        src.0.lock().unwrap().cut_at = None;
        src.reset_bytes();
        let mut last = (0, 0);
        let stats = fetch_all(&cache, &mut s, &files, |d, t| last = (d, t)).await.unwrap();
        assert_eq!(stats.resumed_bytes, 3 * CHUNK as u64);
        assert_eq!(src.bytes(), big.len() as u64 - 3 * CHUNK as u64 + small.len() as u64, "only the missing part");
        assert_eq!(stats.fetched, 2, "kubeadm and kubectl share one blob");
        assert_eq!(last, ((big.len() + small.len()) as u64, (big.len() + small.len()) as u64));
        assert_eq!(std::fs::read(cache.path(&files[0].sha256)).unwrap(), big);
        src.reset_bytes();
        let stats = fetch_all(&cache, &mut s, &files, |_, _| {}).await.unwrap();
        assert_eq!((stats.cached, stats.fetched, src.bytes()), (2, 0, 0), "nothing fetched twice");
    }

    #[tokio::test]
    async fn corrupt_content_is_discarded_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(dir.path());
        let mut f = file("bin/kubeadm", b"the real thing");
        let mut src = Fake::default();
        src.0.lock().unwrap().blobs = [(f.sha256.clone(), b"the evil thing".to_vec())].into();
        let err = fetch_all(&cache, &mut src, std::slice::from_ref(&f), |_, _| {}).await.unwrap_err();
        assert!(err.contains("discarded"), "{err}");
        assert!(!cache.has(&f) && !cache.partial(&f.sha256).exists());
        f.size += 1;
        let err = fetch_all(&cache, &mut src, std::slice::from_ref(&f), |_, _| {}).await.unwrap_err();
        assert!(err.contains("manifest says"), "{err}");
    }
}

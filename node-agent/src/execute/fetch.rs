//! The `fetch-bundle` task: pull a bundle's blobs into the agent's cache over the mTLS session,
//! in chunks, resuming a cut transfer from what is already on disk, verifying every blob's
//! SHA-256 before it is used, and never fetching a blob the cache already holds.
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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

    /// Is the blob cached and intact (its SHA-256 checked, not just its size)? A corrupt one is
    /// deleted, so it is fetched again. Blocking: hashes the whole file.
    pub fn verified(&self, f: &BundleFile) -> Result<bool, FetchError> {
        if !is_sha256_hex(&f.sha256) || !self.has(f) {
            return Ok(false);
        }
        let p = self.path(&f.sha256);
        let got = sha256_file(&p).map_err(io("reading", &p))?;
        if got == f.sha256 {
            return Ok(true);
        }
        tracing::warn!(path = %f.path, blob = %f.sha256, %got, "cached blob is corrupt; fetching it again");
        std::fs::remove_file(&p).map_err(io("removing", &p))?;
        Ok(false)
    }
}

/// Chunk requests in flight per blob (hides the round trip; the order of writes is kept).
pub const DEPTH: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{path}: {sha:?} is not a SHA-256")]
    BadHash { path: String, sha: String },
    #[error("chunk of {path} at offset {offset}: {why}")]
    Chunk { path: String, offset: u64, why: String },
    #[error("{path}: the controller has {have} bytes, the manifest says {want}")]
    SizeMismatch { path: String, have: u64, want: u64 },
    #[error("{path}: chunk at offset {offset} has {got} bytes, expected {want}")]
    ShortChunk { path: String, offset: u64, got: usize, want: usize },
    #[error("{path}: fetched content has SHA-256 {got}, expected {want}; discarded, it will be fetched again")]
    Corrupt { path: String, got: String, want: String },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FetchError {
    let path = path.display().to_string();
    move |source| FetchError::Io { what, path, source }
}

type ChunkResult = Result<(Vec<u8>, u64), String>;

/// Where chunks come from (the controller in production, a fake in tests). Cheap to clone: each
/// request in flight works on its own clone.
pub trait ChunkSource: Clone + Send + 'static {
    /// Up to `max` bytes of blob `sha256` (`size` bytes, as the manifest says) from `offset`,
    /// and the blob's total size.
    fn chunk(
        &self,
        sha256: String,
        size: u64,
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

pub(crate) fn sha256_file(p: &Path) -> std::io::Result<String> {
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

/// Blocking file work on a blocking thread.
async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FetchError> + Send + 'static,
) -> Result<T, FetchError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(FetchError::Io {
            what: "worker thread for",
            path: String::new(),
            source: std::io::Error::other(e.to_string()),
        })
    })
}

/// Fetch every file's blob that is not cached yet. `progress(done_bytes, total_bytes)`. File
/// writes, fsyncs and hashing run on blocking threads.
pub async fn fetch_all<S: ChunkSource>(
    cache: &BlobCache,
    src: &mut S,
    files: &[BundleFile],
    mut progress: impl FnMut(u64, u64),
) -> Result<FetchStats, FetchError> {
    let dir = cache.dir.clone();
    off_thread(move || std::fs::create_dir_all(&dir).map_err(io("creating", &dir))).await?;
    let mut stats = FetchStats::default();
    let mut seen = std::collections::BTreeSet::new();
    let unique: Vec<&BundleFile> = files.iter().filter(|f| seen.insert(f.sha256.clone())).collect();
    let total: u64 = unique.iter().map(|f| f.size).sum();
    let mut done = 0u64;
    for f in unique {
        if !is_sha256_hex(&f.sha256) {
            return Err(FetchError::BadHash { path: f.path.clone(), sha: f.sha256.clone() });
        }
        let (c, fc) = (BlobCache { dir: cache.dir.clone() }, f.clone());
        if off_thread(move || c.verified(&fc)).await? {
            stats.cached += 1;
            done += f.size;
            continue;
        }
        let part = cache.partial(&f.sha256);
        let mut have = tokio::fs::metadata(&part).await.map(|m| m.len()).unwrap_or(0);
        if have > f.size {
            have = 0;
            let _ = tokio::fs::remove_file(&part).await;
        }
        stats.resumed_bytes += have;
        let mut out = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&part)
            .await
            .map_err(io("opening", &part))?;
        // Up to DEPTH requests in flight, each for its own offset; written strictly in order.
        let mut inflight = std::collections::VecDeque::new();
        let mut next = have;
        let abort_all = |inflight: &std::collections::VecDeque<(u64, tokio::task::JoinHandle<ChunkResult>)>| {
            inflight.iter().for_each(|(_, j)| j.abort())
        };
        while have < f.size {
            while inflight.len() < DEPTH && next < f.size {
                let want = CHUNK.min((f.size - next).min(u64::from(u32::MAX)) as u32);
                inflight.push_back((next, tokio::spawn(src.chunk(f.sha256.clone(), f.size, next, want))));
                next += u64::from(want);
            }
            let Some((offset, job)) = inflight.pop_front() else { break };
            let chunk = match job.await {
                Ok(r) => r,
                Err(e) => Err(format!("request failed: {e}")),
            };
            let (data, size) = match chunk {
                Ok(c) => c,
                Err(why) => {
                    abort_all(&inflight);
                    return Err(FetchError::Chunk { path: f.path.clone(), offset, why });
                }
            };
            if size != f.size {
                abort_all(&inflight);
                return Err(FetchError::SizeMismatch { path: f.path.clone(), have: size, want: f.size });
            }
            let expect = CHUNK.min((f.size - offset) as u32) as usize;
            if offset != have || data.len() != expect {
                abort_all(&inflight);
                return Err(FetchError::ShortChunk { path: f.path.clone(), offset, got: data.len(), want: expect });
            }
            // tokio writes in the background; flush so what is acknowledged here is in the file
            // (a cut transfer resumes from the file's length).
            tokio::io::AsyncWriteExt::write_all(&mut out, &data).await.map_err(io("writing", &part))?;
            tokio::io::AsyncWriteExt::flush(&mut out).await.map_err(io("writing", &part))?;
            have += data.len() as u64;
            stats.bytes += data.len() as u64;
            progress(done + have, total);
        }
        out.sync_all().await.map_err(io("syncing", &part))?;
        drop(out);
        let (p, want, path, dest) = (part.clone(), f.sha256.clone(), f.path.clone(), cache.path(&f.sha256));
        off_thread(move || {
            let got = sha256_file(&p).map_err(io("reading", &p))?;
            if got != want {
                let _ = std::fs::remove_file(&p);
                return Err(FetchError::Corrupt { path, got, want });
            }
            std::fs::rename(&p, &dest).map_err(io("storing", &dest))
        })
        .await?;
        stats.fetched += 1;
        done += f.size;
    }
    Ok(stats)
}

/// The controller as a chunk source, over the session's own connection: when the session drops,
/// a request waits (up to [`RECONNECT_WAIT`]) for the next one instead of dialling its own.
/// With `peers` (this agent serves peers too), the controller may send it to a peer for a blob:
/// the chunks then come from that peer, and from the controller again if the peer fails.
#[derive(Clone)]
pub struct Remote {
    pub bundle: String,
    pub channel: super::handler::SessionChannel,
    pub peers: Option<crate::identity::StateDir>,
    routes: Arc<Mutex<HashMap<String, Route>>>,
}

impl Remote {
    pub fn new(
        bundle: String,
        channel: super::handler::SessionChannel,
        peers: Option<crate::identity::StateDir>,
    ) -> Self {
        Self { bundle, channel, peers, routes: Arc::default() }
    }
}

type PeerClient = fleetadm_proto::peer_client::PeerClient<tonic::transport::Channel>;

/// Where one blob's chunks come from.
#[derive(Clone)]
enum Route {
    /// The controller answered with data (it keeps doing so for this blob).
    Controller,
    /// A peer the controller chose, dialled once and shared by the requests in flight.
    Peer { source: fleetadm_proto::PeerSource, client: Arc<tokio::sync::OnceCell<PeerClient>> },
    /// A peer failed: the controller, and no peer again for this blob.
    GaveUp,
}

/// How long a chunk request waits for a session to come back.
pub const RECONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

impl ChunkSource for Remote {
    fn chunk(
        &self,
        sha256: String,
        size: u64,
        offset: u64,
        max: u32,
    ) -> impl std::future::Future<Output = ChunkResult> + Send + 'static {
        let me = self.clone();
        async move {
            loop {
                let route = me.routes.lock().ok().and_then(|r| r.get(&sha256).cloned());
                match route {
                    Some(Route::Peer { source, client }) => {
                        match from_peer(&me, &source, &client, &sha256, size, offset, max).await {
                            Ok(c) => return Ok(c),
                            Err(why) => {
                                tracing::warn!(peer = %source.node, blob = %sha256, %why, "peer failed; fetching from the controller");
                                if let Ok(mut r) = me.routes.lock() {
                                    r.insert(sha256.clone(), Route::GaveUp);
                                }
                            }
                        }
                    }
                    other => {
                        let peers_ok = me.peers.is_some() && other.is_none();
                        let r = from_controller(&me, &sha256, offset, max, peers_ok).await?;
                        if r.peer.is_some() && !peers_ok {
                            // Asking again would loop: a controller that does this is broken.
                            return Err("the controller sent a peer for a blob fetched without peers".into());
                        }
                        let Some(source) = r.peer else {
                            if peers_ok {
                                if let Ok(mut routes) = me.routes.lock() {
                                    routes.entry(sha256.clone()).or_insert(Route::Controller);
                                }
                            }
                            return Ok((r.data, r.size));
                        };
                        if let Ok(mut routes) = me.routes.lock() {
                            if let std::collections::hash_map::Entry::Vacant(e) = routes.entry(sha256.clone()) {
                                tracing::info!(peer = %source.node, address = %source.address, blob = %sha256, "fetching from a peer");
                                let client = Arc::new(tokio::sync::OnceCell::new());
                                e.insert(Route::Peer { source, client });
                            }
                        }
                    }
                }
            }
        }
    }
}

async fn from_peer(
    me: &Remote,
    source: &fleetadm_proto::PeerSource,
    client: &tokio::sync::OnceCell<PeerClient>,
    sha256: &str,
    size: u64,
    offset: u64,
    max: u32,
) -> ChunkResult {
    let dir = me.peers.as_ref().ok_or("peers are off")?;
    let c = client.get_or_try_init(|| crate::peer::dial(dir, &source.node, &source.address)).await?;
    let req = fleetadm_proto::PeerChunkRequest {
        ticket: source.ticket.clone(),
        sha256: sha256.to_string(),
        offset,
        max_len: max,
        size,
    };
    let mut req = tonic::Request::new(req);
    req.set_timeout(crate::peer::RANGE_WAIT + std::time::Duration::from_secs(10));
    let r = c.clone().peer_chunk(req).await.map_err(|st| fleetadm_common::dial::explain_status(&st))?.into_inner();
    Ok((r.data, r.size))
}

async fn from_controller(
    me: &Remote,
    sha256: &str,
    offset: u64,
    max: u32,
    peers_ok: bool,
) -> Result<fleetadm_proto::BlobChunk, String> {
    let mut channel = me.channel.clone();
    let (bundle, sha256) = (me.bundle.clone(), sha256.to_string());
    {
        let client = tokio::time::timeout(RECONNECT_WAIT, channel.wait_for(|c| c.is_some()))
            .await
            .map_err(|_| format!("no session with the controller for {}s", RECONNECT_WAIT.as_secs()))?
            .map_err(|_| "the agent is stopping".to_string())?
            .clone();
        let mut client = client.ok_or("no session")?;
        let r = client
            .fetch_blob(fleetadm_proto::FetchBlobRequest { bundle, sha256, offset, max_len: max, peers_ok })
            .await
            .map_err(|st| fleetadm_common::dial::explain_status(&st))?
            .into_inner();
        Ok(r)
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
            _size: u64,
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
        assert!(err.to_string().contains("connection reset"), "{err}");
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
        // A cached blob that went bad (same size) is not reused: it is fetched again.
        let mut bad = small.clone();
        bad[0] ^= 1;
        std::fs::write(cache.path(&files[2].sha256), &bad).unwrap();
        let stats = fetch_all(&cache, &mut s, &files, |_, _| {}).await.unwrap();
        assert_eq!((stats.cached, stats.fetched, src.bytes()), (1, 1, small.len() as u64));
        assert_eq!(std::fs::read(cache.path(&files[2].sha256)).unwrap(), small);
    }

    #[tokio::test]
    async fn corrupt_content_is_discarded_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(dir.path());
        let mut f = file("bin/kubeadm", b"the real thing");
        let mut src = Fake::default();
        src.0.lock().unwrap().blobs = [(f.sha256.clone(), b"the evil thing".to_vec())].into();
        let err = fetch_all(&cache, &mut src, std::slice::from_ref(&f), |_, _| {}).await.unwrap_err();
        assert!(matches!(err, FetchError::Corrupt { .. }) && err.to_string().contains("discarded"), "{err}");
        assert!(!cache.has(&f) && !cache.partial(&f.sha256).exists());
        f.size += 1;
        let err = fetch_all(&cache, &mut src, std::slice::from_ref(&f), |_, _| {}).await.unwrap_err();
        assert!(err.to_string().contains("manifest says"), "{err}");
    }
}

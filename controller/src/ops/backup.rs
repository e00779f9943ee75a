//! etcd backups: a snapshot taken on a healthy master through its agent (`etcd-snapshot`
//! task), uploaded in chunks that only that agent may send for that task, verified by size and
//! SHA-256, and kept in a content-addressed store of its own under `DATA_DIR/backups`. Each
//! backup's record (cluster, master, time, size, revision) is flushed before it is listed; the
//! oldest beyond the cluster's retention are dropped. The schedule (`cluster set --backup-every`)
//! is run by [`schedule`].
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetadm_proto::task_assignment::Task;
use fleetadm_proto::{EtcdSnapshotTask, SnapshotChunk, TaskKind};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use thiserror::Error;

use super::exec::Execs;
use crate::bundle::blobs::BlobStore;
use crate::rollout::record::ClusterState;
use crate::rollout::Rollouts;
use crate::store::{self, Durability, Store, StoreError, Table};

/// Largest snapshot accepted (etcd's default backend quota is 2 GiB, the largest allowed 8 GiB).
pub const MAX_SNAPSHOT: u64 = 8 << 30;
/// Largest chunk accepted in one call.
pub const MAX_CHUNK: usize = 4 << 20;
/// How long a master may take to save and upload a snapshot.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Debug, Error)]
pub enum BackupError {
    #[error("cluster {0} not found (see `controller cluster list`)")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
    #[error("no master of cluster {cluster} can take a snapshot now: {why}")]
    NoMaster { cluster: String, why: String },
    #[error("the snapshot from {host} failed: {why}")]
    Snapshot { host: String, why: String },
    #[error("backup store {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Blob(#[from] crate::bundle::BundleError),
    #[error(transparent)]
    Rollout(#[from] crate::rollout::RolloutError),
}

/// Why an upload chunk is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum UploadRejected {
    #[error("no snapshot upload is expected for task {0}")]
    Unexpected(String),
    #[error("task {task} is not this node's (it belongs to {owner})")]
    NotYours { task: String, owner: String },
    #[error("{0}")]
    Invalid(String),
    #[error("the snapshot does not match what was announced: {0}")]
    Corrupt(String),
    #[error("storing the snapshot: {0}")]
    Internal(String),
}

/// One backup, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupRecord {
    pub id: String,
    pub cluster: String,
    pub host: String,
    pub taken_ms: u64,
    pub size: u64,
    pub sha256: String,
    pub revision: u64,
    pub total_keys: u64,
    pub scheduled: bool,
}

/// An upload in progress: who may send it, how much has arrived.
struct Slot {
    owner: String,
    tmp: PathBuf,
    announced: Option<(u64, String)>,
    received: u64,
    hasher: sha2::Sha256,
    done: bool,
}

pub struct Backups {
    store: Arc<dyn Store>,
    blobs: BlobStore,
    tmp_dir: PathBuf,
    uploads: Mutex<HashMap<String, Slot>>,
    /// One backup per cluster at a time.
    busy: Mutex<std::collections::HashSet<String>>,
}

fn key(cluster: &str, id: &str) -> String {
    format!("{cluster}/{id}")
}

impl Backups {
    pub fn new(store: Arc<dyn Store>, data_dir: &std::path::Path) -> Arc<Self> {
        Arc::new(Self {
            store,
            blobs: BlobStore::at(data_dir.join("backups").join("sha256")),
            tmp_dir: data_dir.join("backups").join("incoming"),
            uploads: Mutex::default(),
            busy: Mutex::default(),
        })
    }

    /// The cluster's backups, oldest first.
    pub fn list(&self, cluster: &str) -> Result<Vec<BackupRecord>, StoreError> {
        let mut v: Vec<BackupRecord> = store::list_prefix_json(&*self.store, Table::Backups, &format!("{cluster}/"))?;
        v.sort_by(|a, b| (a.taken_ms, &a.id).cmp(&(b.taken_ms, &b.id)));
        Ok(v)
    }

    /// Is the backup's snapshot in the store and intact?
    pub fn holds(&self, rec: &BackupRecord) -> bool {
        self.blobs.verified(&rec.sha256, rec.size).unwrap_or(false)
    }

    /// Up to `max` bytes of a stored snapshot from `offset`, and its size (for a restore).
    pub fn read_chunk(&self, sha256: &str, offset: u64, max: usize) -> Result<(Vec<u8>, u64), BackupError> {
        Ok(self.blobs.read_chunk(sha256, offset, max)?)
    }

    /// Where a backup's snapshot file is (for restores and for operators).
    pub fn path(&self, rec: &BackupRecord) -> PathBuf {
        self.blobs.path(&rec.sha256)
    }

    /// One chunk of the upload for `chunk.task_id`, from `node`. Returns how many bytes the
    /// controller holds (a repeated or out-of-order chunk is answered with that, not written).
    pub fn accept(&self, node: &str, chunk: &SnapshotChunk) -> Result<u64, UploadRejected> {
        if chunk.data.len() > MAX_CHUNK {
            return Err(UploadRejected::Invalid(format!("chunks are at most {MAX_CHUNK} bytes")));
        }
        if chunk.total_size > MAX_SNAPSHOT {
            return Err(UploadRejected::Invalid(format!(
                "a snapshot of {} bytes is larger than the {} bytes accepted",
                chunk.total_size, MAX_SNAPSHOT
            )));
        }
        if chunk.sha256.len() != 64 || !chunk.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(UploadRejected::Invalid("sha256 must be 64 hex digits".into()));
        }
        let mut uploads = self.uploads.lock().map_err(|_| UploadRejected::Internal("lock".into()))?;
        let slot = uploads.get_mut(&chunk.task_id).ok_or_else(|| UploadRejected::Unexpected(chunk.task_id.clone()))?;
        if slot.owner != node {
            return Err(UploadRejected::NotYours { task: chunk.task_id.clone(), owner: slot.owner.clone() });
        }
        let announced = (chunk.total_size, chunk.sha256.to_ascii_lowercase());
        match &slot.announced {
            None => slot.announced = Some(announced.clone()),
            Some(a) if *a != announced => {
                return Err(UploadRejected::Invalid("size and sha256 must be the same in every chunk".into()))
            }
            Some(_) => {}
        }
        if slot.done || chunk.offset != slot.received {
            return Ok(slot.received);
        }
        if slot.received + chunk.data.len() as u64 > announced.0 {
            return Err(UploadRejected::Invalid(format!("more data than the {} bytes announced", announced.0)));
        }
        // (a chunk of at most a few MiB: appended under the lock, in order)
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&slot.tmp)
            .map_err(|e| UploadRejected::Internal(format!("{}: {e}", slot.tmp.display())))?;
        f.write_all(&chunk.data).map_err(|e| UploadRejected::Internal(e.to_string()))?;
        slot.hasher.update(&chunk.data);
        slot.received += chunk.data.len() as u64;
        if slot.received == announced.0 {
            f.sync_all().map_err(|e| UploadRejected::Internal(e.to_string()))?;
            let got = hex::encode(std::mem::take(&mut slot.hasher).finalize());
            if got != announced.1 {
                let _ = std::fs::remove_file(&slot.tmp);
                slot.received = 0;
                slot.announced = None;
                return Err(UploadRejected::Corrupt(format!("SHA-256 {got}, announced {}", announced.1)));
            }
            slot.done = true;
        }
        Ok(slot.received)
    }

    /// Take a backup of `cluster` now: on the first connected master that can, verified and
    /// recorded (flushed), then the retention applied. The store and file work runs on blocking
    /// threads; only the wait for the agent is async.
    pub async fn take(
        self: &Arc<Self>,
        rollouts: &Arc<Rollouts>,
        execs: &Arc<Execs>,
        cluster: &str,
        scheduled: bool,
    ) -> Result<BackupRecord, BackupError> {
        let (r2, c2) = (rollouts.clone(), cluster.to_string());
        let rec = off_thread(move || {
            r2.get(&c2).map_err(|e| match e {
                crate::rollout::RolloutError::NotFound(n) => BackupError::NotFound(n),
                other => BackupError::Rollout(other),
            })
        })
        .await?;
        if rec.deleting {
            return Err(BackupError::Refused(format!("cluster {cluster} is being deleted")));
        }
        if rec.state != ClusterState::Succeeded && rec.operation == crate::rollout::record::Operation::Create {
            return Err(BackupError::Refused(format!(
                "cluster {cluster} is not up yet ({}); back it up once it is",
                rec.state
            )));
        }
        let _guard = {
            let mut b = self.busy.lock().map_err(|_| BackupError::Refused("internal lock".into()))?;
            if !b.insert(cluster.to_string()) {
                return Err(BackupError::Refused(format!("a backup of cluster {cluster} is running already")));
            }
            Busy { backups: self.clone(), cluster: cluster.to_string() }
        };
        let capability = TaskKind::EtcdSnapshot.capability();
        let mut why = Vec::new();
        for m in &rec.shape.masters {
            let Some(info) = execs.sessions().info(&m.node) else {
                why.push(format!("{} is not connected", m.node));
                continue;
            };
            if !info.meta.capabilities.contains(&capability) {
                why.push(format!("{} runs agent {} without {capability}", m.node, info.meta.agent_version));
                continue;
            }
            let taken_ms = fleetadm_common::clock::now_unix_ms();
            let id = format!("etcd-{taken_ms}");
            let op = format!("backup-{cluster}-{taken_ms}");
            let task_id = format!("{}{op}/{}", super::exec::PREFIX, m.node);
            let tmp = self.tmp_dir.join(format!("{op}.part"));
            let (me, t2) = (self.clone(), tmp.clone());
            off_thread(move || {
                std::fs::create_dir_all(&me.tmp_dir)
                    .map_err(|source| BackupError::Io { path: me.tmp_dir.display().to_string(), source })?;
                let _ = std::fs::remove_file(&t2);
                Ok(())
            })
            .await?;
            if let Ok(mut u) = self.uploads.lock() {
                u.insert(
                    task_id.clone(),
                    Slot {
                        owner: m.node.clone(),
                        tmp: tmp.clone(),
                        announced: None,
                        received: 0,
                        hasher: sha2::Sha256::new(),
                        done: false,
                    },
                );
            }
            let task = Task::EtcdSnapshot(EtcdSnapshotTask { endpoint: "127.0.0.1:2379".into(), ..Default::default() });
            let answer = execs.ask(&op, &m.node, task, SNAPSHOT_TIMEOUT).await;
            let slot = self.uploads.lock().ok().and_then(|mut u| u.remove(&task_id));
            let (me, host, cluster_name) = (self.clone(), m.node.clone(), cluster.to_string());
            let keep = rec.spec.backup_keep as usize;
            let outcome = off_thread(move || {
                let stored = (|| {
                    let report = answer.map_err(|why| BackupError::Snapshot { host: host.clone(), why })?;
                    let info = report.snapshot.ok_or_else(|| BackupError::Snapshot {
                        host: host.clone(),
                        why: "the report names no snapshot".into(),
                    })?;
                    let slot = slot.ok_or_else(|| BackupError::Refused("internal: upload slot gone".into()))?;
                    if !slot.done || slot.announced != Some((info.size, info.sha256.clone())) {
                        return Err(BackupError::Snapshot {
                            host: host.clone(),
                            why: format!(
                                "{} of {} bytes arrived; the upload does not match the snapshot reported",
                                slot.received, info.size
                            ),
                        });
                    }
                    // (hashed again while copied in: what is kept is what was announced)
                    me.blobs.put_file(&tmp, &info.sha256, info.size)?;
                    let b = BackupRecord {
                        id,
                        cluster: cluster_name.clone(),
                        host: host.clone(),
                        taken_ms,
                        size: info.size,
                        sha256: info.sha256,
                        revision: info.revision,
                        total_keys: info.total_keys,
                        scheduled,
                    };
                    store::put_json(&*me.store, Table::Backups, &key(&cluster_name, &b.id), &b, Durability::Flush)?;
                    if keep > 0 {
                        me.prune(&cluster_name, keep)?;
                    }
                    Ok(b)
                })();
                let _ = std::fs::remove_file(&tmp);
                stored
            })
            .await;
            match outcome {
                Ok(b) => {
                    tracing::info!(cluster, host = %b.host, id = %b.id, size = b.size, revision = b.revision, "etcd backup stored");
                    return Ok(b);
                }
                // A failed snapshot on one master: the next one is tried.
                Err(e) => {
                    tracing::warn!(cluster, host = %m.node, error = %fleetadm_common::error_chain(&e), "etcd snapshot failed");
                    why.push(fleetadm_common::error_chain(&e));
                }
            }
        }
        Err(BackupError::NoMaster { cluster: cluster.to_string(), why: why.join("; ") })
    }

    /// Keep the newest `keep` backups of `cluster`; the blobs of the others go unless another
    /// backup has the same content.
    pub fn prune(&self, cluster: &str, keep: usize) -> Result<Vec<BackupRecord>, BackupError> {
        let all = self.list(cluster)?;
        let drop = all.len().saturating_sub(keep);
        let (old, kept) = all.split_at(drop);
        for b in old {
            self.store.remove(Table::Backups, &key(cluster, &b.id), Durability::Flush)?;
            if !kept.iter().any(|k| k.sha256 == b.sha256) {
                self.blobs.remove(&b.sha256)?;
            }
            tracing::info!(cluster, id = %b.id, "old etcd backup dropped (retention)");
        }
        Ok(old.to_vec())
    }
}

/// Run store and file work on a blocking thread.
async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BackupError> + Send + 'static,
) -> Result<T, BackupError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| BackupError::Refused(format!("internal: worker failed: {e}")))?
}

/// Marks a cluster's backup as no longer running when dropped.
struct Busy {
    backups: Arc<Backups>,
    cluster: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Ok(mut b) = self.backups.busy.lock() {
            b.remove(&self.cluster);
        }
    }
}

/// The backup schedule: every minute, each cluster that is up and whose newest backup is older
/// than its `backup_every` gets one (a failure is logged and tried again on the next round).
pub async fn schedule(backups: Arc<Backups>, rollouts: Arc<Rollouts>, execs: Arc<Execs>, round: Duration) {
    let mut tick = tokio::time::interval(round);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let r2 = rollouts.clone();
        let Ok(Ok(clusters)) = tokio::task::spawn_blocking(move || r2.list()).await else { continue };
        let now = fleetadm_common::clock::now_unix_ms();
        for c in clusters {
            let every = c.spec.backup_every_secs.saturating_mul(1000);
            if every == 0 || c.state != ClusterState::Succeeded || c.deleting {
                continue;
            }
            let (b2, name) = (backups.clone(), c.name.clone());
            let newest = tokio::task::spawn_blocking(move || b2.list(&name))
                .await
                .ok()
                .and_then(Result::ok)
                .and_then(|l| l.last().map(|b| b.taken_ms))
                .unwrap_or(0);
            if now.saturating_sub(newest) < every {
                continue;
            }
            match backups.take(&rollouts, &execs, &c.name, true).await {
                Ok(b) => tracing::info!(cluster = %c.name, id = %b.id, "scheduled etcd backup taken"),
                Err(e) => {
                    tracing::warn!(cluster = %c.name, error = %fleetadm_common::error_chain(&e), "scheduled etcd backup failed")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(b: &Backups, task: &str, owner: &str, dir: &std::path::Path) {
        b.uploads.lock().unwrap().insert(
            task.into(),
            Slot {
                owner: owner.into(),
                tmp: dir.join(format!("{}.part", task.replace('/', "_"))),
                announced: None,
                received: 0,
                hasher: sha2::Sha256::new(),
                done: false,
            },
        );
    }

    #[test]
    fn uploads_are_taken_only_from_their_node_in_order_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::SledStore::open(&dir.path().join("s")).unwrap());
        let b = Backups::new(store, dir.path());
        let data = b"snapshot-bytes-0123456789".to_vec();
        let sha = hex::encode(sha2::Sha256::digest(&data));
        let chunk = |offset: u64, d: &[u8], sha: &str| SnapshotChunk {
            task_id: "exec/backup-lab-1/m1".into(),
            offset,
            data: d.to_vec(),
            total_size: data.len() as u64,
            sha256: sha.into(),
            ..Default::default()
        };
        // nothing expected yet
        assert!(matches!(b.accept("m1", &chunk(0, &data[..5], &sha)), Err(UploadRejected::Unexpected(_))));
        slot(&b, "exec/backup-lab-1/m1", "m1", dir.path());
        assert!(matches!(b.accept("m2", &chunk(0, &data[..5], &sha)), Err(UploadRejected::NotYours { .. })));
        assert_eq!(b.accept("m1", &chunk(0, &data[..5], &sha)), Ok(5));
        // a repeated chunk and one from the future are answered with what is held
        assert_eq!(b.accept("m1", &chunk(0, &data[..5], &sha)), Ok(5));
        assert_eq!(b.accept("m1", &chunk(10, &data[10..], &sha)), Ok(5));
        assert!(matches!(b.accept("m1", &chunk(5, &data[5..], &"0".repeat(64))), Err(UploadRejected::Invalid(_))));
        assert_eq!(b.accept("m1", &chunk(5, &data[5..], &sha)), Ok(data.len() as u64));
        assert!(b.uploads.lock().unwrap()["exec/backup-lab-1/m1"].done);
        // oversized and malformed
        let mut big = chunk(0, b"", &sha);
        big.total_size = MAX_SNAPSHOT + 1;
        assert!(matches!(b.accept("m1", &big), Err(UploadRejected::Invalid(_))));
        assert!(matches!(b.accept("m1", &chunk(0, b"", "xyz")), Err(UploadRejected::Invalid(_))));
        // content that does not hash to what was announced is refused and starts over
        slot(&b, "exec/backup-lab-2/m1", "m1", dir.path());
        let mut bad = chunk(0, &data, &"a".repeat(64));
        bad.task_id = "exec/backup-lab-2/m1".into();
        assert!(matches!(b.accept("m1", &bad), Err(UploadRejected::Corrupt(_))));
        assert_eq!(b.uploads.lock().unwrap()["exec/backup-lab-2/m1"].received, 0);
    }

    #[test]
    fn retention_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::SledStore::open(&dir.path().join("s")).unwrap());
        let b = Backups::new(store.clone(), dir.path());
        for i in 0..4u64 {
            let data = format!("snap {i}");
            let sha = hex::encode(sha2::Sha256::digest(data.as_bytes()));
            let src = dir.path().join(format!("src{i}"));
            std::fs::write(&src, &data).unwrap();
            b.blobs.put_file(&src, &sha, data.len() as u64).unwrap();
            let r = BackupRecord {
                id: format!("etcd-{i}"),
                cluster: "lab".into(),
                host: "m1".into(),
                taken_ms: 1000 + i,
                size: data.len() as u64,
                sha256: sha,
                revision: i,
                total_keys: 1,
                scheduled: false,
            };
            store::put_json(&*store, Table::Backups, &key("lab", &r.id), &r, Durability::Flush).unwrap();
        }
        let dropped = b.prune("lab", 2).unwrap();
        assert_eq!(dropped.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["etcd-0", "etcd-1"]);
        let left = b.list("lab").unwrap();
        assert_eq!(left.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["etcd-2", "etcd-3"]);
        assert!(!b.path(&dropped[0]).exists() && b.path(&left[0]).exists());
        assert!(b.list("other").unwrap().is_empty());
    }
}

//! `etcd-snapshot`: a backup of this control-plane host's etcd member. `etcdctl snapshot save`
//! (with kubeadm's healthcheck client certificate) into the agent's state directory, checked by
//! `etcdutl snapshot status`, hashed, then uploaded to the controller in chunks over the session
//! (resumed from what the controller holds), and removed here.
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetadm_proto::{SnapshotChunk, SnapshotInfo};
use thiserror::Error;

use super::command::{self, Cancel, Cmd, CommandError};
use super::handler::SessionChannel;

/// Bytes per upload call (well below the message limit).
pub const CHUNK: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum EtcdError {
    #[error("bad etcd endpoint {0:?} (host:port)")]
    Endpoint(String),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("etcdutl snapshot status said something unexpected: {0}")]
    Status(String),
    #[error("{path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("uploading the snapshot: {0}")]
    Upload(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EtcdError + '_ {
    move |source| EtcdError::Io { path: path.display().to_string(), source }
}

/// What `etcdutl snapshot status --write-out=json` says.
#[derive(Debug, serde::Deserialize)]
struct Status {
    revision: u64,
    #[serde(rename = "totalKey")]
    total_key: u64,
}

/// Take, check, upload, remove. `task_id` names the upload.
pub async fn snapshot(
    kube_dir: &Path,
    state_dir: &Path,
    task_id: &str,
    endpoint: &str,
    channel: &SessionChannel,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<SnapshotInfo, EtcdError> {
    if endpoint.parse::<std::net::SocketAddr>().is_err() {
        return Err(EtcdError::Endpoint(endpoint.to_string()));
    }
    let dir = state_dir.join("snapshots");
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let file: PathBuf = dir.join(format!("{}.db", task_id.replace(['/', '.'], "_")));
    let _ = std::fs::remove_file(&file);
    let pki = kube_dir.join("pki/etcd");
    let (ca, cert, key) = (pki.join("ca.crt"), pki.join("healthcheck-client.crt"), pki.join("healthcheck-client.key"));
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let url = format!("https://{endpoint}");
    let (ca, cert, key, out) = (s(&ca), s(&cert), s(&key), s(&file));
    let save = Cmd::new(
        "etcdctl",
        &["--endpoints", &url, "--cacert", &ca, "--cert", &cert, "--key", &key, "snapshot", "save", &out],
        timeout,
    );
    let said = command::run(&save, cancel).await?.ok("etcdctl snapshot save")?;
    let status = Cmd::new("etcdutl", &["snapshot", "status", &out, "--write-out=json"], Duration::from_secs(120));
    let json = command::run(&status, cancel).await?.ok("etcdutl snapshot status")?;
    let st: Status = serde_json::from_str(json.trim()).map_err(|e| EtcdError::Status(format!("{e}: {json}")))?;
    let f2 = file.clone();
    let (sha256, size) = tokio::task::spawn_blocking(move || {
        use sha2::Digest;
        use std::io::Read;
        let mut h = sha2::Sha256::new();
        let mut f = std::fs::File::open(&f2).map_err(io(&f2))?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut size = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(io(&f2))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            size += n as u64;
        }
        Ok::<_, EtcdError>((hex::encode(h.finalize()), size))
    })
    .await
    .map_err(|e| EtcdError::Upload(e.to_string()))??;
    tracing::info!(task = task_id, size, revision = st.revision, "etcd snapshot taken: {}", said.trim());
    let uploaded = upload(&file, task_id, &sha256, size, channel, cancel).await;
    let _ = std::fs::remove_file(&file);
    uploaded?;
    Ok(SnapshotInfo { sha256, size, revision: st.revision, total_keys: st.total_key, ..Default::default() })
}

async fn upload(
    file: &Path,
    task_id: &str,
    sha256: &str,
    size: u64,
    channel: &SessionChannel,
    cancel: &Cancel,
) -> Result<(), EtcdError> {
    let mut offset = 0u64;
    let mut failures = 0;
    loop {
        if cancel.is_cancelled() {
            return Err(EtcdError::Upload("stopped".into()));
        }
        let (f, at) = (file.to_path_buf(), offset);
        let data = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Seek, SeekFrom};
            let mut h = std::fs::File::open(&f).map_err(io(&f))?;
            h.seek(SeekFrom::Start(at)).map_err(io(&f))?;
            let mut buf = Vec::with_capacity(CHUNK);
            h.take(CHUNK as u64).read_to_end(&mut buf).map_err(io(&f))?;
            Ok::<_, EtcdError>(buf)
        })
        .await
        .map_err(|e| EtcdError::Upload(e.to_string()))??;
        let mut ch = channel.clone();
        let client = tokio::time::timeout(super::fetch::RECONNECT_WAIT, ch.wait_for(|c| c.is_some()))
            .await
            .map_err(|_| EtcdError::Upload("no session with the controller".into()))?
            .map_err(|_| EtcdError::Upload("the agent is stopping".into()))?
            .clone();
        let Some(mut client) = client else { return Err(EtcdError::Upload("no session".into())) };
        let last = data.is_empty() || offset + data.len() as u64 >= size;
        let req = SnapshotChunk {
            task_id: task_id.to_string(),
            offset,
            data,
            total_size: size,
            sha256: sha256.to_string(),
            ..Default::default()
        };
        match client.upload_snapshot(req).await {
            Ok(ack) => {
                let got = ack.into_inner().received;
                if got >= size && last {
                    return Ok(());
                }
                // The controller says where to go on (a resumed or repeated upload).
                offset = got.min(size);
                failures = 0;
            }
            Err(st) if failures < 5 && st.code() == tonic::Code::Unavailable => {
                failures += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(st) => return Err(EtcdError::Upload(fleetadm_common::dial::explain_status(&st))),
        }
    }
}

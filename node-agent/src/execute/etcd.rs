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

/// Errors of a restore step.
#[derive(Debug, Error)]
pub enum RestoreError {
    #[error("unknown restore step {0:?} (stop, restore, start-etcd or start-apiserver)")]
    Step(String),
    #[error("bad restore parameter: {0}")]
    Param(String),
    #[error(transparent)]
    Pods(#[from] super::certs::CertsError),
    #[error("{pod} still answers on {addr} {secs}s after its manifest was moved out (is the kubelet running?)")]
    Stuck { pod: String, addr: std::net::SocketAddr, secs: u64 },
    #[error("{what} did not answer on {addr} within {secs}s: {last}")]
    NotUp { what: String, addr: std::net::SocketAddr, secs: u64, last: String },
    #[error(transparent)]
    Fetch(#[from] super::fetch::FetchError),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("the agent is stopping")]
    Cancelled,
}

/// The etcd client endpoint kubeadm's member listens on locally.
const ETCD_LOCAL: &str = "127.0.0.1:2379";
const WAIT: Duration = Duration::from_secs(180);

async fn until(
    what: &str,
    addr: std::net::SocketAddr,
    want_up: bool,
    prober: Option<&crate::lb::probe::Prober>,
    cancel: &Cancel,
) -> Result<f64, RestoreError> {
    let t0 = std::time::Instant::now();
    let mut last = String::from("no answer yet");
    loop {
        let up = match prober {
            Some(p) if want_up => match p.probe(addr).await {
                Ok(()) => true,
                Err(e) => {
                    last = e.to_string();
                    false
                }
            },
            _ => super::certs::listening(addr).await,
        };
        if up == want_up {
            return Ok(t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > WAIT {
            return Err(if want_up {
                RestoreError::NotUp { what: what.to_string(), addr, secs: WAIT.as_secs(), last }
            } else {
                RestoreError::Stuck { pod: what.to_string(), addr, secs: WAIT.as_secs() }
            });
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = cancel.fired() => return Err(RestoreError::Cancelled),
        }
    }
}

/// One step of a restore (see the protocol's `EtcdRestoreTask`). Idempotent: a stopped pod stays
/// stopped, a data directory already restored from this snapshot is not restored again, a
/// started pod is only waited for.
#[allow(clippy::too_many_arguments)]
pub async fn restore_step(
    root: &Path,
    kube_dir: &Path,
    state_dir: &Path,
    t: &fleetadm_proto::EtcdRestoreTask,
    channel: &SessionChannel,
    cancel: &Cancel,
) -> Result<(bool, String), RestoreError> {
    let api: std::net::SocketAddr =
        t.apiserver.parse().map_err(|_| RestoreError::Param(format!("apiserver {:?}", t.apiserver)))?;
    let etcd_addr: std::net::SocketAddr = ETCD_LOCAL.parse().map_err(|_| RestoreError::Param(ETCD_LOCAL.into()))?;
    match t.step.as_str() {
        "stop" => {
            let mut out = Vec::new();
            for (pod, addr) in [("kube-apiserver", api), ("etcd", etcd_addr)] {
                let held = kube_dir.join("fleetadm/held-manifests").join(format!("{pod}.yaml"));
                if !held.exists() {
                    super::certs::hold(kube_dir, pod)?;
                }
                let secs = until(pod, addr, false, None, cancel).await?;
                out.push(format!("{pod} stopped ({secs:.1}s)"));
            }
            Ok((true, out.join("\n")))
        }
        "restore" => {
            let snap = t.snapshot.as_ref().ok_or_else(|| RestoreError::Param("no snapshot".into()))?;
            if !fleetadm_common::tasks::is_sha256_hex(&snap.sha256) {
                return Err(RestoreError::Param("snapshot sha256".into()));
            }
            let name_ok = |s: &str| {
                !s.is_empty() && s.len() <= 253 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            };
            if !name_ok(&t.member_name) {
                return Err(RestoreError::Param(format!("member name {:?}", t.member_name)));
            }
            if t.initial_cluster.is_empty()
                || t.initial_cluster.contains(char::is_whitespace)
                || !t.peer_url.starts_with("https://")
            {
                return Err(RestoreError::Param("initial cluster / peer url".into()));
            }
            let data = root.join("var/lib/etcd");
            let marker = data.join(format!("fleetadm-restored-{}", snap.sha256));
            if marker.exists() {
                return Ok((false, format!("{} already holds snapshot {}", data.display(), snap.sha256)));
            }
            let cache = super::fetch::BlobCache::new(state_dir);
            let mut src = super::fetch::Remote::new(t.source.clone(), channel.clone(), None);
            let files = [fleetadm_common::tasks::BundleFile::from(snap)];
            super::fetch::fetch_all(&cache, &mut src, &files, |_, _| {}).await?;
            let file = cache.path(&snap.sha256);
            let stamp = fleetadm_common::clock::now_unix_ms();
            // Restored inside the data directory (one file system: the swap is two renames),
            // the old member directory kept beside the new one (etcd warns about, and ignores,
            // other entries in its data directory; an operator can go back by hand).
            let fresh = data.join(format!(".restore-{stamp}"));
            let (f, d) = (file.to_string_lossy().into_owned(), fresh.to_string_lossy().into_owned());
            let cmd = Cmd::new(
                "etcdutl",
                &[
                    "snapshot",
                    "restore",
                    &f,
                    "--data-dir",
                    &d,
                    "--name",
                    &t.member_name,
                    "--initial-cluster",
                    &t.initial_cluster,
                    "--initial-advertise-peer-urls",
                    &t.peer_url,
                ],
                Duration::from_secs(600),
            );
            std::fs::create_dir_all(&data).map_err(io(&data)).map_err(RestoreError::from)?;
            let said = command::run(&cmd, cancel)
                .await
                .map_err(EtcdError::from)?
                .ok("etcdutl snapshot restore")
                .map_err(EtcdError::from)?;
            let old = data.join(format!(".member.before-restore-{stamp}"));
            let (data2, fresh2, old2, marker2) = (data.clone(), fresh.clone(), old.clone(), marker.clone());
            tokio::task::spawn_blocking(move || -> Result<(), EtcdError> {
                let member = data2.join("member");
                if member.exists() {
                    std::fs::rename(&member, &old2).map_err(io(&old2))?;
                }
                std::fs::rename(fresh2.join("member"), &member).map_err(io(&member))?;
                let _ = std::fs::remove_dir_all(&fresh2);
                std::fs::write(&marker2, b"").map_err(io(&marker2))?;
                fleetadm_common::fsutil::sync_dir(&data2);
                Ok(())
            })
            .await
            .map_err(|e| EtcdError::Upload(e.to_string()))??;
            Ok((
                true,
                format!("{}\nrestored into {} (the old data is in {})", said.trim(), data.display(), old.display()),
            ))
        }
        // etcd on every master first (a restored member waits for its peers), then the
        // apiservers one at a time, each ready before the next.
        "start-etcd" => {
            let back = super::certs::put_back(kube_dir, "etcd")?;
            let secs = until("etcd", etcd_addr, true, None, cancel).await?;
            Ok((back, format!("etcd answering ({secs:.1}s)")))
        }
        "start-apiserver" => {
            let ca_path = kube_dir.join("pki/ca.crt");
            let ca = std::fs::read_to_string(&ca_path)
                .map_err(|e| RestoreError::Param(format!("{}: {e}", ca_path.display())))?;
            let prober =
                crate::lb::probe::Prober::new(Some(&ca), crate::lb::probe::TlsTrust::Verify, Duration::from_secs(3))
                    .map_err(|e| RestoreError::Param(e.to_string()))?;
            let back = super::certs::put_back(kube_dir, "kube-apiserver")?;
            let secs = until("kube-apiserver", api, true, Some(&prober), cancel).await?;
            Ok((back, format!("kube-apiserver ready ({secs:.1}s)")))
        }
        other => Err(RestoreError::Step(other.to_string())),
    }
}

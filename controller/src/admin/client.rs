//! The CLI's connection to the daemon's admin socket, with clear errors when there is no daemon.
use std::path::{Path, PathBuf};

use fleetadm_proto::admin_client::AdminClient;
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Debug, Error)]
pub enum AdminConnectError {
    #[error("no controller daemon is running for data dir {dir}: {sock} does not exist (start one with `controller serve --data-dir {dir}`)")]
    NoSocket { dir: String, sock: String },
    #[error("no controller daemon is answering on {sock} (stale socket from a stopped daemon?); start one with `controller serve --data-dir {dir}`")]
    Refused { dir: String, sock: String },
    #[error(
        "permission denied on {sock}: the admin socket is owner-only; run as the controller's user (usually root)"
    )]
    Permission { sock: String },
    #[error("cannot connect to the admin socket {sock}")]
    Other {
        sock: String,
        #[source]
        source: tonic::transport::Error,
    },
}

pub async fn connect(data_dir: &Path) -> Result<AdminClient<Channel>, AdminConnectError> {
    let sock: PathBuf = super::socket_path(data_dir);
    let dir = data_dir.display().to_string();
    let sock_s = sock.display().to_string();
    if !sock.exists() {
        return Err(AdminConnectError::NoSocket { dir, sock: sock_s });
    }
    let path = sock.clone();
    let channel = Endpoint::from_static("http://admin.sock")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|source| {
            let io = find_io(&source);
            match io {
                Some(std::io::ErrorKind::ConnectionRefused) | Some(std::io::ErrorKind::NotFound) => {
                    AdminConnectError::Refused { dir: dir.clone(), sock: sock_s.clone() }
                }
                Some(std::io::ErrorKind::PermissionDenied) => AdminConnectError::Permission { sock: sock_s.clone() },
                _ => AdminConnectError::Other { sock: sock_s.clone(), source },
            }
        })?;
    Ok(AdminClient::new(channel)
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(fleetadm_proto::MAX_MESSAGE_BYTES))
}

fn find_io(err: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cur = e.source();
    }
    None
}

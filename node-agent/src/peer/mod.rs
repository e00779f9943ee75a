//! Serving blob chunks to peers, and fetching them from one (docs/bundles.md).
//!
//! Both sides authenticate with their fleet client certificates: the holder requires a client
//! certificate from the fleet CA, the requester accepts a server only if it presents a fleet
//! certificate for the node the controller named (node certificates are client certificates;
//! [`NodeVerifier`] checks them as such, so nothing else accepts them as server certificates).
//! The holder serves only a request carrying a ticket the controller signed with this node's peer
//! key for that requester and blob; the requester verifies the whole blob's SHA-256 as always, so
//! a lying peer costs a refetch, never a wrong file.
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fleetadm_proto::peer_server::{Peer, PeerServer};
use fleetadm_proto::{BlobChunk, PeerChunkRequest, PeerTicket};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tonic::{Request, Response, Status};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::StateDir;

/// The most a chunk may carry.
pub const CHUNK_MAX: usize = 1024 * 1024;
/// How long a holder still fetching waits for a range it does not have yet.
pub const RANGE_WAIT: Duration = Duration::from_secs(30);
/// Connections the peer port holds at once, handshakes included (the controller sends each
/// holder at most a few downstream peers); more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection that has not finished its TLS handshake by then is closed.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// How often the listener reads the node's identity again (a renewed certificate is served
/// from then on; the old one stays valid well past that).
const IDENTITY_RECHECK: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer TLS material: {0}")]
    Tls(String),
    #[error("binding the peer listener on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_verifier(ca: CertificateDer<'static>) -> Result<Arc<dyn ClientCertVerifier>, PeerError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca).map_err(|e| PeerError::Tls(format!("fleet CA: {e}")))?;
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| PeerError::Tls(e.to_string()))
}

/// The node name (CN) of a fleet certificate.
pub fn node_name(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

/// Accepts a server that presents a fleet client certificate for `expected`.
#[derive(Debug)]
pub struct NodeVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    expected: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.chain.verify_client_cert(end_entity, intermediates, now)?;
        match node_name(end_entity.as_ref()) {
            Some(n) if n == self.expected => Ok(ServerCertVerified::assertion()),
            other => Err(rustls::Error::General(format!(
                "the peer presented the certificate of {:?}, not of {:?}",
                other.unwrap_or_default(),
                self.expected
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A client to peer `node` at `address`, with this node's identity.
pub async fn dial(
    dir: &StateDir,
    node: &str,
    address: &str,
) -> Result<fleetadm_proto::peer_client::PeerClient<tonic::transport::Channel>, String> {
    let (dir, node2) = (dir.clone(), node.to_string());
    let config = tokio::task::spawn_blocking(move || -> Result<rustls::ClientConfig, PeerError> {
        let id = crate::identity::Identity::load(&dir)?;
        let tls = id.tls_identity()?;
        let verifier = NodeVerifier { chain: client_verifier(id.ca_der()?)?, expected: node2, provider: provider() };
        let mut c = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| PeerError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(tls.chain, tls.key)
            .map_err(|e| PeerError::Tls(e.to_string()))?;
        c.alpn_protocols = vec![b"h2".to_vec()];
        Ok(c)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| fleetadm_common::error_chain(&e))?;
    let opts = fleetadm_common::dial::DialOptions { connect_timeout: Duration::from_secs(5), ..Default::default() };
    let channel = fleetadm_common::dial::connect(address, config, &opts)
        .await
        .map_err(|e| format!("peer {node} at {address}: {}", fleetadm_common::error_chain(&e)))?;
    Ok(fleetadm_proto::peer_client::PeerClient::new(channel).max_decoding_message_size(CHUNK_MAX + 64 * 1024))
}

/// This node's serving side: its name, its peer key (from the controller's Welcome) and cache.
pub struct Holder {
    pub name: String,
    pub key: RwLock<Vec<u8>>,
    pub blobs: PathBuf,
}

impl Holder {
    /// Whether `t` is a ticket the controller issued for `requester` to fetch `sha256` here.
    pub fn admits(&self, t: &PeerTicket, requester: &str, sha256: &str, now_ms: u64) -> Result<(), Status> {
        let key = self.key.read().map(|k| k.clone()).unwrap_or_default();
        if key.is_empty() {
            return Err(Status::unavailable("this node has no peer key yet (no session with the controller)"));
        }
        if t.holder != self.name || t.sha256 != sha256 || t.requester != requester {
            return Err(Status::permission_denied(format!(
                "the ticket is for {} to fetch {} from {}; this is {} asking {} for {}",
                t.requester, t.sha256, t.holder, requester, self.name, sha256
            )));
        }
        if t.expires_unix_ms <= now_ms {
            return Err(Status::permission_denied("the ticket expired; ask the controller again"));
        }
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
        let msg = fleetadm_common::tasks::peer_ticket_message(t);
        ring::hmac::verify(&k, &msg, &t.mac)
            .map_err(|_| Status::permission_denied("the ticket was not signed by this node's controller"))
    }

    /// `want` bytes of blob `sha256` (of `size` bytes) from `offset`: from the finished blob, or
    /// from the part fetched so far, waiting up to `wait` for it to grow that far.
    pub async fn read(
        &self,
        sha256: &str,
        offset: u64,
        want: usize,
        size: u64,
        wait: Duration,
    ) -> Result<Vec<u8>, Status> {
        if !fleetadm_common::tasks::is_sha256_hex(sha256) {
            return Err(Status::invalid_argument("sha256 must be 64 lowercase hex digits"));
        }
        let done = self.blobs.join(sha256);
        let part = self.blobs.join(format!("{sha256}.partial"));
        let until = tokio::time::Instant::now() + wait;
        loop {
            let full = tokio::fs::metadata(&done).await.map(|m| m.len()).ok();
            let have = match full {
                Some(len) if len != size => {
                    return Err(Status::failed_precondition(format!("this node's blob has {len} bytes, not {size}")))
                }
                Some(len) => len,
                None => tokio::fs::metadata(&part).await.map(|m| m.len()).unwrap_or(0),
            };
            if have >= offset + want as u64 {
                let path = if full.is_some() { done.clone() } else { part.clone() };
                match tokio::task::spawn_blocking(move || read_range(&path, offset, want))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
                {
                    Ok(data) => return Ok(data),
                    // The part was just verified and renamed into place: read that instead.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Status::unavailable(format!("reading the blob: {e}"))),
                }
            }
            if tokio::time::Instant::now() >= until {
                return Err(Status::unavailable(format!(
                    "this node has {have} of the {} bytes asked for yet",
                    offset + want as u64
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn read_range(path: &std::path::Path, offset: u64, want: usize) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek};
    let mut f = std::fs::File::open(path)?;
    f.seek(std::io::SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; want];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

struct Service(Arc<Holder>);

#[tonic::async_trait]
impl Peer for Service {
    async fn peer_chunk(&self, req: Request<PeerChunkRequest>) -> Result<Response<BlobChunk>, Status> {
        let requester = req
            .peer_certs()
            .and_then(|c| c.first().and_then(|l| node_name(l.as_ref())))
            .ok_or_else(|| Status::unauthenticated("a fleet client certificate is required"))?;
        let r = req.into_inner();
        let t = r.ticket.ok_or_else(|| Status::permission_denied("no ticket: ask the controller for one"))?;
        self.0.admits(&t, &requester, &r.sha256, fleetadm_common::clock::now_unix_ms())?;
        if r.offset >= r.size {
            return Err(Status::out_of_range(format!("offset {} is past the blob's {} bytes", r.offset, r.size)));
        }
        let want = (r.max_len as usize).clamp(1, CHUNK_MAX).min((r.size - r.offset) as usize);
        let data = self.0.read(&r.sha256, r.offset, want, r.size, RANGE_WAIT).await?;
        tracing::debug!(%requester, blob = %r.sha256, offset = r.offset, len = data.len(), "served a peer");
        Ok(Response::new(BlobChunk { data, size: r.size, peer: None }))
    }
}

/// Bind the peer listener (before the first session: its port goes into ConnectRequest).
pub async fn bind(addr: &str) -> Result<tokio::net::TcpListener, PeerError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|source| PeerError::Bind { addr: addr.to_string(), source })
}

/// A peer connection holding one of the [`MAX_CONNECTIONS`] slots until it closes.
struct Slotted<S> {
    io: S,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Slotted<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        // The TLS stream's own (the requester's certificate is read from it).
        self.io.connect_info()
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Slotted<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Slotted<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

type PeerConn = Slotted<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

/// Serve peers on `listener` until the process ends: at most [`MAX_CONNECTIONS`] at once
/// (handshakes included; more are closed as they arrive), each handshake within
/// [`HANDSHAKE_DEADLINE`]. The TLS identity is read again every [`IDENTITY_RECHECK`] (a renewal).
pub fn serve(listener: tokio::net::TcpListener, dir: StateDir, holder: Arc<Holder>) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<PeerConn, std::io::Error>>(64);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        let mut current: Option<(String, tokio_rustls::TlsAcceptor)> = None;
        let mut loaded_at: Option<tokio::time::Instant> = None;
        loop {
            let (tcp, from) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "peer listener");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            // Taken before anything is spent on the connection (no file read, no handshake).
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%from, "peer connection closed: {MAX_CONNECTIONS} already open");
                continue;
            };
            if current.is_none() || loaded_at.is_none_or(|t| t.elapsed() >= IDENTITY_RECHECK) {
                let d = dir.clone();
                let loaded = tokio::task::spawn_blocking(move || crate::identity::Identity::load(&d)).await;
                let Ok(Ok(id)) = loaded else {
                    tracing::warn!(%from, "peer connection refused: no identity");
                    continue;
                };
                loaded_at = Some(tokio::time::Instant::now());
                if current.as_ref().is_none_or(|(pem, _)| *pem != id.cert_pem) {
                    match acceptor(&id) {
                        Ok(a) => current = Some((id.cert_pem.clone(), a)),
                        Err(e) => {
                            tracing::warn!(error = %fleetadm_common::error_chain(&e), "peer TLS");
                            continue;
                        }
                    }
                }
            }
            let Some((_, acc)) = current.clone() else { continue };
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_DEADLINE, acc.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(Slotted { io: tls, _slot: slot })).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%from, error = %e, "peer TLS handshake failed"),
                    Err(_) => tracing::debug!(%from, "peer TLS handshake timed out"),
                }
            });
        }
    });
    tokio::spawn(async move {
        let svc = PeerServer::new(Service(holder)).max_decoding_message_size(64 * 1024);
        let r = tonic::transport::Server::builder()
            .initial_stream_window_size(Some(2 << 20))
            .initial_connection_window_size(Some(4 << 20))
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "peer server stopped");
        }
    });
}

fn acceptor(id: &crate::identity::Identity) -> Result<tokio_rustls::TlsAcceptor, PeerError> {
    let tls = id.tls_identity()?;
    let chain: Vec<CertificateDer<'static>> = tls.chain;
    let key: PrivateKeyDer<'static> = tls.key;
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PeerError::Tls(e.to_string()))?
        .with_client_cert_verifier(client_verifier(id.ca_der()?)?)
        .with_single_cert(chain, key)
        .map_err(|e| PeerError::Tls(e.to_string()))?;
    c.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(c)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(dir: &std::path::Path) -> Holder {
        Holder { name: "h1".into(), key: RwLock::new(b"k".repeat(32)), blobs: dir.to_path_buf() }
    }

    fn ticket(key: &[u8], requester: &str, expires: u64) -> PeerTicket {
        let mut t = PeerTicket {
            requester: requester.into(),
            holder: "h1".into(),
            sha256: "ab".repeat(32),
            expires_unix_ms: expires,
            mac: vec![],
        };
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        t.mac = ring::hmac::sign(&k, &fleetadm_common::tasks::peer_ticket_message(&t)).as_ref().to_vec();
        t
    }

    #[test]
    fn only_the_ticket_the_controller_signed_for_this_requester_admits() {
        let dir = tempfile::tempdir().unwrap();
        let h = holder(dir.path());
        let sha = "ab".repeat(32);
        let key = b"k".repeat(32);
        assert!(h.admits(&ticket(&key, "h2", 100), "h2", &sha, 50).is_ok());
        let e = h.admits(&ticket(&key, "h2", 100), "h3", &sha, 50).unwrap_err();
        assert!(e.message().contains("this is h3"), "{e:?}");
        assert!(h.admits(&ticket(&key, "h2", 100), "h2", &sha, 100).unwrap_err().message().contains("expired"));
        let e = h.admits(&ticket(b"other", "h2", 100), "h2", &sha, 50).unwrap_err();
        assert!(e.message().contains("not signed"), "{e:?}");
        let e = h.admits(&ticket(&key, "h2", 100), "h2", &"cd".repeat(32), 50).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        *h.key.write().unwrap() = Vec::new();
        assert_eq!(h.admits(&ticket(&key, "h2", 100), "h2", &sha, 50).unwrap_err().code(), tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn a_holder_still_fetching_serves_what_it_has_and_waits_for_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let h = Arc::new(holder(dir.path()));
        let sha = "ab".repeat(32);
        let part = dir.path().join(format!("{sha}.partial"));
        std::fs::write(&part, vec![1u8; 100]).unwrap();
        assert_eq!(h.read(&sha, 0, 100, 300, Duration::ZERO).await.unwrap(), vec![1u8; 100]);
        let e = h.read(&sha, 100, 100, 300, Duration::ZERO).await.unwrap_err();
        assert!(e.message().contains("has 100 of the 200 bytes"), "{e:?}");
        // The rest arrives while the request waits.
        let h2 = h.clone();
        let s2 = sha.clone();
        let waiting = tokio::spawn(async move { h2.read(&s2, 100, 200, 300, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut all = vec![1u8; 100];
        all.extend(vec![2u8; 200]);
        std::fs::write(dir.path().join(&sha), &all).unwrap();
        std::fs::remove_file(&part).unwrap();
        assert_eq!(waiting.await.unwrap().unwrap(), vec![2u8; 200]);
        let e = h.read(&sha, 0, 10, 999, Duration::ZERO).await.unwrap_err();
        assert!(e.message().contains("not 999"), "{e:?}");
    }

    #[tokio::test]
    async fn the_peer_port_holds_at_most_its_connections_and_closes_the_rest_at_once() {
        use tokio::io::AsyncReadExt;
        use tokio::net::TcpStream;
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::new(dir.path().join("state"));
        let kc = crate::identity::new_key_and_csr("h1").unwrap();
        let cert = rcgen::CertificateParams::new(vec!["h1".into()]).unwrap().self_signed(&kc.key).unwrap();
        let cfg = crate::identity::AgentConfig {
            controller: "127.0.0.1:1".into(),
            node_name: "h1".into(),
            enrolled_at: 1,
            proxy: None,
        };
        crate::identity::Identity::save(&sd, &cfg, &kc.key.serialize_pem(), &cert.pem(), &cert.pem()).unwrap();
        let listener = bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        serve(listener, sd, Arc::new(holder(dir.path())));
        // Connections that never start their handshake (what an attacker would open).
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        // Closed: the peer end reads EOF (or a reset), long before the handshake deadline.
        async fn closed(s: &mut TcpStream, within: Duration) -> bool {
            let mut b = [0u8; 1];
            matches!(tokio::time::timeout(within, s.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_)))
        }
        let mut extra = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut extra, Duration::from_secs(5)).await, "one over the limit is closed at once");
        assert!(!closed(&mut held[0], Duration::from_millis(300)).await, "those within it wait for their handshake");
        // One goes away: its slot is free again.
        drop(held.pop());
        let start = std::time::Instant::now();
        loop {
            let mut s = TcpStream::connect(addr).await.unwrap();
            if !closed(&mut s, Duration::from_millis(500)).await {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "the freed slot was never given out again");
        }
    }
}

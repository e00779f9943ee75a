//! The health probe: HTTPS `GET /readyz` ([`PROBE_PATH`]) on a real server, verifying its certificate against the
//! cluster CA (or, only when explicitly asked, not verifying it). 200 means healthy.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsTrust {
    Verify,
    InsecureSkipVerify,
}

#[derive(Clone)]
pub struct Prober {
    tls: Arc<ClientConfig>,
    timeout: Duration,
    path: String,
}

#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Why a prober cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ProberError {
    #[error("TLS setup")]
    Tls(#[source] rustls::Error),
    #[error("the cluster CA")]
    BadCa(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the CA file holds no certificate")]
    EmptyCa,
    #[error("health checks need the cluster CA (--ca FILE) to verify real servers; pass --insecure-skip-tls-verify to probe without verification")]
    NoCa,
}

/// Why one probe failed (shown as the real server's last probe).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeFailure {
    #[error("connection refused")]
    Refused,
    #[error("connect: {0}")]
    Connect(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Io(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("empty response")]
    Empty,
    #[error("unhealthy: {0}")]
    Unhealthy(String),
}

/// What the guard asks an apiserver. `/readyz`, not `/healthz`: a kube-apiserver that is shutting
/// down keeps answering `/healthz` (and, with `--shutdown-delay-duration`, keeps serving on purpose)
/// while `/readyz` already fails, which is when it must leave the load balancer. Readable without
/// credentials (the `system:public-info-viewer` role).
pub const PROBE_PATH: &str = "/readyz";

impl Prober {
    /// `ca_pem`: the cluster CA the real servers' certificates chain to.
    pub fn new(ca_pem: Option<&str>, trust: TlsTrust, timeout: Duration) -> Result<Self, ProberError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(ProberError::Tls)?;
        let config = match (ca_pem, trust) {
            (_, TlsTrust::InsecureSkipVerify) => {
                builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider))).with_no_client_auth()
            }
            (Some(pem), TlsTrust::Verify) => {
                let mut roots = RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    let c = c.map_err(|e| ProberError::BadCa(Box::new(e)))?;
                    roots.add(c).map_err(|e| ProberError::BadCa(Box::new(e)))?;
                }
                if roots.is_empty() {
                    return Err(ProberError::EmptyCa);
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            (None, TlsTrust::Verify) => return Err(ProberError::NoCa),
        };
        Ok(Self { tls: Arc::new(config), timeout, path: PROBE_PATH.into() })
    }

    /// One probe. Ok(()) = healthy; Err(reason) otherwise.
    pub async fn probe(&self, rs: SocketAddr) -> Result<(), ProbeFailure> {
        match tokio::time::timeout(self.timeout, self.probe_inner(rs)).await {
            Ok(r) => r,
            Err(_) => Err(ProbeFailure::Timeout(self.timeout)),
        }
    }

    async fn probe_inner(&self, rs: SocketAddr) -> Result<(), ProbeFailure> {
        let tcp = tokio::net::TcpStream::connect(rs).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => ProbeFailure::Refused,
            _ => ProbeFailure::Connect(e.to_string()),
        })?;
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let mut tls = connector
            .connect(ServerName::IpAddress(rs.ip().into()), tcp)
            .await
            .map_err(|e| ProbeFailure::Tls(e.to_string()))?;
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: fleetadm-node-agent\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            self.path, rs
        );
        tls.write_all(req.as_bytes()).await.map_err(|e| ProbeFailure::Io(format!("write: {e}")))?;
        let mut buf = vec![0u8; 512];
        let mut got = 0;
        while got < buf.len() {
            let n = tls.read(&mut buf[got..]).await.map_err(|e| ProbeFailure::Io(format!("read: {e}")))?;
            if n == 0 {
                break;
            }
            got += n;
            if buf[..got].windows(2).any(|w| w == b"\r\n") {
                break;
            }
        }
        judge_response(&buf[..got])
    }
}

/// Healthy only for an HTTP/1.x `200` status line; whatever else the server sent (at most the
/// 512 bytes read) becomes the reason.
pub fn judge_response(head: &[u8]) -> Result<(), ProbeFailure> {
    let head = String::from_utf8_lossy(head);
    let status_line = head.lines().next().unwrap_or_default().to_string();
    let code = status_line.split_whitespace().nth(1).unwrap_or_default();
    if status_line.starts_with("HTTP/1.") && code == "200" {
        Ok(())
    } else if status_line.is_empty() {
        Err(ProbeFailure::Empty)
    } else {
        Err(ProbeFailure::Unhealthy(status_line))
    }
}

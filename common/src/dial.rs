//! How an agent reaches the controller: TCP, then TLS with rustls, then HTTP/2 (tonic).
//!
//! Two trust modes:
//! - [`Trust::Pinned`]: before enrollment the agent knows only the CA's pin. The server's chain must
//!   contain a certificate whose SPKI hash equals the pin, and the server certificate must verify
//!   against it. The bootstrap token is sent only over such a connection.
//! - [`Trust::Ca`]: after enrollment the agent trusts exactly the fleet CA it stored.
//!
//! Failures are turned into one-line explanations by [`explain`].
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use thiserror::Error;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pin::CaPin;

#[derive(Debug, Error)]
pub enum DialError {
    #[error("controller address {0:?} is not of the form HOST:PORT")]
    BadAddress(String),
    #[error("invalid TLS material: {0}")]
    BadTlsMaterial(String),
    #[error("cannot reach controller at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
}

/// What the agent trusts when it dials.
#[derive(Clone)]
pub enum Trust {
    Pinned(CaPin),
    Ca(CertificateDer<'static>),
}

/// A client certificate chain and its key.
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// Tuning knobs for a dial.
#[derive(Debug, Clone)]
pub struct DialOptions {
    pub connect_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// An HTTP CONNECT proxy to go through (see [`crate::proxy::Proxy::choose`]).
    pub proxy: Option<crate::proxy::Proxy>,
}

impl Default for DialOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            proxy: None,
        }
    }
}

/// Split `HOST:PORT` (IPv6 as `[::1]:9443`) into host and port.
pub fn split_host_port(addr: &str) -> Result<(String, u16), DialError> {
    let bad = || DialError::BadAddress(addr.to_string());
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(bad)?;
        (h.to_string(), p)
    } else {
        let (h, p) = addr.rsplit_once(':').ok_or_else(bad)?;
        (h.to_string(), p)
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host, port))
}

fn server_name(host: &str) -> Result<ServerName<'static>, DialError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_string()).map_err(|_| DialError::BadAddress(host.to_string()))
}

/// Records what the pinned verifier saw, so a mismatch can be explained precisely.
#[derive(Debug, Default, Clone)]
pub struct PinReport(Arc<Mutex<Option<String>>>);

impl PinReport {
    pub fn take(&self) -> Option<String> {
        self.0.lock().ok().and_then(|mut g| g.take())
    }
    fn set(&self, msg: String) {
        if let Ok(mut g) = self.0.lock() {
            *g = Some(msg);
        }
    }
}

#[derive(Debug)]
struct PinnedCaVerifier {
    pin: CaPin,
    provider: Arc<CryptoProvider>,
    report: PinReport,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut seen = Vec::new();
        for candidate in intermediates.iter().chain(std::iter::once(end_entity)) {
            match CaPin::of_cert_der(candidate) {
                Ok(p) if p == self.pin => {
                    let mut roots = RootCertStore::empty();
                    roots.add(candidate.clone().into_owned())?;
                    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                        .build()
                        .map_err(|e| rustls::Error::General(e.to_string()))?;
                    return inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now);
                }
                Ok(p) => seen.push(p.to_string()),
                Err(_) => {}
            }
        }
        let msg = format!(
            "the controller's CA does not match the pin: expected {}, controller presented {}",
            self.pin,
            if seen.is_empty() { "no parsable certificate".to_string() } else { seen.join(", ") }
        );
        self.report.set(msg.clone());
        Err(rustls::Error::General(msg))
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

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Build the rustls client configuration for a trust mode and optional client identity.
pub fn client_config(
    trust: &Trust,
    identity: Option<ClientIdentity>,
    report: PinReport,
) -> Result<ClientConfig, DialError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| DialError::BadTlsMaterial(e.to_string()))?;
    let builder = match trust {
        Trust::Pinned(pin) => builder.dangerous().with_custom_certificate_verifier(Arc::new(PinnedCaVerifier {
            pin: pin.clone(),
            provider,
            report,
        })),
        Trust::Ca(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add(ca.clone()).map_err(|e| DialError::BadTlsMaterial(format!("fleet CA certificate: {e}")))?;
            builder.with_root_certificates(roots)
        }
    };
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain, id.key)
            .map_err(|e| DialError::BadTlsMaterial(format!("client certificate/key: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Open a gRPC channel to `addr` (HOST:PORT) with the given TLS client configuration.
pub async fn connect(addr: &str, config: ClientConfig, opts: &DialOptions) -> Result<Channel, DialError> {
    let (host, port) = split_host_port(addr)?;
    let name = server_name(&host)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let target = format!("{}:{}", if host.contains(':') { format!("[{host}]") } else { host.clone() }, port);
    let uri: Uri = format!("http://{target}").parse().map_err(|_| DialError::BadAddress(addr.to_string()))?;
    let dial_target = target.clone();
    let (proxy, proxy_timeout) = (opts.proxy.clone(), opts.connect_timeout);
    let service = tower::service_fn(move |_uri: Uri| {
        let connector = connector.clone();
        let name = name.clone();
        let dial_target = dial_target.clone();
        let proxy = proxy.clone();
        async move {
            // TLS runs end to end: through a proxy, only the TCP leg changes.
            let tcp = match &proxy {
                Some(p) => p.tunnel(&dial_target, proxy_timeout).await.map_err(std::io::Error::other)?,
                None => tokio::net::TcpStream::connect(&dial_target).await?,
            };
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Endpoint::from(uri)
        .connect_timeout(opts.connect_timeout)
        .http2_keep_alive_interval(opts.keepalive_interval)
        .keep_alive_timeout(opts.keepalive_timeout)
        .keep_alive_while_idle(true)
        // Room for whole blob chunks in flight (HTTP/2's default 64 KiB window would cost a
        // round trip per 64 KiB); credits, not buffers, so idle sessions cost nothing.
        .initial_stream_window_size(Some(2 << 20))
        .initial_connection_window_size(Some(4 << 20))
        .connect_with_connector(service)
        .await
        .map_err(|e| DialError::Unreachable { addr: addr.to_string(), reason: explain(&e) })
}

/// Turn a transport/TLS error chain into one actionable sentence.
pub fn explain(err: &(dyn std::error::Error + 'static)) -> String {
    let chain: Vec<&(dyn std::error::Error + 'static)> = std::iter::successors(Some(err), |e| e.source()).collect();
    // A TLS error anywhere in the chain says the most.
    for e in &chain {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return explain_tls(tls);
        }
        if let Some(tls) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return explain_tls(tls);
        }
    }
    for e in &chain {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    return "connection refused (is the controller running and listening there?)".into()
                }
                std::io::ErrorKind::TimedOut => return "connection timed out (firewall or wrong address?)".into(),
                _ => {}
            }
        }
    }
    let text: Vec<String> = chain.iter().map(|e| e.to_string()).collect();
    let all = text.join(": ");
    if all.contains("fatal alert: CertificateRequired") {
        return explain_tls(&rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired));
    }
    if all.contains("fatal alert: CertificateExpired") {
        return explain_tls(&rustls::Error::AlertReceived(rustls::AlertDescription::CertificateExpired));
    }
    if all.contains("fatal alert: UnknownCA")
        || all.contains("fatal alert: BadCertificate")
        || all.contains("fatal alert: DecryptError")
    {
        return explain_tls(&rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate));
    }
    if all.contains("timed out") {
        return "connection timed out (firewall or wrong address?)".into();
    }
    if all.contains("connection reset")
        || all.contains("broken pipe")
        || all.contains("connection closed")
        || all.contains("early eof")
        || all.contains("UnexpectedEof")
    {
        return "the controller closed the connection (it may have rejected this node's certificate)".into();
    }
    text.last().cloned().unwrap_or_default()
}

fn explain_tls(err: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match err {
        E::General(msg) => msg.clone(),
        E::InvalidCertificate(C::NotValidForName) | E::InvalidCertificate(C::NotValidForNameContext { .. }) => {
            "the controller's certificate does not cover the address dialled; restart the controller with --advertise-address set to it".into()
        }
        E::InvalidCertificate(C::UnknownIssuer) | E::InvalidCertificate(C::BadSignature) => {
            "the controller's certificate is not issued by the fleet CA this node trusts (wrong controller, or its CA was replaced)".into()
        }
        E::InvalidCertificate(C::Expired) | E::InvalidCertificate(C::ExpiredContext { .. }) => {
            "the controller's certificate has expired".into()
        }
        E::AlertReceived(A::CertificateRequired) => {
            "the controller requires a client certificate; enroll this node first".into()
        }
        E::AlertReceived(A::BadCertificate | A::UnknownCA | A::CertificateUnknown | A::DecryptError) => {
            "the controller rejected this node's client certificate (issued by another CA?); re-enroll with a new token".into()
        }
        E::AlertReceived(A::CertificateExpired) => {
            "the controller rejected this node's client certificate as expired; re-enroll with a new token and --force".into()
        }
        other => format!("TLS error: {other}"),
    }
}

/// Explain a failed RPC: transport failures get the TLS/IO explanation, others their message.
pub fn explain_status(status: &tonic::Status) -> String {
    use std::error::Error;
    if let Some(src) = status.source() {
        let s = explain(src);
        if !s.is_empty() {
            return s;
        }
    }
    let msg = status.message();
    if msg.is_empty() {
        format!("{:?}", status.code())
    } else {
        msg.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_parsing() {
        assert_eq!(split_host_port("10.0.0.1:9443").unwrap(), ("10.0.0.1".into(), 9443));
        assert_eq!(split_host_port("[::1]:9443").unwrap(), ("::1".into(), 9443));
        assert_eq!(split_host_port("ctl.example:1").unwrap(), ("ctl.example".into(), 1));
        for bad in ["", "host", "host:", ":9443", "host:0", "host:99999", "[::1]9443"] {
            assert!(split_host_port(bad).is_err(), "{bad}");
        }
    }
}

//! The agent port: TCP accept with connection limits, the TLS handshake under a deadline, the
//! serving certificate swapped in while the daemon runs, and idle connections closed. What comes
//! out is a stream of TLS connections for the gRPC server (enrollment and the Agent API).
pub mod accept;
pub mod cert;
pub mod conn;
pub mod log_budget;

pub use accept::{incoming, Limits, ListenStats};
pub use cert::{keep_fresh, ServingCert};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ListenError {
    #[error("the serving certificate or key is not usable")]
    BadIdentity(#[source] rustls::Error),
    #[error("the serving certificate PEM is invalid")]
    Pem(#[source] rustls::pki_types::pem::Error),
    #[error("TLS configuration")]
    Tls(#[source] rustls::Error),
    #[error("client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

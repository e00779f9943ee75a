//! Code shared by the fleetadm controller and node-agent.
//!
//! - [`pin`]: the CA pin (`sha256:` over the CA's SubjectPublicKeyInfo), as kubeadm computes it.
//! - [`token`]: kubeadm-format bootstrap tokens.
//! - [`dial`]: the agent's TLS dialer (pinned or trusted CA, optional client certificate) and the
//!   translation of TLS/transport failures into one-line, actionable messages.
//! - [`fsutil`]: atomic and private (0600) file writes.
//! - [`logging`]: journald under systemd, stderr otherwise.
//! - [`output`]: table / json / yaml rendering for CLIs.
//! - [`clock`]: wall-clock helpers.
#![forbid(unsafe_code)]

pub mod clock;
pub mod dial;
pub mod fsutil;
pub mod logging;
pub mod output;
pub mod pin;
pub mod token;

/// Install the process-wide rustls crypto provider (ring). Call first thing in `main` and in tests.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

//! Code shared by the fleetadm controller and node-agent.
//!
//! - [`pin`]: the CA pin (`sha256:` over the CA's SubjectPublicKeyInfo), as kubeadm computes it.
//! - [`token`]: kubeadm-format bootstrap tokens.
//! - [`dial`]: the agent's TLS dialer (pinned or trusted CA, optional client certificate) and the
//!   translation of TLS/transport failures into one-line, actionable messages.
//! - [`proxy`]: HTTP CONNECT proxies (a bastion's), with `HTTPS_PROXY`/`NO_PROXY`.
//! - [`fsutil`]: atomic and private (0600) file writes.
//! - [`logging`]: journald under systemd, stderr otherwise.
//! - [`output`]: table / json / yaml rendering for CLIs.
//! - [`certs`]: what a host's Kubernetes certificates say (kubeadm names, expiry, SANs).
//! - [`clock`]: wall-clock helpers.
//! - [`tasks`]: helpers around the protocol's task messages (bundle files, digests, path checks).
#![forbid(unsafe_code)]

pub mod certs;
pub mod clock;
pub mod config;
pub mod dial;
pub mod docs;
pub mod fsutil;
pub mod logging;
pub mod output;
pub mod pin;
#[cfg(test)]
mod props;
pub mod proxy;
pub mod redact;
pub mod tasks;
pub mod token;

/// Install the process-wide rustls crypto provider (ring). Call first thing in `main` and in tests.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Tell systemd a `Type=notify` service is ready (no-op outside systemd).
pub fn notify_ready() {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// An error and its causes on one line, `outer: cause: root cause` (repeated texts once): the one
/// place error chains are formatted for task reports, cluster messages and CLI output.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

#[cfg(test)]
mod chain_tests {
    #[derive(Debug, thiserror::Error)]
    #[error("installing files")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chains_causes() {
        let e = Outer(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied"));
        assert_eq!(super::error_chain(&e), "installing files: denied");
    }
}
